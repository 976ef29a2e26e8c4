"""In-service agreement: a SEG series sent to us is a reference for a series we segmented.

The worker hands such a series here instead of to the model. Each Segmentation instance in it is matched to
the series it references (same called AE, study and series), our latest result for that series is read back,
and both are compared on the source grid (:func:`edge_runtime.quality.feedback.compare_with_reference`).
A reference we cannot compare refuses the whole series with the reason (:class:`ReferenceRejected`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom

from edge_runtime.dicom import SEGMENTATION_CLASSES
from edge_runtime.errors import ReferenceRejected
from edge_runtime.imaging.geometry import GeometryPolicy
from edge_runtime.imaging.volume import load_volume
from edge_runtime.inference.package import ModelPackage
from edge_runtime.quality.feedback import append_history, compare_with_reference, referenced_series, validation_record
from edge_runtime.spool.store import SeriesRow, Spool

log = logging.getLogger(__name__)


def compare_references(
    spool: Spool, row: SeriesRow, package: ModelPackage, policy: GeometryPolicy
) -> Iterator[dict[str, Any]]:
    """One agreement record per reference SEG in ``row``'s series, in order.

    Raises :class:`ReferenceRejected` (or :class:`~edge_runtime.errors.VolumeError` for the source series)
    at the first reference that cannot be compared, and ``not-a-reference`` when the series holds none.
    """
    compared = 0
    for path in spool.instance_paths(row.id):
        reference = pydicom.dcmread(path)
        if str(reference.SOPClassUID) not in SEGMENTATION_CLASSES:
            continue
        info = referenced_series(reference)
        target = spool.find_series(row.called_ae, info.study_uid, info.series_uid)
        results = spool.results(target.id) if target is not None else []
        if target is None or not results:
            raise ReferenceRejected("no-result", "the referenced series has no result from this service")
        latest = results[-1]
        ours = latest.directory / "seg.dcm"
        if str(pydicom.dcmread(ours, stop_before_pixels=True).SOPInstanceUID) == info.sop_uid:
            raise ReferenceRejected("own-result", "this is our own SEG sent back, not a reference")
        volume = load_volume(spool.instance_paths(target.id), policy)
        metrics, unmatched = compare_with_reference(volume, ours, reference, package)
        record = validation_record(target.key_hash, package, metrics, unmatched)
        record["result_model"] = latest.model
        compared += 1
        yield record
    if not compared:
        raise ReferenceRejected("not-a-reference", "a SEG series without Segmentation instances")


def record_agreement(
    spool: Spool,
    row: SeriesRow,
    package: ModelPackage,
    policy: GeometryPolicy,
    history: Path,
    on_dice: Callable[[str, float], None],
) -> int:
    """Compare every reference in ``row``'s series, append each record to the JSON-lines ``history`` and report
    each label's Dice to ``on_dice(label, dice)``; the number of references compared."""
    compared = 0
    for record in compare_references(spool, row, package, policy):
        append_history(history, record)
        for name, values in record["labels"].items():
            on_dice(name, values["dice"])
        log.info(
            "series %s: reference compared: %s",
            record["series"],
            ", ".join(f"{n} Dice {v['dice']:.3f}" for n, v in record["labels"].items()),
        )
        compared += 1
    return compared
