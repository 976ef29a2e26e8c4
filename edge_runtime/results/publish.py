"""Writing one series' results: the SEG, the measurements, the TID 1500 SR and ``measurements.json``, and the
other result formats that destinations ask for (:mod:`edge_runtime.results.objects`).

This is where the encoder is chosen: the fast BINARY SEG writer (:mod:`edge_runtime.results.seg_binary`) for
single-frame sources, highdicom (:mod:`edge_runtime.results.seg`) for frames of one Enhanced multi-frame source,
whose frames highdicom pairs with the source's. Every file is written atomically (:func:`write_atomic`), and
the instance and series UIDs are derived from ``uid_seed``, so a result re-made after a restart replaces the
same objects at the receiver.

``seg.dcm`` and ``sr.dcm`` are always written (the result of record, which ``measurements.json`` and the status
page refer to); :attr:`ResultFiles.objects` lists only the formats asked for, and it is what goes out.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.dicom import write_atomic
from edge_runtime.imaging.volume import Volume
from edge_runtime.inference.domain import Applicability
from edge_runtime.inference.package import ModelPackage
from edge_runtime.results.formats import BINARY, DEFAULT_FORMATS, SR, check_formats
from edge_runtime.results.measurements import SegmentMeasurement, measure, write_measurements
from edge_runtime.results.objects import write_objects
from edge_runtime.results.seg import build_seg
from edge_runtime.results.seg_binary import encode_binary_seg
from edge_runtime.results.sr import build_sr


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


def uid_seed(called_ae: str, study_uid: str, series_uid: str, model_sha256: str, generation: int) -> str:
    """The seed of every UID in one result: the series (as received by this AE), the model and the series'
    generation (a series that grows after its result is a new generation, with new objects)."""
    return f"{called_ae}|{study_uid}|{series_uid}|{model_sha256}|{generation}"


def write_results(
    directory: Path,
    volume: Volume,
    labels: np.ndarray,
    package: ModelPackage,
    *,
    uid_seed: str,
    device_serial_number: str,
    timings: dict[str, float],
    t_start: float,
    extra: dict[str, Any] | None = None,
    confidence: np.ndarray | None = None,
    applicability: Applicability | None = None,
    formats: Collection[str] = DEFAULT_FORMATS,
    probabilities: np.ndarray | None = None,
) -> ResultFiles:
    """Write ``seg.dcm``, ``sr.dcm``, the other ``formats`` and ``measurements.json`` into ``directory``.

    ``timings`` are the stages so far (load, inference...); ``seg``, ``measurements`` and ``total`` (since
    ``t_start``, a ``time.perf_counter()``) are added and recorded in ``measurements.json`` with ``extra``.
    ``confidence`` (the pipeline's per-voxel probability of the chosen label) adds per-segment confidence to
    the SR and the JSON; ``applicability`` (the domain check) marks a series outside the domain in the SEG's
    Series Description, the SR and the JSON. ``probabilities`` (uint8 (classes, slices, rows, columns)) are
    what a FRACTIONAL SEG holds. The SR references the BINARY SEG, or the LABELMAP SEG when only that is asked
    for, so that a destination gets the SEG its SR points at.
    """
    formats = check_formats(formats)
    directory.mkdir(parents=True, exist_ok=True)
    timings = dict(timings)
    t0 = time.perf_counter()
    encode = build_seg if volume.multiframe else encode_binary_seg
    seg = encode(volume, labels, package, uid_seed=uid_seed, device_serial_number=device_serial_number)
    if applicability is not None and not applicability.inside:
        seg.SeriesDescription = applicability.mark
    seg_path = write_atomic(directory / "seg.dcm", seg)
    timings["seg"] = time.perf_counter() - t0

    written = write_objects(
        directory,
        volume,
        labels,
        package,
        formats,
        probabilities=probabilities,
        uid_seed=uid_seed,
        device_serial_number=device_serial_number,
        series_description=applicability.mark if applicability is not None and not applicability.inside else None,
    )
    timings.update(written.timings)
    referenced = written.labelmap if BINARY not in formats and written.labelmap is not None else seg

    t0 = time.perf_counter()
    measurements = measure(volume, labels, package, confidence)
    sr = build_sr(
        referenced,
        measurements,
        volume,
        package,
        uid_seed=uid_seed,
        device_serial_number=device_serial_number,
        applicability=applicability,
    )
    sr_path = write_atomic(directory / "sr.dcm", sr)
    timings["measurements"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    objects = {BINARY: [seg_path], **written.objects, SR: [sr_path]}
    objects = {name: objects[name] for name in formats if name in objects}

    json_path = directory / "measurements.json"
    write_measurements(
        json_path,
        measurements,
        package=package,
        volume=volume,
        seg_sop_uid=str(seg.SOPInstanceUID),
        applicability=applicability,
        extra={
            "sr_sop_instance_uid": str(sr.SOPInstanceUID),
            "timings_s": {k: round(v, 4) for k, v in timings.items()},
            **({"formats_not_written": written.not_written} if written.not_written else {}),
            **(extra or {}),
        },
    )
    return ResultFiles(seg_path, sr_path, json_path, timings, tuple(measurements), objects, written.not_written)
