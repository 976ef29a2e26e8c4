"""Saver: a TensorRT engine for a model package (``edge-export engine PACKAGE --precision fp32|fp16|int8``).

The builder itself lives in :mod:`edge_runtime.inference.runner.tensorrt.engine` (it needs only ``tensorrt``, so
a device can rebuild its own engine); this module adds the workstation-side checks that need ``onnx``: an
``int8`` engine is built from an explicitly quantised (Q/DQ) model, which
``edge-export quantize`` writes as a package of its own.
"""

from __future__ import annotations

import logging
from pathlib import Path

from edge_runtime.inference.package import ModelPackage
from edge_runtime.inference.runner.tensorrt import engine as engines

log = logging.getLogger(__name__)

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def count_qdq_nodes(onnx_path: Path) -> int:
    """Q/DQ nodes in an ONNX graph (0 for a float model)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return sum(1 for node in model.graph.node if node.op_type in QDQ_OPS)


def check_model_for_precision(package: ModelPackage, precision: str) -> None:
    """Refuse what TensorRT would refuse or silently do badly, before a GPU is touched."""
    engines.check_precision(precision)
    qdq = count_qdq_nodes(package.model_path)
    if precision == "int8" and qdq == 0:
        raise engines.EngineError(
            f"int8 engines are built from an explicitly quantised model; {package.model_path.name} in "
            f"{package.root} has no QuantizeLinear/DequantizeLinear nodes. Run: edge-export quantize "
            f"{package.root} --out DIR, then: edge-export engine DIR --precision int8"
        )
    if precision != "int8" and qdq:
        raise engines.EngineError(
            f"{package.model_path.name} is quantised ({qdq} Q/DQ nodes): build it with --precision int8"
        )


def build_package_engine(
    package_dir: Path,
    precision: str,
    *,
    timing_cache: Path | None = None,
    max_batch: int | None = None,
    device: int = 0,
    workspace_gb: float = 4.0,
) -> tuple[Path, engines.EngineInfo]:
    """Build ``model.<precision>.smXY.engine`` (+ key sidecar) in ``package_dir``; the timing cache is kept
    in the package (or at ``timing_cache``) for the next build."""
    package = ModelPackage.load(package_dir)
    check_model_for_precision(package, precision)
    return engines.build_engine(
        package,
        precision,
        device=device,
        max_batch=max_batch,
        timing_cache=timing_cache,
        workspace_bytes=int(workspace_gb * (1 << 30)),
        progress=True,
    )
