"""Drift: a reference built from one population stays quiet for more of it and alarms for a shifted one."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.quality.drift import DriftMonitor, build_reference, compare, parse_drift_reference


def _population(n: int, seed: int, *, hu_shift: float = 0.0, spacing: float = 1.5, scanner: str = "A X1") -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {
            "intensity_p50": float(rng.normal(40.0, 8.0) + hu_shift),
            "spacing_slice": spacing,
            "scanner": scanner if i % 2 else "B Y2",
            "volume_ml.liver": float(rng.normal(1500.0, 150.0)),
        }
        for i in range(n)
    ]


@pytest.fixture
def reference():  # noqa: ANN201
    section = build_reference(_population(60, seed=0), source="test population")
    problems: list[str] = []
    parsed = parse_drift_reference(json.loads(json.dumps(section)), problems)
    assert parsed is not None and not problems
    return parsed


def test_same_population_is_ok(reference) -> None:  # noqa: ANN001
    results = compare(reference, _population(50, seed=1), min_series=20)
    assert {r.feature for r in results} == {"intensity_p50", "spacing_slice", "scanner", "volume_ml.liver"}
    assert all(r.level == "ok" for r in results), results


@pytest.mark.parametrize(
    ("kwargs", "feature"),
    [({"hu_shift": 60.0}, "intensity_p50"), ({"spacing": 3.0}, "spacing_slice"), ({"scanner": "C Z3"}, "scanner")],
)
def test_shifted_population_alarms_on_the_feature_that_moved(reference, kwargs, feature: str) -> None:  # noqa: ANN001
    results = {r.feature: r for r in compare(reference, _population(50, seed=2, **kwargs), min_series=20)}
    assert results[feature].level == "alarm" and results[feature].psi > 0.25, results[feature]
    assert results["volume_ml.liver"].level == "ok"


def test_no_verdict_before_the_window_holds_enough(reference) -> None:  # noqa: ANN001
    results = compare(reference, _population(5, seed=3, hu_shift=200.0), min_series=20)
    assert all(r.level == "ok" for r in results)


def test_malformed_reference_is_a_problem_not_a_crash() -> None:
    problems: list[str] = []
    assert parse_drift_reference({"version": 1, "numeric": {"x": {"low": 1}}}, problems) is None
    assert problems and "drift_reference" in problems[0]


def test_monitor_keeps_its_window_across_restarts_and_warns_once(
    reference, tmp_path: Path, caplog: pytest.LogCaptureFixture  # noqa: ANN001
) -> None:
    state = tmp_path / "drift-window.json"
    monitor = DriftMonitor(reference, state, window=30, min_series=20)
    for features in _population(25, seed=4, hu_shift=80.0):
        monitor.observe(features, series="abc")
    assert monitor.levels["intensity_p50"] == "alarm"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "intensity_p50" in r.getMessage()]
    assert len(warnings) == 1, "one warning when the level is crossed, not one per series"
    again = DriftMonitor(reference, state, window=30, min_series=20)
    assert len(again.series) == 25 and again.levels["intensity_p50"] == "alarm"
    for features in _population(30, seed=5):
        again.observe(features)
    assert again.levels["intensity_p50"] == "ok", "the window forgets the shifted series"
