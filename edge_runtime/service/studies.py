"""Studies of several series, for a model of several input channels (nnU-Net ``channel_names``: T1, T1c, T2,
FLAIR; CT + PET).

A complete series is held for its study; once the study holds a series for every channel (or its quiet period
has passed) the channels are segmented once, as one result published with the first channel's series, whose grid
is the SEG's. A study that cannot be segmented is refused naming the missing or ambiguous channel.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
from pydicom.dataset import Dataset

from edge_runtime.errors import SeriesRefused
from edge_runtime.imaging.geometry import GeometryPolicy
from edge_runtime.imaging.multichannel import stack_channels
from edge_runtime.imaging.volume import SliceCache, Volume, load_volume
from edge_runtime.ingest.study import StudyGate, StudyInputs
from edge_runtime.spool.store import SeriesRow, Spool
from edge_runtime.spool.studies import StudyRow, StudyState

if TYPE_CHECKING:
    from edge_runtime.service.worker import SeriesWorker

log = logging.getLogger(__name__)


class StudyWorker:
    """The worker's part for studies: hold, look, segment once, or refuse."""

    def __init__(self, gate: StudyGate, series: SeriesWorker):
        self.gate = gate
        self._series = series

    def hold(self, row: SeriesRow) -> None:
        """Hold a complete series for its study, and segment the study if this series completed its channels."""
        study = self.gate.jobs.hold(row)
        if study is None:
            return  # an instance arrived since the worker took it: it is receiving again
        inputs = self._look(study, final=False)
        if inputs is not None:
            self._process(inputs)
        elif self.gate.jobs.study(study.id).state is StudyState.WAITING:
            log.info("series %s held: its study %s waits for the other input channels", row.key_hash, study.key_hash)
        else:  # closed: refused, or nothing new in it
            self._forget(study)

    def take_quiet(self) -> bool:
        """Look at a study whose quiet period passed: segment it, or refuse it naming the missing channel."""
        quiet = self.gate.quiet()
        if not quiet:
            return False
        inputs = self._look(quiet[0], final=True)
        if inputs is not None:
            self._process(inputs)
        return True

    def _look(self, study: StudyRow, *, final: bool) -> StudyInputs | None:
        """The study's inputs when it is ready; None while it waits, or once it is refused."""
        try:
            return self.gate.look(study, final=final)
        except SeriesRefused as exc:
            self._refuse(study, exc.reason)
        except Exception as exc:  # an unreadable series must not stop the worker
            log.exception("study %s could not be looked at", study.key_hash)
            self._refuse(study, f"internal-error: {type(exc).__name__}")
        return None

    def _process(self, inputs: StudyInputs) -> None:
        """Segment a study's channel series once, as one result published with its first channel's series."""
        rows = self.gate.jobs.claim(inputs.study, inputs.series)
        if rows is None:
            log.info("study %s: a series grew before it was segmented; it is looked at again", inputs.study.key_hash)
            return
        log.info(
            "study %s: segmenting channels %s",
            inputs.study.key_hash,
            ", ".join(f"{n}={r.key_hash}" for n, r in zip(inputs.names, rows, strict=True)),
        )
        try:
            seg = self._series.process(rows[0], StudyInputs(inputs.study, inputs.names, tuple(rows)))
        except SeriesRefused as exc:
            self._refuse(inputs.study, exc.reason)
            return
        except Exception as exc:  # one bad study must not stop the others
            log.exception("study %s failed unexpectedly", inputs.study.key_hash)
            self._refuse(inputs.study, f"internal-error: {type(exc).__name__}")
            return
        if seg is None:  # the first channel grew meanwhile: the others wait for it again
            self.gate.jobs.end(inputs.study, StudyState.WAITING)
            return
        self.gate.jobs.end(inputs.study, StudyState.DONE, f"input of study {inputs.study.key_hash}'s result")
        self._forget(inputs.study)

    def _forget(self, study: StudyRow) -> None:
        """Let the decoded slices of a closed study's series go (those no channel took were never loaded)."""
        spool, cache = self._series.spool, self._series.cache
        for member in self.gate.jobs.members(study):
            cache.forget(spool.instance_paths(member.id))

    def _refuse(self, study: StudyRow, reason: str) -> None:
        ended = self.gate.jobs.end(study, StudyState.FAILED, reason)
        self._forget(study)
        log.warning("study %s refused: %s", study.key_hash, reason)
        for row in ended:
            self._series.oversight.refused(row, reason)
        self._series.metrics.series_failed.labels(reason.split(":", 1)[0]).inc()


def load_other_channels(
    spool: Spool, policy: GeometryPolicy, cache: SliceCache, volume: Volume, inputs: StudyInputs | None
) -> tuple[np.ndarray | None, list[Dataset]]:
    """The input channels on ``volume``'s grid (the first channel's) and the other series' instances, which the
    SEG references too; (None, []) for a series on its own."""
    if inputs is None:
        return None, []
    others = []
    for name, row in zip(inputs.names[1:], inputs.series[1:], strict=True):
        paths = spool.instance_paths(row.id)
        try:
            others.append(load_volume(paths, policy, cache))
        except SeriesRefused as exc:
            raise SeriesRefused(exc.code, f"channel {name}: {exc.detail}") from exc
        finally:
            cache.forget(paths)
    return stack_channels([volume, *others]), [ds for v in others for ds in v.datasets]
