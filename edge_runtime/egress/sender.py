"""The sender: drains the outbox to each destination, by C-STORE (DIMSE) or STOW-RS (DICOMweb), with retries
and backoff.

A result leaves the outbox only when the destination answered success (C-STORE 0x0000 or a warning
0xB000-0xBFFF; STOW-RS: the instance referenced, see :mod:`edge_runtime.egress.stow`). Anything else (connection
refused, association rejected, a failure status, a timeout, an HTTP 5xx) is retried with exponential backoff;
the row stays pending across restarts. An object is refused for good only when asking again would get the same
answer: a STOW-RS 4xx, or a DIMSE node that accepts no presentation context for its SOP class (DCMTK 3.6.7's
storescp, for one, does not take the Label Map Segmentation class). That row is marked failed, with the reason.
Each destination is tried on its own, so one that is down holds back nothing sent elsewhere.

:class:`StoreSCU` is the one association-and-C-STORE code path: the :class:`Sender`'s outbox loop and
``edge-runtime push`` (:mod:`edge_runtime.apps.push`) both send through it.
"""

from __future__ import annotations

import logging
import random
import ssl
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import pydicom
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from edge_runtime.dicom import is_success
from edge_runtime.egress.delivery import Delivery
from edge_runtime.egress.destination import Destination, DimseNode, StowTarget
from edge_runtime.egress.stow import store_instances
from edge_runtime.spool.store import OutboxItem, Spool

