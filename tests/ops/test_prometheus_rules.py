"""The shipped Prometheus alerting rules: valid, unit-tested by promtool, and about metrics the service exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from edge_runtime.ops.telemetry import Metrics

RULES = Path(__file__).resolve().parents[2] / "monitoring" / "prometheus"
DASHBOARD = RULES.parent / "grafana" / "edge-runtime.json"


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


def _metric_names(text: str) -> set[str]:
    return set(re.findall(r"\bedge_(?!runtime)\w+", text))


def test_every_metric_the_rules_and_the_dashboard_use_is_exported() -> None:
    exported = set(re.findall(r"^# TYPE (\w+) ", generate_latest(Metrics().registry).decode(), re.M))
    exported |= {f"{name}{suffix}" for name in exported for suffix in ("_total", "_bucket", "_count", "_sum")}
    rules = _metric_names((RULES / "alerts.yml").read_text())
    assert rules and rules <= exported, f"rules use metrics nobody exports: {sorted(rules - exported)}"
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = _metric_names(" ".join(exprs))
    assert used and used <= exported, f"dashboard shows metrics nobody exports: {sorted(used - exported)}"
    assert "edge_drift_psi" in used and "edge_ready" in used
