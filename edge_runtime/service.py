"""The daemon: listener, series tracker, inference worker and sender around one spool.

Threads and what each owns:

- ``dicom-listener`` (pynetdicom, one thread per association): store and acknowledge instances.
- ``tracker``: queues a series once it has been quiet for ``quiet_seconds``.
- ``worker``: takes queued series one at a time: volume, model, SEG, measurements, then publishes the result
  (files in the output folder, rows in the outbox) in one transaction.
- ``sender``: drains the outbox to the destinations.

Every state lives in the spool's SQLite index, so a restart resumes: receiving series keep their timers
(``last_received`` is stored), interrupted jobs are queued again, pending sends are retried.
"""

from __future__ import annotations

import json
import logging
import queue
import signal
import socket
import threading
import time
from pathlib import Path

import pydicom

from edge_runtime.config import Config
from edge_runtime.dicom import SEGMENTATION_CLASSES, write_atomic
from edge_runtime.egress.sender import Sender
from edge_runtime.imaging.volume import (
    GeometryPolicy,
    SliceCache,
    SliceGeometry,
    VolumeError,
    load_volume,
    stack_evidence,
)
from edge_runtime.inference.package import ModelPackage
from edge_runtime.inference.pipeline import segment
from edge_runtime.inference.runner import Runner, RunnerError, load_runner
from edge_runtime.ingest.listener import Listener, ListenerConfig
from edge_runtime.ops.systemd import Notifier
from edge_runtime.ops.telemetry import HealthServer, Metrics
from edge_runtime.quality.feedback import (
    ReferenceRejected,
    append_history,
    compare_with_reference,
    referenced_series,
    validation_record,
)
from edge_runtime.results.seg import build_seg, measure, write_measurements
from edge_runtime.results.seg_binary import encode_binary_seg
from edge_runtime.results.sr import build_sr
from edge_runtime.spool.store import SeriesRow, SeriesState, Spool

log = logging.getLogger(__name__)


