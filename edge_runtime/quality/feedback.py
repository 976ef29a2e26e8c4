"""Continuous monitoring: agreement between our result and a reference SEG that comes back later.

A radiologist corrects the SEG we sent and pushes the corrected version back. The listener stores it like any
instance (its own series, modality SEG); the worker recognises it by the series it references, reads our result
and the reference onto the source grid, and computes every metric per label. Each record is appended to a
JSON-lines history file with the model's name, version and sha256, so agreement can be followed per model
version; the latest Dice per label is also a Prometheus gauge.

Reference segments are matched to the model's labels by SNOMED CT property type (code value and scheme),
then by name, by the rules of :mod:`edge_runtime.quality.matching`; unmatched segments are listed in the record.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from edge_runtime.errors import ReferenceRejected
from edge_runtime.imaging.volume import Volume
from edge_runtime.inference.package import Label, ModelPackage
from edge_runtime.quality.matching import match_labels, segments_of
from edge_runtime.quality.metrics import compare_label_maps
from edge_runtime.quality.reference import UndecodablePixels, read_reference_masks, read_reference_seg


@dataclass(frozen=True)
class ReferenceInfo:
    study_uid: str
    series_uid: str
    sop_uid: str


def referenced_series(ds: Dataset) -> ReferenceInfo:
    """The source series a SEG segments, from its Referenced Series Sequence."""
    try:
        series = str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID)
    except (AttributeError, IndexError) as exc:
        raise ReferenceRejected("no-referenced-series", "the SEG has no Referenced Series Sequence") from exc
    return ReferenceInfo(str(ds.StudyInstanceUID), series, str(ds.SOPInstanceUID))


def match_segments(ds: Dataset, labels: tuple[Label, ...]) -> tuple[dict[int, int], list[str]]:
    """Reference segment number -> our label value, and the names of segments that matched nothing.

    The rules are those of the offline validation (:func:`edge_runtime.quality.matching.match_labels`), so a
    reference gives the same labels here as in ``edge-runtime validate``. Several segments of one type (a
    left and a right lung) all map to the label of that type.
    """
    segments = segments_of(ds)
    matching = match_labels(labels, segments)
    mapping = {n: s.model_values[0] for s in matching.structures for n in s.segment_numbers}
    unmatched = [seg.name or str(number) for number, seg in segments.items() if number not in mapping]
    return dict(sorted(mapping.items())), unmatched


def compare_with_reference(
    volume: Volume, our_seg: Path, reference: Dataset, package: ModelPackage
) -> tuple[dict[int, dict[str, Any]], list[str]]:
    """Metrics per label between our SEG and the reference, both read onto ``volume``."""
    mapping, unmatched = match_segments(reference, package.labels)
    if not mapping:
        raise ReferenceRejected(
            "no-matching-segments",
            f"none of the reference segments ({', '.join(unmatched)}) is a label of the model",
        )
    try:
        ours, _ = read_reference_seg(our_seg, volume)  # our segment numbers are label positions, 1-based
        ref_masks = read_reference_masks(reference, volume)
    except UndecodablePixels as exc:
        raise ReferenceRejected("undecodable-pixels", exc.detail) from exc
    except ValueError as exc:
        raise ReferenceRejected("reference-geometry", str(exc)) from exc
    lut = np.zeros(max(int(ours.max()), len(package.labels)) + 1, dtype=np.uint16)
    for i, label in enumerate(package.labels, start=1):
        lut[i] = label.value
    pred = lut[ours]
    ref = np.zeros(volume.array.shape, dtype=np.uint16)
    for number, value in sorted(mapping.items()):
        ref[ref_masks[number]] = value
    results = compare_label_maps(pred, ref, volume.spacing, labels=sorted(set(mapping.values())))
    return {value: m.to_dict() for value, m in results.items()}, unmatched


def append_history(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line and fsync: the history survives a crash right after the comparison."""
    line = json.dumps(record, allow_nan=True) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def validation_record(
    series_key: str, package: ModelPackage, metrics: dict[int, dict[str, Any]], unmatched: list[str]
) -> dict[str, Any]:
    names = {lab.value: lab.name for lab in package.labels}
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "series": series_key,
        "model": {"name": package.name, "version": package.version, "sha256": package.model_sha256},
        "labels": {names[v]: m for v, m in metrics.items()},
        "unmatched_reference_segments": unmatched,
    }
