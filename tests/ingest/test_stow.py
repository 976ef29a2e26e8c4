"""The STOW-RS receiver over real HTTP on loopback: what it stores, what it refuses and with which answer.

The client is the service's own STOW-RS client (:mod:`edge_runtime.egress.stow`); Orthanc as a real sender is
in ``tests/egress/test_orthanc.py``.
"""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID, generate_uid

from edge_runtime.dicomweb import FAILURE_CANNOT_UNDERSTAND, FAILURE_SOP_CLASS, StowReport, encode_multipart
from edge_runtime.egress.destination import Secret, StowTarget
from edge_runtime.egress.stow import post
from edge_runtime.ingest.listener import Listener, ListenerConfig
from edge_runtime.ingest.stow import CALLING_AE, StowReceiver
from edge_runtime.spool import Spool
from phantom import write_series
from tests.ingest.test_listener import make_certs
from tests.peers import free_port


@pytest.fixture(scope="module")
def ct_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    hu = np.full((4, 16, 16), -1000.0, dtype=np.float32)
    info = write_series(hu, (2.0, 1.0, 1.0), tmp_path_factory.mktemp("ct"))
    return sorted(info.paths)


def start(tmp_path: Path, *, tls: bool = False, token_file: Path | None = None, **kwargs: object) -> StowReceiver:
    config = ListenerConfig(ae_title="EDGE", host="127.0.0.1", port=free_port(), modalities=("CT",), **kwargs)  # type: ignore[arg-type]
    receiver = StowReceiver(Listener(config, Spool(tmp_path / "spool")), 0, tls=tls, token_file=token_file)
    receiver.start()
    return receiver


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[StowReceiver]:
    r = start(tmp_path)
    yield r
    r.stop()


def target(receiver: StowReceiver, scheme: str = "http", **kwargs: object) -> StowTarget:
    return StowTarget(f"{scheme}://127.0.0.1:{receiver.port}/dicom-web", **kwargs)  # type: ignore[arg-type]


def test_instances_are_stored_durably_in_the_listeners_series(receiver: StowReceiver, ct_files: list[Path]) -> None:
    response = post(target(receiver), [p.read_bytes() for p in ct_files], timeout=10)
    assert response.status == 200 and response.report is not None
    sop_uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in ct_files}
    assert {uid for uid, _ in response.report.stored} == sop_uids
    spool = receiver.listener.spool
    [series] = spool.all_series()
    assert series.called_ae == "EDGE" and series.instance_count == len(ct_files) and series.modality == "CT"
    stored = spool.instance_paths(series.id)
    assert sorted(p.read_bytes() for p in stored) == sorted(p.read_bytes() for p in ct_files), "stored as sent"
    again = post(target(receiver), [ct_files[0].read_bytes()], timeout=10)
    assert again.status == 200 and spool.series(series.id).instance_count == len(ct_files), "a re-send is no copy"


def test_refused_parts_are_named_with_their_failure_reason_and_the_rest_is_stored(
    receiver: StowReceiver, ct_files: list[Path]
) -> None:
    sr = pydicom.dcmread(ct_files[0])
    sr.SOPClassUID = sr.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.88.34")  # an SR, no image
    sr.SOPInstanceUID = sr.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    response = post(target(receiver), [ct_files[1].read_bytes(), buffer.getvalue(), b"not DICOM at all"], timeout=10)
    assert response.status == 202 and response.report is not None
    assert len(response.report.stored) == 1
    assert sorted(reason for _, _, reason in response.report.failed) == [FAILURE_SOP_CLASS, FAILURE_CANNOT_UNDERSTAND]
    none = post(target(receiver), [b"still not DICOM"], timeout=10)
    assert none.status == 409 and none.final, "nothing stored: 409, and a client does not send it again"
    [series] = receiver.listener.spool.all_series()
    assert series.instance_count == 1


