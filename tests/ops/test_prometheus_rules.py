"""The shipped Prometheus alerting rules: valid, unit-tested by promtool, and about metrics the service exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from edge_runtime.ops.telemetry import Metrics

RULES = Path(__file__).resolve().parents[2] / "monitoring" / "prometheus"


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (apt-get install prometheus; scripts/bootstrap --dev does)")
    return path


def test_rules_pass_promtool_check_and_their_unit_tests() -> None:
    promtool = _promtool()
    check = subprocess.run([promtool, "check", "rules", "alerts.yml"], cwd=RULES, capture_output=True, text=True)
    assert check.returncode == 0 and "SUCCESS" in check.stdout, check.stdout + check.stderr
    tested = subprocess.run(
        [promtool, "test", "rules", "alerts_test.yml"], cwd=RULES, capture_output=True, text=True, timeout=120
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_metric_the_rules_use_is_exported() -> None:
    exported = set(re.findall(r"^# TYPE (\w+) ", generate_latest(Metrics().registry).decode(), re.M))
    exported |= {f"{name}_total" for name in exported}
    used = set(re.findall(r"\bedge_\w+", (RULES / "alerts.yml").read_text()))
    assert used and used <= exported, f"rules use metrics nobody exports: {sorted(used - exported)}"
