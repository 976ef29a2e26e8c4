"""What every result writer writes about: one series, the model's output on it, and what identifies the objects.

Each result format (BINARY, LABELMAP and FRACTIONAL SEG, RT Structure Set, overlays, the SR) describes the same
thing: a label map on a volume, made by a package, under UIDs derived from one seed and stamped with this
device's serial number. :class:`SeriesResult` holds that once, so the writers and
:mod:`edge_runtime.results.publish` pass one object rather than the same list of parameters each, and a new
piece of context (the series' other sources, the domain check) reaches every writer without a new parameter on
all of them. What is particular to one format (highdicom options, another format's identity) stays a keyword
argument of that writer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass

import numpy as np
from pydicom.dataset import Dataset

from edge_runtime.imaging.volume import Volume
from edge_runtime.inference.domain import Applicability
from edge_runtime.inference.package import ModelPackage

__all__ = ["MANUFACTURER", "SeriesResult"]

#: Manufacturer of every result object, and its Device Serial Number unless the device has its own
MANUFACTURER = "edge-runtime"


@dataclass(frozen=True, eq=False)  # eq=False: arrays do not compare to one bool
class SeriesResult:
    """The model's result on one series, as the result writers take it.

    ``labels`` hold the package's label values (0 = background), shaped like ``volume.array``; ``uid_seed``
    makes every object's UIDs deterministic (a result re-made after a restart replaces the same objects);
    ``series_number`` is the BINARY SEG's (the other formats' follow it; default 5000 + the source's).
    ``applicability`` (the domain check) marks a series outside the domain; ``other_sources`` are the instances
    of the other input series of a model of several channels, which the BINARY SEG references beside
    ``volume``'s. ``confidence`` (per-voxel probability of the chosen label) goes into the measurements;
    ``probabilities`` (uint8 (classes, slices, rows, columns)) are what a FRACTIONAL SEG holds.
    """

    volume: Volume
    labels: np.ndarray
    package: ModelPackage
    _: KW_ONLY
    uid_seed: str
    device_serial_number: str = MANUFACTURER
    series_number: int | None = None
    applicability: Applicability | None = None
    other_sources: Sequence[Dataset] = ()
    confidence: np.ndarray | None = None
    probabilities: np.ndarray | None = None

    @property
    def seg_series_number(self) -> int:
        """The BINARY SEG's Series Number: ``series_number`` if given, else 5000 + the source's (never a random
        one); the other formats' are offsets from it."""
        if self.series_number is not None:
            return int(self.series_number)
        source_number = self.volume.datasets[0].get("SeriesNumber")
        return 5000 + int(source_number) if source_number not in (None, "") else 5000

    @property
    def mark(self) -> str | None:
        """The Series Description of every object of a series outside the model's domain; None inside it."""
        if self.applicability is None or self.applicability.inside:
            return None
        return self.applicability.mark
