"""The model a Triton server serves, checked against the local package's manifest.

The package decides everything around the model (preprocessing, patch size, labels), so the served model must
take and give exactly what the manifest says: one FP32 input and the FP32 output by the manifest's names, the
manifest's channel counts, spatial dimensions that are dynamic or equal to the patch size, and, when the entry
was written by ``edge-export triton``, the same model file (its SHA-256 in the config's parameters).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edge_runtime.errors import RunnerError
from edge_runtime.inference.package import ModelPackage

#: model-config parameter written by ``edge-export triton``: the SHA-256 of the model file in the entry
SHA_PARAMETER = "edge_runtime.model_sha256"
#: the config.pbtxt parameter naming the package (name and version) the repository entry was written from
PACKAGE_PARAMETER = "edge_runtime.package"


@dataclass(frozen=True)
class ServedModel:
    """What the runner needs to know of the served model once it matches the manifest."""

    #: the config's ``max_batch_size``: > 0, Triton owns the batch axis (and its dynamic batcher may merge
    #: requests); 0, the model's own dims include the batch
    max_batch_size: int
    #: at most this many windows per request (the server's batch limit, or a fixed batch dimension); None: any
    chunk: int | None
    #: the served model file's SHA-256 when the entry records it
    model_sha256: str | None


def check_served_model(config: Any, package: ModelPackage, where: str) -> ServedModel:
    """Compare the served model's config (``ModelConfig``) with the manifest; every problem is reported at
    once in one :class:`RunnerError` that starts with ``where`` (which model on which server)."""
    problems = []
    max_batch_size = int(config.max_batch_size)
    batched = max_batch_size > 0
    chunk: int | None = max_batch_size if batched else None
    inputs = {i.name: i for i in config.input}
    outputs = {o.name: o for o in config.output}
    fp32 = _data_type("TYPE_FP32")
    if len(inputs) != 1:
        problems.append(f"the served model has inputs {sorted(inputs)}; this runner sends exactly one")
    for tensors, name, channels, what in (
        (inputs, package.input_name, package.input_channels, "input"),
        (outputs, package.output_name, package.num_classes, "output"),
    ):
        if name not in tensors:
            problems.append(f"{what} {name!r} is not served (the model has {sorted(tensors)})")
            continue
        t = tensors[name]
        if t.data_type != fp32:
            problems.append(f"{what} {name!r} is {_data_type_name(t.data_type)}; this runner needs TYPE_FP32")
        dims = [int(d) for d in t.dims]
        per_item = dims if batched else dims[1:]
        if len(per_item) != 4:
            shown = (["batch"] if batched else []) + dims
            problems.append(f"{what} {name!r} has dims {shown}; expected (N, C, Z, Y, X)")
            continue
        if not batched and what == "input" and dims[0] > 0:
            chunk = dims[0]  # a fixed batch dimension: send exactly that many windows at a time
        if per_item[0] != -1 and per_item[0] != channels:
            needs = "the manifest's labels need" if what == "output" else "the manifest says"
            problems.append(f"the served {what} {name!r} has {per_item[0]} channels; {needs} {channels}")
        if any(d != -1 and d != p for d, p in zip(per_item[1:], package.patch_size, strict=True)):
            problems.append(
                f"{what} {name!r} has fixed spatial dims {per_item[1:]}, not the patch size {list(package.patch_size)}"
            )
    sha = config.parameters[SHA_PARAMETER].string_value if SHA_PARAMETER in config.parameters else ""
    if sha and package.model_sha256 and sha != package.model_sha256:
        problems.append(
            f"the served model file has sha256 {sha}; the local package's model has {package.model_sha256} "
            "(re-export the Triton entry from this package, or use the package it was exported from)"
        )
    if problems:
        raise RunnerError(f"{where} does not match its manifest: " + "; ".join(problems))
    return ServedModel(max_batch_size=max_batch_size, chunk=chunk, model_sha256=sha or None)


def _data_type(name: str) -> int:
    from tritonclient.grpc import model_config_pb2

    return int(model_config_pb2.DataType.Value(name))


def _data_type_name(value: int) -> str:
    from tritonclient.grpc import model_config_pb2

    try:
        return str(model_config_pb2.DataType.Name(value))
    except ValueError:
        return str(value)
