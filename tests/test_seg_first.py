"""SEG first: a result is published in two steps, the SEG sent before the SR and the other objects are written,
and a crash between the steps loses nothing and sends nothing twice.

The service runs as a subprocess against DCMTK storescu (the scanner) and storescp (the PACS, ``+uf``: one file
per received object, so a second delivery of the same SEG would show as a second file). The worker is held
between the two steps by the service's test-only hook (``EDGE_RUNTIME_TEST_HOLD_AFTER_SEG`` names a file that
releases it), so what the PACS holds at that point is observed, not raced.
"""

from __future__ import annotations

import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import RTStructureSetStorage

from edge_runtime.dicom import Comprehensive3DSRStorage, SegmentationStorage
from edge_runtime.service import HOLD_AFTER_SEG_ENV
from edge_runtime.spool import ResultStage, Spool, StoredInstance
from phantom import SeriesInfo, make_phantom, write_series
from tests.peers import ServiceProcess, StoreSCP, storescu

pytestmark = pytest.mark.e2e
SHAPE, SPACING = (16, 32, 32), (3.0, 4.5, 4.5)  # one window of the bundled model
#: the SEG goes out in the first step, the SR and an RT Structure Set in the second
FORMATS = "binary,sr,rtstruct"


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[StoreSCP]:
    scp = StoreSCP(tmp_path / "pacs", options=("+uf",))
    yield scp
    scp.stop()


def start_service(workdir: Path, pacs: StoreSCP) -> ServiceProcess:
    return ServiceProcess(workdir, "--destination", f"{pacs.address};formats={FORMATS}", "--quiet-seconds", "1")


def push_series(folder: Path, service: ServiceProcess, seed: int) -> SeriesInfo:
    phantom = make_phantom(SHAPE, SPACING, rng=seed)
    info = write_series(phantom.hu, phantom.spacing, folder)
    storescu(service.port, info.paths, ae_title=service.ae_title)
    return info


def result_rows(spool: Path) -> list[tuple[str, dict[str, str]]]:
    """Each result's stage and its outbox (file name -> state), read-only as another process reads the index."""
    con = sqlite3.connect(f"file:{spool / 'index.sqlite3'}?mode=ro", uri=True, timeout=10)
    try:
        results = con.execute("SELECT id, stage FROM results ORDER BY id").fetchall()
        return [
            (stage, {Path(p).name: s for p, s in con.execute("SELECT path, state FROM outbox WHERE result_id=?", (i,))})
            for i, stage in results
        ]
    finally:
        con.close()


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(0.1)
    raise TimeoutError(f"{what} after {timeout} s")


def at_pacs(pacs: StoreSCP, sop_class: str, series_uid: str) -> list[Path]:
    return pacs.received(sop_class).get(series_uid, [])


def count_at_pacs(pacs: StoreSCP, sop_class: str) -> int:
    """Objects of one SOP class at the PACS (an RT Structure Set names its series deep in its sequences)."""
    return sum(pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID == sop_class for f in pacs.folder.iterdir())


def all_sent(spool: Path, names: set[str]) -> bool:
    rows = result_rows(spool)
    return (
        len(rows) == 1
        and rows[0][0] == ResultStage.COMPLETE.value
        and names <= set(rows[0][1])
        and all(state == "sent" for state in rows[0][1].values())
    )


