"""What ``/healthz``, ``/readyz`` and the queue gauges report about a running service, and the routes of its
HTTP server: those two, Prometheus ``/metrics`` and, when given, the status page (:mod:`edge_runtime.ops.web`).

Liveness (``/healthz``): every thread of the service is alive, the listener's included. Readiness
(``/readyz``): the service can take work now: listening, the runner ready (a remote one asks its server), the
spool above its free-space watermark, and not stopping. A runner that fell back to the CPU says so here.
Both stay open when an access token is set (probes carry none); everything else then needs it.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from edge_runtime.inference.package import ModelPackage
from edge_runtime.inference.runner import Runner
from edge_runtime.ops.telemetry import Metrics
from edge_runtime.ops.web.access import AccessToken
from edge_runtime.ops.web.page import StatusPage
from edge_runtime.ops.web.server import HttpServer, Request, Response, Route
from edge_runtime.spool.store import SeriesState, Spool


@dataclass
class HealthChecks:
    """The answers of the health endpoints, from the parts of one service."""

    threads: Callable[[], dict[str, bool]]
    listening: Callable[[], bool]
    runner: Runner
    package: ModelPackage
    spool: Spool
    metrics: Metrics
    stopping: threading.Event
    fallback_reason: str | None = None

    def healthz(self) -> tuple[bool, dict[str, object]]:
        threads = self.threads()
        return all(threads.values()), {"threads": threads}

    def readyz(self) -> tuple[bool, dict[str, object]]:
        runner_ok, runner_state = self.runner.ready()
        checks: dict[str, object] = {
            "listening": self.listening(),
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
        ok = checks["listening"] is True and checks["spool"] == "ok" and runner_ok and not self.stopping.is_set()
        return ok, checks

    def update_gauges(self) -> None:
        """Queue depths, read from the spool just before a scrape."""
        counts = self.spool.series_counts()
        for state in (SeriesState.RECEIVING, SeriesState.QUEUED, SeriesState.PROCESSING):
            self.metrics.queue_depth.labels(state.value).set(counts.get(state.value, 0))
        self.metrics.queue_depth.labels("outbox").set(self.spool.outbox_counts().get("pending", 0))

    def server(
        self, host: str, port: int, *, page: StatusPage | None = None, token: AccessToken | None = None
    ) -> HttpServer:
        """The HTTP server of these answers, the metrics and ``page`` (not started)."""
        routes: dict[str, Route] = {
            "/healthz": lambda _: _verdict(self.healthz()),
            "/readyz": lambda _: _verdict(self.readyz()),
            "/metrics": self._metrics,
        }
        if page is not None:
            routes.update(page.routes)
        return HttpServer(
            host,
            port,
            routes,
            prefixes=page.prefixes if page is not None else None,
            gate=token.gate if token is not None else None,
        )

    def _metrics(self, _: Request) -> Response:
        self.update_gauges()
        return Response(200, generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST)


def _verdict(answer: tuple[bool, dict[str, object]]) -> Response:
    ok, details = answer
    return Response(200 if ok else 503, json.dumps({"ok": ok, **details}).encode(), "application/json")
