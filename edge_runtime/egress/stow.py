"""STOW-RS client: results to a DICOMweb origin server (PS3.18 10.5), through the same outbox as C-STORE.

Objects go in batches (up to :data:`BATCH_OBJECTS` files or :data:`BATCH_BYTES`) as one
``multipart/related; type="application/dicom"`` POST to ``{url}/studies``; the response's Referenced and Failed
SOP Sequences decide each object's fate. What is retried, with the outbox's back-off, and what is not:

- no answer (connection refused, reset, TLS failure, timeout), 5xx, 408, 425, 429: the server may take it
  later; every object of the batch is retried;
- 401 and 403: credentials, which an operator fixes (a rotated token file is read at the next attempt): retried;
- an object in the Failed SOP Sequence with an out-of-resources (0xA7xx) or processing-failure (0x0110) reason:
  retried; with any other reason (SOP class not supported, cannot understand...): refused for good;
- any other 4xx (400 malformed, 404 wrong URL, 413 too large, 415): the server would answer the same again;
  refused for good, the reason (HTTP status and the start of the body) logged and kept in the outbox row.

An object the server neither references nor lists as failed counts as stored after 200 (servers may answer 200
with an empty body) and is retried after anything else.
"""

from __future__ import annotations

import logging
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom

from edge_runtime.dicomweb import DICOM_JSON, FAILURE_PROCESSING, StowReport, encode_multipart
from edge_runtime.egress.delivery import Delivery
from edge_runtime.egress.destination import StowTarget

__all__ = ["BATCH_BYTES", "BATCH_OBJECTS", "StowResponse", "batches", "post", "store_instances"]

log = logging.getLogger(__name__)

BATCH_OBJECTS = 16
BATCH_BYTES = 64 * 1024 * 1024
#: client errors that say "later", not "never"
_TRANSIENT_4XX = frozenset({401, 403, 408, 425, 429})


@dataclass(frozen=True)
class StowResponse:
    """The answer to one POST: the HTTP status (None when no answer came), the body's report when it had one,
    and a short reason for a log line."""

    status: int | None
    report: StowReport | None
    reason: str

    @property
    def final(self) -> bool:
        """The server refused the request itself, and would refuse it again."""
        return self.status is not None and 400 <= self.status < 500 and self.status not in _TRANSIENT_4XX


def post(target: StowTarget, parts: Sequence[bytes], *, timeout: float) -> StowResponse:
    """POST ``parts`` (Part 10 files) to ``target``'s ``/studies``; never raises for what the network or the
    server does."""
    body, content_type = encode_multipart(parts)
    request = urllib.request.Request(f"{target.url}/studies", data=body, method="POST")
    request.add_header("Content-Type", content_type)
    request.add_header("Accept", DICOM_JSON)
    try:
        authorization = target.authorization()
    except ValueError as exc:  # the token file vanished, the variable is unset: fix and it goes out
        return StowResponse(None, None, f"credential unavailable: {exc}")
    if authorization is not None:
        request.add_header("Authorization", authorization)
    context = ssl.create_default_context(cafile=str(target.ca_bundle)) if target.ca_bundle else None
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            status, raw = exc.code, exc.read()
    except (OSError, ValueError) as exc:  # URLError, ssl.SSLError, timeouts and resets are OSErrors
        reason = getattr(exc, "reason", exc)
        return StowResponse(None, None, f"no answer: {type(exc).__name__}: {reason}")
    try:
        report = StowReport.from_json(raw) if raw.strip() else None
    except ValueError:
        report = None
    text = raw[:200].decode("utf-8", "replace").strip() if report is None else ""
    return StowResponse(status, report, f"HTTP {status}" + (f": {text}" if text else ""))


def batches(paths: Sequence[Path]) -> Iterator[list[int]]:
    """Indexes of ``paths`` grouped into requests of at most :data:`BATCH_OBJECTS` files and about
    :data:`BATCH_BYTES` (a larger file goes alone)."""
    batch: list[int] = []
    size = 0
    for i, path in enumerate(paths):
        try:
            n = path.stat().st_size
        except OSError:
            n = 0
        if batch and (len(batch) >= BATCH_OBJECTS or size + n > BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(i)
        size += n
    if batch:
        yield batch


def store_instances(target: StowTarget, paths: Sequence[Path], *, timeout: float) -> Iterator[tuple[int, Delivery]]:
    """Send ``paths`` by STOW-RS; yield (index into ``paths``, what became of it) as each batch is answered."""
    for batch in batches(paths):
        blobs: dict[int, bytes] = {}
        uids: dict[int, str] = {}
        for i in batch:
            try:
                blobs[i] = paths[i].read_bytes()
                uids[i] = str(
                    pydicom.dcmread(paths[i], stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID
                )
            except (OSError, pydicom.errors.InvalidDicomError, AttributeError) as exc:
                blobs.pop(i, None)
                yield i, Delivery.refused(f"cannot read result file: {exc}")
        if not blobs:
            continue
        response = post(target, list(blobs.values()), timeout=timeout)
        for i in blobs:
            yield i, _fate(response, uids[i])


def _fate(response: StowResponse, sop_uid: str) -> Delivery:
    report = response.report
    if response.status is None or report is None or response.status not in (200, 202, 409):
        if response.status == 200:
            return Delivery.ok()
        return Delivery.refused(response.reason) if response.final else Delivery.retry(response.reason)
    if any(uid == sop_uid for uid, _ in report.stored):
        return Delivery.ok()
    for uid, _, reason in report.failed:
        if uid == sop_uid:
            why = f"HTTP {response.status}, failure reason 0x{reason:04X}"
            transient = reason == FAILURE_PROCESSING or reason & 0xFF00 == 0xA700
            return Delivery.retry(why) if transient else Delivery.refused(why)
    if response.status == 200:
        return Delivery.ok()
    return Delivery.retry(f"HTTP {response.status}, instance not in the response")
