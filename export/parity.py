"""Parity between two implementations of one model, as a result object that says pass or fail.

Two levels, one report (:class:`ParityReport`):

* per input: the logits of the reference (PyTorch) and the candidate (ONNX Runtime) on the same windows,
  compared element-wise (``|a - b| <= atol + rtol * |a|``) and by argmax agreement;
* per label: Dice between the argmax label maps of reference and candidate over whole phantom volumes, run
  through the runtime's own sliding window (``edge_runtime.inference.pipeline``) with one :class:`Runner` each --
  :class:`TorchRunner` here for PyTorch, ``OnnxRuntimeRunner`` for the exported graph.

The report says which tolerance would have been needed (``needed_atol``, ``needed_min_dice``) and is stored in
the package as ``parity.json`` and ``parity.md`` (:func:`write_report`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edge_runtime.inference.package import ModelPackage
from edge_runtime.inference.pipeline import argmax_labels, normalize, sliding_window
from edge_runtime.inference.runner import Runner

#: FOV of the phantom volumes used for the Dice check (mm, z y x): a chest-abdomen block
PHANTOM_FOV_MM = (240.0, 380.0, 380.0)
#: grid used along axes without a target spacing (the model runs on the native grid there)
FALLBACK_SPACING = (2.5, 0.8, 0.8)
#: above this the default phantom shrinks (fine grids would make the CPU Dice check take very long)
MAX_PHANTOM_VOXELS = 8_000_000


@dataclass(frozen=True)
class OutputParity:
    input: str
    max_abs_error: float
    max_rel_error: float
    argmax_agreement: float
    #: max of |a - b| - rtol * |a| (the atol that would have been needed at the report's rtol)
    max_residual: float | None = None

    def passed(self, atol: float | None, min_agreement: float) -> bool:
        """``atol`` None: logits are reported, not gated (e.g. INT8 against FP32)."""
        error = self.max_abs_error if self.max_residual is None else self.max_residual
        return (atol is None or error <= atol) and self.argmax_agreement >= min_agreement


@dataclass(frozen=True)
class LabelAgreement:
    """Dice between the reference's and the candidate's mask of one label on one volume."""

    volume: str
    label: int
    name: str
    dice: float
    reference_voxels: int
    candidate_voxels: int

    def passed(self, min_dice: float) -> bool:
        return self.dice >= min_dice


@dataclass(frozen=True)
class ParityReport:
    results: list[OutputParity]
    atol: float | None
    min_agreement: float
    rtol: float = 0.0
    segmentation: list[LabelAgreement] = field(default_factory=list)
    min_dice: float = 0.0
    reference: str = "pytorch"
    candidate: str = "onnxruntime"

    @property
    def passed(self) -> bool:
        outputs = all(r.passed(self.atol, self.min_agreement) for r in self.results)
        return outputs and all(d.passed(self.min_dice) for d in self.segmentation)

    @property
    def needed_atol(self) -> float:
        """The tolerance that would have been needed for every input to pass (at this report's rtol)."""
        if not self.results:
            return 0.0
        return max(0.0, *(r.max_abs_error if r.max_residual is None else r.max_residual for r in self.results))

    @property
    def needed_min_dice(self) -> float | None:
        """The lowest Dice seen: ``min_dice`` at or below it would have passed."""
        return min((d.dice for d in self.segmentation), default=None)

    def failures(self) -> list[str]:
        """One line per failed check, saying what came and what was allowed."""
        out = []
        for r in self.results:
            if not r.passed(self.atol, self.min_agreement):
                err = r.max_abs_error if r.max_residual is None else r.max_residual
                allowed = "not gated" if self.atol is None else f"allowed {self.atol:.3g} + {self.rtol:.3g} x |ref|"
                out.append(
                    f"input {r.input}: error {err:.3g} ({allowed}), "
                    f"argmax agreement {r.argmax_agreement:.6f} (needed {self.min_agreement})"
                )
        for d in self.segmentation:
            if not d.passed(self.min_dice):
                out.append(f"{d.volume} label {d.label} {d.name}: Dice {d.dice:.4f} (needed {self.min_dice})")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "reference": self.reference,
            "candidate": self.candidate,
            "atol": self.atol,
            "rtol": self.rtol,
            "min_argmax_agreement": self.min_agreement,
            "min_dice": self.min_dice,
            "needed_atol": self.needed_atol,
            "needed_min_dice": self.needed_min_dice,
            "results": [asdict(r) for r in self.results],
            "segmentation": [asdict(d) for d in self.segmentation],
        }

    def table(self) -> str:
        rows = ["| input | max abs error | max rel error | argmax agreement | pass |", "|---|---|---|---|---|"]
        for r in self.results:
            ok = "yes" if r.passed(self.atol, self.min_agreement) else "NO"
            rows.append(
                f"| {r.input} | {r.max_abs_error:.3g} | {r.max_rel_error:.3g} | {r.argmax_agreement:.6f} | {ok} |"
            )
        if self.segmentation:
            rows += ["", self.dice_table()]
        return "\n".join(rows)

    def dice_table(self) -> str:
        rows = [
            "| volume | label | Dice | reference voxels | candidate voxels | pass |",
            "|---|---|---:|---:|---:|---|",
        ]
        for d in self.segmentation:
            ok = "yes" if d.passed(self.min_dice) else "NO"
            rows.append(
                f"| {d.volume} | {d.label} {d.name} | {d.dice:.4f} | {d.reference_voxels} "
                f"| {d.candidate_voxels} | {ok} |"
            )
        return "\n".join(rows)

    def markdown(self, title: str = "Parity") -> str:
        logits = (
            "logits reported, not gated" if self.atol is None
            else f"|a - b| <= {self.atol:g} + {self.rtol:g} x |a| per logit"
        )
        lines = [
            f"Gate: {logits}, argmax agreement >= {self.min_agreement:g} per input, "
            f"Dice >= {self.min_dice:g} per label and volume.",
            f"Needed: atol {self.needed_atol:.3g}"
            + (f", min Dice {self.needed_min_dice:.4f}" if self.needed_min_dice is not None else "")
            + ".",
            "",
        ]
        if self.results:
            lines += ["## Logits per input", "", self.table().split("\n\n")[0], ""]
        if self.segmentation:
            lines += ["## Label maps through the sliding window", "", self.dice_table(), ""]
        return gate_markdown(self, title, lines)


