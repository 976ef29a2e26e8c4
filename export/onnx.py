"""Saver: a ``torch.nn.Module`` to a checked ONNX file with dynamic batch and spatial axes.

Steps: export (``torch.onnx`` with the ``torch.export`` exporter; TorchScript modules, which ``torch.export``
cannot trace, go through the TorchScript exporter), name the dynamic axes ``batch``/``z``/``y``/``x``,
simplify the graph with ``onnxslim`` when it is installed (optional: without it the graph is kept as exported,
with a logged note), save (weights to an external data file above 2 GB) and run ``onnx.checker``.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18
#: protobuf cannot hold a model above 2 GiB; above this the weights go to an external data file
EXTERNAL_DATA_BYTES = 1_800_000_000
AXIS_NAMES = {0: "batch", 2: "z", 3: "y", 4: "x"}
EXPORTERS = ("auto", "dynamo", "torchscript")


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx_with_info` wrote and how."""

    path: Path
    opset: int
    exporter: str
    external_data: bool
    simplified: bool
    nodes_exported: int
    nodes_saved: int
    note: str = ""


def export_onnx(module: object, path: Path, **options: Any) -> Path:
    """Export ``module`` to ``path`` (opset >= 17, dynamic N/Z/Y/X) and run ``onnx.checker`` on the result.

    Takes the keyword arguments of :func:`export_onnx_with_info` (``example_shape`` is required) and returns
    only the path of the saved graph.
    """
    return export_onnx_with_info(module, path, **options).path


def export_onnx_with_info(
    module: object,
    path: Path,
    *,
    example_shape: tuple[int, int, int, int, int],
    input_name: str = "image",
    output_name: str = "logits",
    opset: int = DEFAULT_OPSET,
    simplify: bool = True,
    exporter: str = "auto",
) -> OnnxExport:
    """Export ``module`` to ``path`` (opset >= 17, dynamic N/Z/Y/X), check the result with ``onnx.checker`` and
    return what was done (exporter, simplification, node counts)."""
    import onnx
    import torch

    if opset < 17:
        raise ValueError(f"opset {opset} requested; the runtime needs opset 17 or newer")
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter is {exporter!r}; allowed: {', '.join(EXPORTERS)}")
    module = module.eval()  # type: ignore[attr-defined]
    if exporter == "auto":
        scripted = any(isinstance(m, torch.jit.ScriptModule) for m in module.modules())  # type: ignore[attr-defined]
        exporter = "torchscript" if scripted else "dynamo"
    params = sum(p.numel() * p.element_size() for p in module.parameters())  # type: ignore[attr-defined]
    external = params > EXTERNAL_DATA_BYTES
    example = torch.zeros(example_shape, dtype=torch.float32)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        # torch.onnx's own deprecation chatter, raised inside the exporter, not by our arguments
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*isinstance\(treespec, LeafSpec\)")
        options: dict[str, Any]
        if exporter == "dynamo":
            dim = torch.export.Dim.DYNAMIC
            options = {
                "dynamo": True,
                "dynamic_shapes": ({axis: dim for axis in AXIS_NAMES},),
                "external_data": external,
                "verbose": False,
            }
        else:
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*legacy TorchScript-based ONNX")
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=r"The feature will be removed")
            # InstanceNorm without running statistics normalises with the input's own: that *is* eval behaviour
            warnings.filterwarnings("ignore", category=UserWarning, message=r".*'instance_norm' is set to train=True")
            # a loaded ScriptModule has no Python signature; inputs are passed positionally anyway
            warnings.filterwarnings(
                "ignore", category=UserWarning, message=r"no signature found for <torch\.ScriptMethod"
            )
            options = {"dynamo": False, "dynamic_axes": {input_name: AXIS_NAMES, output_name: AXIS_NAMES}}
        torch.onnx.export(
            module,  # type: ignore[arg-type]
            (example,),
            str(path),
            input_names=[input_name],
            output_names=[output_name],
            opset_version=opset,
            **options,
        )
    model = onnx.load(str(path))
    exported_nodes = len(model.graph.node)
    _name_axes(model, input_name, output_name)
    simplified, note = False, ""
    if simplify:
        model, simplified, note = _simplify(model, external)  # type: ignore[assignment]
    strip_provenance(model)
    _save(model, path, external)
    onnx.checker.check_model(str(path), full_check=True)
    saved_opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=opset)
    if saved_opset < 17:
        raise RuntimeError(f"the saved graph has opset {saved_opset}; the runtime needs 17 or newer")
    result = OnnxExport(path, saved_opset, exporter, external, simplified, exported_nodes, len(model.graph.node), note)
    log.info(
        "exported %s (opset %d, %s exporter, %s, %d -> %d nodes%s)",
        path.name,
        saved_opset,
        exporter,
        "external data" if external else "single file",
        exported_nodes,
        result.nodes_saved,
        ", simplified with onnxslim" if simplified else f"; {note}" if note else "",
    )
    return result


def strip_provenance(model: object) -> None:
    """Drop the exporter's per-node stack traces and doc strings: they carry the build machine's file paths."""
    for node in model.graph.node:  # type: ignore[attr-defined]
        node.doc_string = ""
        keep = [p for p in node.metadata_props if not p.key.startswith("pkg.torch.onnx.")]
        del node.metadata_props[:]
        node.metadata_props.extend(keep)


def _name_axes(model: object, input_name: str, output_name: str) -> None:
    """Give the dynamic axes of the input and output readable names (the exporter numbers them)."""
    for value in [*model.graph.input, *model.graph.output]:  # type: ignore[attr-defined]
        if value.name not in (input_name, output_name):
            continue
        dims = value.type.tensor_type.shape.dim
        for axis, name in AXIS_NAMES.items():
            if axis < len(dims) and not dims[axis].HasField("dim_value"):
                dims[axis].dim_param = name


def _simplify(model: object, external: bool) -> tuple[object, bool, str]:
    if external:
        note = "graph not simplified: above 2 GB onnxslim cannot run shape inference in memory"
        log.info(note)
        return model, False, note
    try:
        import onnxslim
    except ImportError:
        note = "graph not simplified: onnxslim is not installed (pip install onnxslim)"
        log.info(note)
        return model, False, note
    try:
        slim = onnxslim.slim(model)
    except Exception as exc:  # onnxslim raises whatever its passes raise; keep the checked, unsimplified graph
        note = f"graph not simplified: onnxslim failed ({type(exc).__name__}: {exc})"
        log.warning(note)
        return model, False, note
    if slim is None:
        return model, False, "graph not simplified: onnxslim returned nothing"
    return slim, True, ""


def _save(model: object, path: Path, external: bool) -> None:
    import onnx

    data = path.with_name(path.name + ".data")
    if external:
        data.unlink(missing_ok=True)
        onnx.save_model(
            model,  # type: ignore[arg-type]
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data.name,
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(path))  # type: ignore[arg-type]
        data.unlink(missing_ok=True)
