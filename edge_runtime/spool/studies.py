"""Study jobs: the series of one study that together are the inputs of a model of several channels.

Each series still moves through its own states; a complete one that the worker takes is *held* (not segmented
on its own) and its study's row in ``studies`` is touched. The study is segmented once its held series give
every channel, or refused once it has been quiet for the study's quiet period without them. Everything is in the
spool's index, so a restart resumes: held series stay held, a study job that was being processed puts its
series back in the queue (:meth:`Spool.requeue_interrupted`), and they are held again and the study looked at
again.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from edge_runtime.spool.rows import SeriesRow, SeriesState
from edge_runtime.spool.store import Spool


class StudyState(str, enum.Enum):
    """waiting (for channels) -> processing -> done | failed; a series held again reopens it."""

    WAITING = "waiting"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class StudyRow:
    id: int
    called_ae: str
    study_uid: str
    key_hash: str
    state: StudyState
    updated: float
    reason: str | None


_COLUMNS = "id, called_ae, study_uid, key_hash, state, updated, reason"
#: held, or settled as an input of an earlier result or of a refused study, which a late series may complete
_CLAIMABLE = (SeriesState.HELD.value, SeriesState.DONE.value, SeriesState.FAILED.value)


class StudyJobs:
    """The study-level job records of a :class:`Spool` (its ``studies`` table), sharing its lock and index."""

    def __init__(self, spool: Spool):
        self.spool = spool

    def hold(self, row: SeriesRow) -> StudyRow | None:
        """Hold a series the worker took (processing) for its study, and mark the study as changed now.
        None when an instance arrived since the series was taken (it is receiving again)."""
        now = time.time()
        with self.spool._tx() as db:
            cur = db.execute(
                "UPDATE series SET state=?, reason=NULL, updated=? WHERE id=? AND generation=? AND state=?",
                (SeriesState.HELD.value, now, row.id, row.generation, SeriesState.PROCESSING.value),
            )
            if cur.rowcount != 1:
                return None
            db.execute(
                "INSERT INTO studies (called_ae, study_uid, key_hash, state, updated) VALUES (?,?,?,?,?) "
                "ON CONFLICT (called_ae, study_uid) DO UPDATE SET state=excluded.state, updated=excluded.updated, "
                "reason=NULL",
                (
                    row.called_ae,
                    row.study_uid,
                    self.spool.key_hash(row.called_ae, row.study_uid),
                    StudyState.WAITING.value,
                    now,
                ),
            )
            r = db.execute(
                f"SELECT {_COLUMNS} FROM studies WHERE called_ae=? AND study_uid=?", (row.called_ae, row.study_uid)
            ).fetchone()
        return _study(r)

    def members(self, study: StudyRow) -> list[SeriesRow]:
        """Every series of the study received by the same AE, in any state."""
        with self.spool._lock:
            rows = self.spool._db.execute(
                f"SELECT {self.spool._COLUMNS} FROM series WHERE called_ae=? AND study_uid=? ORDER BY id",
                (study.called_ae, study.study_uid),
            ).fetchall()
        return [self.spool._row(r) for r in rows]

    def quiet(self, quiet_seconds: float, now: float | None = None) -> list[StudyRow]:
        """Waiting studies in which nothing happened for ``quiet_seconds``: no series held, no instance received."""
        cutoff = (time.time() if now is None else now) - quiet_seconds
        with self.spool._lock:
            rows = self.spool._db.execute(
                f"SELECT {_COLUMNS} FROM studies st WHERE state=? AND updated <= ? AND NOT EXISTS ("
                "SELECT 1 FROM series s WHERE s.called_ae = st.called_ae AND s.study_uid = st.study_uid "
                "AND s.last_received > ?) ORDER BY updated",
                (StudyState.WAITING.value, cutoff, cutoff),
            ).fetchall()
        return [_study(r) for r in rows]

    def claim(self, study: StudyRow, series: Sequence[SeriesRow]) -> list[SeriesRow] | None:
        """Take the study for processing with ``series`` (held, or settled before: see ``_CLAIMABLE``; at the
        generations given), all or none: None when one of them was reopened by a new instance meanwhile (the study
        is looked at again once it is held again)."""
        now = time.time()
        with self.spool._tx() as db:
            for s in series:
                current = db.execute("SELECT generation, state FROM series WHERE id=?", (s.id,)).fetchone()
                if current[0] != s.generation or current[1] not in _CLAIMABLE:
                    return None
            for s in series:
                db.execute("UPDATE series SET state=?, updated=? WHERE id=?", (SeriesState.PROCESSING.value, now, s.id))
            inputs = "+".join(f"{s.series_uid}@{s.generation}" for s in series)
            db.execute(
                "UPDATE studies SET state=?, updated=?, reason=NULL, inputs=? WHERE id=?",
                (StudyState.PROCESSING.value, now, inputs, study.id),
            )
        return [replace(s, state=SeriesState.PROCESSING) for s in series]

    def end(self, study: StudyRow, state: StudyState, reason: str | None = None) -> list[SeriesRow]:
        """Close the study (``done`` or ``failed``): its series still held or processing end ``done`` (``reason``
        as their note) or ``failed`` with ``reason``; returns them. Series the caller published are already done.
        ``waiting``: the study is not closed; its series go back to held, to wait for one that grew."""
        series_state = {
            StudyState.FAILED: SeriesState.FAILED,
            StudyState.DONE: SeriesState.DONE,
            StudyState.WAITING: SeriesState.HELD,
        }[state]
        now = time.time()
        open_states = (SeriesState.HELD.value, SeriesState.PROCESSING.value)
        where = "called_ae=? AND study_uid=? AND state IN (?, ?)"
        with self.spool._tx() as db:
            rows = db.execute(
                f"SELECT {self.spool._COLUMNS} FROM series WHERE {where}",
                (study.called_ae, study.study_uid, *open_states),
            ).fetchall()
            db.execute(
                f"UPDATE series SET state=?, reason=?, updated=? WHERE {where}",
                (series_state.value, reason, now, study.called_ae, study.study_uid, *open_states),
            )
            db.execute(
                "UPDATE studies SET state=?, reason=?, updated=? WHERE id=?", (state.value, reason, now, study.id)
            )
        return [self.spool._row(r) for r in rows]

    def inputs_key(self, row: SeriesRow) -> str | None:
        """The series (UID and generation) of the study's last claimed input, when ``row`` is its first channel:
        what names a study's result in its UID seed, so that a study segmented again after any of its channel
        series grew gets new objects, and a result completed after a restart the same ones."""
        with self.spool._lock:
            r = self.spool._db.execute(
                "SELECT inputs FROM studies WHERE called_ae=? AND study_uid=?", (row.called_ae, row.study_uid)
            ).fetchone()
        key = r[0] if r is not None else None
        return key if key and key.startswith(f"{row.series_uid}@") else None

    def study_of(self, row: SeriesRow) -> StudyRow | None:
        """The study job of a series, if it was ever held for one."""
        with self.spool._lock:
            r = self.spool._db.execute(
                f"SELECT {_COLUMNS} FROM studies WHERE called_ae=? AND study_uid=?", (row.called_ae, row.study_uid)
            ).fetchone()
        return None if r is None else _study(r)

    def study(self, study_id: int) -> StudyRow:
        with self.spool._lock:
            r = self.spool._db.execute(f"SELECT {_COLUMNS} FROM studies WHERE id=?", (study_id,)).fetchone()
        return _study(r)


def _study(r: tuple) -> StudyRow:
    return StudyRow(r[0], r[1], r[2], r[3], StudyState(r[4]), r[5], r[6])