class GateReport(Protocol):
    """What every gate's report has (:class:`ParityReport`, the nnU-Net and TotalSegmentator gates')."""

    @property
    def passed(self) -> bool: ...

    @property
    def reference(self) -> str: ...

    @property
    def candidate(self) -> str: ...

    def failures(self) -> list[str]: ...


def gate_markdown(report: GateReport, title: str, body: Sequence[str]) -> str:
    """A gate's report as Markdown, in the frame all gates share: ``# title: PASSED`` (or FAILED), what was
    compared with what, the gate's own ``body`` lines (its criteria, what was needed, its tables), then each
    failed check, so that a failing report says why at its end."""
    lines = [
        f"# {title}: {'PASSED' if report.passed else 'FAILED'}",
        "",
        f"Reference: {report.reference}; candidate: {report.candidate}.",
        *body,
    ]
    failures = report.failures()
    if failures:
        lines += ["## Failed checks", "", *(f"- {f}" for f in failures), ""]
    return "\n".join(lines)


def compare_outputs(name: str, reference: np.ndarray, candidate: np.ndarray, rtol: float = 0.0) -> OutputParity:
    ref = reference.astype(np.float64)
    diff = np.abs(ref - candidate.astype(np.float64))
    rel = diff / np.maximum(np.abs(ref), 1e-6)
    residual = float((diff - rtol * np.abs(ref)).max())
    agreement = float(np.mean(np.argmax(reference, axis=1) == np.argmax(candidate, axis=1)))
    return OutputParity(name, float(diff.max()), float(rel.max()), agreement, residual)


