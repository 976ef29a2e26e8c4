"""End to end: ``edge-runtime serve`` as a subprocess, DCMTK storescu as the scanner, storescp as the PACS."""

from __future__ import annotations

import json
import re
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, SecondaryCaptureImageStorage
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config

from edge_runtime.dicom import Comprehensive3DSRStorage, SegmentationStorage
from edge_runtime.imaging.volume import load_volume
from edge_runtime.inference.package import DEFAULT_PACKAGE, ModelPackage
from edge_runtime.inference.pipeline import segment
from edge_runtime.inference.runner import load_runner
from phantom import SeriesInfo, make_phantom, write_reference_seg, write_series
from tests.peers import (
    ServiceProcess,
    StoreSCP,
    dciodvfy_errors,
    dcmtk_env,
    require_tool,
    storescu,
    wait_for_measurements,
)

pytestmark = pytest.mark.e2e
QUIET = 1.0
SHAPE, SPACING = (24, 96, 96), (2.5, 3.5, 3.5)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, pacs: StoreSCP) -> Iterator[ServiceProcess]:
    svc = ServiceProcess(tmp_path_factory.mktemp("svc"), "--destination", pacs.address, "--quiet-seconds", str(QUIET))
    yield svc
    svc.stop_cleanly()


def new_series(folder: Path, seed: int, **kwargs: object) -> SeriesInfo:
    phantom = make_phantom(SHAPE, SPACING, rng=seed)
    return write_series(phantom.hu, phantom.spacing, folder, **kwargs)


def metrics_with(service: ServiceProcess, text: str, timeout: float = 10.0) -> tuple[int, str]:
    """``GET /metrics`` until it shows ``text`` (counters follow the work they count), else the last answer."""
    deadline = time.monotonic() + timeout
    while True:
        code, metrics = service.http_get("/metrics")
        if text in metrics or time.monotonic() >= deadline:
            return code, metrics
        time.sleep(0.2)


def check_seg(seg_path: Path, info: SeriesInfo) -> None:
    """dciodvfy-clean, every frame references a pushed instance, and the pixels are the runner's label map."""
    assert dciodvfy_errors(seg_path) == []
    ds = pydicom.dcmread(seg_path)
    refs = {
        str(s.ReferencedSOPInstanceUID)
        for fr in ds.PerFrameFunctionalGroupsSequence
        for d in fr.DerivationImageSequence
        for s in d.SourceImageSequence
    }
    assert refs <= set(info.sop_instance_uids)
    referenced = {str(i.ReferencedSOPInstanceUID) for i in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(info.sop_instance_uids), "the SEG must cover every slice of the series"
    package = ModelPackage.load(DEFAULT_PACKAGE)
    expected = segment(load_volume(info.paths), package, load_runner(package, threads=1)).labels
    seg = hd.seg.segread(seg_path)
    got = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=list(info.sop_instance_uids), combine_segments=True, skip_overlap_checks=True
    )
    np.testing.assert_array_equal(got, expected)


def test_shuffled_series_gives_one_correct_seg(service: ServiceProcess, pacs: StoreSCP, tmp_path: Path) -> None:
    info = new_series(tmp_path, seed=1, shuffle_files=True, instance_number_order="random")
    storescu(service.port, sorted(tmp_path.glob("*.dcm")))
    seg = pacs.wait_for_seg(info.series_uid, timeout=60)
    check_seg(seg, info)
    results = wait_for_measurements(service.output, seg)
    assert len(results) == 1, "results are also written to the output folder"
    data = json.loads(results[0].read_text())
    assert {s["name"] for s in data["segments"]} == {lab.name for lab in ModelPackage.load(DEFAULT_PACKAGE).labels}
    sr = pacs.wait_for(Comprehensive3DSRStorage, info.series_uid, timeout=30)
    assert dciodvfy_errors(sr) == []
    sr_ds = pydicom.dcmread(sr)
    assert str(sr_ds.SOPInstanceUID) == data["sr_sop_instance_uid"]
    seg_uid = str(pydicom.dcmread(seg, stop_before_pixels=True).SOPInstanceUID)
    refs = {
        str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for item in _walk(sr_ds.ContentSequence)
        if "ReferencedSOPSequence" in item
        and item.ReferencedSOPSequence[0].ReferencedSOPClassUID == SegmentationStorage
    }
    assert refs == {seg_uid}, "the SR's measurement groups reference the SEG"


