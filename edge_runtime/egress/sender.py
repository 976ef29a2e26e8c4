"""The sender: C-STORE SCU that drains the outbox to each destination, with retries and backoff.

A result leaves the outbox only when the destination answered success (0x0000, or a warning 0xB000-0xBFFF).
Anything else (connection refused, association rejected, a failure status, a timeout) is retried with
exponential backoff; the row stays pending across restarts.

:class:`StoreSCU` is the one association-and-C-STORE code path: the :class:`Sender`'s outbox loop and
``edge-runtime push`` (:mod:`edge_runtime.apps.push`) both send through it.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association

from edge_runtime.dicom import is_success
from edge_runtime.egress.destination import Destination
from edge_runtime.spool.store import OutboxItem, Spool

__all__ = ["Destination", "RetryPolicy", "Sender", "StoreResult", "StoreSCU"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoreResult:
    """What became of one C-STORE request: the Status the destination answered (None when no answer came: a
    timeout or an abort), or the error that kept the request from being sent."""

    status: int | None = None
    error: Exception | None = None

    @property
    def success(self) -> bool:
        """The destination stored the instance (success, or a warning)."""
        return self.error is None and is_success(self.status)


class StoreSCU:
    """One association with a destination for sending files by C-STORE; a context manager that releases it.

    Opening never raises for a destination that refuses or cannot be reached: :attr:`established` is then
    False and :attr:`rejected` tells an association rejection from a connection that never came up.
    """

    def __init__(self, destination: Destination, association: Association):
        self.destination = destination
        self._association = association

    @classmethod
    def open(
        cls,
        destination: Destination,
        *,
        calling_ae: str,
        contexts: Iterable[tuple[str, Sequence[str]]],
        timeout: float,
    ) -> StoreSCU:
        """Request an association calling ``destination`` from ``calling_ae``, proposing each (SOP Class,
        transfer syntaxes) of ``contexts``; ``timeout`` bounds the connection, ACSE, DIMSE and network waits."""
        ae = AE(ae_title=calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
        for sop_class, syntaxes in contexts:
            ae.add_requested_context(sop_class, list(syntaxes))
        return cls(destination, ae.associate(destination.host, destination.port, ae_title=destination.ae_title))

    @property
    def established(self) -> bool:
        return bool(self._association.is_established)

    @property
    def rejected(self) -> bool:
        return bool(self._association.is_rejected)

    def store(self, path: Path) -> StoreResult:
        """Send the file at ``path`` as it is, with C-STORE."""
        try:
            status = self._association.send_c_store(str(path))
        except (OSError, ValueError, RuntimeError) as exc:
            return StoreResult(error=exc)
        return StoreResult(status=getattr(status, "Status", None))

    def release(self) -> None:
        if self._association.is_established:
            self._association.release()

    def __enter__(self) -> StoreSCU:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


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
        by_dest: dict[Destination, list[OutboxItem]] = defaultdict(list)
        for item in self.spool.due_outbox():
            by_dest[item.destination].append(item)
        sent = 0
        for dest, items in by_dest.items():
            if self._stop.is_set():
                break
            sent += self._send_to(dest, items)
        return sent

    def _send_to(self, dest: Destination, items: list[OutboxItem]) -> int:
        datasets = {}
        for item in items:
            try:
                datasets[item.id] = pydicom.dcmread(item.path, stop_before_pixels=True)
            except (OSError, pydicom.errors.InvalidDicomError) as exc:
                self._failed(item, dest, f"cannot read result file: {exc}")
        sop_classes = sorted({str(ds.SOPClassUID) for ds in datasets.values()})
        syntaxes = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        contexts = [(sop_class, syntaxes) for sop_class in sop_classes]
        with StoreSCU.open(dest, calling_ae=self.calling_ae, contexts=contexts, timeout=self.timeout) as scu:
            if not scu.established:
                why = "association rejected" if scu.rejected else "association not established"
                for item in items:
                    if item.id in datasets:
                        self._failed(item, dest, why)
                return 0
            sent = 0
            for item in items:
                if item.id not in datasets or self._stop.is_set():
                    continue
                result = scu.store(item.path)
                if result.error is not None:
                    self._failed(item, dest, f"{type(result.error).__name__}: {result.error}")
                elif result.success:
                    self.spool.mark_sent(item.id)
                    if self.on_result is not None:
                        self.on_result(True)
                    sent += 1
                    log.info("sent result %d file %s to %s", item.result_id, item.path.name, dest)
                else:
                    code = result.status
                    why = "no response (timeout or abort)" if code is None else f"status 0x{code:04X}"
                    self._failed(item, dest, why)
                    if code is None:
                        break
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