def check_parity(module: Any, onnx_path: str, inputs: dict[str, np.ndarray], *, input_name: str = "image",
                 atol: float = 1e-3, min_agreement: float = 0.999, rtol: float = 0.0) -> ParityReport:
    """Run ``module`` (PyTorch) and the ONNX file (ONNX Runtime, CPU) on each input and compare."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    results = []
    with torch.no_grad():
        for name, x in inputs.items():
            ref = module(torch.from_numpy(x)).numpy()
            (got,) = session.run(None, {input_name: x})
            results.append(compare_outputs(name, ref, got, rtol))
    return ParityReport(results, atol, min_agreement, rtol)


# ---------------------------------------------------------------------------------------------------
# segmentation-level agreement
# ---------------------------------------------------------------------------------------------------


class TorchRunner(Runner):
    """A PyTorch module behind the runtime's :class:`Runner` interface (CPU), as the parity reference."""

    name = "pytorch"

    def __init__(self, package: ModelPackage, module: Any):
        super().__init__(package)
        self.module = module.eval()

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            out = self.module(torch.from_numpy(batch))
        return np.ascontiguousarray(out.float().numpy())

    def describe(self) -> str:
        import torch

        return f"pytorch {torch.__version__} cpu threads={torch.get_num_threads()}"


def model_spacing(package: ModelPackage) -> tuple[float, float, float]:
    target = package.target_spacing or (None, None, None)
    return tuple(float(t) if t is not None else f for t, f in zip(target, FALLBACK_SPACING, strict=True))  # type: ignore[return-value]


def phantom_volume_shape(package: ModelPackage, fov_mm: Sequence[float] = PHANTOM_FOV_MM) -> tuple[int, int, int]:
    """A phantom covering ``fov_mm`` on the model grid (shrunk to at most :data:`MAX_PHANTOM_VOXELS`), at least
    one patch in every axis."""
    spacing = model_spacing(package)
    shape = [f / s for f, s in zip(fov_mm, spacing, strict=True)]
    scale = min(1.0, (MAX_PHANTOM_VOXELS / float(np.prod(shape))) ** (1 / 3))
    return tuple(max(p, int(round(n * scale))) for p, n in zip(package.patch_size, shape, strict=True))  # type: ignore[return-value]


def phantom_volumes(
    package: ModelPackage, seeds: Sequence[int], shape: Sequence[int] | None = None
) -> dict[str, np.ndarray]:
    """Normalised phantom CT volumes ``(C, Z, Y, X)`` on the model grid (channels repeat the CT)."""
    from phantom import make_phantom

    spacing = model_spacing(package)
    shape = tuple(int(v) for v in (shape or phantom_volume_shape(package)))
    out = {}
    for seed in seeds:
        ph = make_phantom(shape, spacing, rng=int(seed))  # type: ignore[arg-type]
        image = normalize(ph.hu.astype(np.float32, copy=True), package.normalization)
        name = f"phantom {seed} ({'x'.join(map(str, shape))} @ {'x'.join(f'{s:g}' for s in spacing)} mm)"
        out[name] = np.ascontiguousarray(np.repeat(image[None], package.input_channels, axis=0))
    return out


