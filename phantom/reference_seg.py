"""Write a phantom's ground truth as a reference DICOM SEG over the series that :func:`write_series` wrote.

Offline validation compares the runtime's SEG with this one; it is marked MANUAL (a reference annotation) so that
it can never be taken for the runtime's AUTOMATIC output. highdicom is imported only here, when a SEG is written.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from phantom.anatomy import LABELS
from phantom.series import SeriesInfo


def _property_code(name: str) -> tuple[Any, Any]:
    """(category, type) SNOMED CT codes for a label name."""
    from pydicom.sr.codedict import codes

    known = {
        "lung": (codes.SCT.Organ, codes.SCT.Lung),
        "liver": (codes.SCT.Organ, codes.SCT.Liver),
        "spleen": (codes.SCT.Organ, codes.SCT.Spleen),
        "kidney": (codes.SCT.Organ, codes.SCT.Kidney),
        "bone": (codes.SCT.Tissue, codes.SCT.Bone),
    }
    key = name.strip().lower()
    if key in known:
        return known[key]
    keyword = "".join(part.capitalize() for part in key.replace("_", " ").split())
    try:
        return codes.SCT.AnatomicalStructure, getattr(codes.SCT, keyword)
    except AttributeError:
        return codes.SCT.Tissue, codes.SCT.Tissue


def write_reference_seg(
    series: SeriesInfo,
    labels: np.ndarray,
    out_path: Path | str,
    label_names: Mapping[int, str] = LABELS,
) -> Path:
    """Write ground-truth ``labels`` (``(z, y, x)``, same order as ``series.paths``) as a BINARY
    DICOM SEG referencing the written source images.

    Each label value in ``label_names`` that occurs in ``labels`` becomes one segment, numbered
    1..n in increasing label value (so with :data:`~phantom.LABELS` and all organs present, segment number ==
    label value); other values are left out. Segments carry SNOMED CT property codes and algorithm
    type MANUAL (reference annotation, distinct from the runtime's AUTOMATIC output).
    """
    import highdicom as hd
    from pydicom import dcmread

    from edge_runtime import __version__

    lab = np.asarray(labels)
    if lab.ndim != 3 or lab.shape[0] != len(series.paths):
        raise ValueError(f"labels must be (z, y, x) with z == {len(series.paths)} slices, got {lab.shape}")
    sources = [dcmread(p) for p in series.paths]
    if (int(sources[0].Rows), int(sources[0].Columns)) != lab.shape[1:]:
        raise ValueError(f"labels rows/columns {lab.shape[1:]} do not match the series")
    present = set(np.unique(lab).tolist())
    values = [v for v in sorted(label_names) if v in present and v != 0]
    if not values:
        raise ValueError("labels contain none of the label values in label_names")
    lut = np.zeros(int(max(int(lab.max()), max(values))) + 1, np.uint8)
    descriptions = []
    for number, value in enumerate(values, start=1):
        lut[value] = number
        category, prop = _property_code(label_names[value])
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=label_names[value],
                segmented_property_category=category,
                segmented_property_type=prop,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
            )
        )
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=lut[lab],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=int(sources[0].SeriesNumber or 0) + 100,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="edge_runtime",
        manufacturer_model_name="phantom",
        software_versions=__version__,
        device_serial_number="0",
        series_description="Phantom ground truth",
        content_label="GROUNDTRUTH",
    )
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(out)
    return out
