"""Destinations of each kind end to end, judged by real receivers: DCMTK storescp (DIMSE) and Orthanc with its
DICOMweb plugin (STOW-RS both ways).

One service, started as a user starts it, with three destinations: storescp receiving every format, Orthanc
receiving some formats by STOW-RS (HTTP basic authentication, the password read from a file), and a DIMSE node
that is down. A series pushed with DCMTK must reach both live receivers as the objects each one asked for, while
the outbox rows of the dead one retry (attempts and the last error recorded) without holding anything back.
Orthanc then sends a series of its own into the service's STOW-RS receiver (with a bearer token), which segments
it like any other.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import (
    Comprehensive3DSRStorage,
    KeyObjectSelectionDocumentStorage,
    RTStructureSetStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)

from edge_runtime.dicom import LabelMapSegmentationStorage
from edge_runtime.ingest.stow import CALLING_AE
from edge_runtime.results.formats import FORMATS
from phantom import SeriesInfo, make_phantom, write_series
from tests.peers import Orthanc, ServiceProcess, StoreSCP, free_port, storescu
from tests.results.readers import dciodvfy_new_errors

pytestmark = pytest.mark.e2e
SHAPE, SPACING = (24, 96, 96), (2.5, 3.5, 3.5)
#: the SOP classes of each format's objects
SOP_CLASSES = {
    "binary": {SegmentationStorage},
    "labelmap": {LabelMapSegmentationStorage},
    "fractional": {SegmentationStorage},
    "rtstruct": {RTStructureSetStorage},
    "overlay": {SecondaryCaptureImageStorage, KeyObjectSelectionDocumentStorage},
    "sr": {Comprehensive3DSRStorage},
}
PACS_FORMATS = FORMATS
ORTHANC_FORMATS = ("labelmap", "rtstruct", "overlay", "sr")


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreSCP]:
    # -pm (promiscuous): DCMTK 3.6.7 does not know the Label Map Segmentation class and would refuse its context
    scp = StoreSCP(tmp_path_factory.mktemp("pacs"), options=("-pm",))
    yield scp
    scp.stop()


@pytest.fixture(scope="module")
def stow_port() -> int:
    return free_port()


STOW_TOKEN = "token-that-orthanc-presents"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory, stow_port: int) -> Iterator[Orthanc]:
    server = Orthanc(
        tmp_path_factory.mktemp("orthanc"),
        dicomweb_servers={"edge": f"http://127.0.0.1:{stow_port}/"},
        dicomweb_token=STOW_TOKEN,
        users={"edge": "orthanc-password"},
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, pacs: StoreSCP, orthanc: Orthanc, stow_port: int
) -> Iterator[ServiceProcess]:
    secrets = tmp_path_factory.mktemp("secrets")
    password, token = secrets / "orthanc-password", secrets / "stow-token"
    password.write_text("orthanc-password\n")
    token.write_text(STOW_TOKEN)
    destinations = [
        f"{pacs.address};name=pacs;formats={','.join(PACS_FORMATS)}",
        f"dicomweb+{orthanc.dicomweb_url};name=orthanc;user=edge;password-file={password};"
        f"formats={','.join(ORTHANC_FORMATS)}",
        f"DOWN@127.0.0.1:{free_port()};name=down",
    ]
    svc = ServiceProcess(
        tmp_path_factory.mktemp("svc"),
        *[arg for d in destinations for arg in ("--destination", d)],
        "--quiet-seconds",
        "1",
        "--stow-port",
        str(stow_port),
        "--stow-token-file",
        str(token),
    )
    yield svc
    assert svc.stop() == 0, svc.log()
    assert "Traceback" not in svc.log()


def new_series(folder: Path, seed: int) -> SeriesInfo:
    phantom = make_phantom(SHAPE, SPACING, rng=seed)
    return write_series(phantom.hu, phantom.spacing, folder)


def outbox(service: ServiceProcess) -> list[tuple[str, str, str, int, str | None]]:
    """(file, destination, state, attempts, last error) of every outbox row, read-only."""
    con = sqlite3.connect(f"file:{service.spool / 'index.sqlite3'}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute("SELECT path, destination, state, attempts, last_error FROM outbox").fetchall()
    finally:
        con.close()


def complete_results(service: ServiceProcess) -> int:
    """How many results have both their steps' outbox rows (the SEG's, then the other objects')."""
    try:
        con = sqlite3.connect(f"file:{service.spool / 'index.sqlite3'}?mode=ro", uri=True, timeout=10)
    except sqlite3.OperationalError:
        return 0
    try:
        return int(con.execute("SELECT COUNT(*) FROM results WHERE stage = 'complete'").fetchone()[0])
    except sqlite3.OperationalError:
        return 0
    finally:
        con.close()


