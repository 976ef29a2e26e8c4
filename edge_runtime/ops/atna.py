"""DICOM audit messages (PS3.15 A.5) to a syslog receiver, beside the local audit trail.

A hospital's audit repository (an IHE ATNA Audit Record Repository) collects these XML messages from every node
over syslog. The audit trail (:mod:`edge_runtime.ops.audit`) stays the complete local record; this forwards the
events the DICOM audit vocabulary has words for:

=====================================  =================================================================
audit trail event                      DICOM audit message (EventID / EventTypeCode, EventActionCode)
=====================================  =================================================================
``start``, ``stop``                    Application Activity (110100) / Application Start (110120) or
                                       Application Stop (110121), E
``association`` rejected               Security Alert (110113) / Node Authentication (110126), E, minor
                                       failure
``series`` (received, with its count)  DICOM Instances Transferred (110104), C: the sender is the source
``delivery`` (a result file stored)    DICOM Instances Transferred (110104), R: the destination is the
                                       destination, we are the source
=====================================  =================================================================

Transport: RFC 5424 messages (facility authpriv, severity notice, MSGID ``DICOM+RFC3881``, a UTF-8 BOM before
the XML), one UDP datagram each (RFC 5426) or on TCP with octet counting (RFC 6587, as RFC 5425 frames TLS).
The study is named, as everywhere, by the series' keyed hash unless ``audit_patient_data`` allows UIDs and the
Patient ID, which then appear as the standard's Study and Patient participant objects. Sending never blocks
the service for long and never raises: a receiver that is down costs a log line per message.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import socket
import threading
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

#: facility authpriv (10), severity notice (5)
PRI = 10 * 8 + 5
MSGID = "DICOM+RFC3881"
BOM = "\ufeff".encode()


@dataclass(frozen=True)
class SyslogTarget:
    """``udp://host:port`` or ``tcp://host:port`` (default port 514)."""

    transport: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> SyslogTarget:
        parts = urlsplit(text.strip())
        if parts.scheme not in ("udp", "tcp") or not parts.hostname:
            raise ValueError(f"syslog target {text!r} is not udp://HOST:PORT or tcp://HOST:PORT")
        return cls(parts.scheme, parts.hostname, parts.port or 514)

    def __str__(self) -> str:
        return f"{self.transport}://{self.host}:{self.port}"


def _code(parent: ET.Element, tag: str, code: str, meaning: str) -> None:
    ET.SubElement(parent, tag, {"csd-code": code, "codeSystemName": "DCM", "originalText": meaning})


def _participant(root: ET.Element, user: str, *, requestor: bool, role: tuple[str, str], address: str = "") -> None:
    attrs = {"UserID": user, "UserIsRequestor": "true" if requestor else "false"}
    if address:
        attrs["NetworkAccessPointID"] = address.rsplit(":", 1)[0]
        attrs["NetworkAccessPointTypeCode"] = "2"  # an IP address
    _code(ET.SubElement(root, "ActiveParticipant", attrs), "RoleIDCode", *role)


APPLICATION = ("110150", "Application")
SOURCE = ("110153", "Source Role ID")
DESTINATION = ("110152", "Destination Role ID")


