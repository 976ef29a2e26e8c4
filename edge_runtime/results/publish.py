"""Writing one series' results: the SEG, the measurements, the TID 1500 SR and ``measurements.json``.

This is where the encoder is chosen: the fast BINARY SEG writer (:mod:`edge_runtime.results.seg_binary`) for
single-frame sources, highdicom (:mod:`edge_runtime.results.seg`) for frames of one Enhanced multi-frame source,
whose frames highdicom pairs with the source's. Every file is written atomically (:func:`write_atomic`), and
the instance and series UIDs are derived from ``uid_seed``, so a result re-made after a restart replaces the
same objects at the receiver.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.dicom import write_atomic
from edge_runtime.imaging.volume import Volume
from edge_runtime.inference.package import ModelPackage
from edge_runtime.results.measurements import measure, write_measurements
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

    @property
    def files(self) -> list[Path]:
        """The DICOM objects that go to destinations."""
        return [self.seg, self.sr]


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
) -> ResultFiles:
    """Write ``seg.dcm``, ``sr.dcm`` and ``measurements.json`` into ``directory``.

    ``timings`` are the stages so far (load, inference...); ``seg``, ``measurements`` and ``total`` (since
    ``t_start``, a ``time.perf_counter()``) are added and recorded in ``measurements.json`` with ``extra``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    timings = dict(timings)
    t0 = time.perf_counter()
    encode = build_seg if volume.multiframe else encode_binary_seg
    seg = encode(volume, labels, package, uid_seed=uid_seed, device_serial_number=device_serial_number)
    seg_path = write_atomic(directory / "seg.dcm", seg)
    timings["seg"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    measurements = measure(volume, labels, package)
    sr = build_sr(seg, measurements, volume, package, uid_seed=uid_seed, device_serial_number=device_serial_number)
    sr_path = write_atomic(directory / "sr.dcm", sr)
    timings["measurements"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start

    json_path = directory / "measurements.json"
    write_measurements(
        json_path,
        measurements,
        package=package,
        volume=volume,
        seg_sop_uid=str(seg.SOPInstanceUID),
        extra={
            "sr_sop_instance_uid": str(sr.SOPInstanceUID),
            "timings_s": {k: round(v, 4) for k, v in timings.items()},
            **(extra or {}),
        },
    )
    return ResultFiles(seg_path, sr_path, json_path, timings)
