"""The spool: received instances as files, and the SQLite index that every other stage works from.

Every hand-over survives a crash. An instance is written under a new random name, fsynced (and its directory
fsynced), then indexed in one committed transaction, before the listener answers success. A file exists for the
rest of the runtime only once its row is committed: a crash before that leaves a file the index does not know,
which :meth:`Spool.remove_orphans` deletes at the next start (its sender never got a success status, so it sends
it again). No rename is needed for that, which saves one metadata change per instance; the directory's ``fsync``
stays (it cost 1-2.5 ms per instance on a loaded disk, which files made ahead in batches could save). File names
are random; nothing a peer sent ever becomes part of a path.

Series move through :class:`SeriesState`. A new instance (re)opens its series (``receiving``) and bumps its
``generation``; the tracker queues it after the quiet period; the worker publishes a result only if the
generation it processed is still current, so a series that grew while it was processed is processed again
rather than sent half-done.

A result is published in two steps (:class:`ResultStage`): its SEG(s) with their outbox rows first, so they leave
at once, then the other objects with theirs. The stage is recorded, so a result whose second step a crash
interrupted is completed at the next start (:meth:`Spool.unfinished_results`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from edge_runtime.dicom import fsync_dir
from edge_runtime.errors import SpoolFull
from edge_runtime.imaging.geometry import SliceGeometry
from edge_runtime.spool.rows import OutboxItem, ResultRow, ResultStage, SeriesRow, SeriesState, StoredInstance
from edge_runtime.spool.schema import MIGRATIONS, SCHEMA, SCHEMA_VERSION

log = logging.getLogger(__name__)


class Spool:
    """Files under ``root/instances`` and the index ``root/index.sqlite3``. Thread-safe."""

    def __init__(self, root: Path, *, min_free_bytes: int = 512 * 1024 * 1024):
        self.root = Path(root)
        self.instances_dir = self.root / "instances"
        self.tmp_dir = self.root / "tmp"
        for d in (self.root, self.instances_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.min_free_bytes = min_free_bytes
        self._secret = self._load_secret()
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.root / "index.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        has_tables = self._db.execute("SELECT COUNT(*) FROM sqlite_master WHERE type='table'").fetchone()[0] > 0
        while has_tables and version in MIGRATIONS:
            with self._tx() as db:
                db.execute(MIGRATIONS[version])
                version += 1
                db.execute(f"PRAGMA user_version={version}")
        if has_tables and version != SCHEMA_VERSION:
            self._db.close()
            raise RuntimeError(
                f"the spool index in {self.root} has schema version {version}; this version of edge-runtime "
                f"uses {SCHEMA_VERSION}. Use a new spool directory (the old one still holds its instances)."
            )
        self._db.executescript(SCHEMA)
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        for leftover in self.tmp_dir.iterdir():  # a crash mid-write leaves only unacknowledged data here
            leftover.unlink(missing_ok=True)

    # -- keys and transactions -------------------------------------------------------------------------

    def _load_secret(self) -> bytes:
        path = self.root / "secret"
        if not path.exists():
            tmp = self.tmp_dir / f"secret-{uuid.uuid4().hex}"
            tmp.write_bytes(secrets.token_bytes(32))
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        return path.read_bytes()

    def key_hash(self, *parts: str) -> str:
        """A short keyed hash that names a series in logs without revealing its UIDs."""
        return hmac.new(self._secret, "\x00".join(parts).encode(), hashlib.sha256).hexdigest()[:12]

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- instances --------------------------------------------------------------------------------------

    def check_space(self) -> None:
        st = os.statvfs(self.root)
        free = st.f_bavail * st.f_frsize
        if free < self.min_free_bytes:
            raise SpoolFull(f"{free} bytes free on the spool's file system; the watermark is {self.min_free_bytes}")

    def has_instance(self, called_ae: str, study_uid: str, series_uid: str, sop_uid: str) -> bool:
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM instances i JOIN series s ON s.id = i.series_id "
                "WHERE s.called_ae=? AND s.study_uid=? AND s.series_uid=? AND i.sop_uid=?",
                (called_ae, study_uid, series_uid, sop_uid),
            ).fetchone()
        return row is not None

    def store(
        self,
        data: bytes | Sequence[bytes | memoryview],
        *,
        called_ae: str,
        calling_ae: str,
        study_uid: str,
        series_uid: str,
        sop_uid: str,
        sop_class: str,
        transfer_syntax: str,
        modality: str,
        geometry: SliceGeometry | None = None,
    ) -> StoredInstance:
        """Make one instance durable and index it. A re-sent SOP Instance UID is acknowledged, not stored twice.

        ``data`` is the file's bytes, or its parts in order (written with one ``writev``, never joined)."""
        parts = [data] if isinstance(data, bytes) else list(data)
        key = self.key_hash(called_ae, study_uid, series_uid)
        if self.has_instance(called_ae, study_uid, series_uid, sop_uid):
            return StoredInstance(self._series_id(called_ae, study_uid, series_uid), key, duplicate=True)
        self.check_space()
        path, size = self._write_durably(parts)
        now = time.time()
        try:
            with self._tx() as db:
                db.execute(
                    "INSERT INTO series (called_ae, study_uid, series_uid, modality, key_hash, state, generation, "
                    "instance_count, first_received, last_received, updated) VALUES (?,?,?,?,?,?,0,0,?,?,?) "
                    "ON CONFLICT (called_ae, study_uid, series_uid) DO NOTHING",
                    (
                        called_ae,
                        study_uid,
                        series_uid,
                        modality,
                        key,
                        SeriesState.RECEIVING.value,
                        now,
                        now,
                        now,
                    ),
                )
                series_id = db.execute(
                    "SELECT id FROM series WHERE called_ae=? AND study_uid=? AND series_uid=?",
                    (called_ae, study_uid, series_uid),
                ).fetchone()[0]
                cur = db.execute(
                    "INSERT OR IGNORE INTO instances (series_id, sop_uid, sop_class, transfer_syntax, path, size, "
                    "calling_ae, received, geometry) VALUES (?,?,?,?,?,?,?,?,?)",
                    (
                        series_id,
                        sop_uid,
                        sop_class,
                        transfer_syntax,
                        str(path.relative_to(self.root)),
                        size,
                        calling_ae,
                        now,
                        geometry.to_json() if geometry is not None else None,
                    ),
                )
                duplicate = cur.rowcount == 0
                if not duplicate:
                    db.execute(
                        "UPDATE series SET state=?, generation=generation+1, instance_count=instance_count+1, "
                        "last_received=?, updated=?, reason=NULL WHERE id=?",
                        (SeriesState.RECEIVING.value, now, now, series_id),
                    )
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        if duplicate:  # a concurrent association stored the same instance first
            path.unlink(missing_ok=True)
        return StoredInstance(series_id, key, duplicate, None if duplicate else path)

    def _write_durably(self, parts: Sequence[bytes | memoryview]) -> tuple[Path, int]:
        """Write ``parts`` to a new file under its final name and make it and its name durable; (path, size)."""
        name = uuid.uuid4().hex
        day = time.strftime("%Y%m%d")
        final_dir = self.instances_dir / day
        if not final_dir.is_dir():
            final_dir.mkdir(parents=True, exist_ok=True)
            fsync_dir(self.instances_dir)
        final = final_dir / f"{name}.dcm"
        fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            views = [memoryview(p).cast("B") for p in parts]
            size = sum(len(v) for v in views)
            while views:
                written = os.writev(fd, views)
                while views and written >= len(views[0]):
                    written -= len(views[0])
                    views.pop(0)
                if views:
                    views[0] = views[0][written:]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            final.unlink(missing_ok=True)
            raise
        os.close(fd)
        fsync_dir(final_dir)
        return final, size

    def _series_id(self, called_ae: str, study_uid: str, series_uid: str) -> int:
        with self._lock:
            return self._db.execute(
                "SELECT id FROM series WHERE called_ae=? AND study_uid=? AND series_uid=?",
                (called_ae, study_uid, series_uid),
            ).fetchone()[0]

    def instance_paths(self, series_id: int) -> list[Path]:
        with self._lock:
            rows = self._db.execute("SELECT path FROM instances WHERE series_id=? ORDER BY id", (series_id,)).fetchall()
        return [self.root / r[0] for r in rows]

    def instance_geometries(self, series_id: int) -> list[SliceGeometry]:
        """The slice geometry recorded at ingest for each instance of a series that is an image slice."""
        with self._lock:
            rows = self._db.execute("SELECT geometry FROM instances WHERE series_id=?", (series_id,)).fetchall()
        return [SliceGeometry.from_json(r[0]) for r in rows if r[0]]

    # -- series -----------------------------------------------------------------------------------------

    def _row(self, r: tuple[Any, ...]) -> SeriesRow:
        return SeriesRow(r[0], r[1], r[2], r[3], r[4], r[5], SeriesState(r[6]), r[7], r[8], r[9], r[10])

    _COLUMNS = (
        "id, called_ae, study_uid, series_uid, modality, key_hash, state, generation, instance_count, "
        "last_received, reason"
    )

    def series(self, series_id: int) -> SeriesRow:
        with self._lock:
            r = self._db.execute(f"SELECT {self._COLUMNS} FROM series WHERE id=?", (series_id,)).fetchone()
        return self._row(r)

    def find_series(self, called_ae: str, study_uid: str, series_uid: str) -> SeriesRow | None:
        with self._lock:
            r = self._db.execute(
                f"SELECT {self._COLUMNS} FROM series WHERE called_ae=? AND study_uid=? AND series_uid=?",
                (called_ae, study_uid, series_uid),
            ).fetchone()
        return None if r is None else self._row(r)

    def all_series(self) -> list[SeriesRow]:
        with self._lock:
            rows = self._db.execute(f"SELECT {self._COLUMNS} FROM series ORDER BY id").fetchall()
        return [self._row(r) for r in rows]

    def queue_quiet_series(self, quiet_seconds: float, now: float | None = None) -> list[SeriesRow]:
        """Queue every receiving series that has been quiet for ``quiet_seconds``; return them."""
        now = time.time() if now is None else now
        with self._tx() as db:
            rows = db.execute(
                f"SELECT {self._COLUMNS} FROM series WHERE state=? AND last_received <= ?",
                (SeriesState.RECEIVING.value, now - quiet_seconds),
            ).fetchall()
            for r in rows:
                db.execute("UPDATE series SET state=?, updated=? WHERE id=?", (SeriesState.QUEUED.value, now, r[0]))
        return [self._row(r) for r in rows]

    def queue_series(self, series_id: int, generation: int) -> bool:
        """Queue one receiving series now (completion on evidence), if no instance arrived since ``generation``."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE series SET state=?, updated=? WHERE id=? AND generation=? AND state=?",
                (SeriesState.QUEUED.value, time.time(), series_id, generation, SeriesState.RECEIVING.value),
            )
        return cur.rowcount == 1

    def next_receiving_deadline(self, quiet_seconds: float) -> float | None:
        with self._lock:
            r = self._db.execute(
                "SELECT MIN(last_received) FROM series WHERE state=?", (SeriesState.RECEIVING.value,)
            ).fetchone()
        return None if r[0] is None else r[0] + quiet_seconds

    def claim_job(self) -> SeriesRow | None:
        """Take the oldest queued series for processing."""
        with self._tx() as db:
            r = db.execute(
                f"SELECT {self._COLUMNS} FROM series WHERE state=? ORDER BY last_received LIMIT 1",
                (SeriesState.QUEUED.value,),
            ).fetchone()
            if r is None:
                return None
            db.execute(
                "UPDATE series SET state=?, updated=? WHERE id=?",
                (SeriesState.PROCESSING.value, time.time(), r[0]),
            )
        return replace(self._row(r), state=SeriesState.PROCESSING)

    def requeue_interrupted(self) -> int:
        """After a restart: jobs that were being processed go back to the queue, and series still receiving get
        their whole quiet period again: time the service was down is not time the sender was quiet (it could not
        send), so it is no evidence that the series is complete."""
        now = time.time()
        with self._tx() as db:
            cur = db.execute(
                "UPDATE series SET state=?, updated=? WHERE state=?",
                (SeriesState.QUEUED.value, now, SeriesState.PROCESSING.value),
            )
            db.execute(
                "UPDATE series SET last_received=? WHERE state=? AND last_received < ?",
                (now, SeriesState.RECEIVING.value, now),
            )
        return cur.rowcount

    def fail(self, series_id: int, generation: int, reason: str) -> bool:
        """Record why a series produced no result (only if no newer instance arrived meanwhile)."""
        with self._tx() as db:
            return _end_processing(db, series_id, generation, SeriesState.FAILED, reason, time.time())

    def finish(self, series_id: int, generation: int, note: str) -> bool:
        """Mark a processed series done without a result of its own (e.g. a reference SEG that was compared)."""
        with self._tx() as db:
            return _end_processing(db, series_id, generation, SeriesState.DONE, note, time.time())

    def publish(
        self,
        series_id: int,
        generation: int,
        model: str,
        directory: Path,
        deliveries: Mapping[str, Sequence[Path]],
        timings: str = "{}",
        stage: ResultStage = ResultStage.COMPLETE,
    ) -> int | None:
        """Commit a result and its outbox rows, if ``generation`` is still the series' current one.

        ``deliveries`` maps a destination's name to the files it receives: one outbox row per (file, destination),
        so a destination that is down holds back nothing else. ``stage`` :attr:`ResultStage.SEG`: these are the
        result's SEG(s) only; :meth:`complete` adds the rest."""
        now = time.time()
        with self._tx() as db:
            if not _end_processing(db, series_id, generation, SeriesState.DONE, None, now):
                return None
            result_id = db.execute(
                "INSERT INTO results (series_id, generation, model, directory, created, timings, stage) "
                "VALUES (?,?,?,?,?,?,?)",
                (series_id, generation, model, str(directory), now, timings, stage.value),
            ).lastrowid
            assert result_id is not None
            _add_outbox(db, result_id, deliveries, now)
        return result_id

    def complete(self, result_id: int, deliveries: Mapping[str, Sequence[Path]], record: Mapping[str, Any]) -> bool:
        """The second step of a result published at :attr:`ResultStage.SEG`: its other objects' outbox rows, and
        ``record`` (stages, time) as ``completed`` in its timings. False, adding nothing, when the result is not
        at that stage (so no object is queued twice). The generation is not checked: the SEG of this one went
        out, and the SR and the other objects describe it; a newer generation brings a result of its own."""
        now = time.time()
        with self._tx() as db:
            r = db.execute(
                "SELECT timings FROM results WHERE id=? AND stage=?", (result_id, ResultStage.SEG.value)
            ).fetchone()
            if r is None:
                return False
            timings = {**json.loads(r[0]), "completed": dict(record)}
            db.execute(
                "UPDATE results SET stage=?, timings=? WHERE id=?",
                (ResultStage.COMPLETE.value, json.dumps(timings), result_id),
            )
            _add_outbox(db, result_id, deliveries, now)
        return True

    def drop_unfinished(self, result_id: int) -> bool:
        """Give up the second step of a result (its SEG went out; its other objects cannot be made as they were:
        a newer generation or another model). False when the result was not at the SEG stage."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE results SET stage=? WHERE id=? AND stage=?",
                (ResultStage.DROPPED.value, result_id, ResultStage.SEG.value),
            )
        return cur.rowcount == 1

    def unfinished_results(self) -> list[ResultRow]:
        """Results whose SEG(s) were published and their other objects not (a stop or crash came between)."""
        return self._results("stage=?", ResultStage.SEG.value)

    def results(self, series_id: int) -> list[ResultRow]:
        """The results published for a series, oldest first."""
        return self._results("series_id=?", series_id)

    def _results(self, where: str, value: object) -> list[ResultRow]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT id, series_id, generation, model, directory, stage FROM results WHERE {where} ORDER BY id",
                (value,),
            ).fetchall()
        return [ResultRow(r[0], r[1], r[2], r[3], Path(r[4]), ResultStage(r[5])) for r in rows]

    # -- retention -------------------------------------------------------------------------------------------

    def purge(self, older_than: float) -> tuple[int, int]:
        """Delete the instances of series finished (done or failed) before ``older_than``, and sent outbox rows.

        A series still receiving, queued, processing, with an unsent result or a result whose second step is
        still to be made (from its instances) is never touched. Rows go first, then files: a crash in between
        leaves orphan files, which :meth:`remove_orphans` collects. Returns (series purged, files deleted).
        """
        with self._tx() as db:
            rows = db.execute(
                "SELECT id FROM series WHERE state IN (?, ?) AND updated < ? AND NOT EXISTS ("
                "SELECT 1 FROM results r JOIN outbox o ON o.result_id = r.id "
                "WHERE r.series_id = series.id AND o.state = 'pending') AND NOT EXISTS ("
                "SELECT 1 FROM results r WHERE r.series_id = series.id AND r.stage = ?)",
                (SeriesState.DONE.value, SeriesState.FAILED.value, older_than, ResultStage.SEG.value),
            ).fetchall()
            ids = [r[0] for r in rows]
            paths: list[str] = []
            for series_id in ids:
                paths += [r[0] for r in db.execute("SELECT path FROM instances WHERE series_id=?", (series_id,))]
                db.execute("DELETE FROM instances WHERE series_id=?", (series_id,))
                db.execute(
                    "DELETE FROM outbox WHERE result_id IN (SELECT id FROM results WHERE series_id=?)",
                    (series_id,),
                )
                db.execute("DELETE FROM results WHERE series_id=?", (series_id,))
                db.execute("DELETE FROM series WHERE id=?", (series_id,))
        for rel in paths:
            _unlink_quietly(self.root / rel)
        return len(ids), len(paths)

    def remove_orphans(self) -> int:
        """Delete instance files the index does not know (a crash between rename and commit left them; their
        sender never got a success status, so it sends them again)."""
        with self._lock:
            known = {r[0] for r in self._db.execute("SELECT path FROM instances")}
        removed = 0
        for path in self.instances_dir.rglob("*.dcm"):
            if str(path.relative_to(self.root)) not in known:
                _unlink_quietly(path)
                removed += 1
        return removed

    # -- outbox -----------------------------------------------------------------------------------------

    def due_outbox(self, now: float | None = None) -> list[OutboxItem]:
        now = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute(
                "SELECT id, result_id, path, destination, attempts FROM outbox WHERE state='pending' "
                "AND next_attempt <= ? ORDER BY id",
                (now,),
            ).fetchall()
        return [OutboxItem(r[0], r[1], Path(r[2]), r[3], r[4]) for r in rows]

    def next_outbox_attempt(self) -> float | None:
        with self._lock:
            r = self._db.execute("SELECT MIN(next_attempt) FROM outbox WHERE state='pending'").fetchone()
        return r[0]

    def mark_sent(self, item_id: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE outbox SET state='sent', sent=?, last_error=NULL WHERE id=?", (time.time(), item_id))

    def mark_failed_attempt(self, item_id: int, error: str, retry_at: float) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE outbox SET attempts=attempts+1, last_error=?, next_attempt=? WHERE id=?",
                (error[:500], retry_at, item_id),
            )

    def mark_undeliverable(self, item_id: int, error: str) -> None:
        """The destination refused the object for good (it would refuse it again): no more attempts."""
        with self._tx() as db:
            db.execute(
                "UPDATE outbox SET state='failed', attempts=attempts+1, last_error=? WHERE id=?", (error[:500], item_id)
            )

    def series_counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM series GROUP BY state").fetchall()
        return {r[0]: r[1] for r in rows}

    def outbox_counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM outbox GROUP BY state").fetchall()
        return {r[0]: r[1] for r in rows}


def _add_outbox(db: sqlite3.Connection, result_id: int, deliveries: Mapping[str, Sequence[Path]], now: float) -> None:
    """One pending outbox row per (file, destination). Runs inside the caller's transaction."""
    db.executemany(
        "INSERT INTO outbox (result_id, path, destination, state, next_attempt) VALUES (?,?,?,?,?)",
        [(result_id, str(f), name, "pending", now) for name, files in deliveries.items() for f in files],
    )


def _end_processing(
    db: sqlite3.Connection, series_id: int, generation: int, state: SeriesState, reason: str | None, now: float
) -> bool:
    """Move a series out of processing to ``state``, unless an instance arrived since ``generation`` (then the
    series is receiving again and this outcome is stale). Runs inside the caller's transaction."""
    cur = db.execute(
        "UPDATE series SET state=?, reason=?, updated=? WHERE id=? AND generation=? AND state=?",
        (state.value, reason, now, series_id, generation, SeriesState.PROCESSING.value),
    )
    return cur.rowcount == 1


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