def audit_message(record: Mapping[str, Any], *, ae_title: str, source_id: str) -> bytes | None:
    """The XML AuditMessage for one audit-trail record, or None for events the vocabulary does not cover."""
    event = record.get("event")
    root = ET.Element("AuditMessage")
    when = str(record.get("time", ""))
    ident = ET.SubElement(
        root, "EventIdentification", {"EventDateTime": when, "EventOutcomeIndicator": "0", "EventActionCode": "E"}
    )
    me = ae_title
    if event in ("start", "stop"):
        _code(ident, "EventID", "110100", "Application Activity")
        start = event == "start"
        _code(ident, "EventTypeCode", *(("110120", "Application Start") if start else ("110121", "Application Stop")))
        _participant(root, me, requestor=False, role=APPLICATION)
    elif event == "association" and record.get("outcome") == "rejected":
        _code(ident, "EventID", "110113", "Security Alert")
        _code(ident, "EventTypeCode", "110126", "Node Authentication")
        ident.set("EventOutcomeIndicator", "4")
        ET.SubElement(ident, "EventOutcomeDescription").text = str(record.get("reason", ""))
        caller = str(record.get("calling_ae", ""))
        _participant(root, caller, requestor=True, role=SOURCE, address=str(record.get("peer", "")))
        _participant(root, me, requestor=False, role=DESTINATION)
    elif event == "series" or (event == "delivery" and record.get("outcome") == "delivered"):
        _code(ident, "EventID", "110104", "DICOM Instances Transferred")
        ident.set("EventActionCode", "C" if event == "series" else "R")
        if event == "series":
            _participant(root, "scanner", requestor=True, role=SOURCE)
            _participant(root, me, requestor=False, role=DESTINATION)
        else:
            _participant(root, me, requestor=True, role=SOURCE)
            _participant(root, str(record.get("destination", "")), requestor=False, role=DESTINATION)
    else:
        return None
    ET.SubElement(root, "AuditSourceIdentification", {"AuditSourceID": source_id})
    if event in ("series", "delivery"):
        _participant_objects(root, record)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def _participant_objects(root: ET.Element, record: Mapping[str, Any]) -> None:
    """The study (its UID where allowed, else the keyed hash or result number) and, where allowed, the patient."""
    found = record.get("patient")
    patient: dict[str, Any] = found if isinstance(found, dict) else {}
    study_id = patient.get("study_uid") or str(record.get("series") or f"result {record.get('result')}")
    study = _object(root, study_id, type_code="2", role="3")
    _code(study, "ParticipantObjectIDTypeCode", "110180", "Study Instance UID")
    if "instances" in record:
        ET.SubElement(study, "ParticipantObjectDescription").text = f"{record['instances']} instance(s)"
    if patient.get("patient_id"):
        person = _object(root, str(patient["patient_id"]), type_code="1", role="1")
        ET.SubElement(person, "ParticipantObjectIDTypeCode", {"csd-code": "2", "originalText": "Patient Number"})


def _object(root: ET.Element, object_id: str, *, type_code: str, role: str) -> ET.Element:
    attrs = {"ParticipantObjectID": object_id, "ParticipantObjectTypeCode": type_code}
    attrs["ParticipantObjectTypeCodeRole"] = role
    return ET.SubElement(root, "ParticipantObjectIdentification", attrs)


class AuditSender:
    """Sends the audit messages of audit-trail records to one syslog receiver (a callable for :class:`AuditLog`)."""

    def __init__(self, target: SyslogTarget, *, ae_title: str, timeout: float = 2.0):
        self.target = target
        self.ae_title = ae_title
        self.timeout = timeout
        self.hostname = socket.gethostname() or "-"
        self._tcp: socket.socket | None = None
        self._lock = threading.Lock()

    def __call__(self, record: Mapping[str, Any]) -> None:
        body = audit_message(record, ae_title=self.ae_title, source_id=self.hostname)
        if body is None:
            return
        stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        header = f"<{PRI}>1 {stamp} {self.hostname} edge-runtime {os.getpid()} {MSGID} - "
        message = header.encode() + BOM + body
        try:
            self._send(message)
        except OSError as exc:
            log.warning("audit message (%s) not sent to %s: %s", record.get("event"), self.target, exc)

    def _send(self, message: bytes) -> None:
        with self._lock:
            if self.target.transport == "udp":
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.sendto(message, (self.target.host, self.target.port))
                return
            framed = f"{len(message)} ".encode() + message
            for attempt in (1, 2):  # a connection the receiver closed is opened again once
                if self._tcp is None:
                    self._tcp = socket.create_connection((self.target.host, self.target.port), timeout=self.timeout)
                try:
                    self._tcp.sendall(framed)
                    return
                except OSError:
                    self.close()
                    if attempt == 2:
                        raise

    def close(self) -> None:
        if self._tcp is not None:
            self._tcp.close()
            self._tcp = None
