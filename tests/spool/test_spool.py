from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import pytest

from edge_runtime.imaging.geometry import SliceGeometry
from edge_runtime.spool import ResultRow, SeriesState, Spool, SpoolFull

PACS, P = "PACS@h:1", "P@h:1"


def store(spool: Spool, sop: str, series: str = "1.2.3.2", data: bytes = b"DICM-data") -> object:
    return spool.store(
        data,
        called_ae="EDGE",
        calling_ae="CT",
        study_uid="1.2.3.1",
        series_uid=series,
        sop_uid=sop,
        sop_class="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax="1.2.840.10008.1.2.1",
        modality="CT",
    )


def test_store_is_durable_indexed_and_never_named_from_uids(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    first = store(spool, "1.2.3.3.1")
    paths = spool.instance_paths(first.series_id)
    assert len(paths) == 1 and paths[0].read_bytes() == b"DICM-data"
    assert "1.2.3" not in str(paths[0].relative_to(tmp_path))
    assert not any(spool.tmp_dir.iterdir())
    # another process sees the committed row (it was committed before store() returned)
    con = sqlite3.connect(tmp_path / "index.sqlite3")
    assert con.execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 1


def test_resent_instance_is_acknowledged_not_counted(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    a = store(spool, "1.2.3.3.1")
    b = store(spool, "1.2.3.3.1")
    assert not a.duplicate and b.duplicate and a.series_id == b.series_id
    row = spool.series(a.series_id)
    assert row.instance_count == 1 and row.generation == 1
    assert len(list(spool.instances_dir.rglob("*.dcm"))) == 1


def test_series_keyed_by_called_ae_study_series(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    a = store(spool, "1.1", series="9.1")
    b = store(spool, "1.2", series="9.2")
    c = spool.store(
        b"x",
        called_ae="OTHER",
        calling_ae="CT",
        study_uid="1.2.3.1",
        series_uid="9.1",
        sop_uid="1.3",
        sop_class="1.2",
        transfer_syntax="1.2",
        modality="CT",
    )
    assert len({a.series_id, b.series_id, c.series_id}) == 3
    assert a.key_hash != b.key_hash and "9.1" not in a.key_hash


def test_quiet_period_queue_claim_publish(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    s = store(spool, "1.1")
    assert spool.queue_quiet_series(60.0) == []
    queued = spool.queue_quiet_series(0.0)
    assert [r.id for r in queued] == [s.series_id]
    job = spool.claim_job()
    assert job is not None and job.state is SeriesState.PROCESSING and spool.claim_job() is None
    result = spool.publish(job.id, job.generation, "m 1", tmp_path, {PACS: [tmp_path / "seg.dcm"]})
    assert result is not None
    assert spool.series(job.id).state is SeriesState.DONE
    assert [str(i.destination) for i in spool.due_outbox()] == ["PACS@h:1"]


def test_result_of_a_series_that_grew_meanwhile_is_not_published(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    store(spool, "1.1")
    spool.queue_quiet_series(0.0)
    job = spool.claim_job()
    store(spool, "1.2")  # a late instance arrives while the job runs
    assert spool.publish(job.id, job.generation, "m", tmp_path, {P: [tmp_path / "x"]}) is None
    row = spool.series(job.id)
    assert row.state is SeriesState.RECEIVING and row.instance_count == 2
    assert spool.due_outbox() == []


def test_restart_requeues_interrupted_jobs_and_restarts_quiet_timers(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    store(spool, "1.1", series="7.1")
    store(spool, "1.2", series="7.2")
    spool.queue_quiet_series(0.0)
    job = spool.claim_job()
    spool.close()
    again = Spool(tmp_path)
    store(again, "1.3", series="7.3")  # still receiving when the service went down
    receiving = [r for r in again.all_series() if r.state is SeriesState.RECEIVING][0]
    assert again.requeue_interrupted() == 1
    assert again.series(job.id).state is SeriesState.QUEUED
    assert again.series(receiving.id).last_received >= receiving.last_received
    assert again.queue_quiet_series(0.5) == [], "the quiet period starts again after a restart"


def test_outbox_retry_bookkeeping(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    store(spool, "1.1")
    spool.queue_quiet_series(0.0)
    job = spool.claim_job()
    spool.publish(job.id, job.generation, "m", tmp_path, {P: [tmp_path / "seg.dcm"]})
    (item,) = spool.due_outbox()
    spool.mark_failed_attempt(item.id, "refused", retry_at=1e12)
    assert spool.due_outbox() == [] and spool.outbox_counts() == {"pending": 1}
    assert spool.due_outbox(now=2e12)[0].attempts == 1
    spool.mark_sent(item.id)
    assert spool.outbox_counts() == {"sent": 1}


def test_watermark_refuses_before_writing(tmp_path: Path) -> None:
    st = os.statvfs(tmp_path)
    spool = Spool(tmp_path, min_free_bytes=st.f_bavail * st.f_frsize * 2)
    with pytest.raises(SpoolFull):
        store(spool, "1.1")
    assert not list(spool.instances_dir.rglob("*.dcm"))


def test_retention_purges_finished_series_only(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    done = store(spool, "1.1", series="5.1")
    unsent = store(spool, "1.2", series="5.2")
    receiving = store(spool, "1.3", series="5.3")
    spool.queue_quiet_series(0.0)
    for _ in range(2):
        job = spool.claim_job()
        dests = [P] if job.id == unsent.series_id else []
        spool.publish(job.id, job.generation, "m", tmp_path, {d: [tmp_path / "seg.dcm"] for d in dests})
    store(spool, "1.4", series="5.3")  # keeps 5.3 receiving
    files_before = set(spool.instances_dir.rglob("*.dcm"))
    assert spool.purge(older_than=time.time() + 1) == (1, 1)
    remaining = {r.id for r in spool.all_series()}
    assert remaining == {unsent.series_id, receiving.series_id}  # a pending send keeps its series
    assert len(set(spool.instances_dir.rglob("*.dcm"))) == len(files_before) - 1
    assert done.series_id not in remaining


def test_orphan_files_from_an_interrupted_store_are_removed(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    kept = store(spool, "1.1")
    orphan = spool.instances_dir / "20260101" / "deadbeef.dcm"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"never acknowledged")
    assert spool.remove_orphans() == 1
    assert not orphan.exists() and spool.instance_paths(kept.series_id)[0].exists()


def test_rows_come_back_typed(tmp_path: Path) -> None:
    """Geometry and results go in and come out as types; the index's text stays inside."""
    spool = Spool(tmp_path)
    geometry = SliceGeometry(
        iop=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        ipp=(0.0, 0.0, 2.5),
        rows=16,
        columns=16,
        pixel_spacing=(0.8, 0.8),
        thickness=2.5,
        expected=None,
    )
    common = dict(called_ae="EDGE", calling_ae="CT", study_uid="1.2", series_uid="1.2.1", sop_class="1.2")
    common.update(transfer_syntax="1.2.840.10008.1.2.1", modality="CT")
    spool.store(b"a", **common, sop_uid="1.2.1.1", geometry=geometry)
    stored = spool.store(b"b", **common, sop_uid="1.2.1.2")  # not an image slice: no geometry
    assert spool.instance_geometries(stored.series_id) == [geometry], "an instance without geometry is skipped"
    spool.queue_quiet_series(0.0)
    job = spool.claim_job()
    assert job is not None
    seg = tmp_path / "seg.dcm"
    result_id = spool.publish(job.id, job.generation, "m", tmp_path / "r", {PACS: [seg], P: [seg]})
    assert spool.results(job.id) == [ResultRow(result_id, job.id, job.generation, "m", tmp_path / "r")]
    assert [item.destination for item in spool.due_outbox()] == [PACS, P]
