"""The service's parts built from the configuration, and their threads started and stopped.

The map of the whole path is the package's docstring (:mod:`edge_runtime.service`). This module owns the
lifecycle: what starts in which order, how a SIGTERM drains, and what ``/healthz`` counts as alive.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from pathlib import Path

from edge_runtime.config import Config
from edge_runtime.egress.sender import Sender
from edge_runtime.imaging.geometry import GeometryPolicy
from edge_runtime.imaging.volume import SliceCache
from edge_runtime.inference.package import ModelPackage
from edge_runtime.inference.runner import open_runner
from edge_runtime.ingest.listener import Listener, ListenerConfig
from edge_runtime.ingest.stow import StowReceiver
from edge_runtime.ingest.tracker import SeriesTracker
from edge_runtime.ops.health import HealthChecks
from edge_runtime.ops.oversight import Oversight
from edge_runtime.ops.systemd import Notifier
from edge_runtime.ops.telemetry import Metrics
from edge_runtime.ops.web.access import AccessToken
from edge_runtime.ops.web.page import PageSources, StatusPage
from edge_runtime.ops.web.server import HttpServer
from edge_runtime.service.worker import SeriesWorker
from edge_runtime.spool.store import Spool

log = logging.getLogger(__name__)

MiB = 1024 * 1024


class Service:
    def __init__(self, config: Config):
        self.config = config
        self.metrics = Metrics()
        self.package = ModelPackage.load(config.runner.model)
        opened = open_runner(self.package, config.runner)
        self.runner, self.fallback_reason = opened.runner, opened.fallback_reason
        self.spool = Spool(config.storage.spool, min_free_bytes=config.storage.min_free_mb * MiB)
        #: the audit trail and the drift monitor
        self.oversight = Oversight(config, self.package, self.spool, self.metrics)
        self.output = Path(config.storage.output)
        self.output.mkdir(parents=True, exist_ok=True)
        self.policy = GeometryPolicy(irregular_spacing=config.series.irregular_spacing)
        #: slices decoded as they arrive, by a thread of their own, so the worker starts from memory
        self.cache = SliceCache(max_bytes=config.series.decode_cache_mb * MiB)
        self._to_decode: queue.SimpleQueue[tuple[int, Path] | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self.sender = Sender(
            self.spool,
            calling_ae=config.listener.ae_title,
            on_result=self.metrics.count_send,
            destinations=config.storage.destination,
            on_delivery=self.oversight.delivered,
        )
        self.worker = SeriesWorker(
            config,
            self.package,
            self.runner,
            self.spool,
            self.cache,
            self.policy,
            sender=self.sender,
            metrics=self.metrics,
            oversight=self.oversight,
            stop=self._stop,
        )
        self.tracker = SeriesTracker(
            self.spool,
            config.series,
            self.policy,
            retention_hours=config.storage.retention_hours,
            sender_activity=lambda ae, series_id, since: self.listener.sender_activity(ae, series_id, since=since),
            on_complete=lambda signal: self.metrics.series_completed.labels(signal).inc(),
            wake_worker=self.worker.wake.set,
        )
        self.listener = Listener(
            ListenerConfig.from_settings(config.listener, modalities=self.package.modalities),
            self.spool,
            on_stored=self._on_stored,
            on_released=self.tracker.released,
            on_status=self.metrics.count_status,
            on_association=self.oversight.association,
        )
        settings = config.listener
        self.stow = (
            StowReceiver(self.listener, settings.stow_port, tls=settings.stow_tls, token_file=settings.stow_token_file)
            if settings.stow_port
            else None
        )
        self.checks = HealthChecks(
            threads=self._threads_alive,
            listening=self.listener.serving,
            runner=self.runner,
            package=self.package,
            spool=self.spool,
            metrics=self.metrics,
            stopping=self._stop,
            fallback_reason=self.fallback_reason,
        )
        self.metrics.ready.set_function(lambda: float(self.checks.readyz()[0]))
        self.health = self._http_server() if config.ops.http_port else None
        self._threads: list[threading.Thread] = []
        self.notifier = Notifier()

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        if requeued := self.spool.requeue_interrupted():
            log.info("resuming %d interrupted job(s)", requeued)
        if unfinished := self.spool.unfinished_results():
            log.info("completing %d result(s) whose SEG went out before the last stop", len(unfinished))
        if orphans := self.spool.remove_orphans():
            log.info("removed %d unacknowledged file(s) left by an interrupted store", orphans)
        log.info("model %s (%s) on %s", self.package.identity, self.package.model_sha256[:12], self.runner.describe())
        self.oversight.started(self.config, self.runner.describe())
        self.listener.start()
        if self.stow is not None:
            self.stow.start()
        self.sender.start()
        if self.health is not None:
            self.health.start()
        for name, target in (("tracker", self.tracker.run), ("worker", self.worker.run), ("decoder", self._decode)):
            t = threading.Thread(target=target, args=(self._stop,), name=name, daemon=True)
            t.start()
            self._threads.append(t)
        self.worker.wake.set()
        self.notifier.ready(
            f"listening as {self.listener.config.ae_title} on port {self.listener.port}; model {self.package.identity}"
        )
        self.notifier.start_watchdog(self.healthy)

    def stop(self) -> None:
        """Stop accepting, let the job in hand finish (a restart would resume it anyway), stop sending."""
        log.info("stopping: no new associations; finishing the job in hand")
        self.notifier.stopping()
        self.listener.stop()
        if self.stow is not None:
            self.stow.stop()
        if self.health is not None:
            self.health.stop()
        self._stop.set()
        self.tracker.wake()
        self.worker.wake.set()
        self._to_decode.put(None)
        for t in self._threads:
            t.join()
        self.sender.stop()
        self.oversight.stopped()
        self.runner.close()
        self.spool.close()
        log.info("stopped")

    # -- health -------------------------------------------------------------------------------------------------

    def healthy(self) -> bool:
        """Every service thread is alive."""
        return self.checks.healthz()[0]

    def _threads_alive(self) -> dict[str, bool]:
        threads = {t.name: t.is_alive() for t in self._threads}
        threads["sender"], threads["dicom-listener"] = self.sender.alive(), self.listener.serving()
        if self.stow is not None:
            threads["stow-rs"] = self.stow.serving()
        return threads

    def _http_server(self) -> HttpServer:
        """``/healthz``, ``/readyz``, ``/metrics`` and the status page, behind the access token when one is set."""
        ops = self.config.ops
        sources = PageSources(
            self.package,
            self.runner,
            self.listener,
            self.spool,
            self.output,
            self.metrics,
            destinations=tuple(str(d) for d in self.config.storage.destination),
            started=time.time(),
            fallback_reason=self.fallback_reason,
        )
        token = AccessToken.configured(ops.http_token_file, os.environ)
        return self.checks.server(ops.http_host, ops.http_port, page=StatusPage(sources), token=token)

    # -- arrival ------------------------------------------------------------------------------------------------

    def _on_stored(self, series_id: int, path: Path) -> None:
        self.tracker.stored()
        if self.config.series.decode_cache_mb:
            self._to_decode.put((series_id, path))

    def _decode(self, stop: threading.Event) -> None:
        while not stop.is_set() and (item := self._to_decode.get()) is not None:
            series_id, path = item
            self.cache.add(path)
            streams = self.worker.streams
            if streams is not None and streams.arrived(series_id, path, self.cache):
                self.worker.wake.set()
