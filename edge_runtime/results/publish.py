"""Writing one series' results: the SEG, the measurements, the TID 1500 SR and ``measurements.json``, and the
other result formats that destinations ask for (:mod:`edge_runtime.results.objects`).

This is where the encoder is chosen: the fast BINARY SEG writer (:mod:`edge_runtime.results.seg_binary`) for
single-frame sources, highdicom (:mod:`edge_runtime.results.seg`) for frames of one Enhanced multi-frame source,
whose frames highdicom pairs with the source's. What is written about is one
:class:`~edge_runtime.results.series_result.SeriesResult`. Every file is written atomically
(:func:`write_atomic`), and the instance and series UIDs are derived from its ``uid_seed``, so a result re-made
after a restart replaces the same objects at the receiver.

``seg.dcm`` and ``sr.dcm`` are always written (the result of record, which ``measurements.json`` and the status
page refer to); :attr:`ResultFiles.objects` lists only the formats asked for, and it is what goes out.

Writing is split in two steps so that the SEG leaves as soon as it exists: :func:`write_segs` writes the SEG(s)
(BINARY, and LABELMAP when asked for), which the service publishes and sends at once; :func:`write_rest` then
writes the measurements, the SR, the other formats and ``measurements.json``. After a crash between the steps,
:func:`read_segs` takes the SEG(s) already written (and perhaps already sent) back from the result folder, so
the SR re-made from the same ``uid_seed`` references the very SEG that went out.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from edge_runtime.dicom import write_atomic
from edge_runtime.results.formats import BINARY, DEFAULT_FORMATS, LABELMAP, SR, check_formats
from edge_runtime.results.measurements import SegmentMeasurement, measure, write_measurements
from edge_runtime.results.objects import FILE_NAMES, write_objects
from edge_runtime.results.seg import build_seg
from edge_runtime.results.seg_binary import encode_binary_seg
from edge_runtime.results.series_result import SeriesResult
from edge_runtime.results.sr import build_sr

#: the formats of the first step: the SEGs, which leave before anything else is written
SEG_FORMATS = (BINARY, LABELMAP)
#: the result of record's SEG, always written (the status page and ``measurements.json`` refer to it)
SEG_FILE = "seg.dcm"


@dataclass(frozen=True)
class ResultFiles:
    """What :func:`write_results` wrote, and how long each part took (seconds)."""

    seg: Path
    sr: Path
    measurements: Path
    timings: dict[str, float] = field(default_factory=dict)
    #: the per-segment measurements written (for metrics)
    segments: tuple[SegmentMeasurement, ...] = ()
    #: format -> the DICOM files written for it (only the formats asked for)
    objects: dict[str, list[Path]] = field(default_factory=dict)
    #: format -> why it could not be written for this series (asked for, yet absent from ``objects``)
    not_written: dict[str, str] = field(default_factory=dict)

    @property
    def files(self) -> list[Path]:
        """The DICOM objects that go to destinations: every format's, in format order."""
        return [path for paths in self.objects.values() for path in paths]


@dataclass(frozen=True)
class SegFiles:
    """The first step's output: the SEG(s) written, and the one the SR references."""

    directory: Path
    seg: Path
    #: the SOP Instance UID of ``seg``
    seg_uid: str
    #: the SEG formats asked for -> their files (what goes out in the first step)
    objects: dict[str, list[Path]]
    #: the BINARY SEG, or the LABELMAP SEG when only that is asked for (without pixel data when read back)
    referenced: Dataset
    timings: dict[str, float] = field(default_factory=dict)
    not_written: dict[str, str] = field(default_factory=dict)


def uid_seed(called_ae: str, study_uid: str, series_uid: str, model_sha256: str, generation: int) -> str:
    """The seed of every UID in one result: the series (as received by this AE), the model and the series'
    generation (a series that grows after its result is a new generation, with new objects)."""
    return f"{called_ae}|{study_uid}|{series_uid}|{model_sha256}|{generation}"


def write_segs(directory: Path, result: SeriesResult, formats: Collection[str] = DEFAULT_FORMATS) -> SegFiles:
    """The first step: write ``seg.dcm`` (always) and the LABELMAP SEG when ``formats`` has it.

    The BINARY SEG references the result's ``other_sources`` beside its volume's instances (the highdicom
    encoder of a multi-frame source references only the volume's).
    """
    formats = check_formats(formats)
    directory.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    seg: Dataset = build_seg(result) if result.volume.multiframe else encode_binary_seg(result)
    if result.mark is not None:
        seg.SeriesDescription = result.mark
    seg_path = write_atomic(directory / SEG_FILE, seg)
    timings = {"seg": time.perf_counter() - t0}
    written = write_objects(directory, result, [f for f in formats if f == LABELMAP])
    timings.update(written.timings)
    referenced = written.labelmap if BINARY not in formats and written.labelmap is not None else seg
    objects = {BINARY: [seg_path], **written.objects}
    objects = {name: objects[name] for name in formats if name in objects}
    return SegFiles(directory, seg_path, str(seg.SOPInstanceUID), objects, referenced, timings, written.not_written)