def answer(url: str, body: bytes, content_type: str) -> tuple[int, bytes]:
    """POST ``body``; the HTTP status and the response body, for errors too."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def test_a_study_in_the_path_must_be_the_instances_study(receiver: StowReceiver, ct_files: list[Path]) -> None:
    body, content_type = encode_multipart([ct_files[0].read_bytes()])
    code, text = answer(f"http://127.0.0.1:{receiver.port}/studies/1.2.3.4", body, content_type)
    assert code == 409
    assert StowReport.from_json(text).failed[0][2] == 0xA900
    assert receiver.listener.spool.all_series() == []


@pytest.mark.parametrize(
    ("path", "content_type", "code"),
    [
        ("/studies", "application/dicom", 415),
        ("/studies", 'multipart/related; type="application/json"; boundary=x', 415),
        ("/series", 'multipart/related; type="application/dicom"; boundary=x', 404),
        ("/studies", 'multipart/related; type="application/dicom"; boundary=x', 400),
    ],
)
def test_requests_that_are_not_stow_rs_get_the_http_status_that_says_why(
    receiver: StowReceiver, path: str, content_type: str, code: int
) -> None:
    assert answer(f"http://127.0.0.1:{receiver.port}{path}", b"no parts here", content_type)[0] == code


def test_token_and_tls_with_a_ca_bundle(tmp_path: Path, ct_files: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    certs = make_certs(tmp_path / "certs")
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token-of-the-receiver\n")
    receiver = start(
        tmp_path, tls=True, token_file=token_file, tls_cert=str(certs["server_pem"]), tls_key=str(certs["server_key"])
    )
    try:
        monkeypatch.setenv("STOW_TOKEN", "s3cret-token-of-the-receiver")
        good = target(receiver, "https", token=Secret(env="STOW_TOKEN"), ca_bundle=certs["ca_pem"])
        assert post(good, [ct_files[0].read_bytes()], timeout=10).status == 200
        monkeypatch.setenv("STOW_TOKEN", "wrong")
        refused = post(good, [ct_files[1].read_bytes()], timeout=10)
        assert refused.status == 401 and not refused.final, "credentials are fixed by an operator: retried"
        untrusted = post(target(receiver, "https", token=Secret(env="STOW_TOKEN")), [b""], timeout=10)
        assert untrusted.status is None and "CERTIFICATE_VERIFY_FAILED" in untrusted.reason
        [series] = receiver.listener.spool.all_series()
        assert series.instance_count == 1
        row = receiver.listener.spool._db.execute("SELECT calling_ae FROM instances").fetchone()
        assert row == (CALLING_AE,)
    finally:
        receiver.stop()


def test_a_network_outside_the_allow_list_is_closed_before_http(tmp_path: Path, ct_files: list[Path]) -> None:
    receiver = start(tmp_path, allowed_networks=("10.9.0.0/16",))
    try:
        response = post(target(receiver), [ct_files[0].read_bytes()], timeout=10)
        assert response.status is None, response.reason
        assert receiver.listener.spool.all_series() == []
    finally:
        receiver.stop()


def test_the_response_is_dicom_json(receiver: StowReceiver, ct_files: list[Path]) -> None:
    body, content_type = encode_multipart([ct_files[0].read_bytes()])
    code, text = answer(f"http://127.0.0.1:{receiver.port}/studies", body, content_type)
    data = json.loads(text)
    assert code == 200 and data["00081199"]["vr"] == "SQ" and data["00081199"]["Value"][0]["00081155"]["vr"] == "UI"


def test_a_body_larger_than_the_instance_limit_is_413_and_nothing_is_stored(
    tmp_path: Path, ct_files: list[Path]
) -> None:
    data = ct_files[0].read_bytes()
    receiver = start(tmp_path, max_instance_bytes=len(data) // 2)
    try:
        response = post(target(receiver), [data], timeout=10)
        assert response.status == 413 and response.final
        assert receiver.listener.spool.all_series() == []
        assert list(receiver.listener.spool.tmp_dir.iterdir()) == [], "the body's scratch file is gone"
    finally:
        receiver.stop()


def test_a_chunked_body_is_read_as_routers_send_it(receiver: StowReceiver, ct_files: list[Path]) -> None:
    body, content_type = encode_multipart([p.read_bytes() for p in ct_files[:2]])
    chunks = [body[i : i + 1000] for i in range(0, len(body), 1000)]
    request = urllib.request.Request(
        f"http://127.0.0.1:{receiver.port}/studies",
        data=iter(chunks),
        headers={"Content-Type": content_type, "Transfer-Encoding": "chunked"},
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        assert r.status == 200 and len(StowReport.from_json(r.read()).stored) == 2
