"""The sender's outbox decisions for STOW-RS answers, against a scripted HTTP peer (a server that answers what
the test tells it, as pynetdicom's tests script a raw DICOM peer), and a dead DIMSE node beside a live STOW-RS
receiver of our own."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pydicom
import pytest

from edge_runtime.apps.status import print_status
from edge_runtime.dicom import LabelMapSegmentationStorage
from edge_runtime.dicomweb import StowReport
from edge_runtime.egress.destination import Destination
from edge_runtime.egress.sender import RetryPolicy, Sender
from edge_runtime.ingest.listener import Listener, ListenerConfig
from edge_runtime.ingest.stow import StowReceiver
from edge_runtime.spool import Spool
from phantom import write_series
from tests.ingest.test_listener import make_certs
from tests.peers import StoreSCP, free_port


class ScriptedServer:
    """Answers every POST with the next (status, body) of ``script``; records the requests' headers."""

    def __init__(self, script: list[tuple[int, bytes]]):
        self.script, self.requests = list(script), []  # type: ignore[var-annotated]
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - http.server API
                self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append(dict(self.headers))
                status, body = outer.script.pop(0)
                self.send_response(status)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/dicom-web"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    hu = np.full((3, 16, 16), -1000.0, dtype=np.float32)
    return sorted(write_series(hu, (2.0, 1.0, 1.0), tmp_path_factory.mktemp("results")).paths)


def publish(spool: Spool, deliveries: dict[str, list[Path]]) -> None:
    spool.store(
        b"x",
        called_ae="EDGE",
        calling_ae="CT",
        study_uid="1.2",
        series_uid="1.2.1",
        sop_class="1.2",
        sop_uid="1.2.1.1",
        transfer_syntax="1.2.840.10008.1.2.1",
        modality="CT",
    )
    spool.queue_quiet_series(0.0)
    job = spool.claim_job()
    assert job is not None
    spool.publish(job.id, job.generation, "m", Path("r"), deliveries)


def outbox(spool: Spool) -> dict[tuple[str, str], tuple[str, int, str | None]]:
    rows = spool._db.execute("SELECT path, destination, state, attempts, last_error FROM outbox").fetchall()
    return {(Path(p).name, d): (s, a, e) for p, d, s, a, e in rows}


def uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    s = Spool(tmp_path / "spool")
    yield s
    s.close()


