"""What the status page reads from the spool: a read-only view of its SQLite index and of one header per series.

The page opens the index with ``mode=ro``, a connection per request, so nothing it does can write to the spool
or hold the service's own connection (SQLite in WAL lets readers run beside the writer). The spool's index keeps
no descriptive attributes, so the date, modality and description that name a series on the page come from the
header of its first stored instance, read once (the pixel data is not read) and cached. Only those attributes
are read: patient name, ID and birth date never reach the page.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

#: the attributes a series is shown with, besides its keyed hash
DESCRIPTIVE_TAGS = ("SeriesDate", "StudyDate", "Modality", "SeriesDescription")
_CACHE_SIZE = 2048


@dataclass(frozen=True)
class ResultView:
    """The newest result of a series: where its files are and what its stages took."""

    id: int
    directory: Path
    created: float
    #: the record the worker stored: ``stages`` (seconds per stage), ``started``, ``published`` (epochs)
    timings: dict[str, Any]
    #: when the last of its files reached a destination (None: not sent, or no destination)
    sent: float | None
    pending: int


@dataclass(frozen=True)
class SeriesView:
    id: int
    key_hash: str
    state: str
    modality: str
    instances: int
    first_received: float
    last_received: float
    updated: float
    reason: str | None
    result: ResultView | None

    def timeline(self) -> list[tuple[str, float]]:
        """(stage, seconds) from the first instance to the last send: receive, completion wait, the worker's
        stages (load, preprocess, inference, postprocess, seg, measurements), send. Empty without a result."""
        if self.result is None:
            return []
        record = self.result.timings
        stages = record.get("stages", {})
        started = float(record.get("started", self.last_received))
        steps = [("receive", self.last_received - self.first_received), ("wait", started - self.last_received)]
        steps += [(name, float(v)) for name, v in stages.items() if name != "total"]
        if self.result.sent is not None:
            steps.append(("send", self.result.sent - float(record.get("published", self.result.created))))
        return [(name, max(seconds, 0.0)) for name, seconds in steps]


@dataclass(frozen=True)
class FailingDestination:
    destination: str
    #: results waiting after at least one failed attempt
    pending: int
    attempts: int
    #: results the destination refused for good (state ``failed``)
    refused: int
    last_error: str | None


class SpoolIndex:
    """Read-only queries of the index in ``spool_root``; thread-safe (a connection per call)."""

    def __init__(self, spool_root: Path):
        self.root = Path(spool_root)
        self._headers: OrderedDict[tuple[int, str], dict[str, str]] = OrderedDict()
        self._lock = threading.Lock()

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        con = sqlite3.connect(f"{(self.root / 'index.sqlite3').resolve().as_uri()}?mode=ro", uri=True, timeout=5)
        try:
            yield con
        finally:
            con.close()

    def recent_series(self, limit: int = 100, state: str | None = None) -> list[SeriesView]:
        """The series that received their last instance most recently, newest first; ``state`` filters."""
        where, args = ("WHERE s.state = ?", (state, limit)) if state else ("", (limit,))
        with self._connect() as db:
            rows = db.execute(
                "SELECT s.id, s.key_hash, s.state, s.modality, s.instance_count, s.first_received, s.last_received, "
                "s.updated, s.reason, r.id, r.directory, r.created, r.timings, "
                "(SELECT MAX(o.sent) FROM outbox o WHERE o.result_id = r.id), "
                "(SELECT COUNT(*) FROM outbox o WHERE o.result_id = r.id AND o.state = 'pending') "
                "FROM series s LEFT JOIN results r ON r.id = (SELECT MAX(id) FROM results WHERE series_id = s.id) "
                f"{where} ORDER BY s.last_received DESC, s.id DESC LIMIT ?",
                args,
            ).fetchall()
        return [_series(r) for r in rows]

    def result_directory(self, result_id: int) -> Path | None:
        with self._connect() as db:
            row = db.execute("SELECT directory FROM results WHERE id = ?", (result_id,)).fetchone()
        return None if row is None else Path(row[0])

    def failing_destinations(self) -> list[FailingDestination]:
        """Destinations with results still pending after at least one failed attempt, or refused for good, with
        the newest error."""
        failing = "(state = 'pending' AND attempts > 0) OR state = 'failed'"
        with self._connect() as db:
            rows = db.execute(
                "SELECT destination, SUM(state = 'pending'), MAX(attempts), SUM(state = 'failed'), "
                f"(SELECT last_error FROM outbox e WHERE e.destination = o.destination AND ({failing}) "
                " AND e.last_error IS NOT NULL ORDER BY e.id DESC LIMIT 1) "
                f"FROM outbox o WHERE {failing} GROUP BY destination"
            ).fetchall()
        return [FailingDestination(*r) for r in rows]

    def latencies(self, since: float) -> tuple[list[float], list[float]]:
        """Seconds from a series' last instance to its result, for results published after ``since``: (to the
        result written, for every result; to its last file sent, for results every destination has taken)."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT r.created, s.last_received, (SELECT MAX(o.sent) FROM outbox o WHERE o.result_id = r.id), "
                "(SELECT COUNT(*) FROM outbox o WHERE o.result_id = r.id AND o.state = 'pending') "
                "FROM results r JOIN series s ON s.id = r.series_id WHERE r.created >= ?",
                (since,),
            ).fetchall()
        current = [(created - last, sent, pending, last) for created, last, sent, pending in rows if created >= last]
        return [w for w, *_ in current], [sent - last for _, sent, pending, last in current if sent and not pending]

    def describe(self, series: SeriesView) -> dict[str, str]:
        """Date, modality and description of a series from its first instance's header ({} once purged).

        Cached by row id and keyed hash together: SQLite may give a purged series' id to a new one."""
        key = (series.id, series.key_hash)
        with self._lock:
            if key in self._headers:
                self._headers.move_to_end(key)
                return self._headers[key]
        with self._connect() as db:
            row = db.execute(
                "SELECT path FROM instances WHERE series_id = ? ORDER BY id LIMIT 1", (series.id,)
            ).fetchone()
        if row is None:
            return {}
        try:
            ds = pydicom.dcmread(self.root / row[0], stop_before_pixels=True, specific_tags=list(DESCRIPTIVE_TAGS))
        except (OSError, InvalidDicomError):
            return {}
        found = {tag: str(ds.get(tag, "") or "") for tag in DESCRIPTIVE_TAGS}
        with self._lock:
            self._headers[key] = found
            while len(self._headers) > _CACHE_SIZE:
                self._headers.popitem(last=False)
        return found


def _series(r: tuple[Any, ...]) -> SeriesView:
    result = None
    if r[9] is not None:
        result = ResultView(r[9], Path(r[10]), r[11], json.loads(r[12] or "{}"), r[13], r[14])
    return SeriesView(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], result)
