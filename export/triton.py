"""``edge-export triton``: write a Triton Inference Server model-repository entry from a model package.

The entry is what Triton's ONNX Runtime backend loads, plus the package's manifest beside the config so a
runtime (or a person) can fetch the preprocessing settings from the same place as the model::

    <repo>/<model_name>/config.pbtxt      platform onnxruntime_onnx, FP32 tensors, dynamic batching
    <repo>/<model_name>/manifest.json     the package's manifest, verbatim
    <repo>/<model_name>/<version>/model.onnx

Input and output names, channel counts and data types come from the package and are checked against the
ONNX graph; spatial dimensions the graph leaves symbolic are written as -1, so one entry serves any window
size. The batch axis is Triton's (``max_batch_size`` > 0), which needs a model exported with a dynamic
batch dimension. ``config.pbtxt`` also carries the package identity and the model's SHA-256 as
``parameters`` (``edge_runtime.package``, ``edge_runtime.model_sha256``); ``TritonRunner`` compares the
latter with its local package, so a runtime never blends a Triton model with another model's manifest.

Files are written to temporary names and renamed into place (model first, config last), so a Triton
server polling the repository never loads a half-written entry.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from edge_runtime.errors import ExportError
from edge_runtime.inference.package import MANIFEST_NAME, ModelPackage
from edge_runtime.inference.runner.triton.served_model import PACKAGE_PARAMETER, SHA_PARAMETER

KINDS = ("KIND_GPU", "KIND_CPU")
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
ONNX_FLOAT = "tensor(float)"


class TritonExportError(ExportError, ValueError):
    """The package cannot be written as a Triton model-repository entry (with these settings)."""


def write_triton_repository(
    package_dir: Path | str,
    repo_dir: Path | str,
    *,
    model_name: str | None = None,
    max_batch_size: int = 8,
    instances: int = 1,
    kind: str = "KIND_GPU",
    version: int = 1,
    preferred_batch_sizes: list[int] | None = None,
    max_queue_delay_us: int = 100,
    gpus: list[int] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``<repo_dir>/<model_name>/`` for the package at ``package_dir``; returns that folder.

    ``model_name`` defaults to the manifest's name. ``kind`` is ``KIND_GPU`` or ``KIND_CPU`` (``gpu`` and
    ``cpu`` are accepted too); ``gpus`` pins GPU instances to device ids. ``preferred_batch_sizes`` defaults
    to multiples of the package's batch size up to ``max_batch_size`` (the sliding window sends requests of
    that size, so several in flight merge into these). An existing version folder is an error unless
    ``overwrite``; other versions already in the entry are left alone.
    """
    package = ModelPackage.load(package_dir)
    name = model_name or package.name
    kind = _kind(kind)
    problems = []
    if not MODEL_NAME_RE.match(name):
        problems.append(
            f"model name {name!r} must be letters, digits, '.', '_' or '-' (and start with a letter or digit)"
        )
    if max_batch_size < 1:
        problems.append(f"max_batch_size must be >= 1, got {max_batch_size}")
    if instances < 1:
        problems.append(f"instances must be >= 1, got {instances}")
    if version < 1:
        problems.append(f"version must be >= 1, got {version}")
    if max_queue_delay_us < 0:
        problems.append(f"max_queue_delay_us must be >= 0, got {max_queue_delay_us}")
    if gpus and kind != "KIND_GPU":
        problems.append("gpus only applies to KIND_GPU instances")
    if preferred_batch_sizes is None:
        preferred = default_preferred_batch_sizes(package.batch_size, max_batch_size)
    else:
        preferred = sorted(set(preferred_batch_sizes))
        bad = [b for b in preferred if not 1 <= b <= max_batch_size]
        if bad:
            problems.append(
                f"preferred batch sizes must be in 1..max_batch_size ({max_batch_size}), got {bad}"
            )
    if problems:
        raise TritonExportError("cannot write a Triton entry: " + "; ".join(problems))

    input_dims, output_dims = _model_dims(package)
    entry = Path(repo_dir) / name
    version_dir = entry / str(version)
    if version_dir.exists() and not overwrite:
        raise TritonExportError(
            f"{version_dir} already exists (pass overwrite=True / --overwrite to replace it)"
        )
    version_dir.mkdir(parents=True, exist_ok=True)

    config = render_config(
        name=name,
        input_name=package.input_name,
        output_name=package.output_name,
        input_dims=input_dims,
        output_dims=output_dims,
        max_batch_size=max_batch_size,
        preferred_batch_sizes=preferred,
        max_queue_delay_us=max_queue_delay_us,
        instances=instances,
        kind=kind,
        gpus=gpus,
        parameters={
            PACKAGE_PARAMETER: package.identity,
            SHA_PARAMETER: package.model_sha256,
        },
    )
    _copy_atomic(package.model_path, version_dir / "model.onnx")
    _copy_atomic(package.root / MANIFEST_NAME, entry / MANIFEST_NAME)
    _write_atomic(entry / "config.pbtxt", config)
    return entry


