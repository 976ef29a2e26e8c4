"""The gate of a TotalSegmentator package: the runtime against what TotalSegmentator itself gives, part by part.

The reference is TotalSegmentator's ``nnUNet_predict_image`` for the task, run in this process on the gate's
volumes with TotalSegmentator's own functions where it has them: nibabel's ``as_closest_canonical``, its
``change_spacing`` to the task's grid (``order`` 1, int32), nnunetv2's ``nnUNetPredictor`` on each part's model
folder with TotalSegmentator's settings (the task's folds, test-time mirroring off, its tile step: 0.8 for
``total``), its combining loop (a lookup table per part from its own class maps, a later part overwriting an
earlier one where it found something), ``change_spacing`` back (``order`` 0) and ``undo_canonical``. What it
leaves out is what TotalSegmentator does with files (NIfTI written and read back between the steps) and its
z-slab split of very large images (``export.totalsegmentator.NOT_REPRODUCED``).

The candidate is the package in ONNX Runtime through the runtime's TotalSegmentator pipeline. The gate refuses
the package unless

* every part's label map, predicted by the runtime on TotalSegmentator's resampled grid, reaches Dice
  ``--min-dice`` per class against ``nnUNetPredictor``'s for that part (a part whose normalisation or network is
  wrong shows here, named);
* the merged label map on the source grid reaches Dice ``--min-dice`` per class against TotalSegmentator's merge
  of ``nnUNetPredictor``'s part outputs, brought back as TotalSegmentator brings it back;
* the ONNX graph's logits agree with the PyTorch parts' on random windows (``--atol``): the export itself.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.imaging.volume import Volume
from edge_runtime.inference.package import ModelPackage
from export.commands import _Staging
from export.parity import LabelAgreement, ParityReport, gate_markdown, label_dice

#: LPS -> RAS: x and y change sign (nibabel's world is RAS)
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def gate_volume(image: np.ndarray, spacing: Sequence[float]) -> Volume:
    """A bare ``(Z, Y, X)`` array as a volume on an axis-aligned grid, stored as scanners store an axial CT
    (columns towards the patient's left, rows towards the back, slices upwards), so that the reorientation to
    TotalSegmentator's canonical axes has work to do on both sides."""
    z, y, x = (float(s) for s in spacing)
    return Volume(array=image, spacing=(z, y, x), positions=np.arange(image.shape[0]) * z, origin=np.zeros(3),
                  row_direction=np.array([1.0, 0.0, 0.0]), column_direction=np.array([0.0, 1.0, 0.0]), datasets=[],
                  regular=True)


def nifti_of(volume: Volume) -> Any:
    """The volume as the NIfTI image TotalSegmentator would be given (``dcm2niix``'s axes: ``(i, j, k)`` =
    (column, row, slice), affine in RAS)."""
    import nibabel as nib

    lps = volume.affine()  # (slice, row, column) -> LPS
    affine = np.eye(4)
    affine[:3, :3] = lps[:3, [2, 1, 0]]
    affine[:3, 3] = lps[:3, 3]
    return nib.Nifti1Image(np.ascontiguousarray(volume.array.transpose(2, 1, 0)), _LPS_TO_RAS @ affine)


@dataclass
class TotalSegmentatorCase:
    """TotalSegmentator's result on one volume, with what the per-part check needs."""

    #: nnU-Net's input: TotalSegmentator's resampled image in nnU-Net's reader order, and its spacing
    grid: np.ndarray
    spacing: tuple[float, float, float]
    #: each part's label map on that grid (the part's own class indices)
    parts: list[np.ndarray]
    #: the merged label map in TotalSegmentator's class values, on the volume's (slice, row, column) grid
    merged: np.ndarray


class TotalSegmentatorReference:
    """TotalSegmentator's multi-part prediction (see the module docstring) with ``nnUNetPredictor`` per part."""

    def __init__(self, source: Any):
        from edge_runtime.extras import require
        from export.nnunet_parity import NnunetReference

        for module in ("nibabel", "nnunetv2"):
            require(module, feature="the TotalSegmentator gate", extra="nnunet-test")
        from totalsegmentator import map_to_binary

        plan = source.plan
        self.resample_mm = plan.resample_mm
        self.parts = [NnunetReference(part, use_mirroring=False, tile_step_size=plan.step_size)
                      for part in source.parts]
        # the combining loop's lookup tables, from TotalSegmentator's class maps (not from the package)
        inverse = {name: value for value, name in map_to_binary.class_map[plan.task].items()}
        self.luts = []
        for i in range(len(source.parts)):
            part_map = plan.part_maps[i][1] if plan.part_maps else map_to_binary.class_map[plan.task]
            lut = np.zeros(max(part_map) + 1, dtype=np.uint8)
            for index, name in part_map.items():
                lut[index] = inverse[name]
            self.luts.append(lut)
        self.describe = (f"TotalSegmentator {_version('totalsegmentator')} steps around "
                         f"{self.parts[0].describe} per part")

    def predict(self, volume: Volume) -> TotalSegmentatorCase:
        import nibabel as nib
        from totalsegmentator.alignment import as_closest_canonical, undo_canonical
        from totalsegmentator.resampling import change_spacing

        img_in_orig = nifti_of(volume)
        img_in = as_closest_canonical(nib.Nifti1Image(img_in_orig.get_fdata(), img_in_orig.affine))
        img_rsp = img_in
        if self.resample_mm is not None:
            img_rsp = change_spacing(img_in, self.resample_mm, order=1, dtype=np.int32, nr_cpus=1)
        # nnU-Net's reader: the NIfTI's (i, j, k) as (k, j, i), its zooms reversed
        grid = np.asarray(img_rsp.dataobj).transpose(2, 1, 0).astype(np.float32)
        spacing = tuple(float(z) for z in img_rsp.header.get_zooms()[:3][::-1])
        parts = [reference.predict(grid[None], spacing)[0] for reference in self.parts]
        combined = np.zeros(img_rsp.shape, dtype=np.uint8)
        for seg, lut in zip(parts, self.luts, strict=True):
            mapped = lut[seg.transpose(2, 1, 0).astype(np.uint8)]
            np.copyto(combined, mapped, where=mapped != 0)
        img_pred = nib.Nifti1Image(combined, img_rsp.affine)
        if self.resample_mm is not None:
            img_pred = change_spacing(img_pred, self.resample_mm, img_in.shape, order=0, dtype=np.uint8, nr_cpus=1,
                                      force_affine=img_in.affine)
        merged = np.asarray(undo_canonical(img_pred, img_in_orig).dataobj).transpose(2, 1, 0)
        return TotalSegmentatorCase(grid, spacing, parts, merged)  # type: ignore[arg-type]


@dataclass
class TotalSegmentatorGateReport:
    """Dice per class of each part and of the merged map, and the logits of the export; pass/fail with the
    Dice that would have been needed."""

    parts: list[LabelAgreement]
    merged: list[LabelAgreement]
    min_dice: float
    reference: str
    candidate: str
    timings: dict[str, float] = field(default_factory=dict)
    #: the ONNX graph against the PyTorch parts on windows; None: not checked (a package already written)
    logits: ParityReport | None = None

    @property
    def passed(self) -> bool:
        return not self.failures()

    @property
    def needed_min_dice(self) -> float | None:
        return min((d.dice for d in self.parts + self.merged), default=None)

    def failures(self) -> list[str]:
        out = [f"{d.volume}: class {d.label} {d.name}: Dice {d.dice:.4f} against nnUNetPredictor (needed "
               f"{self.min_dice})" for d in self.parts if not d.passed(self.min_dice)]
        out += [f"{d.volume}: class {d.label} {d.name}: Dice {d.dice:.4f} against TotalSegmentator's merge (needed "
                f"{self.min_dice})" for d in self.merged if not d.passed(self.min_dice)]
        return out + [f"ONNX against PyTorch, {line}" for line in (self.logits.failures() if self.logits else [])]

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "reference": self.reference,
            "candidate": self.candidate,
            "min_dice": self.min_dice,
            "needed_min_dice": self.needed_min_dice,
            "parts": [asdict(d) for d in self.parts],
            "merged": [asdict(d) for d in self.merged],
            "logits": self.logits.to_dict() if self.logits else None,
            "timings_s": self.timings,
        }

    def table(self) -> str:
        def rows(items: list[LabelAgreement]) -> list[str]:
            return [f"| {d.volume} | {d.label} {d.name} | {d.dice:.4f} | {d.reference_voxels} | {d.candidate_voxels} "
                    f"| {'yes' if d.passed(self.min_dice) else 'NO'} |" for d in items]

        head = ["| {} | class | Dice | reference voxels | runtime voxels | pass |", "|---|---|---:|---:|---:|---|"]
        return "\n".join([head[0].format("volume, part"), head[1], *rows(self.parts), "",
                          head[0].format("volume, merged"), head[1], *rows(self.merged),
                          *(["", self.logits.table()] if self.logits else [])])

    def markdown(self, title: str = "TotalSegmentator gate") -> str:
        needed = self.needed_min_dice
        lines = [
            f"Gate: Dice >= {self.min_dice:g} per class, for every part on TotalSegmentator's grid and for the merged "
            f"label map on the source grid" + (f"; ONNX logits within {self.logits.atol:g} of PyTorch's on windows."
                                               if self.logits and self.logits.atol is not None else "."),
            f"Needed: min Dice {needed if needed is not None else float('nan'):.4f}.",
            "",
            self.table(),
            "",
        ]
        return gate_markdown(self, title, lines)


