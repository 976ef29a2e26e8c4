"""Writing the result formats beyond the BINARY SEG and the SR: LABELMAP and FRACTIONAL SEG, RT Structure Set,
overlays with their Key Object Selection (:mod:`edge_runtime.results.formats` names them).

Each is written atomically under its own file name and each is optional: a format that cannot be made for this
series (FRACTIONAL without the model's probabilities; an RT Structure Set for a source without a Frame of
Reference) is reported with its reason and costs nothing else, since destinations that asked for other formats
must still get theirs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset

from edge_runtime.dicom import write_atomic
from edge_runtime.results.formats import FRACTIONAL, LABELMAP, OVERLAY, RTSTRUCT
from edge_runtime.results.overlay import build_overlays
from edge_runtime.results.rtstruct import build_rtstruct
from edge_runtime.results.seg_fractional import encode_fractional_seg
from edge_runtime.results.seg_labelmap import build_labelmap_seg
from edge_runtime.results.series_result import SeriesResult

__all__ = ["FILE_NAMES", "WrittenObjects", "write_objects"]

log = logging.getLogger(__name__)

#: the file (or, for overlays, the file name stem) of each format in the result folder
FILE_NAMES = {
    LABELMAP: "seg-labelmap.dcm",
    FRACTIONAL: "seg-fractional.dcm",
    RTSTRUCT: "rtstruct.dcm",
    OVERLAY: "overlay",
}


@dataclass
class WrittenObjects:
    """What :func:`write_objects` wrote, by format; the formats it could not write, with the reason why;
    seconds per format; the LABELMAP SEG itself (the SR may reference it)."""

    objects: dict[str, list[Path]] = field(default_factory=dict)
    not_written: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    labelmap: Dataset | None = None


def write_objects(directory: Path, result: SeriesResult, formats: Collection[str]) -> WrittenObjects:
    """Write each of ``formats`` other than ``binary`` and ``sr`` (those are :func:`write_results`' own) into
    ``directory``, in :data:`edge_runtime.results.formats.FORMATS` order; the result's
    :attr:`~SeriesResult.mark` replaces each object's Series Description (a series outside the model's domain
    says so in every object, as in the BINARY SEG)."""
    written = WrittenObjects()
    series_description = result.mark

    def save(name: str, ds: Dataset) -> Path:
        if series_description is not None:
            ds.SeriesDescription = series_description[:64]
        return write_atomic(directory / name, ds)

    def labelmap() -> list[Path]:
        written.labelmap = build_labelmap_seg(result)
        return [save(FILE_NAMES[LABELMAP], written.labelmap)]

    def fractional() -> list[Path]:
        if result.probabilities is None:
            raise _NotMade("the pipeline gave no per-class probabilities")
        return [save(FILE_NAMES[FRACTIONAL], encode_fractional_seg(result))]

    def rtstruct() -> list[Path]:
        return [save(FILE_NAMES[RTSTRUCT], build_rtstruct(result))]

    def overlay() -> list[Path]:
        made = build_overlays(result)
        stem = FILE_NAMES[OVERLAY]
        paths = [save(f"{stem}-{i:03d}.dcm", ds) for i, ds in enumerate(made.images, start=1)]
        return [*paths, save(f"{stem}-kos.dcm", made.selection)]

    writers: dict[str, Callable[[], list[Path]]] = {
        LABELMAP: labelmap,
        FRACTIONAL: fractional,
        RTSTRUCT: rtstruct,
        OVERLAY: overlay,
    }
    for name, write in writers.items():
        if name not in formats:
            continue
        t0 = time.perf_counter()
        try:
            written.objects[name] = write()
        except (_NotMade, ValueError) as exc:
            # ValueError: the writers' word for a source this format cannot describe (checked before writing)
            written.not_written[name] = str(exc)
            log.warning("result format %s not written: %s", name, exc)
        written.timings[name] = time.perf_counter() - t0
    return written


class _NotMade(Exception):
    """A format that this series' result cannot have (the reason is the message)."""