def window_inputs(package: ModelPackage, seed: int = 0, volume: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-input parity windows: random values over the normalised range and a phantom patch."""
    rng = np.random.default_rng(seed)
    norm = package.normalization
    c, patch = package.input_channels, package.patch_size
    if norm.kind == "ct_window":
        lo, hi = (norm.lower - norm.mean) / norm.std, (norm.upper - norm.mean) / norm.std
        random = rng.uniform(lo, hi, (2, c, *patch))
    else:
        random = rng.standard_normal((2, c, *patch))
    inputs = {"random": random.astype(np.float32)}
    if volume is None:
        volume = next(iter(phantom_volumes(package, [seed + 1]).values()))
    start = [max(0, (n - p) // 2) for n, p in zip(volume.shape[1:], patch, strict=True)]
    window = (slice(None),) + tuple(slice(s, s + p) for s, p in zip(start, patch, strict=True))
    crop = volume[window]
    if crop.shape[1:] == tuple(patch):
        inputs["phantom"] = np.ascontiguousarray(crop[None])
    return inputs


def label_agreement(
    reference: Runner,
    candidate: Runner,
    package: ModelPackage,
    volumes: Mapping[str, np.ndarray],
) -> list[LabelAgreement]:
    """Dice per label between the argmax maps of ``reference`` and ``candidate`` over each whole volume,
    both through the runtime's sliding window (same windows, blending and batch size)."""
    names = {lab.value: lab.name for lab in package.labels}
    out = []
    for vol_name, image in volumes.items():
        maps = []
        for runner in (reference, candidate):
            logits, _ = _window(image, package, runner)
            maps.append(argmax_labels(logits))
        out += label_dice(vol_name, maps[0], maps[1], names, package.num_classes)
    return out


def label_dice(
    volume: str, reference: np.ndarray, candidate: np.ndarray, names: Mapping[int, str], num_classes: int
) -> list[LabelAgreement]:
    """Dice per label 1..K-1 between two label maps of one volume; 1.0 where both lack the label."""
    if reference.shape != candidate.shape:
        raise ValueError(f"{volume}: label maps of shape {reference.shape} and {candidate.shape}")
    ref_counts = np.bincount(reference.ravel(), minlength=num_classes)
    cand_counts = np.bincount(candidate.ravel(), minlength=num_classes)
    both = np.bincount(reference[reference == candidate].ravel(), minlength=num_classes)
    out = []
    for value in range(1, num_classes):
        total = int(ref_counts[value] + cand_counts[value])
        dice = 1.0 if total == 0 else 2.0 * float(both[value]) / total
        out.append(LabelAgreement(volume, value, names.get(value, str(value)), dice, int(ref_counts[value]),
                                  int(cand_counts[value])))
    return out


def _window(image: np.ndarray, package: ModelPackage, runner: Runner) -> tuple[np.ndarray, int]:
    # the runtime's sliding window takes one (Z, Y, X) image and repeats it over the model's input channels
    return sliding_window(image[0], package, runner)


@dataclass(frozen=True)
class GateOptions:
    """Thresholds and inputs of the export parity gate."""

    atol: float = 1e-3
    rtol: float = 1e-3
    min_agreement: float = 0.999
    min_dice: float = 0.99
    #: phantom volumes for the Dice check (seeds ``seed + 1 ...``); 0 skips the Dice check
    volumes: int = 1
    #: phantom volume shape on the model grid; default covers :data:`PHANTOM_FOV_MM`
    volume_shape: tuple[int, int, int] | None = None
    seed: int = 0


def run_gate(
    module: Any,
    package: ModelPackage,
    options: GateOptions = GateOptions(),
    *,
    candidate: Runner | None = None,
) -> ParityReport:
    """The export gate: per-input logits parity and per-label Dice, PyTorch ``module`` against the package's
    ONNX model in ONNX Runtime on the CPU (or against ``candidate``)."""
    from edge_runtime.inference.runner.onnxruntime import OnnxRuntimeRunner

    seeds = [options.seed + 1 + i for i in range(options.volumes)]
    volumes = phantom_volumes(package, seeds, options.volume_shape) if seeds else {}
    first = next(iter(volumes.values()), None)
    inputs = window_inputs(package, options.seed, first)
    reference = TorchRunner(package, module)
    close = candidate is None
    candidate = candidate or OnnxRuntimeRunner(package)
    try:
        results = []
        for name, x in inputs.items():
            results.append(compare_outputs(name, reference.infer(x), candidate.infer(x), options.rtol))
        dice = label_agreement(reference, candidate, package, volumes)
    finally:
        if close:
            candidate.close()
    return ParityReport(
        results, options.atol, options.min_agreement, options.rtol, dice, options.min_dice,
        reference=reference.describe(), candidate=candidate.describe(),
    )


def write_report(report: ParityReport, package_dir: Path, *, title: str = "Parity", stem: str = "parity") -> None:
    """``parity.json`` and ``parity.md`` into the package, both hashed into its manifest."""
    from export.package import add_file

    package_dir = Path(package_dir)
    json_path, md_path = package_dir / f"{stem}.json", package_dir / f"{stem}.md"
    json_path.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    md_path.write_text(report.markdown(title) + "\n", encoding="utf-8")
    add_file(package_dir, json_path)
    add_file(package_dir, md_path)
