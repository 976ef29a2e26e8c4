"""The sender: C-STORE SCU that drains the outbox to each destination, with retries and backoff.

A result leaves the outbox only when the destination answered success (0x0000, or a warning 0xB000-0xBFFF).
Anything else (connection refused, association rejected, a failure status, a timeout) is retried with
exponential backoff; the row stays pending across restarts.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import pydicom
from pynetdicom import AE

from edge_runtime.dicom import is_success
from edge_runtime.spool.store import OutboxItem, Spool

log = logging.getLogger(__name__)

_DESTINATION = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:@]+|\[[0-9a-fA-F:]+\]):(?P<port>\d{1,5})$")


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        m = _DESTINATION.match(text.strip())
        if not m or not 0 < int(m["port"]) < 65536 or not m["ae"].strip():
            raise ValueError(f"destination {text!r} is not AE@host:port (AE title up to 16 characters, port 1-65535)")
        return cls(m["ae"].strip(), m["host"].strip("[]"), int(m["port"]))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class RetryPolicy:
    initial_seconds: float = 2.0
    max_seconds: float = 300.0

    def delay(self, attempts: int) -> float:
        base = min(self.max_seconds, self.initial_seconds * (2 ** max(0, attempts)))
        return base * random.uniform(0.8, 1.2)


class Sender:
    def __init__(
        self,
        spool: Spool,
        calling_ae: str,
        retry: RetryPolicy | None = None,
        timeout: float = 30.0,
        on_result: Callable[[bool], None] | None = None,
    ):
        self.spool = spool
        self.on_result = on_result
        self.calling_ae = calling_ae
        self.retry = retry or RetryPolicy()
        self.timeout = timeout
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sender", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.send_due()
            except Exception:
                log.exception("sender loop failed; retrying")
            nxt = self.spool.next_outbox_attempt()
            wait = 5.0 if nxt is None else min(5.0, max(0.0, nxt - time.time()))
            self._wake.wait(wait)
            self._wake.clear()

    def send_due(self) -> int:
        """Send every due outbox item, one association per destination. Returns how many were sent."""
        by_dest: dict[str, list[OutboxItem]] = defaultdict(list)
        for item in self.spool.due_outbox():
            by_dest[item.destination].append(item)
        sent = 0
        for dest_text, items in by_dest.items():
            if self._stop.is_set():
                break
            sent += self._send_to(Destination.parse(dest_text), items)
        return sent

    def _send_to(self, dest: Destination, items: list[OutboxItem]) -> int:
        datasets = {}
        for item in items:
            try:
                datasets[item.id] = pydicom.dcmread(item.path, stop_before_pixels=True)
            except (OSError, pydicom.errors.InvalidDicomError) as exc:
                self._failed(item, dest, f"cannot read result file: {exc}")
        sop_classes = sorted({str(ds.SOPClassUID) for ds in datasets.values()})
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        ae.connection_timeout = self.timeout
        for sop_class in sop_classes:
            ae.add_requested_context(sop_class, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
        if not assoc.is_established:
            why = "association rejected" if assoc.is_rejected else "association not established"
            for item in items:
                if item.id in datasets:
                    self._failed(item, dest, why)
            return 0
        sent = 0
        try:
            for item in items:
                if item.id not in datasets or self._stop.is_set():
                    continue
                try:
                    status = assoc.send_c_store(str(item.path))
                except (OSError, ValueError, RuntimeError) as exc:
                    self._failed(item, dest, f"{type(exc).__name__}: {exc}")
                    continue
                code = getattr(status, "Status", None)
                if is_success(code):
                    self.spool.mark_sent(item.id)
                    if self.on_result is not None:
                        self.on_result(True)
                    sent += 1
                    log.info("sent result %d file %s to %s", item.result_id, item.path.name, dest)
                else:
                    why = "no response (timeout or abort)" if code is None else f"status 0x{code:04X}"
                    self._failed(item, dest, why)
                    if code is None:
                        break
        finally:
            if assoc.is_established:
                assoc.release()
        return sent

    def _failed(self, item: OutboxItem, dest: Destination, why: str) -> None:
        if self.on_result is not None:
            self.on_result(False)
        delay = self.retry.delay(item.attempts)
        self.spool.mark_failed_attempt(item.id, why, time.time() + delay)
        log.warning(
            "send of result %d to %s failed (%s); attempt %d, retrying in %.0f s",
            item.result_id,
            dest,
            why,
            item.attempts + 1,
            delay,
        )
