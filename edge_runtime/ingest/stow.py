"""The STOW-RS receiver: DICOMweb's ``POST /studies`` and ``POST /studies/{study}`` beside the DIMSE listener,
for routers that speak only DICOMweb.

It is the listener by another door, not a second listener: every instance is checked by the listener's own
:func:`~edge_runtime.ingest.listener.inspect_dataset`, must be of a SOP class and transfer syntax the listener
accepts (read from its negotiated contexts), and is stored through :meth:`Listener.store_instance`: durable in
the spool before the response says so, grouped under the listener's AE title with the series that came by
C-STORE, and announced to the tracker. Connections pass a :class:`~edge_runtime.ingest.guard.ConnectionGuard`
with the listener's allowed networks (and a cap of ``max_associations`` connections), and TLS uses the
listener's certificate through the same :func:`~edge_runtime.ingest.guard.tls_context` (with ``tls_ca``,
clients must present a certificate). AE titles do not exist in HTTP: ``allowed_calling_aets`` has no say here; a bearer
token (``stow_token_file``, read at each request) takes its place.

Completion: an HTTP request carries no "association released" evidence, and a router may split a series over
many requests, so series received here complete after the quiet period.

Answers (PS3.18 10.5.3): 200 every instance stored, 202 some refused, 409 none stored, each with the DICOM JSON
Referenced/Failed SOP Sequences; a part's Failure Reason is the status C-STORE would have answered (0xA700,
0xA900, 0xC210, 0xC220, 0xC221), 0x0122 for a SOP class the model cannot use, 0xC122 for a transfer syntax no
installed decoder reads. 400 a body that is not multipart, 401 a missing or wrong token, 404 another path, 411
no length, 413 larger than ``max_instance_mb``, 415 not ``multipart/related; type="application/dicom"``.
"""

from __future__ import annotations

import hmac
import io
import ipaddress
import logging
import mmap
import re
import socket
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO

import pydicom

from edge_runtime.dicom import STATUS_DATASET_MISMATCH, STATUS_OUT_OF_RESOURCES, STATUS_SUCCESS, VERIFICATION
from edge_runtime.dicomweb import (
    DICOM,
    DICOM_JSON,
    FAILURE_CANNOT_UNDERSTAND,
    FAILURE_SOP_CLASS,
    FAILURE_SYNTAX,
    MultipartError,
    StowReport,
    parse_content_type,
    split_multipart,
)
from edge_runtime.ingest.guard import ConnectionGuard, tls_context
from edge_runtime.ingest.listener import Listener, Refusal, inspect_dataset

__all__ = ["CALLING_AE", "StowReceiver"]

log = logging.getLogger(__name__)

#: the calling AE recorded for instances that came by STOW-RS (HTTP has no AE titles)
CALLING_AE = "STOW-RS"
_PATH = re.compile(r"(?:/[^/?]+)*?/studies(?:/(?P<study>[^/?]+))?/?")


@dataclass(frozen=True)
class _Policy:
    """What the receiver accepts, taken once from the listener: SOP class -> transfer syntaxes."""

    syntaxes: dict[str, frozenset[str]]
    max_bytes: int
    token_file: Path | None

    @classmethod
    def of(cls, listener: Listener, token_file: Path | None) -> _Policy:
        syntaxes: dict[str, set[str]] = {}
        for context in listener.ae.supported_contexts:
            if context.abstract_syntax != VERIFICATION:
                syntaxes.setdefault(str(context.abstract_syntax), set()).update(map(str, context.transfer_syntax))
        return cls({k: frozenset(v) for k, v in syntaxes.items()}, listener.config.max_instance_bytes, token_file)