def _walk(items):  # noqa: ANN001, ANN202
    for item in items:
        yield item
        if "ContentSequence" in item:
            yield from _walk(item.ContentSequence)


def test_health_and_metrics_endpoints(service: ServiceProcess, pacs: StoreSCP, tmp_path: Path) -> None:
    info = new_series(tmp_path, seed=11)
    storescu(service.port, list(info.paths))
    pacs.wait_for_seg(info.series_uid, timeout=60)
    code, body = service.http_get("/healthz")
    assert code == 200 and json.loads(body)["ok"] is True
    code, body = service.http_get("/readyz")
    assert code == 200 and json.loads(body)["spool"] == "ok"
    code, metrics = metrics_with(service, 'edge_sends_total{outcome="success"}')
    assert code == 200
    stored = re.search(r'edge_instances_received_total\{outcome="stored"\} (\d+)', metrics)
    assert stored and int(float(stored.group(1))) >= SHAPE[0]
    assert 'edge_stage_seconds_count{stage="inference"}' in metrics
    assert 'edge_queue_depth{queue="outbox"}' in metrics
    assert service.http_get("/nope")[0] == 404


def test_reference_seg_pushed_back_is_compared_with_our_result(
    service: ServiceProcess, pacs: StoreSCP, tmp_path: Path
) -> None:
    phantom = make_phantom(SHAPE, SPACING, rng=12)
    info = write_series(phantom.hu, phantom.spacing, tmp_path / "ct")
    storescu(service.port, list(info.paths))
    pacs.wait_for_seg(info.series_uid, timeout=60)
    reference = write_reference_seg(info, phantom.labels, tmp_path / "reference.dcm")
    storescu(service.port, [reference], extra=["-R"])  # propose exactly the SEG class
    history = service.output / "validation.jsonl"
    deadline = time.monotonic() + 30
    records: list[dict] = []
    while time.monotonic() < deadline and not records:
        if history.exists():
            records = [json.loads(line) for line in history.read_text().splitlines()]
        time.sleep(0.2)
    assert records, service.log()[-2000:]
    record = records[-1]
    package = ModelPackage.load(DEFAULT_PACKAGE)
    assert record["model"]["sha256"] == package.model_sha256
    assert set(record["labels"]) == {lab.name for lab in package.labels}
    for values in record["labels"].values():
        assert 0.0 <= values["dice"] <= 1.0 and "hd95_mm" in values
    assert record["labels"]["Lung"]["dice"] > 0.5  # the comparison ran on real overlap, not on empty masks
    _, metrics = metrics_with(service, 'edge_validation_dice{label="Lung"')
    assert 'edge_validation_dice{label="Lung"' in metrics


def test_two_series_interleaved_in_one_association(service: ServiceProcess, pacs: StoreSCP, tmp_path: Path) -> None:
    a = new_series(tmp_path / "a", seed=2)
    b = new_series(tmp_path / "b", seed=3)
    interleaved = [p for pair in zip(a.paths, b.paths, strict=False) for p in pair]
    storescu(service.port, interleaved)
    for info in (a, b):
        check_seg(pacs.wait_for_seg(info.series_uid, timeout=60), info)


def test_series_split_across_two_associations(service: ServiceProcess, pacs: StoreSCP, tmp_path: Path) -> None:
    info = new_series(tmp_path, seed=4)
    storescu(service.port, list(info.paths[::2]))
    storescu(service.port, list(info.paths[1::2]))
    check_seg(pacs.wait_for_seg(info.series_uid, timeout=60), info)
    time.sleep(QUIET + 1.0)
    assert len(pacs.segs()[info.series_uid]) == 1


def test_jpeg2000_series_forwarded_as_stored_gives_a_seg(
    service: ServiceProcess, pacs: StoreSCP, tmp_path: Path
) -> None:
    """A router forwards what it stored: DCMTK ``storescu -xv`` proposes JPEG 2000 lossless and sends the files
    compressed. The default install decodes them; the SEG is the one the uncompressed series gives."""
    info = new_series(tmp_path, seed=9)
    for path in info.paths:
        ds = pydicom.dcmread(path)
        ds.compress(JPEG2000Lossless, generate_instance_uid=False)  # the same instance, losslessly re-encoded
        ds.save_as(path, enforce_file_format=True)
    assert pydicom.dcmread(info.paths[0], stop_before_pixels=True).file_meta.TransferSyntaxUID == JPEG2000Lossless
    storescu(service.port, list(info.paths), extra=["-xv"])
    check_seg(pacs.wait_for_seg(info.series_uid, timeout=60), info)
    spooled = [pydicom.dcmread(f, stop_before_pixels=True) for f in service.spool.rglob("*.dcm")]
    syntaxes = {ds.file_meta.TransferSyntaxUID for ds in spooled if ds.SeriesInstanceUID == info.series_uid}
    assert syntaxes == {JPEG2000Lossless}, "the service must have received (and decoded) JPEG 2000 itself"