def test_seg_is_at_the_pacs_before_the_sr_is_written(
    tmp_path: Path, pacs: StoreSCP, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = tmp_path / "release"
    monkeypatch.setenv(HOLD_AFTER_SEG_ENV, str(gate))
    service = start_service(tmp_path / "svc", pacs)
    try:
        info = push_series(tmp_path / "series", service, seed=1)
        pacs.wait_for_seg(info.series_uid, timeout=90)
        # the worker is held between the steps: the SEG is stored at the PACS, the SR does not exist yet
        assert list(service.output.glob("*/seg.dcm")) and not list(service.output.glob("*/sr.dcm"))
        assert not list(service.output.glob("*/measurements.json"))
        assert at_pacs(pacs, Comprehensive3DSRStorage, info.series_uid) == []
        [(stage, outbox)] = result_rows(service.spool)
        assert stage == ResultStage.SEG.value and outbox == {"seg.dcm": "sent"}

        gate.touch()
        wait_until(lambda: all_sent(service.spool, {"seg.dcm", "sr.dcm", "rtstruct.dcm"}), "not every object sent")
        assert len(at_pacs(pacs, Comprehensive3DSRStorage, info.series_uid)) == 1
        assert count_at_pacs(pacs, RTStructureSetStorage) == 1
        assert len(at_pacs(pacs, SegmentationStorage, info.series_uid)) == 1
    finally:
        code = service.stop()
    assert code == 0, service.log()
    assert "Traceback" not in service.log()


def test_a_crash_between_the_steps_is_completed_at_restart_and_the_seg_sent_once(
    tmp_path: Path, pacs: StoreSCP, monkeypatch: pytest.MonkeyPatch
) -> None:
    workdir = tmp_path / "svc"
    monkeypatch.setenv(HOLD_AFTER_SEG_ENV, str(tmp_path / "never"))
    service = start_service(workdir, pacs)
    info = push_series(tmp_path / "series", service, seed=2)
    seg_at_pacs = pacs.wait_for_seg(info.series_uid, timeout=90)
    wait_until(lambda: result_rows(service.spool) == [("seg", {"seg.dcm": "sent"})], "the SEG's send not recorded")
    service.stop(signal.SIGKILL)  # between the steps: the SEG committed and sent, nothing else written

    monkeypatch.delenv(HOLD_AFTER_SEG_ENV)
    service = start_service(workdir, pacs)
    try:
        wait_until(lambda: all_sent(service.spool, {"seg.dcm", "sr.dcm", "rtstruct.dcm"}), "not completed")
        [sr] = at_pacs(pacs, Comprehensive3DSRStorage, info.series_uid)
        assert count_at_pacs(pacs, RTStructureSetStorage) == 1
        # the SEG was not sent again, and the SR re-made after the crash references the one that was sent
        assert at_pacs(pacs, SegmentationStorage, info.series_uid) == [seg_at_pacs]
        seg_uid = str(pydicom.dcmread(seg_at_pacs, stop_before_pixels=True).SOPInstanceUID)
        evidence = pydicom.dcmread(sr).CurrentRequestedProcedureEvidenceSequence
        referenced = {
            str(i.ReferencedSOPInstanceUID)
            for s in evidence
            for r in s.ReferencedSeriesSequence
            for i in r.ReferencedSOPSequence
        }
        assert seg_uid in referenced
        assert "completing result" in service.log()
    finally:
        code = service.stop()
    assert code == 0, service.log()
    assert "Traceback" not in service.log()


# -- the spool's side ----------------------------------------------------------------------------------------


def store(spool: Spool, sop_uid: str) -> StoredInstance:
    return spool.store(
        b"DICM-data",
        called_ae="EDGE",
        calling_ae="CT",
        study_uid="1.2.3.1",
        series_uid="1.2.3.2",
        sop_uid=sop_uid,
        sop_class="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax="1.2.840.10008.1.2.1",
        modality="CT",
    )


def claimed_job(spool: Spool) -> tuple[int, int]:
    stored = store(spool, "1.2.3.3")
    spool.queue_series(stored.series_id, 1)
    job = spool.claim_job()
    assert job is not None
    return job.id, job.generation


def test_spool_completes_a_result_once_and_keeps_its_instances_until_then(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    series_id, generation = claimed_job(spool)
    result_id = spool.publish(
        series_id, generation, "m", tmp_path, {"pacs": [tmp_path / "seg.dcm"]}, '{"published": 1}', ResultStage.SEG
    )
    assert result_id is not None
    assert [r.id for r in spool.unfinished_results()] == [result_id]
    assert spool.purge(time.time() + 1) == (0, 0), "the second step needs the instances"

    assert spool.complete(result_id, {"pacs": [tmp_path / "sr.dcm"]}, {"stages": {"sr": 0.5}})
    assert not spool.complete(result_id, {"pacs": [tmp_path / "sr.dcm"]}, {}), "queued twice"
    assert not spool.drop_unfinished(result_id)
    assert spool.unfinished_results() == []
    assert [i.path.name for i in spool.due_outbox()] == ["seg.dcm", "sr.dcm"]
    [result] = spool.results(series_id)
    assert result.stage is ResultStage.COMPLETE
    con = sqlite3.connect(tmp_path / "spool" / "index.sqlite3")
    assert con.execute("SELECT timings FROM results").fetchone()[0] == (
        '{"published": 1, "completed": {"stages": {"sr": 0.5}}}'
    )
    con.close()


def test_spool_of_schema_1_is_migrated_with_its_results_complete(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    series_id, generation = claimed_job(spool)
    spool.publish(series_id, generation, "m", tmp_path, {"pacs": [tmp_path / "seg.dcm"]})
    spool.close()
    con = sqlite3.connect(tmp_path / "index.sqlite3")  # the index as version 1 left it
    con.execute("ALTER TABLE results DROP COLUMN stage")
    con.execute("PRAGMA user_version=1")
    con.close()

    spool = Spool(tmp_path)
    assert [r.stage for r in spool.results(series_id)] == [ResultStage.COMPLETE]
    assert spool.unfinished_results() == []
    spool.close()


def test_spool_lets_a_superseded_result_be_dropped(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    series_id, generation = claimed_job(spool)
    result_id = spool.publish(series_id, generation, "m", tmp_path, {}, stage=ResultStage.SEG)
    assert result_id is not None
    store(spool, "1.2.3.4")  # a late instance: the series is a new generation, whose own result will follow
    assert spool.series(series_id).generation == generation + 1
    assert spool.drop_unfinished(result_id) and not spool.drop_unfinished(result_id)
    assert spool.unfinished_results() == [] and not spool.complete(result_id, {"pacs": [tmp_path / "sr.dcm"]}, {})
    assert [r.stage for r in spool.results(series_id)] == [ResultStage.DROPPED]