class StowReceiver:
    """A threaded HTTP(S) server for STOW-RS on ``port`` (0: a free one), storing through ``listener``."""

    def __init__(self, listener: Listener, port: int, *, tls: bool = False, token_file: Path | None = None):
        cfg = listener.config
        if tls and not (cfg.tls_cert and cfg.tls_key):
            raise ValueError("STOW-RS over TLS needs tls_cert and tls_key")
        guard = ConnectionGuard(
            tuple(ipaddress.ip_network(n, strict=False) for n in cfg.allowed_networks),
            max_pending=cfg.max_associations,
            tls=tls_context(cfg.tls_cert, cfg.tls_key, cfg.tls_ca) if tls and cfg.tls_cert and cfg.tls_key else None,
        )
        self.listener = listener
        self.policy = _Policy.of(listener, token_file)
        handler = _handler(self._receive, self.policy, timeout=cfg.network_timeout, scratch=listener.spool.tmp_dir)
        self.httpd = _GuardedHTTPServer((cfg.host, port), handler, guard)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> None:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="stow-rs", daemon=True)
        self._thread.start()
        tls = " (TLS)" if self.httpd.guard.tls is not None else ""
        log.info("STOW-RS receiver on %s:%d%s", self.httpd.server_address[0], self.port, tls)

    def serving(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _receive(self, parts: Iterable[tuple[str, bytes]], study: str | None) -> StowReport:
        """Check and store each part (Content-Type, content) as it comes; what became of each, in the response's
        terms."""
        report = StowReport()
        for content_type, data in parts:
            sop_uid, sop_class, status = self._store_part(content_type, data, study)
            if self.listener.on_status is not None:
                self.listener.on_status(status)
            if status == STATUS_SUCCESS:
                report.stored.append((sop_uid, sop_class))
            else:
                report.failed.append((sop_uid, sop_class, status))
        log.info("STOW-RS: %d instance(s) stored, %d refused", len(report.stored), len(report.failed))
        return report

    def _store_part(self, content_type: str, data: bytes, study: str | None) -> tuple[str, str, int]:
        """(SOP Instance UID, SOP Class UID, status: success when stored, else the Failure Reason) of one part."""
        if content_type not in ("", DICOM):
            return "", "", FAILURE_CANNOT_UNDERSTAND
        try:
            ds = pydicom.dcmread(io.BytesIO(data))
            meta_class = str(ds.file_meta.MediaStorageSOPClassUID)
            meta_uid = str(ds.file_meta.MediaStorageSOPInstanceUID)
            syntax = str(ds.file_meta.TransferSyntaxUID)
        except Exception:  # pydicom raises many types on malformed input; the part is refused, the rest go on
            return "", "", FAILURE_CANNOT_UNDERSTAND
        checked = inspect_dataset(ds, meta_class, meta_uid)
        if isinstance(checked, Refusal):
            log.warning("STOW-RS instance refused (0x%04X): %s", checked.status, checked.reason)
            return meta_uid, meta_class, checked.status
        accepted = self.policy.syntaxes.get(checked.sop_class)
        if accepted is None:
            return checked.sop_uid, checked.sop_class, FAILURE_SOP_CLASS
        if syntax not in accepted:
            return checked.sop_uid, checked.sop_class, FAILURE_SYNTAX
        if study is not None and checked.study_uid != study:
            return checked.sop_uid, checked.sop_class, STATUS_DATASET_MISMATCH
        stored = self.listener.store_instance(
            data, checked, called=self.listener.config.ae_title, calling=CALLING_AE, syntax=syntax
        )
        return checked.sop_uid, checked.sop_class, STATUS_SUCCESS if stored is not None else STATUS_OUT_OF_RESOURCES


class _GuardedHTTPServer(ThreadingHTTPServer):
    """The standard threaded HTTP server with the connection guard's admission, socket timeouts, and the TLS
    handshake in the connection's own thread (not the accept loop, where one silent client would block all)."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], guard: ConnectionGuard):
        self.guard = guard
        super().__init__(address, handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        client, address = self.socket.accept()
        client.settimeout(self.guard.stall_timeout)
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return self.guard.admit(client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            if self.guard.tls is not None:
                request = self.guard.tls.wrap_socket(request, server_side=True)
            self.finish_request(request, client_address)
        except OSError as exc:  # a TLS handshake that failed, a peer that went silent or away
            log.warning("STOW-RS connection from %s dropped: %s", client_address[0], exc)
        except Exception:  # a fault of ours: logged with its traceback; the other connections go on
            log.exception("STOW-RS connection from %s failed", client_address[0])
        finally:
            self.guard.release()
            self.shutdown_request(request)


def _handler(
    receive: Callable[[Iterable[tuple[str, bytes]], str | None], StowReport],
    policy: _Policy,
    *,
    timeout: float,
    scratch: Path,
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "edge-runtime-stow"

        def setup(self) -> None:
            super().setup()
            self.connection.settimeout(timeout)

        def do_POST(self) -> None:  # noqa: N802 - http.server API
            match = _PATH.fullmatch(self.path.split("?", 1)[0])
            if match is None:
                return self._error(404, "POST /studies or /studies/{StudyInstanceUID}")
            if not self._authorised():
                return self._error(401, "a valid bearer token is required", {"WWW-Authenticate": "Bearer"})
            media, params = parse_content_type(self.headers.get("Content-Type", ""))
            if media != "multipart/related" or params.get("type", DICOM).lower() != DICOM:
                return self._error(415, f'expected multipart/related; type="{DICOM}"')
            # the body waits in an unnamed file beside the spool, mapped into memory one part at a time: a
            # request of many instances costs disk, not memory
            with tempfile.TemporaryFile(dir=scratch) as file:
                if not self._body(file):
                    return None
                if file.tell() == 0:
                    return self._error(400, "the body is empty")
                file.flush()
                with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as body:
                    try:
                        where = split_multipart(body, params.get("boundary", ""))
                    except MultipartError as exc:
                        return self._error(400, str(exc))
                    report = receive(((kind, body[at]) for kind, at in where), match["study"])
            self._send(report.http_status, report.to_json(), DICOM_JSON)
            return None

        def _authorised(self) -> bool:
            if policy.token_file is None:
                return True
            try:
                token = policy.token_file.read_text().strip()
            except OSError as exc:
                log.error("STOW-RS token file unreadable (%s): refusing every request", exc.strerror)
                return False
            given = self.headers.get("Authorization", "")
            return bool(token) and hmac.compare_digest(given.encode(), f"Bearer {token}".encode())

        def _body(self, into: BinaryIO) -> bool:
            """Copy the request body (plain or chunked) into ``into``; False after answering 400/411/413."""
            if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                length = self.headers.get("Content-Length")
                if length is None or not length.isdigit():
                    self._error(411, "Content-Length or chunked transfer coding required")
                    return False
                return self._copy(int(length), into)
            while True:
                line = self.rfile.readline(1024).split(b";", 1)[0].strip()
                try:
                    size = int(line or b"0", 16)
                except ValueError:
                    self._error(400, "malformed chunked transfer coding")
                    return False
                if size == 0:
                    while self.rfile.readline(1024).strip():  # trailers, then the empty line
                        pass
                    return True
                if not self._copy(size, into):
                    return False
                self.rfile.readline(16)

        def _copy(self, size: int, into: BinaryIO) -> bool:
            if into.tell() + size > policy.max_bytes:
                self._error(413, f"larger than {policy.max_bytes} bytes")
                return False
            while size > 0:
                chunk = self.rfile.read(min(size, 1 << 20))
                if not chunk:
                    raise ConnectionError("the request body ended early")
                into.write(chunk)
                size -= len(chunk)
            return True

        def _error(self, code: int, detail: str, headers: dict[str, str] | None = None) -> None:
            log.warning("STOW-RS request from %s answered %d: %s", self.client_address[0], code, detail)
            self.close_connection = True  # the body may be unread: this connection cannot carry another request
            self._send(code, f'{{"error": "{detail}"}}'.encode(), "application/json", headers)

        def _send(self, code: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - http.server API
            log.debug("stow-rs %s", format % args)

    return Handler
