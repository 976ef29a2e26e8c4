"""Saver: an INT8 package from an FP32 one, by explicit (Q/DQ) post-training quantisation.

``onnxruntime.quantization.quantize_static`` in QDQ format with per-channel INT8 weights and symmetric INT8
activations (what TensorRT's explicit quantisation needs, and what ONNX Runtime runs on the CPU), calibrated on
normalised windows of seeded phantom CT volumes (:class:`PhantomCalibrationReader`). The result is a package
of its own (``model.onnx`` is the INT8 graph; the manifest says where it came from), so every runner loads it
as it loads any package, and ``edge-export engine DIR --precision int8`` builds a TensorRT engine from it.

The gate compares INT8 with FP32 in ONNX Runtime through the runtime's sliding window on phantom volumes not
used for calibration: per-label Dice between the two label maps (``min_dice``), plus the logit errors per
window for the record (not gated: INT8 logits are not meant to match to 1e-3).
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.inference.package import MANIFEST_NAME, ModelPackage
from edge_runtime.inference.pipeline import window_starts
from export.parity import ParityReport, compare_outputs, label_agreement, phantom_volumes, window_inputs

log = logging.getLogger(__name__)

METHODS = ("minmax", "percentile", "entropy")
INT8_MODEL = "model.int8.onnx"


@dataclass(frozen=True)
class QuantizeOptions:
    calibration_volumes: int = 4
    windows_per_volume: int = 8
    method: str = "minmax"
    per_channel: bool = True
    #: symmetric INT8 activations (zero point 0): required by TensorRT, fine for ONNX Runtime
    symmetric_activations: bool = True
    #: operators whose inputs and outputs get Q/DQ; normalisation and activations stay float (TensorRT's advice
    #: for explicit quantisation; on the CPU it measured as fast as quantising everything, and closer to FP32)
    op_types: tuple[str, ...] = ("Conv", "ConvTranspose", "MatMul", "Gemm")
    #: run ONNX Runtime's quant_pre_process (shape inference + graph optimisation) first
    preprocess: bool = True
    #: calibration volumes use seeds ``seed, seed + 1, ...``; the gate uses ``gate_seed ...``
    seed: int = 1000
    gate_seed: int = 2000
    gate_volumes: int = 1
    min_dice: float = 0.90
    volume_shape: tuple[int, int, int] | None = None


def _reader_base() -> type:
    from onnxruntime.quantization import CalibrationDataReader

    return CalibrationDataReader


class PhantomCalibrationReader:
    """Calibration batches for ``quantize_static``: ``windows_per_volume`` patches (batch 1) from each of
    ``volumes`` normalised phantom volumes on the model grid, chosen at random among the sliding-window
    positions (so body, air and edges are all represented)."""

    def __init__(
        self,
        package: ModelPackage,
        *,
        volumes: int,
        windows_per_volume: int,
        seed: int,
        shape: tuple[int, int, int] | None = None,
    ):
        self.package = package
        self.windows: list[np.ndarray] = []
        rng = np.random.default_rng(seed)
        patch = package.patch_size
        for image in phantom_volumes(package, [seed + i for i in range(volumes)], shape).values():
            starts = [
                window_starts(n, p, package.overlap) for n, p in zip(image.shape[1:], patch, strict=True)
            ]
            positions = [(z, y, x) for z in starts[0] for y in starts[1] for x in starts[2]]
            picks = rng.choice(len(positions), size=min(windows_per_volume, len(positions)), replace=False)
            for i in sorted(picks):
                z, y, x = positions[i]
                window = image[:, z : z + patch[0], y : y + patch[1], x : x + patch[2]]
                if window.shape[1:] == tuple(patch):
                    self.windows.append(np.ascontiguousarray(window[None]))
        if not self.windows:
            raise ValueError("no calibration windows: the phantom volumes are smaller than the patch")
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self.windows):
            return None
        self._next += 1
        return {self.package.input_name: self.windows[self._next - 1]}

    def rewind(self) -> None:
        self._next = 0

    def __len__(self) -> int:
        return len(self.windows)


def quantize_model(package: ModelPackage, out_path: Path, options: QuantizeOptions = QuantizeOptions()) -> Path:
    """Write the QDQ INT8 version of ``package``'s model to ``out_path``."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if options.method not in METHODS:
        raise ValueError(f"calibration method is {options.method!r}; allowed: {', '.join(METHODS)}")
    method = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }[options.method]
    reader_cls = type("PhantomReader", (PhantomCalibrationReader, _reader_base()), {})
    reader = reader_cls(
        package,
        volumes=options.calibration_volumes,
        windows_per_volume=options.windows_per_volume,
        seed=options.seed,
        shape=options.volume_shape,
    )
    log.info("calibrating on %d windows from %d phantom volumes (%s)", len(reader), options.calibration_volumes,
             options.method)
    with tempfile.TemporaryDirectory() as tmp:
        source = package.model_path
        if options.preprocess:
            from onnxruntime.quantization import quant_pre_process

            pre = Path(tmp) / "pre.onnx"
            try:
                # symbolic shape inference cannot finish on dynamic spatial axes; ONNX shape inference can
                quant_pre_process(str(source), str(pre), skip_symbolic_shape=True)
                source = pre
            except Exception as exc:  # shape inference fails on some graphs; quantising still works without it
                log.warning("quant_pre_process failed (%s: %s); quantising the model as it is",
                            type(exc).__name__, exc)
        extra: dict[str, Any] = {
            "ActivationSymmetric": options.symmetric_activations,
            "WeightSymmetric": True,
        }
        # (not CalibMaxIntermediateOutputs: MinMax keeps only reduced min/max per tensor, and ORT 1.32 drops
        # the collected batches when that limit is reached instead of folding them in)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        quantize_static(
            str(source),
            str(out_path),
            reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(options.op_types),
            per_channel=options.per_channel,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=method,
            extra_options=extra,
        )
    return out_path


