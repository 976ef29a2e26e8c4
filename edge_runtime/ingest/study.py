"""When a study holds every input channel of a model of several, and which series gives each.

Completion stays per series (the tracker's evidence and quiet rules); a complete series of such a model is then
*held* for its study (:class:`edge_runtime.spool.studies.StudyJobs`) and the study looked at:

- every channel has exactly one held series that matches its rule, and no other series of the study is still
  arriving (it could be a second candidate): the study is ready, once its channels share a Frame of Reference;
- otherwise it waits; after ``quiet_seconds`` without a new instance or series, a channel with no series or
  with several is refused, naming the channel (``channel-missing``, ``channel-ambiguous``).

Series that match no channel (localizers, other weightings) are held too, so that they are neither segmented on
their own nor refused: they end with the study.
"""

from __future__ import annotations

from dataclasses import dataclass

import pydicom

from edge_runtime.errors import SeriesRefused
from edge_runtime.inference.channels import Channels, SeriesFacts
from edge_runtime.spool.rows import SeriesRow, SeriesState
from edge_runtime.spool.store import Spool
from edge_runtime.spool.studies import StudyJobs, StudyRow, StudyState

#: series states in which a series of the study may still become a candidate
_ARRIVING = (SeriesState.RECEIVING, SeriesState.QUEUED, SeriesState.PROCESSING)
#: series states in which a series of the study is a candidate input
_SETTLED = (SeriesState.HELD, SeriesState.DONE, SeriesState.FAILED)


@dataclass(frozen=True)
class StudyInputs:
    """A study ready to segment: the series of each channel, in the model's channel order."""

    study: StudyRow
    names: tuple[str, ...]
    series: tuple[SeriesRow, ...]


class StudyGate:
    """Holds complete series for their study and says when a study is ready (see the module notes)."""

    def __init__(self, spool: Spool, channels: Channels, quiet_seconds: float):
        self.spool = spool
        self.jobs = StudyJobs(spool)
        self.channels = channels
        self.quiet_seconds = quiet_seconds

    def quiet(self) -> list[StudyRow]:
        """Waiting studies whose quiet period has passed: each is ready now, or refused."""
        return self.jobs.quiet(self.quiet_seconds)

    def look(self, study: StudyRow, *, final: bool) -> StudyInputs | None:
        """The study's inputs when ready; None while it may still get them, or when no channel's series is new
        since the study's last result (the study is then closed). ``final`` (its quiet period passed): raises
        :class:`SeriesRefused` for a channel with no series or several. Raises it too when the channels' series
        are not on one Frame of Reference (more series would not change that)."""
        members = self.jobs.members(study)
        # a done series is one an earlier result of the study was made from (or one no channel takes): it is
        # still its channel's series when another channel's series grows and the study is segmented again; a
        # failed one was refused with its study, which a late channel series may now complete
        candidates = {m.id: m for m in members if m.state in _SETTLED}
        arriving = any(m.state in _ARRIVING for m in members)
        choice = self.channels.choose([self.facts(m) for m in candidates.values()])
        if not choice.complete or (arriving and not final):
            if final:
                raise choice.refusal(self.channels)
            return None
        self.channels.check_frame_of_reference(choice)
        names = self.channels.names
        series = tuple(candidates[choice.chosen[n].series_id] for n in names)
        if all(s.state is not SeriesState.HELD for s in series):  # a late series no channel takes: nothing new
            self.jobs.end(study, StudyState.DONE, "no new channel series since the study's result")
            return None
        return StudyInputs(study, names, series)

    def inputs_of(self, row: SeriesRow) -> StudyInputs:
        """The inputs a published study result was made from, chosen again among the study's series (a result
        whose second step a restart completes): raises :class:`SeriesRefused` when they no longer can be."""
        study = self.jobs.study_of(row)
        members = self.jobs.members(study) if study is not None else []
        choice = self.channels.choose([self.facts(m) for m in members if m.state is not SeriesState.FAILED])
        if not choice.complete:
            raise choice.refusal(self.channels)
        by_id = {m.id: m for m in members}
        names = self.channels.names
        series = tuple(by_id[choice.chosen[n].series_id] for n in names)
        if study is None or series[0].id != row.id:
            raise SeriesRefused("channel-ambiguous", f"the series is no longer channel {names[0]} of its study")
        return StudyInputs(study, names, series)

    def facts(self, row: SeriesRow) -> SeriesFacts:
        """What the channel rules look at, from the series' first instance (headers only)."""
        paths = self.spool.instance_paths(row.id)
        ds = pydicom.dcmread(paths[0], stop_before_pixels=True) if paths else pydicom.Dataset()
        image_type = ds.get("ImageType") or []
        values = [image_type] if isinstance(image_type, str) else list(image_type)
        return SeriesFacts(
            series_id=row.id,
            key_hash=row.key_hash,
            modality=row.modality,
            description=str(ds.get("SeriesDescription", "") or ""),
            image_type=tuple(str(v).upper() for v in values),
            contrast=bool(str(ds.get("ContrastBolusAgent", "") or "").strip()),
            frame_of_reference=str(ds.get("FrameOfReferenceUID", "") or ""),
        )
