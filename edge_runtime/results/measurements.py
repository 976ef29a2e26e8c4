"""Per-segment measurements of a label map: voxel counts, volumes, intensity statistics, extent and the
model's confidence, as JSON.

The SR (:mod:`edge_runtime.results.sr`) encodes the same numbers as DICOM; the JSON keeps them for every
modality, with the model and the source geometry they were taken on.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from edge_runtime.dicom import write_atomic
from edge_runtime.imaging.volume import Volume
from edge_runtime.inference.confidence import summarise
from edge_runtime.inference.domain import Applicability
from edge_runtime.inference.package import ModelPackage


@dataclass(frozen=True)
class SegmentMeasurement:
    segment_number: int
    label: int
    name: str
    voxels: int
    volume_ml: float
    mean: float | None
    std: float | None
    min: float | None
    max: float | None
    #: [min, max] patient LPS corners of the segment's bounding box, mm
    bbox_mm: list[list[float]] | None
    centroid_mm: list[float] | None
    #: the segment touches the border of the scanned volume: its volume is a lower bound
    truncated: bool
    #: mean softmax probability of the segment's voxels; None when empty or not computed
    mean_confidence: float | None = None
    #: share of the segment's voxels below the package's ``confidence.low``
    low_confidence_fraction: float | None = None
    #: mean confidence below the package's ``confidence.flag_below``
    low_confidence: bool | None = None


def measure(
    volume: Volume, labels: np.ndarray, package: ModelPackage, confidence: np.ndarray | None = None
) -> list[SegmentMeasurement]:
    """Per-label voxel counts, volumes, intensity statistics, extent and (given the pipeline's per-voxel
    ``confidence``) the confidence summary of :func:`edge_runtime.inference.confidence.summarise`.

    One pass finds each label's bounding box; every statistic is then computed inside that box only.
    """
    boxes = ndimage.find_objects(labels, max_label=max(lab.value for lab in package.labels))
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    out = []
    for seg_number, label in enumerate(package.labels, start=1):
        box = boxes[label.value - 1] if label.value - 1 < len(boxes) else None
        mask = None if box is None else labels[box] == label.value
        n = 0 if mask is None else int(np.count_nonzero(mask))
        if box is None or mask is None or n == 0:
            out.append(
                SegmentMeasurement(
                    seg_number, label.value, label.name, 0, 0.0, None, None, None, None, None, None, False
                )
            )
            continue
        mean, std, vmin, vmax = _masked_stats(volume.array[box], mask, n)
        lo = [s.start for s in box]
        hi = [s.stop - 1 for s in box]
        centre = [
            lo[axis]
            + float(np.dot(mask.sum(axis=tuple(a for a in range(3) if a != axis)), np.arange(mask.shape[axis]))) / n
            for axis in range(3)
        ]
        trust = None if confidence is None else summarise(confidence[box][mask], package.confidence)
        corners = np.array([_to_patient(volume, lo), _to_patient(volume, hi)])
        truncated = any(a == 0 for a in lo) or any(b == d - 1 for b, d in zip(hi, labels.shape, strict=False))
        out.append(
            SegmentMeasurement(
                seg_number,
                label.value,
                label.name,
                n,
                n * voxel_ml,
                mean,
                std,
                vmin,
                vmax,
                [corners.min(axis=0).tolist(), corners.max(axis=0).tolist()],
                _to_patient(volume, centre),
                truncated,
                None if trust is None else trust.mean,
                None if trust is None else trust.low_fraction,
                None if trust is None else trust.flagged,
            )
        )
    return out


def _masked_stats(values: np.ndarray, mask: np.ndarray, n: int, slab: int = 16) -> tuple[float, float, float, float]:
    """Mean, standard deviation, min and max of ``values[mask]``, slab by slab: memory stays bounded by one slab
    however large the segment (float64 sums, so the variance of HU values keeps its precision)."""
    total = squares = 0.0
    vmin, vmax = np.inf, -np.inf
    for z in range(0, values.shape[0], slab):
        picked = values[z : z + slab][mask[z : z + slab]]
        if picked.size:
            as64 = picked.astype(np.float64)
            total += float(as64.sum())
            squares += float(np.dot(as64, as64))
            vmin, vmax = min(vmin, float(picked.min())), max(vmax, float(picked.max()))
    mean = total / n
    return mean, float(np.sqrt(max(squares / n - mean * mean, 0.0))), vmin, vmax


def _to_patient(volume: Volume, index: Sequence[float]) -> list[float]:
    """Patient LPS position of a (slice, row, column) index; the slice axis follows the true positions."""
    z, y, x = (float(v) for v in index)
    along = float(np.interp(z, np.arange(len(volume.positions)), volume.positions))
    p = (
        volume.origin
        + volume.normal * along
        + volume.column_direction * y * volume.spacing[1]
        + volume.row_direction * x * volume.spacing[2]
    )
    return [round(float(v), 3) for v in p]


def write_measurements(
    path: Path,
    measurements: list[SegmentMeasurement],
    *,
    package: ModelPackage,
    volume: Volume,
    seg_sop_uid: str,
    applicability: Applicability | None = None,
    extra: dict | None = None,
) -> None:
    """``measurements.json``: the measurements with the model, the SEG they belong to and the source geometry;
    ``applicability`` (when the package declares a domain) says whether the series was inside it and which
    checks failed; ``extra`` (timings, inference windows ...) is merged in at the top level. Written atomically."""
    data = {
        "model": {"name": package.name, "version": package.version, "sha256": package.model_sha256},
        "seg_sop_instance_uid": seg_sop_uid,
        "source": {
            "modality": volume.modality,
            "slices": int(volume.array.shape[0]),
            "rows": int(volume.array.shape[1]),
            "columns": int(volume.array.shape[2]),
            "spacing_mm": list(volume.spacing),
            "regular_spacing": volume.regular,
            "notes": volume.notes,
        },
        "units": {"volume": "mL", "intensity": "HU" if volume.modality == "CT" else "modality units"},
        "segments": [asdict(m) for m in measurements],
        "confidence_thresholds": asdict(package.confidence),
        **({} if applicability is None else {"applicability": applicability.as_json()}),
        **(extra or {}),
    }
    write_atomic(path, json.dumps(data, indent=2) + "\n")
