"""DICOM audit messages (PS3.15 A.5) over RFC 5424 syslog, received by real UDP and TCP sockets on loopback."""

from __future__ import annotations

import socket
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_runtime.ops.atna import BOM, AuditSender, SyslogTarget
from edge_runtime.ops.audit import AuditLog
from tests.peers import SyslogReceiver


@pytest.fixture(params=["udp", "tcp"])
def receiver(request: pytest.FixtureRequest) -> Iterator[SyslogReceiver]:
    r = SyslogReceiver(request.param)
    yield r
    r.close()


def _parse(message: bytes) -> tuple[list[str], ET.Element]:
    header, xml = message.split(BOM, 1)
    return header.decode().split(" "), ET.fromstring(xml)


def _trail(tmp_path: Path, receiver: SyslogReceiver, *, patient_data: bool) -> AuditSender:
    sender = AuditSender(SyslogTarget(receiver.transport, "127.0.0.1", receiver.port), ae_title="EDGE")
    audit = AuditLog(tmp_path / "audit.jsonl", patient_data=patient_data, forward=sender)
    audit.start({"ae_title": "EDGE"})
    audit.record("association", calling_ae="CT1", peer="10.0.0.7:4100", outcome="accepted")  # not a message
    audit.record("association", calling_ae="ROGUE", peer="10.0.0.9:4100", outcome="rejected", reason="calling AE")
    phi = {"study_uid": "1.2.3.4", "series_uid": "1.2.3.4.5", "patient_id": "PAT-9"}
    audit.record("series", series="3f9a0c1d2e4b", instances=24, phi=phi)
    audit.record("delivery", result=1, file="seg.dcm", destination="PACS@10.0.0.5:104", outcome="delivered")
    audit.close()
    return sender


def test_audit_messages_reach_a_syslog_receiver(tmp_path: Path, receiver: SyslogReceiver) -> None:
    sender = _trail(tmp_path, receiver, patient_data=False)
    messages = receiver.wait(4)
    sender.close()
    parsed = [_parse(m) for m in messages]
    for header, _ in parsed:
        assert header[0] == "<85>1" and header[3] == "edge-runtime" and header[5] == "DICOM+RFC3881"
    events = [(x.find("EventIdentification/EventID").get("csd-code"), x.find("EventIdentification")) for _, x in parsed]
    assert [code for code, _ in events] == ["110100", "110113", "110104", "110104"]
    assert events[1][1].get("EventOutcomeIndicator") == "4"
    assert [e.get("EventActionCode") for _, e in events[2:]] == ["C", "R"]
    study = parsed[2][1].find("ParticipantObjectIdentification")
    assert study is not None and study.get("ParticipantObjectID") == "3f9a0c1d2e4b"
    assert not any(b"PAT-9" in m or b"1.2.3.4" in m for m in messages), "patient data sent without the site's consent"


def test_patient_identifiers_only_where_enabled(tmp_path: Path, receiver: SyslogReceiver) -> None:
    sender = _trail(tmp_path, receiver, patient_data=True)
    messages = receiver.wait(4)
    sender.close()
    objects = _parse(messages[2])[1].findall("ParticipantObjectIdentification")
    assert [o.get("ParticipantObjectID") for o in objects] == ["1.2.3.4", "PAT-9"]


def test_a_receiver_that_is_down_costs_a_log_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    sender = AuditSender(SyslogTarget("tcp", "127.0.0.1", port), ae_title="EDGE")
    audit = AuditLog(tmp_path / "audit.jsonl", forward=sender)
    audit.start({})
    audit.close()
    assert "not sent" in caplog.text and (tmp_path / "audit.jsonl").read_text().count("\n") == 1