def read_segs(directory: Path, formats: Collection[str] = DEFAULT_FORMATS) -> SegFiles:
    """The first step's output as it was written into ``directory`` (before a crash), read back without pixel
    data: what the second step needs to reference and route. A LABELMAP SEG asked for but absent was not
    written (the reason was logged then)."""
    formats = check_formats(formats)
    seg_path = directory / SEG_FILE
    labelmap_path = directory / FILE_NAMES[LABELMAP]
    objects = {BINARY: [seg_path]} if BINARY in formats else {}
    seg = referenced = pydicom.dcmread(seg_path, stop_before_pixels=True)
    if LABELMAP in formats and labelmap_path.is_file():
        objects[LABELMAP] = [labelmap_path]
        if BINARY not in formats:
            referenced = pydicom.dcmread(labelmap_path, stop_before_pixels=True)
    return SegFiles(directory, seg_path, str(seg.SOPInstanceUID), objects, referenced)


def write_results(
    directory: Path,
    result: SeriesResult,
    *,
    timings: dict[str, float],
    t_start: float,
    extra: dict[str, Any] | None = None,
    formats: Collection[str] = DEFAULT_FORMATS,
) -> ResultFiles:
    """Write ``seg.dcm``, ``sr.dcm``, the other ``formats`` and ``measurements.json`` of ``result`` into
    ``directory``: both steps (:func:`write_segs`, :func:`write_rest`) at once.

    ``timings`` are the stages so far (load, inference...); ``seg``, ``measurements`` and ``total`` (since
    ``t_start``, a ``time.perf_counter()``) are added and recorded in ``measurements.json`` with ``extra``.
    The result's ``confidence`` adds per-segment confidence to the SR and the JSON; its ``applicability`` marks
    a series outside the domain in the SEG's Series Description, the SR and the JSON; its ``probabilities`` are
    what a FRACTIONAL SEG holds. The SR references the BINARY SEG, or the LABELMAP SEG when only that is asked
    for, so that a destination gets the SEG its SR points at.
    """
    segs = write_segs(directory, result, formats)
    return write_rest(segs, result, timings=timings, t_start=t_start, extra=extra, formats=formats)


def write_rest(
    segs: SegFiles,
    result: SeriesResult,
    *,
    timings: dict[str, float],
    t_start: float,
    extra: dict[str, Any] | None = None,
    formats: Collection[str] = DEFAULT_FORMATS,
) -> ResultFiles:
    """The second step: the other ``formats`` (not the SEGs of ``segs``), the measurements, ``sr.dcm``
    (referencing ``segs.referenced``) and ``measurements.json``. The arguments are :func:`write_results`'; the
    returned :attr:`ResultFiles.objects` hold both steps' objects."""
    formats = check_formats(formats)
    directory = segs.directory
    timings = {**timings, **segs.timings}
    written = write_objects(directory, result, [f for f in formats if f not in SEG_FORMATS])
    timings.update(written.timings)
    not_written = {**segs.not_written, **written.not_written}

    volume, package, applicability = result.volume, result.package, result.applicability
    t0 = time.perf_counter()
    measurements = measure(volume, result.labels, package, result.confidence)
    sr = build_sr(
        segs.referenced,
        measurements,
        volume,
        package,
        uid_seed=result.uid_seed,
        device_serial_number=result.device_serial_number,
        applicability=applicability,
    )
    sr_path = write_atomic(directory / "sr.dcm", sr)
    timings["measurements"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    objects = {**segs.objects, **written.objects, SR: [sr_path]}
    objects = {name: objects[name] for name in formats if name in objects}

    json_path = directory / "measurements.json"
    write_measurements(
        json_path,
        measurements,
        package=package,
        volume=volume,
        seg_sop_uid=segs.seg_uid,
        applicability=applicability,
        extra={
            "sr_sop_instance_uid": str(sr.SOPInstanceUID),
            "timings_s": {k: round(v, 4) for k, v in timings.items()},
            **({"formats_not_written": not_written} if not_written else {}),
            **(extra or {}),
        },
    )
    return ResultFiles(segs.seg, sr_path, json_path, timings, tuple(measurements), objects, not_written)
