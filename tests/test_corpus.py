"""Every file of the public corpus (../shared/data) pushed through the running service.

Each file gets success or a documented status (or its SOP class is rejected at negotiation); the service
survives; every series that results ends done or refused with a documented reason, never an internal error.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config

from tests.peers import SHARED_DATA, ServiceProcess

pytestmark = pytest.mark.e2e

DOCUMENTED_STATUSES = {0x0000, 0xA700, 0xA900, 0xC210, 0xC220, 0xC221}
DOCUMENTED_REASONS = {
    "mixed-stacks",
    "duplicate-positions",
    "too-few-slices",
    "gantry-tilt",
    "missing-slices",
    "irregular-spacing",
    "undecodable-pixels",
    "multiframe",
    "no-images",
    "bad-geometry",
    "bad-pixels",
    "modality-not-served",
    "no-result",
    "own-result",
    "no-matching-segments",
    "reference-geometry",
    "no-referenced-series",
    "not-a-reference",
    "malformed-instance",
    "decoder-failed",
    "too-large",
}


def corpus_files() -> list[Path]:
    if not SHARED_DATA.is_dir():
        pytest.skip("the shared corpus (../shared/data) is not present")
    return sorted(
        p for p in SHARED_DATA.rglob("*") if p.is_file() and p.suffix not in (".md", ".tsv", ".nrrd")
    )


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    svc = ServiceProcess(
        tmp_path_factory.mktemp("corpus"), "--quiet-seconds", "1", "--early-completion", "false"
    )
    yield svc
    svc.stop()


def push(port: int, path: Path) -> str:
    """Send a file's bytes as they are; the outcome as a string: a status, 'rejected' or 'unsendable'."""
    try:
        meta = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"]).file_meta
        sop_class, syntax = str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)
        if "MediaStorageSOPInstanceUID" not in meta:
            return "unsendable"
    except Exception:
        return "unsendable"  # no file meta to build a C-STORE from: a sender could not send it either
    ae = AE(ae_title="CORPUS")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="EDGE")
    if not assoc.is_established:
        # pynetdicom aborts when the acceptor accepted none of the contexts: the SOP class was rejected
        return "refused-association" if assoc.is_rejected else "rejected"
    if not any(c.result == 0 for c in assoc.accepted_contexts):
        assoc.release()
        return "rejected"
    try:
        status = assoc.send_c_store(path)
    except (ValueError, AttributeError, KeyError):
        return "unsendable"  # pynetdicom could not encode the request from this file
    finally:
        if assoc.is_established:
            assoc.release()
    code = getattr(status, "Status", None)
    return "no-response" if code is None else f"0x{code:04X}"


def test_every_corpus_file_gets_a_documented_answer(service: ServiceProcess) -> None:
    files = corpus_files()
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # "no accepted contexts" is expected here
    outcomes: Counter[str] = Counter()
    old = pynetdicom_config.STORE_SEND_CHUNKED_DATASET
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True  # send the bytes exactly as they are on disk
    try:
        for path in files:
            outcomes[push(service.port, path)] += 1
    finally:
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = old
    assert service.alive(), service.log()[-3000:]
    statuses = {int(k, 16) for k in outcomes if k.startswith("0x")}
    assert statuses <= DOCUMENTED_STATUSES, outcomes
    assert outcomes["0x0000"] > 100, outcomes
    assert outcomes["no-response"] == 0 and outcomes["refused-association"] == 0, outcomes
    print(dict(outcomes))

    # every series the corpus made ends done or refused with a documented reason
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        rows = status(service)
        if rows and not any(state in ("receiving", "queued", "processing") for state, _ in rows):
            break
        time.sleep(1.0)
    rows = status(service)
    assert rows and not any(state in ("receiving", "queued", "processing") for state, _ in rows), rows
    reasons = Counter(reason.split(":", 1)[0] for state, reason in rows if state == "failed")
    assert set(reasons) <= DOCUMENTED_REASONS, reasons
    assert sum(1 for state, _ in rows if state == "done") >= 3, rows  # the multi-slice CT series
    assert service.alive() and "Traceback" not in service.log()
    print(reasons)


def status(service: ServiceProcess) -> list[tuple[str, str]]:
    """(state, reason) of every series in the service's spool."""
    rows = []
    for line in service.status()[1:]:
        if line.startswith("outbox:"):
            continue
        parts = line.split(None, 3)
        rows.append((parts[1], parts[3] if len(parts) > 3 else ""))
    return rows
