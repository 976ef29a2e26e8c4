"""Per-segment confidence in the SR and ``measurements.json``, and the marks of a result made out of domain.

The bundled model segments a small phantom three times: as written, with noise, and with its rescale lost on
the way (stored values read as HU). dciodvfy judges each SR; highdicom reads it back.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from edge_runtime.imaging.volume import Volume, load_volume
from edge_runtime.inference.domain import Applicability
from edge_runtime.inference.package import DEFAULT_PACKAGE, ModelPackage
from edge_runtime.inference.pipeline import Segmentation, segment
from edge_runtime.inference.runner import load_runner
from edge_runtime.results.publish import ResultFiles, write_results
from edge_runtime.results.series_result import SeriesResult
from edge_runtime.results.sr import LOW_CONFIDENCE, OUT_OF_DOMAIN
from phantom import make_phantom, write_series
from tests.peers import dciodvfy_errors

CASES = ("clean", "noise", "lost-rescale")


@pytest.fixture(scope="module")
def package() -> ModelPackage:
    return ModelPackage.load(DEFAULT_PACKAGE)


@pytest.fixture(scope="module")
def runs(package: ModelPackage, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Volume, Segmentation]]:
    phantom = make_phantom((20, 64, 64), (3.0, 3.9, 3.9), rng=3)
    noisy = phantom.hu + np.random.default_rng(0).normal(0, 150, phantom.hu.shape)
    series = {
        "clean": write_series(phantom.hu, phantom.spacing, tmp_path_factory.mktemp("clean"), rng=3),
        "noise": write_series(noisy, phantom.spacing, tmp_path_factory.mktemp("noise"), rng=3),
        # a router that dropped the rescale: stored values (HU + 1024) arrive as they are
        "lost-rescale": write_series(
            phantom.hu, phantom.spacing, tmp_path_factory.mktemp("rescale"), rng=3, extra={"RescaleIntercept": "0"}
        ),
    }
    runner = load_runner(package, threads=2)
    out = {}
    for name, info in series.items():
        volume = load_volume(info.paths)
        out[name] = (volume, segment(volume, package, runner))
    runner.close()
    return out


def publish(
    run: tuple[Volume, Segmentation], package: ModelPackage, folder: Path, applicability: Applicability | None = None
) -> ResultFiles:
    volume, result = run
    written = SeriesResult(
        volume,
        result.labels,
        package,
        uid_seed=str(folder),
        device_serial_number="test",
        applicability=applicability,
        confidence=result.confidence,
    )
    return write_results(folder, written, timings={}, t_start=time.perf_counter())


def sr_confidence(path: Path) -> dict[str, tuple[float, float, str]]:
    """Per segment finding: (mean probability, share of low-confidence voxels %, low-confidence flag)."""
    sr = hd.sr.srread(path)
    out = {}
    for group in sr.content.get_volumetric_roi_measurement_groups():
        values = {
            (m.name.value, m.derivation.value if m.derivation else None): m.value for m in group.get_measurements()
        }
        flags = [q.value.meaning for q in group.get_qualitative_evaluations() if q.name.value == LOW_CONFIDENCE[0]]
        if (codes.DCM.Probability.value, codes.SCT.Mean.value) in values:
            out[group.finding_type.meaning] = (
                float(values[(codes.DCM.Probability.value, codes.SCT.Mean.value)]),
                float(values[("low-conf-share", None)]),
                flags[0],
            )
    return out


def segment_means(files: ResultFiles) -> dict[str, float]:
    data = json.loads(files.measurements.read_text())
    return {s["name"]: s["mean_confidence"] for s in data["segments"] if s["voxels"]}


def test_every_sr_carries_per_segment_confidence(runs, package: ModelPackage, tmp_path: Path) -> None:  # noqa: ANN001
    for name in CASES:
        files = publish(runs[name], package, tmp_path / name)
        assert dciodvfy_errors(files.sr) == [], name
        data = json.loads(files.measurements.read_text())
        assert data["confidence_thresholds"] == {"low": 0.5, "flag_below": 0.7}
        in_sr = sr_confidence(files.sr)
        found = [s for s in data["segments"] if s["voxels"]]
        assert found and {s["name"] for s in found} == set(in_sr), name
        for s in found:
            mean, low_share, flag = in_sr[s["name"]]
            assert mean == pytest.approx(s["mean_confidence"]) and 0 < mean <= 1
            assert low_share == pytest.approx(100 * s["low_confidence_fraction"], abs=0.01)
            assert flag == ("Yes" if s["mean_confidence"] < 0.7 else "No") and s["low_confidence"] == (flag == "Yes")
        empty = [s for s in data["segments"] if not s["voxels"]]
        assert all(s["mean_confidence"] is None for s in empty)


def test_a_degraded_input_lowers_the_confidence(runs, package: ModelPackage, tmp_path: Path) -> None:  # noqa: ANN001
    means = {name: segment_means(publish(runs[name], package, tmp_path / name)) for name in CASES}
    clean = float(np.mean(list(means["clean"].values())))
    assert clean > 0.85 and min(means["clean"].values()) >= 0.7, means["clean"]  # nothing flagged
    for name in ("noise", "lost-rescale"):
        degraded = float(np.mean(list(means[name].values())))
        assert degraded < clean - 0.05, (name, means[name], means["clean"])
        assert min(means[name].values()) < 0.7, (name, means[name])  # at least one segment flagged
        _, result = runs[name]
        assert result.confidence is not None and runs["clean"][1].confidence is not None
        low = float(np.mean(result.confidence < 0.5))
        assert low > float(np.mean(runs["clean"][1].confidence < 0.5)), name


def test_a_result_made_out_of_domain_is_marked(runs, package: ModelPackage, tmp_path: Path) -> None:  # noqa: ANN001
    volume, _ = runs["clean"]
    assert package.domain is not None
    verdict = package.domain.check(volume)
    assert not verdict.inside and "z extent 60 mm < 240 mm" in verdict.summary
    files = publish(runs["clean"], package, tmp_path / "marked", applicability=verdict)
    seg = pydicom.dcmread(files.seg, stop_before_pixels=True)
    assert str(seg.SeriesDescription).startswith("OUT OF DOMAIN: z extent 60 mm < 240 mm")
    assert dciodvfy_errors(files.sr) == []
    sr = hd.sr.srread(files.sr)
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert groups and all(
        any(q.name.value == OUT_OF_DOMAIN[0] and q.value == codes.SCT.Yes for q in g.get_qualitative_evaluations())
        for g in groups
    )
    (overall,) = sr.content.get_planar_roi_measurement_groups() or sr.content.get_image_measurement_groups()
    failed = {q.name.value for q in overall.get_qualitative_evaluations() if q.value == codes.SCT.Yes}
    assert {OUT_OF_DOMAIN[0], "z-extent", "y-extent"} <= failed, failed
    data = json.loads(files.measurements.read_text())
    assert data["applicability"]["inside"] is False
    assert {"check": "z-extent", "detail": "z extent 60 mm < 240 mm"} in data["applicability"]["failed"]
    # the same series inside the domain (a domain widened to take it) is not marked
    inside = publish(runs["clean"], package, tmp_path / "inside", applicability=type(verdict)())
    assert "OUT OF DOMAIN" not in str(pydicom.dcmread(inside.seg, stop_before_pixels=True).SeriesDescription)
    assert json.loads(inside.measurements.read_text())["applicability"] == {"inside": True, "failed": [], "notes": []}
