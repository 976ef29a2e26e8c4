"""Streaming inference in the service: the same series pushed in order (pynetdicom, paced like a scanner), in
reverse and shuffled (DCMTK storescu) gives, at a real PACS, the SEG of batch inference voxel for voxel; so does
a series acquired top down (instance numbers counting down the normal) pushed top first, which streams too. The
results' ``measurements.json`` says how each was segmented."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from edge_runtime.imaging.volume import load_volume
from edge_runtime.inference.package import DEFAULT_PACKAGE, ModelPackage
from edge_runtime.inference.pipeline import segment
from edge_runtime.inference.runner import load_runner
from phantom import SeriesInfo, make_phantom, write_series
from tests.peers import ServiceProcess, StoreSCP, storescu, wait_for_measurements

pytestmark = pytest.mark.e2e
#: three z-windows of the bundled model (64 slices of 1.5 mm, stride 48) in 105 slices of 2 mm
SHAPE, SPACING = (105, 32, 32), (2.0, 3.0, 3.0)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, pacs: StoreSCP) -> Iterator[ServiceProcess]:
    svc = ServiceProcess(tmp_path_factory.mktemp("svc"), "--destination", pacs.address, "--quiet-seconds", "2")
    yield svc
    svc.stop_cleanly()


@pytest.fixture(scope="module")
def hu() -> np.ndarray:
    return make_phantom(SHAPE, SPACING, rng=11).hu


@pytest.fixture(scope="module")
def expected(hu: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """Batch inference on the same pixels and geometry (the UIDs do not matter to it), acquired upwards and
    downwards (the grid is anchored at the first slice acquired)."""
    package = ModelPackage.load(DEFAULT_PACKAGE)
    runner = load_runner(package)
    labels = {}
    for numbers in ("spatial", "reversed"):
        info = write_series(hu, SPACING, tmp_path_factory.mktemp("reference"), instance_number_order=numbers)
        labels[numbers] = segment(load_volume(info.paths), package, runner).labels
    return labels


def paced_store(port: int, paths: list[Path], rate: float) -> None:
    """pynetdicom as a scanner: one association, ``rate`` instances per second."""
    ae = AE(ae_title="SCANNER")
    sop_class = str(pydicom.dcmread(paths[0], stop_before_pixels=True).SOPClassUID)
    ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="EDGE")
    assert assoc.is_established
    start = time.perf_counter()
    try:
        for i, path in enumerate(paths):
            time.sleep(max(0.0, start + i / rate - time.perf_counter()))
            assert assoc.send_c_store(str(path)).Status == 0
    finally:
        assoc.release()


def streaming_record(service: ServiceProcess, seg: Path) -> dict:
    for path in wait_for_measurements(service.output, seg):
        return json.loads(path.read_text())["streaming"]
    raise AssertionError("no measurements.json for the SEG")


@pytest.mark.parametrize("order", ["in order", "reverse", "shuffled", "top down"])
def test_seg_is_the_batch_seg_whatever_the_arrival_order(
    order: str,
    service: ServiceProcess,
    pacs: StoreSCP,
    hu: np.ndarray,
    expected: dict[str, np.ndarray],
    tmp_path: Path,
) -> None:
    numbers = "reversed" if order == "top down" else "spatial"
    info: SeriesInfo = write_series(hu, SPACING, tmp_path, instance_number_order=numbers)
    if order == "in order":
        paced_store(service.port, info.paths, rate=40)
    elif order == "top down":
        paced_store(service.port, info.paths[::-1], rate=40)
    else:
        rng = np.random.default_rng(2)
        paths = info.paths[::-1] if order == "reverse" else [info.paths[i] for i in rng.permutation(len(info.paths))]
        storescu(service.port, paths)
    seg = pacs.wait_for_seg(info.series_uid, timeout=120)
    got = hd.seg.segread(seg).get_pixels_by_source_instance(
        source_sop_instance_uids=list(info.sop_instance_uids), combine_segments=True, skip_overlap_checks=True
    )
    assert expected[numbers].any()
    np.testing.assert_array_equal(got, expected[numbers])
    timeline = streaming_record(service, seg)
    if order in ("in order", "top down"):
        assert timeline["mode"] == "streaming" and timeline["slabs_streamed"] >= 1, timeline
    else:
        assert timeline["mode"] == "whole-series" and "not in acquisition order" in timeline["reason"], timeline
