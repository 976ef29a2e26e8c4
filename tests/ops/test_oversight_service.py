"""The service's audit trail and drift metrics, end to end: DCMTK storescu as the scanner, storescp as the PACS."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from phantom import make_phantom, write_series
from tests.peers import ServiceProcess, StoreSCP, SyslogReceiver, storescu

pytestmark = pytest.mark.e2e

PATIENT_NAME, PATIENT_ID = "DOE^JANE", "PAT-SECRET-77"


def _events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wait_for(path: Path, event: str, timeout: float = 60.0) -> list[dict[str, Any]]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = [e for e in _events(path) if e["event"] == event]
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"no {event!r} line in {path} after {timeout} s")


def test_a_series_leaves_a_verifiable_trail_without_patient_data(tmp_path: Path) -> None:
    pacs = StoreSCP(tmp_path / "pacs")
    syslog = SyslogReceiver("udp")
    # a short phantom is outside the bundled model's domain: "mark" segments it anyway, quickly
    service = ServiceProcess(
        tmp_path / "svc",
        *("--destination", pacs.address, "--quiet-seconds", "1", "--out-of-domain", "mark"),
        *("--audit-syslog", f"udp://127.0.0.1:{syslog.port}"),
    )
    audit = service.spool / "audit.jsonl"
    try:
        phantom = make_phantom((24, 96, 96), (2.5, 3.5, 3.5), rng=3)
        info = write_series(
            phantom.hu, phantom.spacing, tmp_path / "series", patient_name=PATIENT_NAME, patient_id=PATIENT_ID
        )
        refused = storescu(service.port, list(info.paths[:1]), ae_title="NOT-EDGE", check=False)
        assert refused.returncode != 0
        storescu(service.port, list(info.paths))
        pacs.wait_for_seg(info.series_uid, timeout=120)
        deliveries = _wait_for(audit, "delivery")
        window = 'edge_drift_window_series{model="phantom-ct-unet 1.1.0"} 1.0'
        end = time.monotonic() + 30  # the drift features are taken after the result is sent on its way
        while window not in (metrics := service.http_get("/metrics")[1]) and time.monotonic() < end:
            time.sleep(0.2)
        code = service.http_get("/metrics")[0]
    finally:
        assert service.stop() == 0, service.log()
        pacs.stop()
        syslog.close()

    events = _events(audit)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "stop", kinds
    assert events[0]["config"]["ae_title"] == "EDGE" and events[0]["model_sha256"]
    associations = [e for e in events if e["event"] == "association"]
    assert {"outcome": "rejected", "reason": "called AE title is not ours"}.items() <= associations[0].items()
    accepted = [a for a in associations if a["outcome"] == "accepted"]
    assert accepted and accepted[0]["calling_ae"] == "SCANNER" and accepted[0]["peer"].startswith("127.0.0.1:")
    (series,) = [e for e in events if e["event"] == "series"]
    assert series["instances"] == len(info.paths) and len(series["series"]) == 12
    (result,) = [e for e in events if e["event"] == "result"]
    assert result["series"] == series["series"] and "seg.dcm" in result["files"]
    assert {d["outcome"] for d in deliveries} == {"delivered"} and pacs.address in deliveries[0]["destination"]

    text = audit.read_text()
    for secret in (PATIENT_ID, PATIENT_NAME, info.series_uid, info.study_uid):
        assert secret not in text, "patient data or UIDs in the audit trail by default"

    done = subprocess.run(
        [sys.executable, "-m", "edge_runtime", "audit", "verify", str(audit)], capture_output=True, text=True
    )
    assert done.returncode == 0 and "chain intact" in done.stdout, done.stdout + done.stderr
    assert code == 200 and "edge_spool_free_bytes" in metrics
    # the bundled package carries a drift reference: the series joined the window, its PSI went to /metrics
    assert window in metrics
    assert 'edge_drift_psi{feature="intensity_p50",model="phantom-ct-unet 1.1.0"}' in metrics
    # DICOM audit messages: application start and stop, the rejected association, the series, each delivery
    sent = b"".join(syslog.messages)
    for code_value in (b'"110100"', b'"110113"', b'"110104"', b'"110121"'):
        assert code_value in sent, code_value
    assert PATIENT_ID.encode() not in sent and info.study_uid.encode() not in sent