class Service:
    def __init__(self, config: Config):
        self.config = config
        self.metrics = Metrics()
        self.package = ModelPackage.load(config.model)
        self.fallback_reason: str | None = None
        self.runner: Runner = self._load_runner()
        self.spool = Spool(config.spool, min_free_bytes=config.min_free_mb * 1024 * 1024)
        self.output = Path(config.output)
        self.output.mkdir(parents=True, exist_ok=True)
        self.policy = GeometryPolicy(irregular_spacing=config.irregular_spacing)
        self.listener = Listener(
            ListenerConfig(
                ae_title=config.ae_title,
                host=config.host,
                port=config.port,
                modalities=self.package.modalities,
                allowed_calling_aets=config.allowed_calling_aets,
                max_associations=config.max_associations,
                allowed_networks=config.allowed_networks,
                max_instance_bytes=config.max_instance_mb * 1024 * 1024,
                tls_port=config.tls_port,
                tls_cert=str(config.tls_cert) if config.tls_cert else None,
                tls_key=str(config.tls_key) if config.tls_key else None,
                tls_ca=str(config.tls_ca) if config.tls_ca else None,
            ),
            self.spool,
            on_stored=self._on_stored,
            on_released=self._on_released,
            on_status=self._count_status,
        )
        self.sender = Sender(
            self.spool,
            calling_ae=config.ae_title,
            on_result=lambda ok: self.metrics.sends.labels("success" if ok else "failure").inc(),
        )
        self.health: HealthServer | None = None
        if config.http_port:
            self.health = HealthServer(
                config.http_host,
                config.http_port,
                self.metrics,
                self._healthz,
                self._readyz,
                before_scrape=self._update_gauges,
            )
        self._stop = threading.Event()
        self._tracker_wake = threading.Event()
        self._released: queue.SimpleQueue[tuple[int, str, float]] = queue.SimpleQueue()
        #: series complete on evidence, waiting out the release grace:
        #: id -> (generation, calling AE, release time, deadline), monotonic times
        self._graced: dict[int, tuple[int, str, float, float]] = {}
        #: slices decoded as they arrive, by a thread of their own, so the worker starts from memory
        self.cache = SliceCache(max_bytes=config.decode_cache_mb * 1024 * 1024)
        self._to_decode: queue.SimpleQueue[Path | None] = queue.SimpleQueue()
        self._work = threading.Event()
        self._threads: list[threading.Thread] = []
        self.serial = socket.gethostname()[:64] or "edge-runtime"
        self.notifier = Notifier()

    def _load_runner(self) -> Runner:
        config = self.config
        if config.backend == "triton":
            options: dict[str, object] = {
                "url": config.triton_url,
                "model_name": config.triton_model or self.package.name,
                "shared_memory": "system" if config.triton_shared_memory else "none",
            }
        elif config.backend == "tensorrt":
            options = {"precision": config.precision, "rebuild": config.rebuild_engine}
        else:
            options = {"threads": config.threads}
        try:
            return load_runner(self.package, config.backend, config.device, **options)
        except (RunnerError, ImportError) as exc:
            if not config.fallback_backend:
                raise
            log.error(
                "BACKEND FALLBACK: %s could not start (%s); running on %s CPU as configured",
                config.backend,
                exc,
                config.fallback_backend,
            )
            self.fallback_reason = str(exc)
            return load_runner(self.package, config.fallback_backend, "cpu", threads=config.threads)

    # -- lifecycle --------------------------------------------------------------------------------------

    def start(self) -> None:
        requeued = self.spool.requeue_interrupted()
        if requeued:
            log.info("resuming %d interrupted job(s)", requeued)
        orphans = self.spool.remove_orphans()
        if orphans:
            log.info("removed %d unacknowledged file(s) left by an interrupted store", orphans)
        log.info(
            "model %s (%s) on %s",
            self.package.identity,
            self.package.model_sha256[:12],
            self.runner.describe(),
        )
        self.listener.start()
        self.sender.start()
        if self.health is not None:
            self.health.start()
        for name, target in (
            ("tracker", self._track),
            ("worker", self._work_loop),
            ("decoder", self._decode_loop),
        ):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        self._work.set()
        self.notifier.ready(
            f"listening as {self.config.ae_title} on port {self.listener.port}; model {self.package.identity}"
        )
        self.notifier.start_watchdog(self.healthy)

    def healthy(self) -> bool:
        """Every service thread is alive."""
        return all(t.is_alive() for t in self._threads) and self.sender.alive() and self.listener.serving()

    def _healthz(self) -> tuple[bool, dict[str, object]]:
        threads = {t.name: t.is_alive() for t in self._threads}
        threads["sender"] = self.sender.alive()
        threads["dicom-listener"] = self.listener.serving()
        return all(threads.values()), {"threads": threads}

    def _readyz(self) -> tuple[bool, dict[str, object]]:
        runner_ok, runner_state = self.runner.ready()
        checks: dict[str, object] = {
            "listening": self.listener.serving(),
            "model": self.package.identity,
            "runner": runner_state,
        }
        if self.fallback_reason:
            checks["fallback"] = self.fallback_reason
        try:
            self.spool.check_space()
            checks["spool"] = "ok"
        except OSError as exc:
            checks["spool"] = str(exc)
        ok = checks["listening"] is True and checks["spool"] == "ok" and runner_ok and not self._stop.is_set()
        return ok, checks

    def _update_gauges(self) -> None:
        counts = self.spool.series_counts()
        for state in (SeriesState.RECEIVING, SeriesState.QUEUED, SeriesState.PROCESSING):
            self.metrics.queue_depth.labels(state.value).set(counts.get(state.value, 0))
        self.metrics.queue_depth.labels("outbox").set(self.spool.outbox_counts().get("pending", 0))

    def _count_status(self, status: int) -> None:
        outcome = "stored" if status == 0 else f"refused_{status:04x}"
        self.metrics.instances_received.labels(outcome).inc()

    def stop(self) -> None:
        """Stop accepting, let the job in hand finish (a restart would resume it anyway), stop sending."""
        log.info("stopping: no new associations; finishing the job in hand")
        self.notifier.stopping()
        self.listener.stop()
        if self.health is not None:
            self.health.stop()
        self._stop.set()
        self._tracker_wake.set()
        self._work.set()
        self._to_decode.put(None)
        for t in self._threads:
            t.join()
        self.sender.stop()
        self.runner.close()
        self.spool.close()
        log.info("stopped")

    def run_forever(self) -> None:
        """Start, then block until SIGTERM or SIGINT."""
        done = threading.Event()

        def on_signal(signum: int, _frame: object) -> None:
            log.info("received %s", signal.Signals(signum).name)
            done.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        self.start()
        while not done.wait(1.0):
            pass
        self.stop()

    # -- tracker ----------------------------------------------------------------------------------------

    def _on_stored(self, _series_id: int, path: Path) -> None:
        self._tracker_wake.set()
        if self.config.decode_cache_mb:
            self._to_decode.put(path)

    def _decode_loop(self) -> None:
        while not self._stop.is_set():
            path = self._to_decode.get()
            if path is None:
                return
            self.cache.add(path)

    def _on_released(self, series_ids: set[int], calling_ae: str) -> None:
        deadline = time.monotonic() + self.config.release_grace_seconds
        for series_id in series_ids:
            self._released.put((series_id, calling_ae, deadline))
        self._tracker_wake.set()

    def _complete_on_evidence(self) -> bool:
        """Queue series whose association was released and whose stack is geometrically complete.

        A complete-looking stack only counts once the release grace has passed without its sender coming back:
        a sender that opens one association per instance (or per chunk) releases after every one of them, and
        what it has sent so far is a regular stack at every step.
        """
        while True:
            try:
                series_id, calling_ae, deadline = self._released.get_nowait()
            except queue.Empty:
                break
            row = self.spool.series(series_id)
            if row.state is not SeriesState.RECEIVING:
                continue
            geometries = [SliceGeometry.from_json(g) for g in self.spool.instance_geometries(series_id) if g]
            evidence = stack_evidence(geometries, self.policy) if geometries else None
            if evidence is None or not evidence.complete:
                why = evidence.reason if evidence else "no image slices"
                log.info("series %s: association released, waiting for the quiet period (%s)", row.key_hash, why)
                self._graced.pop(series_id, None)
                continue
            self._graced[series_id] = (
                row.generation,
                calling_ae,
                deadline - self.config.release_grace_seconds,
                deadline,
            )
        queued = False
        now = time.monotonic()
        grace = self.config.release_grace_seconds
        for series_id, (generation, calling_ae, released, deadline) in list(self._graced.items()):
            if now < deadline:
                continue
            activity = self.listener.sender_activity(calling_ae, series_id, since=released)
            if activity == "new" and deadline < released + 2 * grace:
                # its sender just associated again: one more grace for it to send more of this series
                self._graced[series_id] = (generation, calling_ae, released, released + 2 * grace)
                continue
            del self._graced[series_id]
            if activity != "none":
                continue  # its sender is sending more of this series: the quiet period decides
            if self.spool.queue_series(series_id, generation):
                row = self.spool.series(series_id)
                log.info(
                    "series %s complete on evidence: %d slices, association released", row.key_hash, row.instance_count
                )
                self.metrics.series_completed.labels("evidence").inc()
                queued = True
        return queued

    def _track(self) -> None:
        quiet = self.config.quiet_seconds
        next_purge = 0.0
        while not self._stop.is_set():
            if time.monotonic() >= next_purge:
                next_purge = time.monotonic() + 60.0
                purged, files = self.spool.purge(time.time() - self.config.retention_hours * 3600)
                if purged:
                    log.info("retention: deleted %d file(s) of %d finished series", files, purged)
            try:
                if self.config.early_completion and self._complete_on_evidence():
                    self._work.set()
            except Exception:  # the quiet period still completes every series; keep tracking
                log.exception("completion on evidence failed")
            queued = self.spool.queue_quiet_series(quiet)
            for row in queued:
                log.info(
                    "series %s complete after %.1f s quiet: %d instance(s)",
                    row.key_hash,
                    quiet,
                    row.instance_count,
                )
                self.metrics.series_completed.labels("quiet").inc()
            if queued:
                self._work.set()
            deadline = self.spool.next_receiving_deadline(quiet)
            wait = 1.0 if deadline is None else min(1.0, max(0.02, deadline - time.time()))
            if self._graced:
                soonest = min(d for _, _, _, d in self._graced.values())
                wait = min(wait, max(0.01, soonest - time.monotonic()))
            self._tracker_wake.wait(wait)
            self._tracker_wake.clear()

    # -- worker -----------------------------------------------------------------------------------------

    def _work_loop(self) -> None:
        while not self._stop.is_set():
            row = self.spool.claim_job()
            if row is None:
                self._work.wait(1.0)
                self._work.clear()
                continue
            try:
                self.process(row)
            except Exception as exc:  # one bad series must not stop the others
                log.exception("series %s failed unexpectedly", row.key_hash)
                self._refuse(row, f"internal-error: {type(exc).__name__}")

    def process(self, row: SeriesRow) -> Path | None:
        """Segment one series and publish its result; record a reason when it is refused."""
        started = time.time()
        t_start = time.perf_counter()
        if row.modality.upper() == "SEG":
            self._validate(row)
            return None
        if row.modality.upper() not in self.package.modalities:
            served = ", ".join(self.package.modalities)
            self._refuse(row, f"modality-not-served: {row.modality or 'none'} (model serves {served})")
            return None
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        paths = self.spool.instance_paths(row.id)
        try:
            volume = load_volume(paths, self.policy, self.cache)
        except VolumeError as exc:
            self._refuse(row, f"{exc.code}: {exc.detail}")
            return None
        finally:
            self.cache.forget(paths)
        timings["load"] = time.perf_counter() - t0
        for note in volume.notes:
            log.info("series %s: %s", row.key_hash, note)
        result = segment(volume, self.package, self.runner)
        timings.update(result.timings)

        seed = f"{row.called_ae}|{row.study_uid}|{row.series_uid}|{self.package.model_sha256}|{row.generation}"
        directory = self.output / f"{time.strftime('%Y%m%d')}-{row.key_hash}-g{row.generation}"
        directory.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        if volume.multiframe:  # frames of one Enhanced source: highdicom pairs them with the source's frames
            seg = build_seg(volume, result.labels, self.package, uid_seed=seed, device_serial_number=self.serial)
        else:
            seg = encode_binary_seg(
                volume, result.labels, self.package, uid_seed=seed, device_serial_number=self.serial
            )
        seg_path = write_atomic(directory / "seg.dcm", seg)
        timings["seg"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        measurements = measure(volume, result.labels, self.package)
        sr = build_sr(seg, measurements, volume, self.package, uid_seed=seed, device_serial_number=self.serial)
        sr_path = write_atomic(directory / "sr.dcm", sr)
        timings["measurements"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start
        write_measurements(
            directory / "measurements.json",
            measurements,
            package=self.package,
            volume=volume,
            seg_sop_uid=str(seg.SOPInstanceUID),
            extra={
                "sr_sop_instance_uid": str(sr.SOPInstanceUID),
                "timings_s": {k: round(v, 4) for k, v in timings.items()},
                "windows": result.windows,
            },
        )
        record = {"stages": timings, "started": started, "published": time.time()}
        result_id = self.spool.publish(
            row.id,
            row.generation,
            self.package.identity,
            directory,
            [seg_path, sr_path],
            [str(d) for d in self.config.destination],
            timings=json.dumps(record),
        )
        if result_id is None:
            log.info("series %s grew while it was processed; its result is superseded", row.key_hash)
            return None
        log.info(
            "series %s segmented: %d slices, %d windows, %s",
            row.key_hash,
            volume.array.shape[0],
            result.windows,
            ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()),
        )
        self.metrics.series_segmented.inc()
        self.metrics.observe_stages(timings)
        self.sender.wake()
        return seg_path

    def _validate(self, row: SeriesRow) -> None:
        """Compare reference SEGs pushed back to us with our result for the series they reference."""
        compared = 0
        for path in self.spool.instance_paths(row.id):
            reference = pydicom.dcmread(path)
            if str(reference.SOPClassUID) not in SEGMENTATION_CLASSES:
                continue
            try:
                info = referenced_series(reference)
                target = self.spool.find_series(row.called_ae, info.study_uid, info.series_uid)
                results = self.spool.results(target.id) if target is not None else []
                if target is None or not results:
                    raise ReferenceRejected("no-result", "the referenced series has no result from this service")
                _, _, model, directory = results[-1]
                ours = directory / "seg.dcm"
                if str(pydicom.dcmread(ours, stop_before_pixels=True).SOPInstanceUID) == info.sop_uid:
                    raise ReferenceRejected("own-result", "this is our own SEG sent back, not a reference")
                volume = load_volume(self.spool.instance_paths(target.id), self.policy)
                metrics, unmatched = compare_with_reference(volume, ours, reference, self.package)
            except (ReferenceRejected, VolumeError) as exc:
                self._refuse(row, f"{exc.code}: {exc.detail}")
                return
            record = validation_record(target.key_hash, self.package, metrics, unmatched)
            record["result_model"] = model
            append_history(self.output / "validation.jsonl", record)
            for name, values in record["labels"].items():
                self.metrics.validation_dice.labels(self.package.identity, name).set(values["dice"])
            log.info(
                "series %s: reference compared: %s",
                target.key_hash,
                ", ".join(f"{n} Dice {v['dice']:.3f}" for n, v in record["labels"].items()),
            )
            compared += 1
        if compared:
            self.spool.finish(row.id, row.generation, f"reference compared ({compared} SEG)")
        else:
            self._refuse(row, "not-a-reference: a SEG series without Segmentation instances")

    def _refuse(self, row: SeriesRow, reason: str) -> None:
        if self.spool.fail(row.id, row.generation, reason):
            log.warning("series %s refused: %s", row.key_hash, reason)
            self.metrics.series_failed.labels(reason.split(":", 1)[0]).inc()