def default_preferred_batch_sizes(package_batch: int, max_batch_size: int) -> list[int]:
    """Multiples of the package's batch size (x1, x2, x4, ...) that fit in ``max_batch_size``."""
    sizes = []
    b = max(1, package_batch)
    while b <= max_batch_size:
        sizes.append(b)
        b *= 2
    return sizes or [max_batch_size]


def render_config(
    *,
    name: str,
    input_name: str,
    output_name: str,
    input_dims: list[int],
    output_dims: list[int],
    max_batch_size: int,
    preferred_batch_sizes: list[int],
    max_queue_delay_us: int,
    instances: int,
    kind: str,
    gpus: list[int] | None = None,
    parameters: dict[str, str] | None = None,
) -> str:
    """``config.pbtxt`` text (protobuf text format of Triton's ``ModelConfig``)."""

    def dims(values: list[int]) -> str:
        return "[ " + ", ".join(str(v) for v in values) + " ]"

    group = f"count: {instances}\n    kind: {kind}"
    if gpus:
        group += f"\n    gpus: {dims(gpus)}"
    lines = [
        f"name: {_q(name)}",
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {max_batch_size}",
        "input [",
        "  {",
        f"    name: {_q(input_name)}",
        "    data_type: TYPE_FP32",
        f"    dims: {dims(input_dims)}",
        "  }",
        "]",
        "output [",
        "  {",
        f"    name: {_q(output_name)}",
        "    data_type: TYPE_FP32",
        f"    dims: {dims(output_dims)}",
        "  }",
        "]",
        "dynamic_batching {",
        f"  preferred_batch_size: {dims(preferred_batch_sizes)}",
        f"  max_queue_delay_microseconds: {max_queue_delay_us}",
        "}",
        "instance_group [",
        "  {",
        f"    {group}",
        "  }",
        "]",
    ]
    for key, value in (parameters or {}).items():
        lines += [
            "parameters {",
            f"  key: {_q(key)}",
            f"  value: {{ string_value: {_q(value)} }}",
            "}",
        ]
    return "\n".join(lines) + "\n"