def test_resent_series_gives_exactly_one_seg(service: ServiceProcess, pacs: StoreSCP, tmp_path: Path) -> None:
    info = new_series(tmp_path, seed=5)
    storescu(service.port, list(info.paths))
    storescu(service.port, list(info.paths))  # a scanner that sends twice
    pacs.wait_for_seg(info.series_uid, timeout=60)
    storescu(service.port, list(info.paths))  # and again after the result went out
    time.sleep(QUIET + 2.0)
    assert len(pacs.segs()[info.series_uid]) == 1


# -- bad input: the documented status or reason, and the service keeps serving everyone else ----------------


def send_file_raw(port: int, path: Path, sop_class: str) -> int | None:
    """C-STORE a file's bytes as they are (pynetdicom reads the command UIDs from its file meta)."""
    ae = AE(ae_title="FUZZ")
    ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="EDGE")
    assert assoc.is_established
    old = pynetdicom_config.STORE_SEND_CHUNKED_DATASET
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    try:
        status = assoc.send_c_store(path)
    finally:
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = old
        assoc.release()
    return getattr(status, "Status", None)


def test_bad_input_gets_documented_statuses(service: ServiceProcess, pacs: StoreSCP, tmp_path: Path) -> None:
    info = new_series(tmp_path / "good", seed=6)
    ct = pydicom.dcmread(info.paths[0])
    sop_class = str(ct.SOPClassUID)

    # A SOP class the model cannot use is rejected at negotiation: DCMTK storescu reports it and fails.
    sc = pydicom.dcmread(info.paths[1])
    sc.SOPClassUID = sc.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    sc.save_as(tmp_path / "sc.dcm")
    out = storescu(service.port, [tmp_path / "sc.dcm"], check=False)
    assert out.returncode != 0 or "no presentation context" in (out.stdout + out.stderr).lower()

    # A data set that does not parse (a sequence of undefined length cut short): 0xC210.
    raw = info.paths[2].read_bytes()
    meta_end = 132 + 12 + int.from_bytes(raw[140:144], "little")
    cut_sequence = b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff\xfe\xff\x00\xe0\x10\x00\x00\x00"
    (tmp_path / "garbage.dcm").write_bytes(raw[:meta_end] + cut_sequence)
    assert send_file_raw(service.port, tmp_path / "garbage.dcm", sop_class) == 0xC210

    # A data set without its Series Instance UID: 0xC220.
    raw_ds = raw[meta_end:]
    (tmp_path / "no-uids.dcm").write_bytes(
        raw[:meta_end] + b"\x08\x00\x16\x00UI\x1a\x00" + sop_class.encode() + b"\x00" * (26 - len(sop_class))
    )
    assert send_file_raw(service.port, tmp_path / "no-uids.dcm", sop_class) == 0xC220
    assert raw_ds

    # A data set whose SOP Instance UID differs from the command's: 0xA900.
    mismatch = pydicom.dcmread(info.paths[3])
    mismatch.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    mismatch.save_as(tmp_path / "mismatch.dcm")
    assert send_file_raw(service.port, tmp_path / "mismatch.dcm", sop_class) == 0xA900

    # A UID a peer made up to escape the spool: 0xC221, and nothing is written outside it.
    evil = pydicom.dcmread(info.paths[4])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid UID we are writing on purpose
        evil.SeriesInstanceUID = "../../../../tmp/pwned"
        evil.save_as(tmp_path / "evil.dcm")
    assert send_file_raw(service.port, tmp_path / "evil.dcm", sop_class) == 0xC221

    # A series whose geometry is refused gets its reason recorded and no SEG.
    tilted = new_series(tmp_path / "tilted", seed=7, gantry_tilt_deg=20.0)
    storescu(service.port, list(tilted.paths))

    # ... and the service still serves everyone else.
    storescu(service.port, list(info.paths))
    check_seg(pacs.wait_for_seg(info.series_uid, timeout=60), info)
    assert service.alive()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if any("gantry-tilt" in line for line in service.status()):
            break
        time.sleep(0.3)
    rows = service.status()
    assert any("failed" in line and "gantry-tilt: slices are sheared by 20.0 degrees" in line for line in rows), rows
    assert tilted.series_uid not in pacs.segs()
    log = service.log()
    for uid in (info.series_uid, info.study_uid, tilted.series_uid, "PHANTOM"):
        assert uid not in log, "no UID or patient name in the log"


