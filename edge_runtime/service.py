"""The daemon, wired together: the path of a series from the listener to the sender, around one spool.

::

    scanner --C-STORE--> ingest.Listener --> spool.Spool --> ingest.SeriesTracker (complete?)
        --> worker: imaging.load_volume --> inference.segment
        --> results.write_segs --> spool outbox (the SEG first) --> results.write_rest --> spool outbox
        --> egress.Sender --C-STORE or STOW-RS--> PACS / viewer / archive (each destination its formats)

Threads and what each owns:

- ``dicom-listener`` (pynetdicom, one thread per association): store and acknowledge instances.
- ``stow-rs`` (when ``stow_port`` is set; one thread per connection): the same, for DICOMweb STOW-RS.
- ``tracker``: queues a series once it is complete on evidence or quiet for ``quiet_seconds``.
- ``decoder``: decodes slices as they arrive, so the worker starts from memory.
- ``worker``: takes queued series one at a time: volume, model, results, published in two steps (files in the
  output folder, rows in the outbox): the SEG(s), sent at once, then the SR and the other objects. A result
  whose second step a crash interrupted is completed at the next start. A SEG series sent to us is a reference
  to compare instead.
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

import numpy as np
from pydicom.dataset import Dataset

from edge_runtime.config import Config
from edge_runtime.egress.destination import route, wanted_formats
from edge_runtime.egress.sender import Sender
from edge_runtime.errors import SeriesRefused
from edge_runtime.imaging.geometry import GeometryPolicy
from edge_runtime.imaging.multichannel import stack_channels
from edge_runtime.imaging.volume import SliceCache, Volume, load_volume
from edge_runtime.inference.domain import Applicability
from edge_runtime.inference.package import ModelPackage
from edge_runtime.inference.pipeline import Segmentation, segment
from edge_runtime.inference.runner import open_runner
from edge_runtime.inference.streaming import Streams
from edge_runtime.ingest.listener import Listener, ListenerConfig
from edge_runtime.ingest.stow import StowReceiver
from edge_runtime.ingest.study import StudyGate, StudyInputs
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
from edge_runtime.results.publish import SegFiles, read_segs, uid_seed, write_rest, write_segs
from edge_runtime.results.thumbnails import publish_thumbnails
from edge_runtime.spool.rows import ResultRow, ResultStage
from edge_runtime.spool.store import SeriesRow, Spool
from edge_runtime.spool.studies import StudyRow, StudyState

log = logging.getLogger(__name__)

MiB = 1024 * 1024
#: test-only (tests/test_seg_first.py): the worker holds between a result's two steps until this file exists,
#: so a test can see the SEG at the PACS before the SR is written, or kill the service there
HOLD_AFTER_SEG_ENV = "EDGE_RUNTIME_TEST_HOLD_AFTER_SEG"


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
            Streams(self.package, self.policy)
            if config.series.streaming and config.series.decode_cache_mb and self.package.channels is None
            else None
        )
        #: a model of several input series: a complete series waits for the other channels of its study
        channels = self.package.channels
        self.studies = StudyGate(self.spool, channels, config.series.study_quiet_seconds) if channels else None
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
        self._complete_unfinished()
        while not stop.is_set():
            row = self.spool.claim_job()
            if row is None:
                if self.studies is not None and self._take_quiet_study():
                    continue
                if self.streams is not None and self.streams.step(self.runner):
                    continue
                self._work.wait(1.0)
                self._work.clear()
                continue
            self.oversight.series_taken(row)
            try:
                if row.modality.upper() == "SEG":
                    self._compare_references(row)
                elif self.studies is not None:
                    self._hold_for_study(row)
                else:
                    self.process(row)
            except SeriesRefused as exc:
                self._refuse(row, exc.reason)
            except Exception as exc:  # one bad series must not stop the others
                log.exception("series %s failed unexpectedly", row.key_hash)
                self._refuse(row, f"internal-error: {type(exc).__name__}")

    def process(self, row: SeriesRow, inputs: StudyInputs | None = None) -> Path | None:
        """Segment one series and publish its result; raises :class:`SeriesRefused` when it cannot be.
        ``inputs``: the series of every input channel of a study, ``row`` the first's (its grid is the SEG's)."""
        started, t_start = time.time(), time.perf_counter()
        if row.modality.upper() not in self.package.modalities:
            served = ", ".join(self.package.modalities)
            raise SeriesRefused("modality-not-served", f"{row.modality or 'none'} (model serves {served})")
        paths = self.spool.instance_paths(row.id)
        try:
            volume = load_volume(paths, self.policy, self.cache)
        finally:
            self.cache.forget(paths)
        channels, other_sources = self._load_other_channels(volume, inputs)
        timings = {"load": time.perf_counter() - t_start}
        for note in volume.notes:
            log.info("series %s: %s", row.key_hash, note)
        applicability = self._check_domain(row, volume)
        result, streamed = self._segment(row, volume, channels)
        timings.update(result.timings)
        if result.confidence is None:
            log.info("series %s: the pipeline gave no per-voxel confidence; none is reported", row.key_hash)
        # a study's result: its generation grows with any channel series', so each result has its own folder
        generation = row.generation if inputs is None else sum(s.generation for s in inputs.series)
        directory = self.output / f"{time.strftime('%Y%m%d')}-{row.key_hash}-g{generation}"
        segs = write_segs(
            directory,
            volume,
            result.labels,
            self.package,
            uid_seed=self._uid_seed(row),
            device_serial_number=self.serial,
            applicability=applicability,
            formats=self.formats,
            other_sources=other_sources,
        )
        deliveries, _ = route(self.destinations, segs.objects)
        stages = {**timings, **segs.timings}
        record = {"stages": stages, "started": started, "published": time.time()}
        published = self.spool.publish(
            row.id,
            row.generation,
            self.package.identity,
            directory,
            deliveries,
            timings=json.dumps(record),
            stage=ResultStage.SEG,
        )
        if published is None:
            log.info("series %s grew while it was processed; its result is superseded", row.key_hash)
            return None
        self.sender.wake()  # the SEG leaves now; the SR and the other objects follow
        self.metrics.series_segmented.inc()
        log.info(
            "series %s segmented: %d slices, %d windows, %s",
            row.key_hash,
            volume.array.shape[0],
            result.windows,
            _seconds(stages),
        )
        _hold_after_seg(self._stop)
        try:
            self._complete(row, published, segs, volume, result, applicability, timings, t_start, streamed)
        except Exception:
            log.exception("series %s: its SEG went out; its other objects failed (next start retries)", row.key_hash)
        return segs.seg

    def _complete(
        self,
        row: SeriesRow,
        result_id: int,
        segs: SegFiles,
        volume: Volume,
        result: Segmentation,
        applicability: Applicability | None,
        timings: dict[str, float],
        t_start: float,
        streamed: dict | None,
    ) -> None:
        """The second step of a result whose SEG(s) are published: the measurements, the SR and the other
        formats written and queued, then what needs no hurry (thumbnails, the audit line, drift features)."""
        files = write_rest(
            segs,
            volume,
            result.labels,
            self.package,
            uid_seed=self._uid_seed(row),
            device_serial_number=self.serial,
            timings=timings,
            t_start=t_start,
            extra={"windows": result.windows, "streaming": streamed},
            confidence=result.confidence,
            applicability=applicability,
            formats=self.formats,
            probabilities=result.probabilities,
        )
        everything, missing = route(self.destinations, files.objects)
        deliveries, _ = route(self.destinations, {f: p for f, p in files.objects.items() if f not in segs.objects})
        for name in missing:
            why = files.not_written.get(name, "not written")
            log.warning("series %s: no %s object (%s); its destinations get the rest", row.key_hash, name, why)
        done = {k: v for k, v in files.timings.items() if k not in timings and k not in segs.timings}
        if not self.spool.complete(result_id, deliveries, {"stages": done, "at": time.time()}):
            log.warning("series %s: result %d was completed or dropped meanwhile", row.key_hash, result_id)
            return
        self.sender.wake()
        log.info("series %s: the SR and other objects queued: %s", row.key_hash, _seconds(done))
        self.metrics.observe_confidence(
            self.package.identity, ((m.name, m.mean_confidence, m.low_confidence) for m in files.segments)
        )
        self.metrics.observe_stages(files.timings)
        # the status page's pictures, once, while the sender works: they must not delay the result
        publish_thumbnails(segs.directory, volume, result.labels, self.package, row.key_hash)
        # after the wake too: the audit line and the drift features (about a second on a large CT) delay no send
        self.oversight.published(row, result_id, volume, result.labels, result.confidence, files.files, everything)

    def _complete_unfinished(self) -> None:
        """Complete the results whose SEG went out and whose other objects a stop or crash cut short: the series
        is segmented again from its instances in the spool (the objects derive from the label map, their UIDs
        from the same seed), and the SR references the SEG read back from the result folder, the one that was
        sent. A result of a generation since superseded, or of another model, is dropped: its successor, or
        the current model's result, is what counts."""
        for unfinished in self.spool.unfinished_results():
            row = self.spool.series(unfinished.series_id)
            stale = "a newer generation arrived" if row.generation != unfinished.generation else None
            if unfinished.model != self.package.identity:
                stale = f"it was made by {unfinished.model}"
            if stale is None:
                try:
                    self._resume(row, unfinished)
                    continue
                except SeriesRefused as exc:  # its instances no longer make the volume they made
                    stale = exc.reason
                except Exception:  # one bad result must not stop the others, nor the worker
                    log.exception("series %s: completing result %d failed", row.key_hash, unfinished.id)
                    continue
            if self.spool.drop_unfinished(unfinished.id):
                log.warning("series %s: its SEG went out; its other objects are not made (%s)", row.key_hash, stale)

    def _resume(self, row: SeriesRow, unfinished: ResultRow) -> None:
        t_start = time.perf_counter()
        volume = load_volume(self.spool.instance_paths(row.id), self.policy)
        channels, _ = self._load_other_channels(volume, self.studies.inputs_of(row) if self.studies else None)
        timings = {"load": time.perf_counter() - t_start}
        applicability = self._check_domain(row, volume)
        result = segment(volume, self.package, self.runner, probabilities=FRACTIONAL in self.formats, channels=channels)
        timings.update(result.timings)
        segs = read_segs(unfinished.directory, self.formats)
        log.info("series %s: completing result %d after a restart", row.key_hash, unfinished.id)
        self._complete(row, unfinished.id, segs, volume, result, applicability, timings, t_start, None)

    def _uid_seed(self, row: SeriesRow) -> str:
        # a study's result: named by every channel series and its generation (StudyJobs.inputs_key)
        study_inputs = self.studies.jobs.inputs_key(row) if self.studies is not None else None
        series = study_inputs or row.series_uid
        return uid_seed(row.called_ae, row.study_uid, series, self.package.model_sha256, row.generation)

    def _segment(
        self, row: SeriesRow, volume: Volume, channels: np.ndarray | None = None
    ) -> tuple[Segmentation, dict | None]:
        """Finish what was streamed while the series arrived, or segment it whole; the timeline says which.
        ``channels``: the input channels of several series on ``volume``'s grid (never streamed)."""

        probabilities = FRACTIONAL in self.formats  # a FRACTIONAL SEG holds them; nothing else needs them
        if channels is not None:
            return segment(volume, self.package, self.runner, probabilities=probabilities, channels=channels), None

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

    # -- studies of several series (a model of several input channels) ---------------------------------------

    def _hold_for_study(self, row: SeriesRow) -> None:
        """Hold a complete series for its study, and segment the study if this series completed its channels."""
        assert self.studies is not None
        study = self.studies.jobs.hold(row)
        if study is None:
            return  # an instance arrived since the worker took it: it is receiving again
        inputs = self._look_at_study(study, final=False)
        if inputs is not None:
            self._process_study(inputs)
        elif self.studies.jobs.study(study.id).state is StudyState.WAITING:
            log.info("series %s held: its study %s waits for the other input channels", row.key_hash, study.key_hash)
        else:  # closed: refused, or nothing new in it
            self._forget_study(study)

    def _take_quiet_study(self) -> bool:
        """Look at a study whose quiet period passed: segment it, or refuse it naming the missing channel."""
        assert self.studies is not None
        quiet = self.studies.quiet()
        if not quiet:
            return False
        inputs = self._look_at_study(quiet[0], final=True)
        if inputs is not None:
            self._process_study(inputs)
        return True

    def _look_at_study(self, study: StudyRow, *, final: bool) -> StudyInputs | None:
        """The study's inputs when it is ready; None while it waits, or once it is refused."""
        assert self.studies is not None
        try:
            return self.studies.look(study, final=final)
        except SeriesRefused as exc:
            self._refuse_study(study, exc.reason)
        except Exception as exc:  # an unreadable series must not stop the worker
            log.exception("study %s could not be looked at", study.key_hash)
            self._refuse_study(study, f"internal-error: {type(exc).__name__}")
        return None

    def _process_study(self, inputs: StudyInputs) -> None:
        """Segment a study's channel series once, as one result published with its first channel's series."""
        assert self.studies is not None
        rows = self.studies.jobs.claim(inputs.study, inputs.series)
        if rows is None:
            log.info("study %s: a series grew before it was segmented; it is looked at again", inputs.study.key_hash)
            return
        log.info(
            "study %s: segmenting channels %s",
            inputs.study.key_hash,
            ", ".join(f"{n}={r.key_hash}" for n, r in zip(inputs.names, rows, strict=True)),
        )
        try:
            seg = self.process(rows[0], StudyInputs(inputs.study, inputs.names, tuple(rows)))
        except SeriesRefused as exc:
            self._refuse_study(inputs.study, exc.reason)
            return
        except Exception as exc:  # one bad study must not stop the others
            log.exception("study %s failed unexpectedly", inputs.study.key_hash)
            self._refuse_study(inputs.study, f"internal-error: {type(exc).__name__}")
            return
        if seg is None:  # the first channel grew meanwhile: the others wait for it again
            self.studies.jobs.end(inputs.study, StudyState.WAITING)
            return
        self.studies.jobs.end(inputs.study, StudyState.DONE, f"input of study {inputs.study.key_hash}'s result")
        self._forget_study(inputs.study)

    def _load_other_channels(
        self, volume: Volume, inputs: StudyInputs | None
    ) -> tuple[np.ndarray | None, list[Dataset]]:
        """The input channels on ``volume``'s grid (the first channel's) and the other series' instances, which
        the SEG references too; (None, []) for a series on its own."""
        if inputs is None:
            return None, []
        others = []
        for name, row in zip(inputs.names[1:], inputs.series[1:], strict=True):
            paths = self.spool.instance_paths(row.id)
            try:
                others.append(load_volume(paths, self.policy, self.cache))
            except SeriesRefused as exc:
                raise SeriesRefused(exc.code, f"channel {name}: {exc.detail}") from exc
            finally:
                self.cache.forget(paths)
        return stack_channels([volume, *others]), [ds for v in others for ds in v.datasets]

    def _forget_study(self, study: StudyRow) -> None:
        """Let the decoded slices of a closed study's series go (those no channel took were never loaded)."""
        assert self.studies is not None
        for member in self.studies.jobs.members(study):
            self.cache.forget(self.spool.instance_paths(member.id))

    def _refuse_study(self, study: StudyRow, reason: str) -> None:
        assert self.studies is not None
        ended = self.studies.jobs.end(study, StudyState.FAILED, reason)
        self._forget_study(study)
        log.warning("study %s refused: %s", study.key_hash, reason)
        for row in ended:
            self.oversight.refused(row, reason)
        self.metrics.series_failed.labels(reason.split(":", 1)[0]).inc()


def _seconds(timings: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}s" for k, v in timings.items())


def _hold_after_seg(stop: threading.Event) -> None:
    """Test-only: wait between a result's two steps while :data:`HOLD_AFTER_SEG_ENV` names a file that does not
    exist yet (or until the service stops). Unset, as in production, it returns at once."""
    gate = os.environ.get(HOLD_AFTER_SEG_ENV)
    while gate and not os.path.exists(gate) and not stop.wait(0.05):
        pass
