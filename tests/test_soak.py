"""Crash safety: ``python -m benchmarks.soak`` SIGKILLs the service while series are pushed, then counts.

The small soak runs on every CI run (3 kills, 2 small series, well under a minute); the longer one is
``slow`` (excluded by the default ``-m 'not slow'``; run it with ``pytest -m slow tests/test_soak.py``), and
the full issue #4 soak (20 kills) is ``python -m benchmarks.soak``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.peers import REPO, SYSTEM_BIN

pytestmark = pytest.mark.e2e
STORESCP = SYSTEM_BIN / "storescp"  # DCMTK's, not pynetdicom's app of the same name in the venv


def run_soak(tmp_path: Path, *args: str, timeout: float) -> dict:
    if not STORESCP.exists():
        pytest.skip("DCMTK storescp is not installed in /usr/bin (apt-get install dcmtk)")
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.soak", "--workdir", str(tmp_path / "work"), "--results-dir", str(tmp_path)]
        + list(args),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    report = tmp_path / "soak.json"
    assert report.exists(), out.stdout + out.stderr
    result = json.loads(report.read_text())
    assert out.returncode == 0, f"{result['problems']}\n{out.stdout}\n{out.stderr[-4000:]}"
    return result


def check(result: dict, kills: int, series: int, instances: int) -> None:
    assert result["ok"] and result["problems"] == []
    assert result["kills"] == kills and result["unexpected_exits"] == []
    total = series * instances
    assert result["instances_acknowledged"] == total, "every instance was acknowledged in the end"
    assert result["instances_found"] == total and result["lost"] == []
    assert result["segs_expected"] == series and result["segs_delivered_distinct"] == series
    for s in result["series"]:
        assert s["seg_distinct"] == 1 and s["seg_covers_all_instances"], s
        assert s["sr_distinct"] == 1 and s["indexed"] == instances, s
    assert result["final_spool"]["outbox"].get("pending", 0) == 0
    assert set(result["final_spool"]["series"]) == {"done"}
    assert (Path(result["workdir"]) / f"service-{result['runs']}.log").exists(), "each run's log is kept"


def test_small_soak_survives_sigkill(tmp_path: Path) -> None:
    """3 kills while 2 series are pushed: nothing acknowledged is lost, one SEG per series."""
    result = run_soak(
        tmp_path,
        *("--kills", "3", "--series", "2", "--shape", "24", "96", "96", "--spacing", "2.5", "3.5", "3.5"),
        *("--max-up", "3", "--seed", "3", "--start-timeout", "120", "--timeout", "180"),
        timeout=600,
    )
    check(result, kills=3, series=2, instances=24)
    assert result["kill_log"][0]["mode"] == "store", "the first kill aims at a C-STORE in progress"
    assert any(k["associations_open"] for k in result["kill_log"]), "kills land while series are on the wire"


@pytest.mark.slow
def test_soak_with_five_kills(tmp_path: Path) -> None:
    result = run_soak(tmp_path, "--kills", "5", "--seed", "5", "--timeout", "300", timeout=900)
    check(result, kills=5, series=6, instances=40)