def wait_until_sent(service: ServiceProcess, live: set[str], count: int, timeout: float = 90.0) -> list[tuple]:
    """The outbox once ``count`` results are complete (both publishing steps: the SEG goes out first) and the rows
    of the ``live`` destinations are all sent."""
    end = time.monotonic() + timeout
    rows: list[tuple] = []
    while time.monotonic() < end:
        try:
            rows = outbox(service)
        except sqlite3.OperationalError:
            rows = []
        mine = [r for r in rows if r[1] in live]
        if complete_results(service) >= count and mine and all(r[2] == "sent" for r in mine):
            return rows
        time.sleep(0.2)
    raise TimeoutError(f"live destinations not delivered after {timeout} s: {rows}\n{service.log()[-3000:]}")


def sop_of(path: str) -> tuple[str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.SOPInstanceUID), str(ds.SOPClassUID)


def test_each_destination_gets_its_formats_and_a_dead_one_holds_back_nothing(
    service: ServiceProcess, pacs: StoreSCP, orthanc: Orthanc, tmp_path: Path
) -> None:
    info = new_series(tmp_path, seed=3)
    storescu(service.port, list(info.paths))
    rows = wait_until_sent(service, {"pacs", "orthanc"}, count=1)

    routed = {name: dict(sop_of(r[0]) for r in rows if r[1] == name) for name in ("pacs", "orthanc", "down")}
    assert {c for f in PACS_FORMATS for c in SOP_CLASSES[f]} == set(routed["pacs"].values())
    assert {c for f in ORTHANC_FORMATS for c in SOP_CLASSES[f]} == set(routed["orthanc"].values())
    fractional = [
        r[0] for r in rows if r[1] == "pacs" and pydicom.dcmread(r[0]).get("SegmentationType") == "FRACTIONAL"
    ]
    assert len(fractional) == 1, "a FRACTIONAL SEG beside the BINARY one"

    at_pacs = dict(sop_of(str(p)) for p in pacs.folder.iterdir())
    assert routed["pacs"].items() <= at_pacs.items(), "storescp holds every object routed to it, as sent"
    for path in pacs.folder.iterdir():
        assert dciodvfy_new_errors(path) == [], path.name
    at_orthanc = orthanc.instances()
    assert routed["orthanc"].items() <= at_orthanc.items(), "Orthanc (QIDO-RS) holds what was sent by STOW-RS"
    assert not set(routed["pacs"]) - set(routed["orthanc"]) & set(at_orthanc), "and nothing it did not ask for"
    for path, name, *_ in rows:
        if name == "orthanc":  # Orthanc keeps the bytes that were checked at storescp
            assert orthanc.instance_file(sop_of(path)[0]) == Path(path).read_bytes(), Path(path).name

    end = time.monotonic() + 30
    while True:  # the dead destination is tried after the others, and again after its back-off
        down = [r for r in outbox(service) if r[1] == "down"]
        if all(r[3] >= 2 for r in down) or time.monotonic() > end:
            break
        time.sleep(0.2)
    assert down and all(r[2] == "pending" and r[3] >= 2 and r[4] for r in down), down
    assert "association not established" in str(down[0][4])


def test_orthanc_sends_a_series_in_by_stow_rs_and_it_is_segmented(
    service: ServiceProcess, pacs: StoreSCP, orthanc: Orthanc, tmp_path: Path
) -> None:
    info = new_series(tmp_path, seed=4)
    series = orthanc.upload(list(info.paths))
    orthanc.post("/dicom-web/servers/edge/stow", {"Resources": [series], "Synchronous": True})
    seg = pacs.wait_for_seg(info.series_uid, timeout=90)
    assert dciodvfy_new_errors(seg) == []
    con = sqlite3.connect(f"file:{service.spool / 'index.sqlite3'}?mode=ro", uri=True, timeout=10)
    try:
        callers = con.execute(
            "SELECT DISTINCT i.calling_ae, s.called_ae, s.instance_count FROM instances i "
            "JOIN series s ON s.id = i.series_id WHERE s.series_uid = ?",
            (info.series_uid,),
        ).fetchall()
    finally:
        con.close()
    assert callers == [(CALLING_AE, service.ae_title, SHAPE[0])]