# -- completion on evidence: no waiting for the quiet period when the stack is complete ---------------------


@pytest.fixture(scope="module")
def patient_service(tmp_path_factory: pytest.TempPathFactory, pacs: StoreSCP) -> Iterator[ServiceProcess]:
    """A service with a long quiet period: a SEG that arrives quickly was completed on evidence."""
    svc = ServiceProcess(
        tmp_path_factory.mktemp("svc-long-quiet"), "--destination", pacs.address, "--quiet-seconds", "30"
    )
    yield svc
    svc.stop()


def test_complete_stack_is_finished_when_its_association_is_released(
    patient_service: ServiceProcess, pacs: StoreSCP, tmp_path: Path
) -> None:
    info = new_series(tmp_path, seed=8, shuffle_files=True)
    t0 = time.monotonic()
    storescu(patient_service.port, list(info.paths))
    check_seg(pacs.wait_for_seg(info.series_uid, timeout=25), info)
    assert time.monotonic() - t0 < 25, "finished before the 30 s quiet period"
    assert "complete on evidence" in patient_service.log()


def test_split_series_with_a_pause_gives_one_seg_of_all_slices(
    patient_service: ServiceProcess, pacs: StoreSCP, tmp_path: Path
) -> None:
    """Halves of a series in two associations, 2 s apart: the first half alone is never finalised."""
    n = SHAPE[0]
    contiguous = new_series(tmp_path / "c", seed=9, extra={"ImagesInAcquisition": n})
    interleaved = new_series(tmp_path / "i", seed=10)  # every other slice: spacing exceeds the thickness
    storescu(patient_service.port, list(contiguous.paths[: n // 2]) + list(interleaved.paths[::2]))
    time.sleep(2.0)
    assert contiguous.series_uid not in pacs.segs() and interleaved.series_uid not in pacs.segs()
    storescu(patient_service.port, list(contiguous.paths[n // 2 :]) + list(interleaved.paths[1::2]))
    for info in (contiguous, interleaved):
        check_seg(pacs.wait_for_seg(info.series_uid, timeout=25), info)
    assert len(pacs.segs()[contiguous.series_uid]) == 1 and len(pacs.segs()[interleaved.series_uid]) == 1


def test_one_association_per_instance_gives_one_seg_of_all_slices(
    patient_service: ServiceProcess, pacs: StoreSCP, tmp_path: Path
) -> None:
    """Some senders open an association per image: every release leaves a regular stack, none is the series."""
    info = new_series(tmp_path, seed=13)
    for path in info.paths:
        storescu(patient_service.port, [path])
    check_seg(pacs.wait_for_seg(info.series_uid, timeout=25), info)
    time.sleep(2.0)
    assert len(pacs.segs()[info.series_uid]) == 1


def test_concurrent_associations_from_one_sender_each_complete_on_evidence(
    patient_service: ServiceProcess, pacs: StoreSCP, tmp_path: Path
) -> None:
    """A PACS runs store jobs in parallel under one AE title: neither series waits for the 30 s quiet period."""
    a = new_series(tmp_path / "a", seed=14)
    b = new_series(tmp_path / "b", seed=15)
    t0 = time.monotonic()
    cmd = [require_tool("storescu"), "-aec", "EDGE", "-aet", "SCANNER", "127.0.0.1", str(patient_service.port)]
    slow = subprocess.Popen([*cmd, *map(str, b.paths)], env=dcmtk_env())  # still open while a completes
    storescu(patient_service.port, list(a.paths))
    assert slow.wait(60) == 0
    for info in (a, b):
        pacs.wait_for_seg(info.series_uid, timeout=25)
    assert time.monotonic() - t0 < 25
