"""The status page's routes: ``/`` (the page), ``/series`` (the same rows as JSON) and ``/thumbs/<result>/<file>``.

:class:`StatusPage` reads the running service through :class:`PageSources` and the spool index read-only
(:class:`~edge_runtime.ops.web.index.SpoolIndex`); it changes nothing. A picture is served from the result
directory the index names for that result id, under a file name from a fixed list, so no part of a request
ever becomes a path.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.inference.package import ModelPackage
from edge_runtime.inference.runner import Runner
from edge_runtime.ingest.listener import Listener
from edge_runtime.ops.telemetry import Metrics
from edge_runtime.ops.web import render
from edge_runtime.ops.web.index import SeriesView, SpoolIndex
from edge_runtime.ops.web.quality import confidence, dice_history, drift_gauges
from edge_runtime.ops.web.server import Request, Response, Route
from edge_runtime.results.thumbnails import PLANES, THUMBS_DIR, thumbnail_name
from edge_runtime.spool.store import Spool

MAX_ROWS = 100
CONFIDENCE_ROWS = 10
DAY = 86400.0
_PICTURE = re.compile(r"^/thumbs/(\d{1,12})/([a-z]+(?:-large)?\.png)$")
#: ``user:password@`` in a URL, which a page must not repeat even when a configuration holds one
_CREDENTIALS = re.compile(r"(//)[^/@\s]+@")
_PICTURE_NAMES = frozenset(thumbnail_name(p, large) for p in PLANES for large in (False, True))


@dataclass(frozen=True)
class PageSources:
    """The parts of a running service the page reads."""

    package: ModelPackage
    runner: Runner
    listener: Listener
    spool: Spool
    output: Path
    metrics: Metrics
    #: where results go, as the configuration names them
    destinations: tuple[str, ...]
    started: float
    fallback_reason: str | None = None


class StatusPage:
    def __init__(self, sources: PageSources):
        self.sources = sources
        self.index = SpoolIndex(sources.spool.root)

    @property
    def routes(self) -> dict[str, Route]:
        return {"/": self.page, "/series": self.series_json}

    @property
    def prefixes(self) -> dict[str, Route]:
        return {"/thumbs/": self.picture}

    # -- routes ----------------------------------------------------------------------------------------------

    def page(self, request: Request) -> Response:
        state = _state(request)
        entries = [self._entry(v) for v in self.index.recent_series(MAX_ROWS, state)]
        title = f"edge-runtime on {os.uname().nodename}"
        html = render.page(title, self.now(), entries, self.quality(), state)
        return Response.text(200, html, "text/html; charset=utf-8")

    def series_json(self, request: Request) -> Response:
        rows = []
        for view in self.index.recent_series(MAX_ROWS, _state(request)):
            entry = self._entry(view)
            rows.append(
                {
                    "series": view.key_hash,
                    "state": view.state,
                    "reason": view.reason,
                    "modality": view.modality,
                    "instances": view.instances,
                    "first_received": view.first_received,
                    "last_received": view.last_received,
                    "description": entry.description,
                    "timeline": dict(view.timeline()),
                    "pictures": {plane: {"thumbnail": small, "large": large} for plane, small, large in entry.pictures},
                }
            )
        return Response(200, json.dumps({"series": rows}).encode(), "application/json")

    def picture(self, request: Request) -> Response:
        match = _PICTURE.match(request.path)
        if match is None or match.group(2) not in _PICTURE_NAMES:
            return Response(404, b'{"error": "not found"}', "application/json")
        directory = self.index.result_directory(int(match.group(1)))
        try:
            data = (directory / THUMBS_DIR / match.group(2)).read_bytes() if directory is not None else None
        except FileNotFoundError:
            data = None
        if data is None:
            return Response(404, b'{"error": "not found"}', "application/json")
        return Response(200, data, "image/png")

    # -- what the page shows ---------------------------------------------------------------------------------

    def now(self) -> list[tuple[str, str]]:
        s = self.sources
        pkg, listener = s.package, s.listener
        counts = s.spool.series_counts()
        outbox = s.spool.outbox_counts()
        failing = [
            _without_credentials(
                f"{f.destination}: {f.pending} pending after {f.attempts} attempts"
                + (f", {f.refused} refused for good" if f.refused else "")
                + f" ({f.last_error or 'no error text'})"
            )
            for f in self.index.failing_destinations()
        ]
        disk = os.statvfs(s.spool.root)
        free, size = disk.f_bavail * disk.f_frsize, disk.f_blocks * disk.f_frsize
        items = [
            ("model", f"{pkg.identity}, sha256 {pkg.model_sha256[:16]}"),
            ("runner", s.runner.describe()),
        ]
        if s.fallback_reason:
            items.append(("backend fallback", s.fallback_reason))
        items += [
            ("listener", f"AE {listener.config.ae_title}, port {listener.port}"),
            ("TLS port", str(listener.tls_port) if listener.tls_port else "off"),
            ("associations open", str(len(listener.ae.active_associations))),
            ("series", ", ".join(f"{counts.get(state, 0)} {state}" for state in render.STATES)),
            (
                "outbox",
                f"{outbox.get('pending', 0)} pending, {outbox.get('sent', 0)} sent, "
                f"{outbox.get('failed', 0)} refused for good",
            ),
            ("failing destinations", render.joined(failing)),
            ("destinations", render.joined(map(_without_credentials, s.destinations), "the output folder only")),
            ("spool free", f"{free / 2**30:.1f} GiB of {size / 2**30:.1f} GiB"),
            ("uptime", render.duration(time.time() - s.started)),
        ]
        return items

    def quality(self) -> render.QualityView:
        s = self.sources
        written, sent = self.index.latencies(time.time() - DAY)
        newest = self.index.recent_series(CONFIDENCE_ROWS, "done")
        confidences = [(v.key_hash, confidence(v.result.directory)) for v in newest if v.result is not None]
        return render.QualityView(
            dice=dice_history(s.output / "validation.jsonl"),
            colours={label.name: label.color for label in s.package.labels},
            latency_written=written,
            latency_sent=sent,
            confidence=[(key, values) for key, values in confidences if values],
            drift=drift_gauges(s.metrics.registry),
        )

    def _entry(self, view: SeriesView) -> render.SeriesEntry:
        pictures: list[tuple[str, str, str]] = []
        if view.result is not None:
            folder = view.result.directory / THUMBS_DIR
            for plane in PLANES:
                if (folder / thumbnail_name(plane)).is_file():
                    base = f"/thumbs/{view.result.id}/"
                    pictures.append((plane, base + thumbnail_name(plane), base + thumbnail_name(plane, large=True)))
        return render.SeriesEntry(view, self.index.describe(view), pictures)


def _state(request: Request) -> str | None:
    state = request.query.get("state", "")
    return state if state in render.STATES else None


def _without_credentials(destination: str) -> str:
    return _CREDENTIALS.sub(r"\1", destination)
