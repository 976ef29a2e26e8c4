"""The service's Prometheus metrics. :mod:`edge_runtime.ops.health` serves them at ``/metrics`` beside
``/healthz``, ``/readyz`` and the status page (the HTTP server is :mod:`edge_runtime.ops.web.server`).

The metric objects live in :class:`Metrics`, one registry per service, so tests and several services in one
process do not share counters.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
CONFIDENCE_BUCKETS = (0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 1.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.instances_received = Counter(
            "edge_instances_received", "C-STORE requests answered, by outcome", ["outcome"], registry=r
        )
        self.series_completed = Counter(
            "edge_series_completed",
            "Series found complete, by the signal that completed them",
            ["signal"],
            registry=r,
        )
        self.series_segmented = Counter("edge_series_segmented", "Series segmented and published", registry=r)
        self.series_failed = Counter(
            "edge_series_failed", "Series refused or failed, by reason", ["reason"], registry=r
        )
        self.stage_seconds = Histogram(
            "edge_stage_seconds",
            "Time spent per stage of a series",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("edge_queue_depth", "Series or results waiting, by queue", ["queue"], registry=r)
        self.sends = Counter("edge_sends", "C-STORE of results to destinations, by outcome", ["outcome"], registry=r)
        self.validation_dice = Gauge(
            "edge_validation_dice",
            "Dice against the latest reference segmentation, per model and label",
            ["model", "label"],
            registry=r,
        )

        self.segment_confidence = Histogram(
            "edge_segment_confidence",
            "Mean softmax probability of each non-empty segment's voxels, per model and label",
            ["model", "label"],
            buckets=CONFIDENCE_BUCKETS,
            registry=r,
        )
        self.low_confidence_segments = Counter(
            "edge_low_confidence_segments",
            "Segments flagged because their mean confidence is below the package's threshold, per model and label",
            ["model", "label"],
            registry=r,
        )
        self.out_of_domain = Counter(
            "edge_series_out_of_domain",
            "Series outside the model's declared domain, by failed check and what was done (refused or marked)",
            ["check", "action"],
            registry=r,
        )

        self.drift_psi = Gauge(
            "edge_drift_psi",
            "Population stability index of the recent series against the package's drift reference, per feature",
            ["model", "feature"],
            registry=r,
        )
        self.drift_p_value = Gauge(
            "edge_drift_p_value",
            "p-value of the drift test (two-sample KS, or chi-square for categories) per feature",
            ["model", "feature"],
            registry=r,
        )
        self.drift_level = Gauge(
            "edge_drift_level", "Drift level per feature: 0 ok, 1 watch, 2 alarm", ["model", "feature"], registry=r
        )
        self.drift_window = Gauge(
            "edge_drift_window_series", "Series in the rolling drift window", ["model"], registry=r
        )
        self.spool_free_bytes = Gauge("edge_spool_free_bytes", "Free space on the spool's file system", registry=r)
        self.ready = Gauge("edge_ready", "1 while /readyz would answer 200 (read at each scrape)", registry=r)
        self.spool_min_free_bytes = Gauge(
            "edge_spool_min_free_bytes", "Free-space watermark below which instances are refused (0xA700)", registry=r
        )

    def observe_drift(self, model: str, results: Iterable[tuple[str, float, float, int]], window: int) -> None:
        """Per feature ``(feature, PSI, p-value, level index)`` of the latest comparison, and the window's size."""
        for feature, psi, p_value, level in results:
            self.drift_psi.labels(model, feature).set(psi)
            self.drift_p_value.labels(model, feature).set(p_value)
            self.drift_level.labels(model, feature).set(level)
        self.drift_window.labels(model).set(window)

    def count_status(self, status: int) -> None:
        """One C-STORE answered with ``status``."""
        self.instances_received.labels("stored" if status == 0 else f"refused_{status:04x}").inc()

    def count_send(self, ok: bool) -> None:
        """One result file sent to a destination (``ok``), or not."""
        self.sends.labels("success" if ok else "failure").inc()

    def observe_confidence(self, model: str, segments: Iterable[tuple[str, float | None, bool | None]]) -> None:
        """Per segment ``(label, mean confidence, flagged)``; empty segments (mean None) are not observed."""
        for label, mean, flagged in segments:
            if mean is None:
                continue
            self.segment_confidence.labels(model, label).observe(mean)
            if flagged:
                self.low_confidence_segments.labels(model, label).inc()

    def count_out_of_domain(self, checks: Iterable[str], action: str) -> None:
        for check in dict.fromkeys(checks):
            self.out_of_domain.labels(check, action).inc()

    def observe_stages(self, timings: dict[str, float]) -> None:
        for stage, seconds in timings.items():
            self.stage_seconds.labels(stage).observe(seconds)
