"""Results as DICOM: a BINARY SEG built with highdicom, and per-segment measurements as JSON.

The SEG is what viewers read (see DESIGN.md): BINARY, Explicit VR Little Endian, pixel-aligned with the
source, every frame referencing its source instance, SNOMED CT coded segments, algorithm identification.
Frames where a segment is absent are omitted (the segment itself is always described).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian
from scipy import ndimage

from edge_runtime import __version__
from edge_runtime.dicom import derive_uid, write_atomic
from edge_runtime.imaging.volume import Volume
from edge_runtime.inference.package import Code, ModelPackage

#: root under which SEG UIDs are derived deterministically (pydicom's registered prefix)


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


def measure(volume: Volume, labels: np.ndarray, package: ModelPackage) -> list[SegmentMeasurement]:
    """Per-label voxel counts, volumes, intensity statistics and extent.

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


def _to_patient(volume: Volume, index: object) -> list[float]:
    """Patient LPS position of a (slice, row, column) index; the slice axis follows the true positions."""
    z, y, x = (float(v) for v in index)  # type: ignore[union-attr]
    along = float(np.interp(z, np.arange(len(volume.positions)), volume.positions))
    p = (
        volume.origin
        + volume.normal * along
        + volume.column_direction * y * volume.spacing[1]
        + volume.row_direction * x * volume.spacing[2]
    )
    return [round(float(v), 3) for v in p]


def _coded(code: Code):  # noqa: ANN202 - highdicom type
    import highdicom as hd

    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def _lab_color(rgb: tuple[int, int, int]):  # noqa: ANN202
    import highdicom as hd

    return hd.color.CIELabColor.from_rgb(*(v / 255.0 for v in rgb))


def seg_series_number(volume: Volume, series_number: int | None = None) -> int:
    """The SEG's Series Number: ``series_number`` if given, else 5000 + the source's (never a random one)."""
    if series_number is not None:
        return int(series_number)
    source_number = volume.datasets[0].get("SeriesNumber")
    return 5000 + int(source_number) if source_number not in (None, "") else 5000


def segment_descriptions(package: ModelPackage, uid_seed: str) -> list:
    """One highdicom SegmentDescription per label: SNOMED CT codes, algorithm identification, tracking UID."""
    import highdicom as hd

    algorithm = hd.AlgorithmIdentificationSequence(
        name=package.algorithm_name,
        family=codes.cid7162.ArtificialIntelligence,
        version=package.algorithm_version,
    )
    return [
        hd.seg.SegmentDescription(
            segment_number=i,
            segment_label=label.name,
            segmented_property_category=_coded(label.category),
            segmented_property_type=_coded(label.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=derive_uid(uid_seed, "segment", str(i)),
            tracking_id=label.name,
            display_color=_lab_color(label.color),
        )
        for i, label in enumerate(package.labels, start=1)
    ]


def build_seg(
    volume: Volume,
    labels: np.ndarray,
    package: ModelPackage,
    *,
    uid_seed: str,
    series_number: int | None = None,
    device_serial_number: str = "edge-runtime",
):
    """A highdicom ``Segmentation`` for ``labels`` (values are the package's label values) on ``volume``.

    ``uid_seed`` makes the SEG's Series and SOP Instance UIDs deterministic, so a result that is re-sent after a
    crash carries the same UIDs and a PACS treats it as the same object.
    """
    import highdicom as hd

    descriptions = segment_descriptions(package, uid_seed)
    lut = np.zeros(max(lab.value for lab in package.labels) + 1, dtype=np.uint8)
    for i, label in enumerate(package.labels, start=1):
        lut[label.value] = i
    segments = lut[labels]
    if volume.multiframe:  # highdicom pairs pixel_array[i] with frame i of the single multi-frame source
        assert volume.frames is not None
        frames = np.zeros((int(volume.datasets[0].NumberOfFrames), *segments.shape[1:]), dtype=segments.dtype)
        frames[volume.frames] = segments
        segments = frames
    return hd.seg.Segmentation(
        source_images=volume.datasets,
        pixel_array=segments,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=derive_uid(uid_seed, "series"),
        series_number=seg_series_number(volume, series_number),
        sop_instance_uid=derive_uid(uid_seed, "seg"),
        instance_number=1,
        manufacturer="edge-runtime",
        manufacturer_model_name=package.name[:64],
        software_versions=f"edge-runtime {__version__}; model {package.version}",
        device_serial_number=device_serial_number,
        series_description=f"AI segmentation: {package.name}"[:64],
        content_label="SEGMENTATION",
        content_description=f"{package.identity}"[:64],
        content_creator_name="EDGE^RUNTIME",
        transfer_syntax_uid=ExplicitVRLittleEndian,
        omit_empty_frames=True,
    )


def write_measurements(
    path: Path,
    measurements: list[SegmentMeasurement],
    *,
    package: ModelPackage,
    volume: Volume,
    seg_sop_uid: str,
    extra: dict | None = None,
) -> None:
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
        **(extra or {}),
    }
    write_atomic(path, json.dumps(data, indent=2) + "\n")