__all__ = ["Destination", "DimseNode", "RetryPolicy", "Sender", "StoreResult", "StoreSCU"]

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

    def __init__(self, destination: DimseNode, association: Association):
        self.destination = destination
        self._association = association

    @classmethod
    def open(
        cls,
        destination: DimseNode,
        *,
        calling_ae: str,
        contexts: Iterable[tuple[str, Sequence[str]]],
        timeout: float,
    ) -> StoreSCU:
        """Request an association calling ``destination`` from ``calling_ae``, proposing each (SOP Class,
        transfer syntaxes) of ``contexts``; ``timeout`` bounds the connection, ACSE, DIMSE and network waits.
        A node with ``tls_ca`` is reached over TLS, its certificate verified against that CA and its host name."""
        ae = AE(ae_title=calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
        for sop_class, syntaxes in contexts:
            ae.add_requested_context(sop_class, list(syntaxes))
        # Verification too, which every node accepts: a node that accepts none of the storage classes then
        # still answers, and :meth:`accepts` tells which objects it refuses, instead of an aborted association
        # that looks like a node that is down
        ae.add_requested_context(Verification)
        tls_args = None
        if destination.tls_ca is not None:
            context = ssl.create_default_context(cafile=str(destination.tls_ca))
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            if destination.tls_cert is not None and destination.tls_key is not None:
                context.load_cert_chain(str(destination.tls_cert), str(destination.tls_key))
            tls_args = (context, destination.host)
        association = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args)
        return cls(destination, association)

    @property
    def established(self) -> bool:
        return bool(self._association.is_established)

    @property
    def rejected(self) -> bool:
        return bool(self._association.is_rejected)

    def accepts(self, sop_class: str) -> bool:
        """Whether the node accepted a presentation context for ``sop_class`` on this association."""
        return any(cx.abstract_syntax == sop_class for cx in self._association.accepted_contexts)

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
    """The outbox's drain: one thread, waking when a result is published or a retry falls due.

    ``destinations`` are the configured ones; an outbox row names its destination, which is looked up here (a
    row naming ``AE@host:port`` that is no longer configured is still sent there, as older versions wrote it).
    """

    def __init__(
        self,
        spool: Spool,
        calling_ae: str,
        retry: RetryPolicy | None = None,
        timeout: float = 30.0,
        on_result: Callable[[bool], None] | None = None,
        destinations: Sequence[Destination] = (),
        on_delivery: Callable[[OutboxItem, str, Delivery], None] | None = None,
    ):
        self.spool = spool
        self.on_result = on_result
        #: told what became of every send (the audit trail): the outbox row, the destination, the outcome
        self.on_delivery = on_delivery
        self.calling_ae = calling_ae
        self.retry = retry or RetryPolicy()
        self.timeout = timeout
        self.destinations = {d.name: d for d in destinations}
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

    def resolve(self, name: str) -> Destination | None:
        """The configured destination called ``name``; else ``name`` read as ``AE@host:port``; else None."""
        if name in self.destinations:
            return self.destinations[name]
        try:
            return Destination.parse(name) if "@" in name and ";" not in name else None
        except ValueError:
            return None

    def send_due(self) -> int:
        """Send every due outbox item, one association (or series of STOW-RS requests) per destination.
        Returns how many were sent."""
        by_dest: dict[str, list[OutboxItem]] = defaultdict(list)
        for item in self.spool.due_outbox():
            by_dest[item.destination].append(item)
        sent = 0
        for name, items in by_dest.items():
            if self._stop.is_set():
                break
            # one back-off for the destination's whole batch: its rows stay together and a destination that
            # is down gets one connection attempt per round, not one per row
            retry_at = time.time() + self.retry.delay(min(item.attempts for item in items))
            dest = self.resolve(name)
            if dest is None:
                for item in items:
                    self._record(item, name, Delivery.retry(f"destination {name!r} is not configured"), retry_at)
                continue
            target = dest.target
            paths = [item.path for item in items]
            deliveries = (
                self._store_dimse(target, paths) if isinstance(target, DimseNode) else self._store_stow(target, paths)
            )
            for index, delivery in deliveries:
                sent += self._record(items[index], str(dest), delivery, retry_at)
        return sent

    def _store_stow(self, target: StowTarget, paths: list[Path]) -> Iterator[tuple[int, Delivery]]:
        for index, delivery in store_instances(target, paths, timeout=self.timeout):
            yield index, delivery
            if self._stop.is_set():
                return

    def _store_dimse(self, node: DimseNode, paths: list[Path]) -> Iterator[tuple[int, Delivery]]:
        """C-STORE each file on one association; stops at the first request that got no answer (the rest are
        due again at their next attempt)."""
        sop_classes: dict[int, str] = {}
        for index, path in enumerate(paths):
            try:
                sop_classes[index] = str(pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID)
            except (OSError, pydicom.errors.InvalidDicomError, AttributeError) as exc:
                yield index, Delivery.retry(f"cannot read result file: {exc}")
        if not sop_classes:
            return
        syntaxes = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        contexts = [(sop_class, syntaxes) for sop_class in sorted(set(sop_classes.values()))]
        with StoreSCU.open(node, calling_ae=self.calling_ae, contexts=contexts, timeout=self.timeout) as scu:
            if not scu.established:
                why = "association rejected" if scu.rejected else "association not established"
                for index in sop_classes:
                    yield index, Delivery.retry(why)
                return
            for index, sop_class in sop_classes.items():
                if self._stop.is_set():
                    return
                if not scu.accepts(sop_class):
                    # the node does not store this kind of object; asking again would get the same answer
                    name = getattr(UID(sop_class), "name", sop_class)
                    yield index, Delivery.refused(f"{name} not accepted by the node (no presentation context)")
                    continue
                result = scu.store(paths[index])
                if result.error is not None:
                    yield index, Delivery.retry(f"{type(result.error).__name__}: {result.error}")
                elif result.success:
                    yield index, Delivery.ok()
                else:
                    code = result.status
                    why = "no response (timeout or abort)" if code is None else f"status 0x{code:04X}"
                    yield index, Delivery.retry(why)
                    if code is None:
                        return

    def _record(self, item: OutboxItem, dest: str, delivery: Delivery, retry_at: float) -> int:
        """Write what became of ``item`` into the outbox (to be tried again at ``retry_at`` when it may be); 1 if
        it was sent."""
        if self.on_result is not None:
            self.on_result(delivery.sent)
        if self.on_delivery is not None:
            self.on_delivery(item, dest, delivery)
        if delivery.sent:
            self.spool.mark_sent(item.id)
            log.info("sent result %d file %s to %s", item.result_id, item.path.name, dest)
            return 1
        if delivery.final:
            self.spool.mark_undeliverable(item.id, delivery.why)
            log.error(
                "%s refused result %d file %s for good (%s); it will not be sent again",
                dest,
                item.result_id,
                item.path.name,
                delivery.why,
            )
            return 0
        self.spool.mark_failed_attempt(item.id, delivery.why, retry_at)
        log.warning(
            "send of result %d to %s failed (%s); attempt %d, retrying in %.0f s",
            item.result_id,
            dest,
            delivery.why,
            item.attempts + 1,
            max(0.0, retry_at - time.time()),
        )
        return 0