def quantize_package(
    package_dir: Path,
    out_dir: Path,
    options: QuantizeOptions = QuantizeOptions(),
) -> tuple[ModelPackage, ParityReport]:
    """Quantise the package at ``package_dir`` into a new package at ``out_dir`` (its ``model.onnx`` is INT8)
    and gate it against FP32. Writes ``parity.json``/``parity.md`` into the new package; the caller decides
    what a failed gate means (``edge-export quantize`` exits non-zero)."""
    from edge_runtime.inference.runner.onnxruntime import OnnxRuntimeRunner
    from export.package import write_package
    from export.parity import write_report

    fp32 = ModelPackage.load(package_dir)
    with tempfile.TemporaryDirectory() as tmp:
        int8_path = quantize_model(fp32, Path(tmp) / INT8_MODEL, options)
        model = Path(tmp) / "model.onnx"
        int8_path.rename(model)
        manifest = _int8_manifest(fp32, options)
        int8 = write_package(Path(out_dir), model, manifest)

    volumes = phantom_volumes(fp32, [options.gate_seed + i for i in range(options.gate_volumes)],
                              options.volume_shape)
    with OnnxRuntimeRunner(fp32) as ref, OnnxRuntimeRunner(int8) as cand:
        inputs = window_inputs(fp32, options.gate_seed, next(iter(volumes.values()), None))
        results = [compare_outputs(name, ref.infer(x), cand.infer(x)) for name, x in inputs.items()]
        dice = label_agreement(ref, cand, fp32, volumes)
        report = ParityReport(
            results, None, 0.0, 0.0, dice, options.min_dice,
            reference=f"onnxruntime fp32 ({fp32.identity})", candidate=f"onnxruntime int8 ({int8.identity})",
        )
    write_report(report, int8.root, title=f"INT8 against FP32: {fp32.identity}")
    return ModelPackage.load(int8.root), report


def _int8_manifest(fp32: ModelPackage, options: QuantizeOptions) -> dict[str, Any]:
    data = json.loads((fp32.root / MANIFEST_NAME).read_text(encoding="utf-8"))
    data.pop("files", None)
    data.pop("format", None)
    data["name"] = f"{fp32.name}-int8"
    data["description"] = (
        f"{fp32.description} INT8 (QDQ, per-channel weights) post-training quantisation of {fp32.identity}."
    ).strip()
    algorithm = data.setdefault("algorithm", {"name": fp32.algorithm_name, "family": "artificial-intelligence"})
    algorithm["version"] = f"{fp32.algorithm_version}-int8"
    data["quantization"] = {
        "tool": "onnxruntime.quantization.quantize_static",
        "format": "QDQ",
        "weights": "int8 symmetric, per channel" if options.per_channel else "int8 symmetric, per tensor",
        "activations": "int8 symmetric" if options.symmetric_activations else "int8 asymmetric",
        "calibration": {
            "data": "phantom volumes on the model grid",
            **{k: v for k, v in asdict(options).items() if k not in ("gate_seed", "gate_volumes", "min_dice")},
        },
        "from": {"package": fp32.identity, "model_sha256": fp32.model_sha256},
    }
    return data
