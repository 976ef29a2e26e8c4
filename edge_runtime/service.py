"""The daemon, wired together: the path of a series from the listener to the sender, around one spool.

::

    scanner --C-STORE--> ingest.Listener --> spool.Spool --> ingest.SeriesTracker (complete?)
        --> worker: imaging.load_volume --> inference.segment --> results.write_results --> spool outbox
        --> egress.Sender --C-STORE or STOW-RS--> PACS / viewer / archive (each destination its formats)

Threads and what each owns:

- ``dicom-listener`` (pynetdicom, one thread per association): store and acknowledge instances.
- ``stow-rs`` (when ``stow_port`` is set; one thread per connection): the same, for DICOMweb STOW-RS.
- ``tracker``: queues a series once it is complete on evidence or quiet for ``quiet_seconds``.
- ``decoder``: decodes slices as they arrive, so the worker starts from memory.
- ``worker``: takes queued series one at a time: volume, model, results, published (files in the output
  folder, rows in the outbox) in one transaction. A SEG series sent to us is a reference to compare instead.
- ``sender``: drains the outbox to the destinations.

Every state lives in the spool's SQLite index, so a restart resumes: receiving series keep their timers,
interrupted jobs are queued again, pending sends are retried.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import threading
import time
from pathlib import Path

from edge_runtime.config import Config
from edge_runtime.egress.destination import route, wanted_formats
from edge_runtime.egress.sender import Sender
from edge_runtime.errors import SeriesRefused
from edge_runtime.imaging.geometry import GeometryPolicy
from edge_runtime.imaging.volume import SliceCache, Volume, load_volume
from edge_runtime.inference.domain import Applicability
from edge_runtime.inference.package import ModelPackage
from edge_runtime.inference.pipeline import Segmentation, segment
from edge_runtime.inference.runner import open_runner
from edge_runtime.inference.streaming import Streams
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
from edge_runtime.quality.agreement import record_agreement
from edge_runtime.results.formats import FRACTIONAL
from edge_runtime.results.publish import uid_seed, write_results
from edge_runtime.results.thumbnails import publish_thumbnails
from edge_runtime.spool.store import SeriesRow, Spool

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
        #: series segmented slab by slab while they arrive, by the worker when it has no job
        self.streams = (
            Streams(self.package, self.policy) if config.series.streaming and config.series.decode_cache_mb else None
        )
        self._stop = threading.Event()
        self._work = threading.Event()
        self.tracker = SeriesTracker(
            self.spool,
            config.series,
            self.policy,
            retention_hours=config.storage.retention_hours,
            sender_activity=lambda ae, series_id, since: self.listener.sender_activity(ae, series_id, since=since),
            on_complete=lambda signal: self.metrics.series_completed.labels(signal).inc(),
            wake_worker=self._work.set,
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
        self.destinations = config.storage.destination
        #: what write_results makes for each series: every format some destination receives
        self.formats = wanted_formats(self.destinations)
        self.sender = Sender(
            self.spool,
            calling_ae=config.listener.ae_title,
            on_result=self.metrics.count_send,
            destinations=self.destinations,
            on_delivery=self.oversight.delivered,
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
        self.serial = socket.gethostname()[:64] or "edge-runtime"
        self.notifier = Notifier()

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        if requeued := self.spool.requeue_interrupted():
            log.info("resuming %d interrupted job(s)", requeued)
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
        for name, target in (("tracker", self.tracker.run), ("worker", self._work_loop), ("decoder", self._decode)):
            t = threading.Thread(target=target, args=(self._stop,), name=name, daemon=True)
            t.start()
            self._threads.append(t)
        self._work.set()
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
        self._work.set()
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
            if self.streams is not None and self.streams.arrived(series_id, path, self.cache):
                self._work.set()

    # -- the worker ---------------------------------------------------------------------------------------------

    def _work_loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            row = self.spool.claim_job()
            if row is None:
                if self.streams is not None and self.streams.step(self.runner):
                    continue
                self._work.wait(1.0)
                self._work.clear()
                continue
            self.oversight.series_taken(row)
            try:
                if row.modality.upper() == "SEG":
                    self._compare_references(row)
                else:
                    self.process(row)
            except SeriesRefused as exc:
                self._refuse(row, exc.reason)
            except Exception as exc:  # one bad series must not stop the others
                log.exception("series %s failed unexpectedly", row.key_hash)
                self._refuse(row, f"internal-error: {type(exc).__name__}")

    def process(self, row: SeriesRow) -> Path | None:
        """Segment one series and publish its result; raises :class:`SeriesRefused` when it cannot be."""
        started, t_start = time.time(), time.perf_counter()
        if row.modality.upper() not in self.package.modalities:
            served = ", ".join(self.package.modalities)
            raise SeriesRefused("modality-not-served", f"{row.modality or 'none'} (model serves {served})")
        paths = self.spool.instance_paths(row.id)
        try:
            volume = load_volume(paths, self.policy, self.cache)
        finally:
            self.cache.forget(paths)
        timings = {"load": time.perf_counter() - t_start}
        for note in volume.notes:
            log.info("series %s: %s", row.key_hash, note)
        applicability = self._check_domain(row, volume)
        result, streamed = self._segment(row, volume)
        timings.update(result.timings)
        if result.confidence is None:
            log.info("series %s: the pipeline gave no per-voxel confidence; none is reported", row.key_hash)
        files = write_results(
            self.output / f"{time.strftime('%Y%m%d')}-{row.key_hash}-g{row.generation}",
            volume,
            result.labels,
            self.package,
            uid_seed=uid_seed(row.called_ae, row.study_uid, row.series_uid, self.package.model_sha256, row.generation),
            device_serial_number=self.serial,
            timings=timings,
            t_start=t_start,
            extra={"windows": result.windows, "streaming": streamed},
            confidence=result.confidence,
            applicability=applicability,
            formats=self.formats,
            probabilities=result.probabilities,
        )
        record = {"stages": files.timings, "started": started, "published": time.time()}
        deliveries, missing = route(self.destinations, files.objects)
        for name in missing:
            why = files.not_written.get(name, "not written")
            log.warning("series %s: no %s object (%s); its destinations get the rest", row.key_hash, name, why)
        published = self.spool.publish(
            row.id, row.generation, self.package.identity, files.seg.parent, deliveries, timings=json.dumps(record)
        )
        if published is None:
            log.info("series %s grew while it was processed; its result is superseded", row.key_hash)
            return None
        log.info(
            "series %s segmented: %d slices, %d windows, %s",
            row.key_hash,
            volume.array.shape[0],
            result.windows,
            ", ".join(f"{k} {v:.2f}s" for k, v in files.timings.items()),
        )
        self.metrics.series_segmented.inc()
        self.metrics.observe_confidence(
            self.package.identity, ((m.name, m.mean_confidence, m.low_confidence) for m in files.segments)
        )
        self.metrics.observe_stages(files.timings)
        self.sender.wake()
        # the status page's pictures, once, while the sender works: they must not delay the result
        publish_thumbnails(files.seg.parent, volume, result.labels, self.package, row.key_hash)
        # after the wake too: the audit line and the drift features (about a second on a large CT) delay no send
        self.oversight.published(row, published, volume, result.labels, result.confidence, files.files, deliveries)
        return files.seg

    def _segment(self, row: SeriesRow, volume: Volume) -> tuple[Segmentation, dict | None]:
        """Finish what was streamed while the series arrived, or segment it whole; the timeline says which."""

        probabilities = FRACTIONAL in self.formats  # a FRACTIONAL SEG holds them; nothing else needs them

        def whole() -> Segmentation:
            return segment(volume, self.package, self.runner, probabilities=probabilities)

        if self.streams is None:
            return whole(), None
        result, timeline = self.streams.segment(row.id, volume, self.runner, whole, probabilities=probabilities)
        log.info("series %s: %s", row.key_hash, timeline.summary())
        return result, timeline.as_dict()

    def _check_domain(self, row: SeriesRow, volume: Volume) -> Applicability | None:
        """Refuse a series outside the package's declared domain, or (``out_of_domain = "mark"``) let it through
        with the verdict, which marks its results. None when the package declares no domain."""
        if self.package.domain is None:
            return None
        verdict = self.package.domain.check(volume)
        for note in verdict.notes:
            log.info("series %s: %s", row.key_hash, note)
        if verdict.inside:
            return verdict
        refuse = self.config.series.out_of_domain == "refuse"
        self.metrics.count_out_of_domain(verdict.checks_failed, "refused" if refuse else "marked")
        if refuse:
            raise SeriesRefused("out-of-domain", verdict.summary)
        log.warning("series %s is outside the model's domain (%s): segmented and marked", row.key_hash, verdict.summary)
        return verdict

    def _compare_references(self, row: SeriesRow) -> None:
        """Compare reference SEGs pushed back to us with our result for the series they reference."""
        dice = self.metrics.validation_dice
        compared = record_agreement(
            self.spool,
            row,
            self.package,
            self.policy,
            self.output / "validation.jsonl",
            on_dice=lambda label, value: dice.labels(self.package.identity, label).set(value),
        )
        self.spool.finish(row.id, row.generation, f"reference compared ({compared} SEG)")
        self.oversight.compared(row, compared)

    def _refuse(self, row: SeriesRow, reason: str) -> None:
        if self.streams is not None:
            self.streams.drop(row.id)
        if self.spool.fail(row.id, row.generation, reason):
            log.warning("series %s refused: %s", row.key_hash, reason)
            self.oversight.refused(row, reason)
            self.metrics.series_failed.labels(reason.split(":", 1)[0]).inc()
