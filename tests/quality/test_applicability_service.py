"""Applicability through the running service: DCMTK storescu sends 20 slices of a real head CT (the Philips
phantom of dcm_qa_ct, Body Part BRAIN, 100 mm) to ``edge-runtime serve`` with the bundled torso model.

By default the series is refused with the failed checks and their values; where the site sets
``--out-of-domain mark`` it is segmented and every result says it was made out of domain.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.sr.codedict import codes

from edge_runtime.dicom import Comprehensive3DSRStorage
from edge_runtime.results.sr import OUT_OF_DOMAIN
from tests.peers import ServiceProcess, StoreSCP, storescu
from tests.quality.test_applicability import PHILIPS, slab

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def head_slab() -> list[Path]:
    if not PHILIPS.is_dir():
        pytest.skip("the Philips head CT is not here because the shared corpus (../shared/data) is absent")
    return slab(PHILIPS, 20)


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory, pacs: StoreSCP) -> Iterator[dict[str, ServiceProcess]]:
    """Both policies at once (two processes, the slab sent to each)."""
    started = {
        policy: ServiceProcess(
            tmp_path_factory.mktemp(policy),
            "--destination",
            pacs.address,
            "--quiet-seconds",
            "1",
            "--out-of-domain",
            policy,
        )
        for policy in ("refuse", "mark")
    }
    yield started
    for svc in started.values():
        assert svc.stop() == 0, svc.log()[-3000:]
        assert "Traceback" not in svc.log()


def metric(svc: ServiceProcess, pattern: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        _, text = svc.http_get("/metrics")
        if (found := re.search(pattern, text)) or time.monotonic() > deadline:
            assert found, text[-2000:]
            return found.group(0)
        time.sleep(0.2)


def test_a_head_ct_slab_is_refused_by_default_and_marked_where_allowed(
    services: dict[str, ServiceProcess], pacs: StoreSCP, head_slab: list[Path]
) -> None:
    series_uid = str(pydicom.dcmread(head_slab[0], stop_before_pixels=True).SeriesInstanceUID)
    for svc in services.values():
        storescu(svc.port, head_slab)

    # default: refused, the reason names each failed check and its values
    refuse = services["refuse"]
    with pytest.raises(RuntimeError, match=r"out-of-domain: body part BRAIN not in CHEST.*z extent 100 mm < 240 mm"):
        refuse.record(series_uid, timeout=120)
    assert any("out-of-domain" in line for line in refuse.status())
    metric(refuse, r'edge_series_out_of_domain_total\{action="refused",check="z-extent"\} 1\.0')
    assert not list(refuse.output.rglob("seg.dcm"))

    # the site allows it: segmented, and the SEG, the SR and measurements.json say out of domain
    mark = services["mark"]
    record = mark.record(series_uid, timeout=180)
    seg = pydicom.dcmread(pacs.wait_for_seg(series_uid), stop_before_pixels=True)
    assert str(seg.SeriesDescription).startswith("OUT OF DOMAIN: body part BRAIN not in")
    sr = hd.sr.srread(pacs.wait_for(Comprehensive3DSRStorage, series_uid))
    for group in sr.content.get_volumetric_roi_measurement_groups():
        marks = [q.value for q in group.get_qualitative_evaluations() if q.name.value == OUT_OF_DOMAIN[0]]
        assert marks == [codes.SCT.Yes]
    data = json.loads((Path(record["directory"]) / "measurements.json").read_text())
    failed = {item["check"]: item["detail"] for item in data["applicability"]["failed"]}
    assert failed["z-extent"] == "z extent 100 mm < 240 mm" and "body-part" in failed
    assert all("mean_confidence" in s for s in data["segments"])
    metric(mark, r'edge_series_out_of_domain_total\{action="marked",check="body-part"\} 1\.0')
    metric(mark, r'edge_segment_confidence_count\{label="\w+",model="[^"]+"\} 1\.0')
    assert "segmented and marked" in mark.log()
