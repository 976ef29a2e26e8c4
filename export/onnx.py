"""Saver: a ``torch.nn.Module`` to a checked ONNX file with dynamic batch and spatial axes."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18
#: protobuf cannot hold a model above 2 GiB; above this the weights go to an external data file
EXTERNAL_DATA_BYTES = 1_800_000_000


def export_onnx(
    module: object,
    path: Path,
    *,
    example_shape: tuple[int, int, int, int, int],
    input_name: str = "image",
    output_name: str = "logits",
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Export ``module`` to ``path`` (opset >= 17, dynamic N/Z/Y/X) and run ``onnx.checker`` on the result."""
    import onnx
    import torch

    if opset < 17:
        raise ValueError(f"opset {opset} requested; the runtime needs opset 17 or newer")
    module = module.eval()  # type: ignore[attr-defined]
    params = sum(p.numel() * p.element_size() for p in module.parameters())  # type: ignore[attr-defined]
    external = params > EXTERNAL_DATA_BYTES
    example = torch.zeros(example_shape, dtype=torch.float32)
    axes = {0: "batch", 2: "z", 3: "y", 4: "x"}
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=[input_name],
            output_names=[output_name],
            opset_version=opset,
            dynamo=True,
            dynamic_axes={input_name: axes, output_name: axes},
            external_data=external,
        )
    onnx.checker.check_model(str(path), full_check=True)
    log.info("exported %s (opset %d, %s)", path.name, opset, "external data" if external else "single file")
    return path
