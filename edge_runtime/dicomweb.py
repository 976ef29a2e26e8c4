"""The DICOMweb vocabulary of STOW-RS (PS3.18 10.5), shared by the client (:mod:`edge_runtime.egress.stow`) and
the receiver (:mod:`edge_runtime.ingest.stow`): the multipart/related body and the response data set.

A STOW-RS request is ``multipart/related; type="application/dicom"``, one DICOM Part 10 file per part. The
response is a DICOM JSON data set: Referenced SOP Sequence (0008,1199) for the instances stored, Failed SOP
Sequence (0008,1198) with a Failure Reason (0008,1197) for the others; HTTP 200 when all were stored, 202 when
some failed (or carry warnings), 409 when none was stored.
"""

from __future__ import annotations

import json
import mmap
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from email.message import Message

from pydicom.dataset import Dataset

__all__ = [
    "DICOM",
    "DICOM_JSON",
    "FAILURE_CANNOT_UNDERSTAND",
    "FAILURE_OUT_OF_RESOURCES",
    "FAILURE_PROCESSING",
    "FAILURE_SOP_CLASS",
    "FAILURE_SYNTAX",
    "MultipartError",
    "StowReport",
    "encode_multipart",
    "parse_content_type",
    "split_multipart",
]

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"

#: Failure Reasons (PS3.18 Table 10.5.3-1 refers to PS3.4 statuses)
FAILURE_PROCESSING = 0x0110
FAILURE_SOP_CLASS = 0x0122
FAILURE_OUT_OF_RESOURCES = 0xA700
FAILURE_CANNOT_UNDERSTAND = 0xC000
FAILURE_SYNTAX = 0xC122


class MultipartError(ValueError):
    """A body that is not the multipart/related of DICOM objects it claims to be."""


def parse_content_type(header: str) -> tuple[str, dict[str, str]]:
    """``multipart/related; type="application/dicom"; boundary=x`` -> (media type, {parameter: value})."""
    msg = Message()
    msg["content-type"] = header
    params = {str(k).lower(): str(v) for k, v in (msg.get_params() or [])[1:]}
    return msg.get_content_type(), params


def encode_multipart(parts: Iterable[bytes]) -> tuple[bytes, str]:
    """The body and the Content-Type header of a STOW-RS request carrying ``parts`` (Part 10 files)."""
    boundary = f"edge-{secrets.token_hex(16)}"
    delimiter = f"--{boundary}\r\n".encode()
    chunks: list[bytes] = []
    for part in parts:
        chunks += [delimiter, f"Content-Type: {DICOM}\r\n\r\n".encode(), part, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f'multipart/related; type="{DICOM}"; boundary={boundary}'


def split_multipart(body: bytes | mmap.mmap, boundary: str) -> list[tuple[str, slice]]:
    """Where the parts of a multipart body are: (Content-Type, the slice of ``body`` that is its content); an
    absent part Content-Type is ``""``. Nothing is copied, so a body mapped from a file stays on disk until each
    part is read."""
    # RFC 2046 allows 70 characters; Orthanc 1.10's DICOMweb plugin sends 73, so be liberal in what we accept
    if not boundary or len(boundary) > 200:
        raise MultipartError("the Content-Type names no usable boundary")
    delimiter = b"--" + boundary.encode("latin-1")
    start = body.find(delimiter)
    if start < 0:
        raise MultipartError("the body holds no part (boundary not found)")
    parts: list[tuple[str, slice]] = []
    pos = start + len(delimiter)
    while body[pos : pos + 2] != b"--":
        header_end = body.find(b"\r\n\r\n", pos)
        end = body.find(b"\r\n" + delimiter, header_end + 4 if header_end >= 0 else pos)
        if header_end < 0 or end < 0:
            raise MultipartError("a part is not terminated by the boundary")
        content_type = ""
        for line in body[pos:header_end].decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-type":
                content_type = parse_content_type(value.strip())[0]
        parts.append((content_type, slice(header_end + 4, end)))
        pos = end + 2 + len(delimiter)
    return parts


@dataclass
class StowReport:
    """What a STOW-RS response says: the instances stored as (SOP Instance UID, SOP Class UID), and those refused
    as (SOP Instance UID, SOP Class UID, Failure Reason); a part that did not parse has empty UIDs."""

    stored: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str, int]] = field(default_factory=list)

    @property
    def http_status(self) -> int:
        """200 all stored, 202 some stored, 409 none (PS3.18 10.5.3)."""
        if not self.failed:
            return 200
        return 202 if self.stored else 409

    def to_json(self, retrieve_url: str | None = None) -> bytes:
        ds = Dataset()
        if retrieve_url:
            ds.RetrieveURL = retrieve_url
        if self.stored:
            ds.ReferencedSOPSequence = [_reference(uid, cls) for uid, cls in self.stored]
        if self.failed:
            ds.FailedSOPSequence = [_reference(uid, cls, reason) for uid, cls, reason in self.failed]
        return json.dumps(ds.to_json_dict()).encode()

    @classmethod
    def from_json(cls, body: bytes) -> StowReport:
        """Read a response body (a DICOM JSON object, or a one-element array of it, as some servers answer)."""
        data = json.loads(body)
        if isinstance(data, list) and len(data) == 1:
            data = data[0]
        if not isinstance(data, dict):
            raise ValueError("the STOW-RS response is not a DICOM JSON object")
        try:
            ds = Dataset.from_json(data)
        except (TypeError, KeyError, AttributeError) as exc:  # JSON, but not a DICOM JSON data set
            raise ValueError(f"the STOW-RS response is not a DICOM JSON data set: {exc}") from exc
        report = cls()
        for item in ds.get("ReferencedSOPSequence", []):
            report.stored.append((_uid(item, "ReferencedSOPInstanceUID"), _uid(item, "ReferencedSOPClassUID")))
        for item in ds.get("FailedSOPSequence", []):
            reason = int(item.get("FailureReason", FAILURE_PROCESSING))
            report.failed.append((_uid(item, "ReferencedSOPInstanceUID"), _uid(item, "ReferencedSOPClassUID"), reason))
        return report


def _reference(sop_uid: str, sop_class: str, failure: int | None = None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_uid
    if failure is not None:
        item.FailureReason = failure
    return item


def _uid(item: Dataset, keyword: str) -> str:
    return str(item.get(keyword, "") or "")