def test_stow_answers_decide_sent_retry_or_refused(
    spool: Spool, files: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    a, b, c = files
    partial = StowReport(stored=[(uid(a), "1.2")], failed=[(uid(b), "1.2", 0xA700), (uid(c), "1.2", 0xC000)])
    server = ScriptedServer([(503, b"busy"), (202, partial.to_json()), (400, b'{"error": "bad multipart"}')])
    try:
        web = Destination.parse(f"dicomweb+{server.url};name=web")
        publish(spool, {"web": [a, b, c]})
        sender = Sender(spool, "EDGE", RetryPolicy(initial_seconds=0.0), destinations=[web])
        assert sender.send_due() == 0
        assert {v[:2] for v in outbox(spool).values()} == {("pending", 1)}, "503: every object is retried"
        assert sender.send_due() == 1
        rows = outbox(spool)
        assert rows[(a.name, "web")][0] == "sent"
        assert rows[(b.name, "web")][:2] == ("pending", 2) and "0xA700" in str(rows[(b.name, "web")][2])
        assert rows[(c.name, "web")][0] == "failed" and "0xC000" in str(rows[(c.name, "web")][2])
        assert sender.send_due() == 0
        state, _, error = outbox(spool)[(b.name, "web")]
        assert state == "failed" and error is not None and "HTTP 400" in error and "bad multipart" in error
        assert sender.send_due() == 0 and len(server.requests) == 3, "nothing is left to send"
        assert server.requests[0]["Content-Type"].startswith('multipart/related; type="application/dicom"')
        print_status(spool.root)
        assert "outbox: 0 pending, 1 sent, 2 refused for good" in capsys.readouterr().out
    finally:
        server.stop()


# pynetdicom 3.0.4 leaks the socket of a refused connection: its _shutdown_socket() calls shutdown() first, which
# raises ENOTCONN on a socket that never connected, so the close() after it never runs
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_dead_dimse_node_holds_back_nothing_sent_elsewhere(tmp_path: Path, spool: Spool, files: list[Path]) -> None:
    config = ListenerConfig(ae_title="ARCHIVE", host="127.0.0.1", port=free_port(), modalities=("CT",))
    archive = Spool(tmp_path / "archive")
    receiver = StowReceiver(Listener(config, archive), 0)
    receiver.start()
    try:
        web = Destination.parse(f"dicomweb+http://127.0.0.1:{receiver.port};name=archive")
        dead = Destination.parse(f"DEAD@127.0.0.1:{free_port()};name=dead")
        publish(spool, {"dead": files, "archive": files})
        sender = Sender(spool, "EDGE", RetryPolicy(initial_seconds=30.0), timeout=5, destinations=[dead, web])
        assert sender.send_due() == len(files)
        rows = outbox(spool)
        assert all(rows[(f.name, "archive")][0] == "sent" for f in files)
        dead_rows = [rows[(f.name, "dead")] for f in files]
        assert all(s == "pending" and n == 1 and e == "association not established" for s, n, e in dead_rows)
        retry_at = {r[0] for r in spool._db.execute("SELECT next_attempt FROM outbox WHERE destination='dead'")}
        assert len(retry_at) == 1, "one back-off for the destination, not one connection attempt per row"
        [series] = archive.all_series()
        assert series.instance_count == len(files)
    finally:
        receiver.stop()
        archive.close()


def test_a_row_for_a_destination_no_longer_configured_waits(spool: Spool, files: list[Path]) -> None:
    publish(spool, {"gone": files[:1]})
    Sender(spool, "EDGE", RetryPolicy(initial_seconds=0.0)).send_due()
    assert outbox(spool)[(files[0].name, "gone")] == ("pending", 1, "destination 'gone' is not configured")


def test_dimse_over_tls_verifies_the_node_and_presents_our_certificate(
    tmp_path: Path, spool: Spool, files: list[Path]
) -> None:
    certs = make_certs(tmp_path / "certs")
    config = ListenerConfig(
        ae_title="SECURE",
        host="127.0.0.1",
        port=free_port(),
        modalities=("CT",),
        tls_port=free_port(),
        tls_cert=str(certs["server_pem"]),
        tls_key=str(certs["server_key"]),
        tls_ca=str(certs["ca_pem"]),
    )
    node = Spool(tmp_path / "node")
    listener = Listener(config, node)
    listener.start()
    try:
        address = f"SECURE@127.0.0.1:{listener.tls_port}"
        ours = f"tls-cert={certs['client_pem']};tls-key={certs['client_key']}"
        trusted = Destination.parse(f"{address};name=trusted;tls-ca={certs['ca_pem']};{ours}")
        impostor = Destination.parse(f"{address};name=impostor;tls-ca={certs['rogue_pem']};{ours}")
        publish(spool, {"trusted": files, "impostor": files[:1]})
        sender = Sender(spool, "EDGE", RetryPolicy(initial_seconds=30.0), timeout=5, destinations=[trusted, impostor])
        assert sender.send_due() == len(files)
        assert outbox(spool)[(files[0].name, "impostor")][:2] == ("pending", 1), "an unverified node gets nothing"
        [series] = node.all_series()
        assert series.instance_count == len(files)
    finally:
        listener.stop()
        node.close()


def test_an_object_the_node_does_not_store_is_refused_for_good_and_the_rest_is_sent(
    tmp_path: Path, spool: Spool, files: list[Path]
) -> None:
    """DCMTK 3.6.7's storescp has no presentation context for the Label Map Segmentation class: that object is
    marked failed with the reason, not retried every few minutes forever, and the images on the same association
    are stored."""
    labelmap = tmp_path / "labelmap.dcm"
    ds = pydicom.dcmread(files[0])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = LabelMapSegmentationStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.424242"
    ds.save_as(labelmap)
    pacs = StoreSCP(tmp_path / "pacs", fork=False)
    try:
        publish(spool, {"pacs": [*files, labelmap]})
        sender = Sender(
            spool,
            "EDGE",
            RetryPolicy(initial_seconds=30.0),
            timeout=10,
            destinations=[Destination.parse(f"{pacs.address};name=pacs")],
        )
        assert sender.send_due() == len(files)
        rows = outbox(spool)
        assert all(rows[(f.name, "pacs")][0] == "sent" for f in files)
        state, _, error = rows[("labelmap.dcm", "pacs")]
        assert state == "failed" and "not accepted by the node" in (error or "")
        assert sender.send_due() == 0 and outbox(spool)[("labelmap.dcm", "pacs")][0] == "failed"
    finally:
        pacs.stop()