def gate_against_totalsegmentator(source: Any, package: ModelPackage,
                                  volumes: Mapping[str, tuple[np.ndarray, Sequence[float]]], *, min_dice: float = 0.99,
                                  runner: Any = None) -> TotalSegmentatorGateReport:
    """Per part and merged, the runtime (``package``, in ONNX Runtime unless ``runner`` is given) against
    :class:`TotalSegmentatorReference` for ``source`` (:func:`export.totalsegmentator.load_totalsegmentator`) on
    ``volumes`` (name -> ``(C, Z, Y, X)`` image in modality units, ``(z, y, x)`` spacing)."""
    from totalsegmentator.map_to_binary import class_map

    from edge_runtime.inference.runner.onnxruntime import OnnxRuntimeRunner
    from edge_runtime.inference.totalsegmentator.pipeline import predict_parts, segment_totalsegmentator

    ts = package.totalsegmentator
    assert ts is not None
    reference = TotalSegmentatorReference(source)
    own = runner is None
    runner = runner or OnnxRuntimeRunner(package)
    values = {entry["value"]: entry["totalsegmentator_value"] for entry in package.manifest["labels"]}
    to_ts = np.array([0, *[values[lab.value] for lab in package.labels]], np.uint8)  # package value -> its class
    names = class_map[source.plan.task]
    parts: list[LabelAgreement] = []
    merged: list[LabelAgreement] = []
    timings = {"totalsegmentator_s": 0.0, "runtime_s": 0.0}
    try:
        for name, (image, spacing) in volumes.items():
            volume = gate_volume(image[0], spacing)
            t0 = time.perf_counter()
            theirs = reference.predict(volume)
            timings["totalsegmentator_s"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            grid = np.repeat(theirs.grid[None], package.input_channels, axis=0)
            ours, _, _ = predict_parts(grid, theirs.spacing, package, runner, {})
            labels = to_ts[segment_totalsegmentator(volume, package, runner).labels]
            timings["runtime_s"] += time.perf_counter() - t0
            for part, nnunet, runtime, part_source in zip(ts.parts, theirs.parts, ours, source.parts, strict=True):
                parts += label_dice(f"{name}, part {part.name}", nnunet, runtime, part_source.label_names,
                                    part.classes)
            # the package's classes, and any other class either side painted (TotalSegmentator's map has 117)
            shown = {int(v) for v in (*to_ts[1:], *np.unique(theirs.merged), *np.unique(labels))}
            merged += [d for d in label_dice(f"{name}, merged", theirs.merged, labels, names, max(shown) + 1)
                       if d.label in shown]
        candidate = runner.describe()
    finally:
        if own:
            runner.close()
    return TotalSegmentatorGateReport(parts, merged, min_dice, reference.describe, candidate,
                                      {k: round(v, 3) for k, v in timings.items()})


def build_and_gate(args: argparse.Namespace, source: Any, manifest: dict[str, Any], volumes: dict,
                   stage: _Staging) -> int:
    from export.package import write_package
    from export.parity import check_parity, write_report
    from export.totalsegmentator import build_onnx

    with stage.building():
        with tempfile.TemporaryDirectory() as tmp:
            info = build_onnx(source, Path(tmp), args)
            manifest["export"] = {"opset": info.opset, "exporter": info.exporter, "simplified": info.simplified,
                                  "nodes": info.nodes_saved}
            extra = [info.path.with_name(info.path.name + ".data")] if info.external_data else []
            package = write_package(stage.dir, info.path, manifest, extra)
        rng = np.random.default_rng(0)
        windows = {f"random window {i + 1}": rng.normal(0, 1, (1, len(source.parts), *source.window))
                   .astype(np.float32) for i in range(2)}
        logits = check_parity(source.module, str(package.model_path), windows, input_name=package.input_name,
                              atol=args.atol, min_agreement=args.min_agreement, rtol=args.rtol)
        report = gate_against_totalsegmentator(source, package, volumes, min_dice=args.min_dice)
        report.logits = logits
        write_report(report, stage.dir,  # type: ignore[arg-type]  # the same to_dict() and markdown()
                     title=f"TotalSegmentator package against TotalSegmentator: {package.identity}")
    out = stage.settle(report, "edge-export package: the TotalSegmentator package's gate failed; set aside in "
                               "{where} (see parity.md there):")
    if out is None:
        return 1
    print(f"wrote {out} ({package.identity}, {len(package.labels)} classes from {len(source.parts)} part(s))")
    return 0


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)
