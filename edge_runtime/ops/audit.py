"""The audit trail: an append-only JSON-lines log in which each line carries the hash of the line before it.

What it records, one line per event: the configuration at every start (and which keys changed since the
previous start), every association (calling AE, peer address, accepted or rejected and why), every series
taken for processing with its instance count, every result published or refused, every delivery of a result
file to a destination, and every comparison with a reference segmentation.

Why a hash chain. A site must be able to show afterwards what the device received, produced and sent, and
that nobody edited that record since. Each line holds ``prev`` (the sha256 of the previous line's bytes, or
:data:`ANCHOR` on the first line) and ``hash`` (the sha256 of its own canonical JSON without ``hash``), plus a
``seq`` number. An edited line fails its own hash; a line edited with its hash recomputed breaks the next
line's ``prev``; a removed or reordered line breaks ``seq`` and ``prev``. :func:`verify` names the first line
that does not hold. What a chain cannot show is the loss of the newest lines (truncation): ``audit verify``
prints the head hash, which a site that cares copies elsewhere (a syslog receiver, a ticket).

Durability: each line is written with one ``write`` on a file opened for appending, then flushed and
fsynced (a series makes a handful of lines). A restart continues the chain from the last line on disk.

Patient data: by default series are named only by the spool's keyed hash (``key_hash``), as in the logs.
``audit_patient_data = true`` adds Patient ID and the Study/Series Instance UIDs where the service has them.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: ``prev`` of the first line: a fixed value, so that removing the first lines is detected too
ANCHOR = hashlib.sha256(b"edge-runtime audit log, version 1").hexdigest()


def canonical(record: Mapping[str, Any]) -> bytes:
    """The bytes a record is hashed and written as: sorted keys, no spaces, UTF-8."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class AuditLog:
    """Appends chained records to ``path``; thread-safe (the listener's, worker's and sender's threads share it).

    ``patient_data`` says whether the site allows patient identifiers in the trail; callers pass them in
    ``phi=`` and they are written only then.
    """

    def __init__(
        self,
        path: Path,
        *,
        patient_data: bool = False,
        forward: Callable[[Mapping[str, Any]], None] | None = None,
    ):
        self.path = Path(path)
        self.patient_data = patient_data
        #: also told of every record written (DICOM audit messages to syslog: :mod:`edge_runtime.ops.atna`)
        self.forward = forward
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._seq, self._prev, self._last_start = self._tail()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)

    def _tail(self) -> tuple[int, str, dict[str, Any] | None]:
        """Next ``seq``, the hash of the last line, and the configuration of the last ``start`` record."""
        if not self.path.exists():
            return 0, ANCHOR, None
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            # a line cut short (a crash inside write): leave it for ``audit verify`` to name, chain after it
            log.warning("audit log %s ends in an incomplete line; it stays as it is and the chain goes on", self.path)
            with open(self.path, "ab") as f:
                f.write(b"\n")
            data += b"\n"
        lines = data.splitlines()
        if not lines:
            return 0, ANCHOR, None
        seq: int | None = None
        last_start = None
        for raw in reversed(lines):
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(record, dict):
                continue
            if seq is None and isinstance(record.get("seq"), int):
                seq = record["seq"] + 1
            if record.get("event") == "start":
                last_start = record.get("config") if isinstance(record.get("config"), dict) else None
                break
        return len(lines) if seq is None else seq, _sha256(lines[-1]), last_start

    def record(self, event: str, /, **fields: Any) -> None:
        """Append one ``event`` with ``fields``; the field ``phi`` (patient identifiers, a mapping or None) is
        written, as ``patient``, only where the site allows it.

        Never raises: an audit write that fails is logged as an error, and the service goes on (refusing
        work because the audit disk is full would lose more than it protects)."""
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")
        phi: Mapping[str, Any] | None = fields.pop("phi", None)
        with self._lock:
            body: dict[str, Any] = {"seq": self._seq, "time": now, "event": event, **fields, "prev": self._prev}
            if phi and self.patient_data:
                body["patient"] = dict(phi)
            body["hash"] = _sha256(canonical(body))
            line = canonical(body)
            try:
                os.write(self._fd, line + b"\n")
                os.fsync(self._fd)
            except OSError as exc:
                log.error("audit log %s: cannot write a %s record: %s", self.path, event, exc.strerror)
                return
            self._seq += 1
            self._prev = _sha256(line)
        if self.forward is not None:
            self.forward(body)

    def start(self, config: Mapping[str, Any], **fields: Any) -> None:
        """The configuration at start, and which keys changed since the previous start in this log."""
        plain: dict[str, Any] = json.loads(json.dumps(config, default=str))
        previous = self._last_start
        changed = None
        if previous is not None:
            changed = sorted(k for k in set(plain) | set(previous) if plain.get(k) != previous.get(k))
        self.record("start", config=plain, changed=changed, **fields)
        self._last_start = plain

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


@dataclass(frozen=True)
class Verification:
    """What :func:`verify` found: how many lines held, and the first that did not (1-based) and why."""

    lines: int
    head: str
    bad_line: int | None = None
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.bad_line is None


def verify(path: Path) -> Verification:
    """Check the chain of the audit log at ``path`` line by line; stop at the first line that does not hold."""
    prev, expected_seq, count = ANCHOR, 0, 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            line = raw.rstrip(b"\n")
            problem = _check_line(line, prev, expected_seq, number)
            if problem:
                return Verification(lines=count, head=prev, bad_line=number, reason=problem)
            prev, expected_seq, count = _sha256(line), expected_seq + 1, count + 1
    return Verification(lines=count, head=prev)


def _check_line(line: bytes, prev: str, expected_seq: int, number: int) -> str:
    """Why line ``number`` breaks the chain, or ``""`` when it holds."""
    try:
        record = json.loads(line)
    except ValueError:
        return "not a JSON object (edited or cut short)"
    if not isinstance(record, dict) or not isinstance(record.get("hash"), str):
        return "not an audit record (no hash)"
    claimed = record.pop("hash")
    if _sha256(canonical(record)) != claimed or canonical({**record, "hash": claimed}) != line:
        return "its content does not match its hash (the line was edited)"
    if record.get("seq") != expected_seq:
        what = "removed" if isinstance(record.get("seq"), int) and record["seq"] > expected_seq else "reordered"
        return f"seq {record.get('seq')} where {expected_seq} was expected (lines were {what} before it)"
    if record.get("prev") != prev:
        before = "the anchor" if number == 1 else f"line {number - 1}"
        return f"prev does not match the hash of {before} (that line was edited, or lines were removed or reordered)"
    return ""