def _model_dims(package: ModelPackage) -> tuple[list[int], list[int]]:
    """Per-item dims (batch axis dropped) of the model's input and output, -1 where the graph is symbolic."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(package.model_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own C++ exception types
        raise TritonExportError(f"ONNX Runtime could not load {package.model_path}: {exc}") from exc
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    problems = []
    if len(inputs) != 1:
        problems.append(f"the model must have exactly one input, it has {sorted(inputs)}")
    if package.input_name not in inputs:
        problems.append(f"input {package.input_name!r} not in the model (it has {sorted(inputs)})")
    if package.output_name not in outputs:
        problems.append(f"output {package.output_name!r} not in the model (it has {sorted(outputs)})")
    if problems:
        raise TritonExportError("model does not match its manifest: " + "; ".join(problems))
    result = []
    for arg, channels, what in (
        (inputs[package.input_name], package.input_channels, "input"),
        (outputs[package.output_name], package.num_classes, "output"),
    ):
        if arg.type != ONNX_FLOAT:
            problems.append(f"{what} {arg.name!r} is {arg.type}; Triton entries are written as TYPE_FP32")
        shape = list(arg.shape)
        if len(shape) != 5:
            problems.append(f"{what} {arg.name!r} has shape {shape}; expected (N, C, Z, Y, X)")
            continue
        if isinstance(shape[0], int) and shape[0] > 0:
            problems.append(
                f"{what} {arg.name!r} has a fixed batch dimension {shape[0]}; re-export with a dynamic batch "
                "axis for Triton's batching"
            )
        if isinstance(shape[1], int) and shape[1] > 0 and shape[1] != channels:
            problems.append(f"{what} {arg.name!r} has {shape[1]} channels; the manifest needs {channels}")
        spatial = [d if isinstance(d, int) and d > 0 else -1 for d in shape[2:]]
        fixed = [(d, p) for d, p in zip(spatial, package.patch_size, strict=True) if d != -1 and d != p]
        if fixed:
            problems.append(
                f"{what} {arg.name!r} has fixed spatial dims {shape[2:]} that differ from the patch size "
                f"{list(package.patch_size)}"
            )
        result.append([channels, *spatial])
    if problems:
        raise TritonExportError("model does not fit a Triton entry: " + "; ".join(problems))
    return result[0], result[1]


def _kind(kind: str) -> str:
    k = kind.upper()
    if not k.startswith("KIND_"):
        k = "KIND_" + k
    if k not in KINDS:
        raise TritonExportError(f"instance kind {kind!r} is not one of {', '.join(KINDS)}")
    return k


def _q(text: str) -> str:
    """A protobuf text-format string literal (JSON escaping is a subset it accepts for these strings)."""
    return json.dumps(text, ensure_ascii=True)


def _copy_atomic(src: Path, dst: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", dir=dst.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_atomic(dst: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", dir=dst.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def add_triton_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``triton`` subcommand to ``edge-export``'s subparsers; it runs via ``args.func(args)``."""
    p = subparsers.add_parser(
        "triton",
        help="write a Triton model-repository entry (config.pbtxt + model.onnx + manifest.json)",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--package", type=Path, required=True, help="model package folder (with manifest.json)")
    p.add_argument("--repo", type=Path, required=True, help="Triton model repository folder")
    p.add_argument("--model-name", default=None, help="default: the manifest's name")
    p.add_argument("--version", type=int, default=1)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--instances", type=int, default=1, help="model instances (instance_group count)")
    p.add_argument("--kind", default="KIND_GPU", help="KIND_GPU (default) or KIND_CPU")
    p.add_argument("--gpus", type=int, nargs="+", default=None, help="GPU ids for the instances")
    p.add_argument("--preferred-batch-sizes", type=int, nargs="+", default=None)
    p.add_argument("--max-queue-delay-us", type=int, default=100)
    p.add_argument("--overwrite", action="store_true", help="replace an existing version folder")
    p.set_defaults(func=run_triton_command)
    return p


def run_triton_command(args: argparse.Namespace) -> int:
    import sys

    from edge_runtime.inference.package import PackageError

    try:
        entry = write_triton_repository(
            args.package,
            args.repo,
            model_name=args.model_name,
            max_batch_size=args.max_batch_size,
            instances=args.instances,
            kind=args.kind,
            version=args.version,
            preferred_batch_sizes=args.preferred_batch_sizes,
            max_queue_delay_us=args.max_queue_delay_us,
            gpus=args.gpus,
            overwrite=args.overwrite,
        )
    except (TritonExportError, PackageError) as exc:
        print(f"edge-export triton: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {entry}")
    return 0
