"""What the spool hands out: typed rows, never SQL tuples, JSON or strings to parse again.

The index stores text (a geometry as JSON); the spool turns it back into the types the other stages work with,
so no caller unpacks a row by position or parses what the spool kept.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path


class SeriesState(str, enum.Enum):
    """Where a series stands: receiving -> queued -> processing -> done | failed; a new instance reopens it.
    A series that is one input channel of a model of several waits ``held`` for the rest of its study."""

    RECEIVING = "receiving"
    QUEUED = "queued"
    PROCESSING = "processing"
    HELD = "held"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class StoredInstance:
    """The outcome of one C-STORE: its series, and whether it was new (``path``) or a re-sent duplicate."""

    series_id: int
    key_hash: str
    duplicate: bool
    path: Path | None = None


@dataclass(frozen=True)
class SeriesRow:
    id: int
    called_ae: str
    study_uid: str
    series_uid: str
    modality: str
    key_hash: str
    state: SeriesState
    generation: int
    instance_count: int
    last_received: float
    reason: str | None


class ResultStage(str, enum.Enum):
    """How far a result is published: its SEG(s) first (they leave at once), then everything else."""

    #: the SEG(s) and their outbox rows are committed; the SR, measurements and other objects are not yet
    SEG = "seg"
    #: every object written and queued
    COMPLETE = "complete"
    #: the SEG(s) went out; the rest was given up (a newer generation of the series, or another model, came first)
    DROPPED = "dropped"


@dataclass(frozen=True)
class ResultRow:
    """A published result: the model that made it, the directory that holds its files, and its stage."""

    id: int
    series_id: int
    generation: int
    model: str
    directory: Path
    stage: ResultStage = ResultStage.COMPLETE


@dataclass(frozen=True)
class OutboxItem:
    """One result file still to be sent to one destination, named as configured (the sender resolves the name,
    so a changed address or credential applies to what is already waiting)."""

    id: int
    result_id: int
    path: Path
    destination: str
    attempts: int
