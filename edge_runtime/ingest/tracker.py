"""The series tracker: decides when a series is complete and queues it for the worker.

C-STORE has no "series complete" signal, so completion is decided on evidence or on silence:

- **Evidence** (``early_completion``): the sender released its association and the stack it left is
  geometrically complete (regular spacing, no gaps). Even then the tracker waits out a short *release grace*:
  a sender that opens one association per instance (or per chunk) releases after every one of them, and what it
  has sent so far is a regular stack at every step. If the sender associates again within the grace, the series
  gets one more grace; if it is sending more of this series, the quiet period decides.
- **Silence**: no new instance for ``quiet_seconds`` (every PACS does this; Orthanc waits 60 s).

The tracker also runs the spool's retention purge. Times are stored in the spool, so a restart keeps every
receiving series' timer; the graces live only in memory (after a restart the quiet period decides).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edge_runtime.imaging.geometry import GeometryPolicy, stack_evidence
from edge_runtime.spool.store import SeriesState, Spool

if TYPE_CHECKING:
    from edge_runtime.config import SeriesSettings

log = logging.getLogger(__name__)

#: what a sender's open associations are doing (see ``Listener.sender_activity``)
SenderActivity = Callable[[str, int, float], str]


@dataclass(frozen=True)
class _Grace:
    """A series complete on evidence, waiting out its release grace (monotonic times)."""

    generation: int
    calling_ae: str
    released: float
    deadline: float


class SeriesTracker:
    """Queues complete series in the spool; ``on_complete(signal)`` is called once per series queued
    (``"evidence"`` or ``"quiet"``), ``wake_worker()`` once per round that queued any."""

    def __init__(
        self,
        spool: Spool,
        settings: SeriesSettings,
        policy: GeometryPolicy,
        *,
        retention_hours: float,
        sender_activity: SenderActivity,
        on_complete: Callable[[str], None],
        wake_worker: Callable[[], None],
    ):
        self.spool = spool
        self.settings = settings
        self.policy = policy
        self.retention_hours = retention_hours
        self.sender_activity = sender_activity
        self.on_complete = on_complete
        self.wake_worker = wake_worker
        self._wake = threading.Event()
        self._released: queue.SimpleQueue[tuple[int, str, float]] = queue.SimpleQueue()
        self._graced: dict[int, _Grace] = {}

    # -- events from the listener (any thread) ---------------------------------------------------------------

    def stored(self) -> None:
        """An instance was stored: a series' quiet period starts again."""
        self._wake.set()

    def released(self, series_ids: set[int], calling_ae: str) -> None:
        """An association that carried instances of ``series_ids`` was released."""
        now = time.monotonic()
        for series_id in series_ids:
            self._released.put((series_id, calling_ae, now))
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    # -- the tracker thread -----------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Track until ``stop`` is set (call :meth:`wake` after setting it)."""
        quiet = self.settings.quiet_seconds
        next_purge = 0.0
        while not stop.is_set():
            if time.monotonic() >= next_purge:
                next_purge = time.monotonic() + 60.0
                self._purge()
            queued = False
            try:
                if self.settings.early_completion:
                    queued = self._complete_on_evidence()
            except Exception:  # the quiet period still completes every series; keep tracking
                log.exception("completion on evidence failed")
            for row in self.spool.queue_quiet_series(quiet):
                log.info(
                    "series %s complete after %.1f s quiet: %d instance(s)", row.key_hash, quiet, row.instance_count
                )
                self.on_complete("quiet")
                queued = True
            if queued:
                self.wake_worker()
            self._wake.wait(self._next_wait())
            self._wake.clear()

    def _purge(self) -> None:
        purged, files = self.spool.purge(time.time() - self.retention_hours * 3600)
        if purged:
            log.info("retention: deleted %d file(s) of %d finished series", files, purged)

    def _next_wait(self) -> float:
        deadline = self.spool.next_receiving_deadline(self.settings.quiet_seconds)
        wait = 1.0 if deadline is None else min(1.0, max(0.02, deadline - time.time()))
        if self._graced:
            soonest = min(g.deadline for g in self._graced.values())
            wait = min(wait, max(0.01, soonest - time.monotonic()))
        return wait

    def _complete_on_evidence(self) -> bool:
        """Queue series whose association was released, whose stack is geometrically complete and whose
        release grace has passed without their sender coming back."""
        self._take_releases()
        queued = False
        now = time.monotonic()
        grace = self.settings.release_grace_seconds
        for series_id, g in list(self._graced.items()):
            if now < g.deadline:
                continue
            activity = self.sender_activity(g.calling_ae, series_id, g.released)
            if activity == "new" and g.deadline < g.released + 2 * grace:
                # its sender just associated again: one more grace for it to send more of this series
                self._graced[series_id] = _Grace(g.generation, g.calling_ae, g.released, g.released + 2 * grace)
                continue
            del self._graced[series_id]
            if activity != "none":
                continue  # its sender is sending more of this series: the quiet period decides
            if self.spool.queue_series(series_id, g.generation):
                row = self.spool.series(series_id)
                log.info(
                    "series %s complete on evidence: %d slices, association released", row.key_hash, row.instance_count
                )
                self.on_complete("evidence")
                queued = True
        return queued

    def _take_releases(self) -> None:
        """Start a grace for each released series whose stack is complete; forget the others."""
        while True:
            try:
                series_id, calling_ae, released = self._released.get_nowait()
            except queue.Empty:
                return
            row = self.spool.series(series_id)
            if row.state is not SeriesState.RECEIVING:
                continue
            geometries = self.spool.instance_geometries(series_id)
            evidence = stack_evidence(geometries, self.policy) if geometries else None
            if evidence is None or not evidence.complete:
                why = evidence.reason if evidence else "no image slices"
                log.info("series %s: association released, waiting for the quiet period (%s)", row.key_hash, why)
                self._graced.pop(series_id, None)
                continue
            grace = self.settings.release_grace_seconds
            self._graced[series_id] = _Grace(row.generation, calling_ae, released, released + grace)
