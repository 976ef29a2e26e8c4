"""The service's HTTP server: a route table on the standard library's threaded server, GET only.

``/healthz`` and ``/readyz`` stay open to every caller (systemd, a load balancer, Kubernetes probes); every other
path passes the access token first when one is configured (:mod:`edge_runtime.ops.web.access`). There are no
write actions: any other method is answered 405. Responses are never cached and carry a content security policy
that allows only this server's own images and the page's inline style and script, so the page works offline and
loads nothing from elsewhere.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger(__name__)

_HIDE_TOKEN = re.compile(r"([?&]token=)[^&\s'\"]*")

OPEN_PATHS = frozenset({"/healthz", "/readyz"})
SECURITY_HEADERS = (
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    (
        "Content-Security-Policy",
        "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
)


@dataclass(frozen=True)
class Request:
    """What a route sees of a GET: the path, the query (last value of each key) and the headers."""

    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str
    headers: tuple[tuple[str, str], ...] = field(default=())

    @classmethod
    def text(cls, status: int, text: str, content_type: str = "text/plain; charset=utf-8") -> Response:
        return cls(status, text.encode("utf-8"), content_type)


Route = Callable[[Request], Response]
#: decides before any route except the open ones: None lets the request through, a response answers it
Gate = Callable[[Request], "Response | None"]


class HttpServer:
    """Serves ``routes`` (exact paths) and ``prefixes`` (a path that starts with the key) in daemon threads."""

    def __init__(
        self,
        host: str,
        port: int,
        routes: Mapping[str, Route],
        *,
        prefixes: Mapping[str, Route] | None = None,
        gate: Gate | None = None,
    ):
        self.routes = dict(routes)
        self.prefixes = dict(prefixes or {})
        self.gate = gate
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server API
                self._answer(outer.dispatch(self._request()))

            def do_HEAD(self) -> None:  # noqa: N802 - http.server API
                self._answer(outer.dispatch(self._request()), body=False)

            def do_POST(self) -> None:  # noqa: N802 - http.server API
                self._answer(Response.text(405, "read-only: this server has no write actions\n"))

            do_PUT = do_DELETE = do_PATCH = do_POST  # noqa: N815 - http.server API

            def _request(self) -> Request:
                url = urlsplit(self.path)
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                return Request(url.path, query, {k.lower(): v for k, v in self.headers.items()})

            def _answer(self, response: Response, body: bool = True) -> None:
                self.send_response(response.status)
                self.send_header("Content-Type", response.content_type)
                self.send_header("Content-Length", str(len(response.body)))
                for name, value in (*SECURITY_HEADERS, *response.headers):
                    self.send_header(name, value)
                self.end_headers()
                if body:
                    self.wfile.write(response.body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - http.server API
                # the request line of a browser's first visit carries the access token
                log.debug("http %s", _HIDE_TOKEN.sub(r"\1(hidden)", format % args))

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    def dispatch(self, request: Request) -> Response:
        """The response to one request: the gate, then the route; a route that raises is a logged 500."""
        if self.gate is not None and request.path not in OPEN_PATHS:
            refused = self.gate(request)
            if refused is not None:
                return refused
        route = self.routes.get(request.path)
        if route is None:
            route = next((r for prefix, r in self.prefixes.items() if request.path.startswith(prefix)), None)
        if route is None:
            return Response(404, b'{"error": "not found"}', "application/json")
        try:
            return route(request)
        except Exception:  # one broken page must not take the health endpoints with it
            log.exception("http %s failed", request.path)
            return Response.text(500, "internal error (logged)\n")

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> None:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="http", daemon=True)
        self._thread.start()
        log.info("status page, health and metrics on http://%s:%d", self.httpd.server_address[0], self.port)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
