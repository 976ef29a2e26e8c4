"""The worker's path of a series: volume, model, results, published in two steps.

One thread runs :meth:`SeriesWorker.run`. It takes queued series one at a time; when it has none it lets a
quiet study go, or runs the windows of series still arriving (streaming). A result is published in two steps:
the SEG(s) are written and queued at once, then the measurements, the SR and the other formats. A crash between
the steps is completed at the next start (:meth:`SeriesWorker.complete_unfinished`), without sending the SEG
twice. One bad series is refused with its reason and never stops the others.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from edge_runtime.config import Config
from edge_runtime.egress.destination import route, wanted_formats
from edge_runtime.egress.sender import Sender
from edge_runtime.errors import SeriesRefused
from edge_runtime.imaging.geometry import GeometryPolicy
from edge_runtime.imaging.volume import SliceCache, Volume, load_volume
from edge_runtime.inference.domain import Applicability
from edge_runtime.inference.package import ModelPackage
from edge_runtime.inference.pipeline import Segmentation, segment
from edge_runtime.inference.runner.base import Runner
from edge_runtime.inference.streaming import Streams
from edge_runtime.ingest.study import StudyGate, StudyInputs
from edge_runtime.ops.oversight import Oversight
from edge_runtime.ops.telemetry import Metrics
from edge_runtime.quality.agreement import record_agreement
from edge_runtime.results.formats import FRACTIONAL
from edge_runtime.results.publish import SegFiles, read_segs, uid_seed, write_rest, write_segs
from edge_runtime.results.series_result import SeriesResult
from edge_runtime.results.thumbnails import publish_thumbnails
from edge_runtime.service.studies import StudyWorker, load_other_channels
from edge_runtime.spool.rows import ResultRow, ResultStage
from edge_runtime.spool.store import SeriesRow, Spool

log = logging.getLogger(__name__)

#: test-only (tests/test_seg_first.py): the worker holds between a result's two steps until this file exists,
#: so a test can see the SEG at the PACS before the SR is written, or kill the service there
HOLD_AFTER_SEG_ENV = "EDGE_RUNTIME_TEST_HOLD_AFTER_SEG"


class SeriesWorker:
    """Segments and publishes queued series; owns the streams of series still arriving and the study gate."""

    def __init__(
        self,
        config: Config,
        package: ModelPackage,
        runner: Runner,
        spool: Spool,
        cache: SliceCache,
        policy: GeometryPolicy,
        *,
        sender: Sender,
        metrics: Metrics,
        oversight: Oversight,
        stop: threading.Event,
    ):
        self.config, self.package, self.runner, self.spool = config, package, runner, spool
        self.cache, self.policy = cache, policy
        self.sender, self.metrics, self.oversight = sender, metrics, oversight
        self._stop = stop
        #: set to wake the worker: a series queued, a study quiet, a streamed slab ready
        self.wake = threading.Event()
        self.output = Path(config.storage.output)
        self.destinations = config.storage.destination
        #: what the writers make for each series: every format some destination receives
        self.formats = wanted_formats(self.destinations)
        self.serial = socket.gethostname()[:64] or "edge-runtime"
        series = config.series
        #: series segmented slab by slab while they arrive, by the worker when it has no job
        streaming = series.streaming and series.decode_cache_mb and package.channels is None
        keep = FRACTIONAL in self.formats  # every class's probability, reduced slab by slab as the rest
        self.streams = Streams(package, policy, probabilities=keep) if streaming else None
        #: a model of several input series: a complete series waits for the other channels of its study
        gate = StudyGate(spool, package.channels, series.study_quiet_seconds) if package.channels else None
        self.studies = StudyWorker(gate, self) if gate is not None else None

    def run(self, stop: threading.Event) -> None:
        self.complete_unfinished()
        while not stop.is_set():
            row = self.spool.claim_job()
            if row is None:
                if self.studies is not None and self.studies.take_quiet():
                    continue
                if self.streams is not None and self.streams.step(self.runner):
                    continue
                self.wake.wait(1.0)
                self.wake.clear()
                continue
            self.oversight.series_taken(row)
            try:
                if row.modality.upper() == "SEG":
                    self._compare_references(row)
                elif self.studies is not None:
                    self.studies.hold(row)
                else:
                    self.process(row)
            except SeriesRefused as exc:
                self.refuse(row, exc.reason)
            except Exception as exc:  # one bad series must not stop the others
                log.exception("series %s failed unexpectedly", row.key_hash)
                self.refuse(row, f"internal-error: {type(exc).__name__}")

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
        channels, other_sources = load_other_channels(self.spool, self.policy, self.cache, volume, inputs)
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
        written = self._series_result(row, volume, result, applicability, other_sources)
        segs = write_segs(directory, written, self.formats)
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
            self._complete(row, published, segs, written, result.windows, timings, t_start, streamed)
        except Exception:
            log.exception("series %s: its SEG went out; its other objects failed (next start retries)", row.key_hash)
        return segs.seg

    def _complete(
        self,
        row: SeriesRow,
        result_id: int,
        segs: SegFiles,
        written: SeriesResult,
        windows: int,
        timings: dict[str, float],
        t_start: float,
        streamed: dict | None,
    ) -> None:
        """The second step of a result whose SEG(s) are published (``written``: what the first step wrote about):
        the measurements, the SR and the other formats written and queued, then what needs no hurry (thumbnails,
        the audit line, drift features)."""
        files = write_rest(
            segs,
            written,
            timings=timings,
            t_start=t_start,
            extra={"windows": windows, "streaming": streamed},
            formats=self.formats,
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
        volume, labels = written.volume, written.labels
        publish_thumbnails(segs.directory, volume, labels, self.package, row.key_hash)
        # after the wake too: the audit line and the drift features (about a second on a large CT) delay no send
        self.oversight.published(row, result_id, volume, labels, written.confidence, files.files, everything)

    def complete_unfinished(self) -> None:
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
        inputs = self.studies.gate.inputs_of(row) if self.studies is not None else None
        channels, _ = load_other_channels(self.spool, self.policy, self.cache, volume, inputs)
        timings = {"load": time.perf_counter() - t_start}
        applicability = self._check_domain(row, volume)
        result = segment(volume, self.package, self.runner, probabilities=FRACTIONAL in self.formats, channels=channels)
        timings.update(result.timings)
        segs = read_segs(unfinished.directory, self.formats)
        log.info("series %s: completing result %d after a restart", row.key_hash, unfinished.id)
        written = self._series_result(row, volume, result, applicability)
        self._complete(row, unfinished.id, segs, written, result.windows, timings, t_start, None)

    def _series_result(
        self,
        row: SeriesRow,
        volume: Volume,
        result: Segmentation,
        applicability: Applicability | None,
        other_sources: Sequence[Dataset] = (),
    ) -> SeriesResult:
        """What the result writers write about; ``other_sources`` matter to the BINARY SEG only (the first step)."""
        return SeriesResult(
            volume,
            result.labels,
            self.package,
            uid_seed=self._uid_seed(row),
            device_serial_number=self.serial,
            applicability=applicability,
            other_sources=other_sources,
            confidence=result.confidence,
            probabilities=result.probabilities,
        )

    def _uid_seed(self, row: SeriesRow) -> str:
        # a study's result: named by every channel series and its generation (StudyJobs.inputs_key)
        study_inputs = self.studies.gate.jobs.inputs_key(row) if self.studies is not None else None
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

    def refuse(self, row: SeriesRow, reason: str) -> None:
        if self.streams is not None:
            self.streams.drop(row.id)
        if self.spool.fail(row.id, row.generation, reason):
            log.warning("series %s refused: %s", row.key_hash, reason)
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
