"""``edge-runtime validate``: discovery, label matching, statistics and the reports, on small phantom series."""

from __future__ import annotations

import argparse
import io
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from edge_runtime.apps import validate
from edge_runtime.apps.validate import (
    ModelConfig,
    Progress,
    RefSegment,
    bootstrap_ci,
    discover_cases,
    match_labels,
    run_validation,
    structure_maps,
    summarize,
)
from edge_runtime.inference.package import DEFAULT_PACKAGE, Code, Label, ModelPackage
from phantom import LABELS, make_phantom, write_reference_seg, write_series

SHAPE = (24, 96, 96)
SPACING = (2.5, 3.5, 3.5)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """case0, case1: reference SEGs in refs/; case2: reference.npz with names; case3: no reference;
    case4: a reference.npz of the wrong shape."""
    root = tmp_path_factory.mktemp("validate-data")
    for i in range(5):
        ph = make_phantom(SHAPE, SPACING, rng=100 + i)
        info = write_series(ph.hu, ph.spacing, root / f"case{i}", patient_id=f"VAL{i}", series_number=i + 1)
        if i < 2:
            write_reference_seg(info, ph.labels, root / "refs" / f"case{i}_seg.dcm")
        elif i == 2:
            names = np.array([""] + [LABELS[v] for v in sorted(LABELS)])
            np.savez(root / "case2" / "reference.npz", labels=ph.labels, spacing=np.asarray(SPACING), names=names)
        elif i == 4:
            np.savez(root / "case4" / "reference.npz", labels=ph.labels[:-1])
    (root / "notes.txt").write_text("not DICOM")
    return root


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="edge-runtime")
    validate.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["validate", *argv])


def _run(*argv: str) -> int:
    args = _args(*argv)
    assert args.func is validate.cmd_validate
    return validate.cmd_validate(args)


def _floats(values: list) -> list[float]:
    return [float(v) for v in values]


@pytest.fixture(scope="module")
def single(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, int]:
    out = tmp_path_factory.mktemp("validate-single")
    rc = _run(str(dataset), "--out", str(out), "--threads", "1", "--workers", "1")
    return out, json.loads((out / "report.json").read_text()), rc


# ------------------------------------------------------------------------------------------ statistics


def test_bootstrap_ci_on_known_data() -> None:
    rng = np.random.default_rng(7)
    x = rng.normal(10.0, 2.0, 400)
    low, high = bootstrap_ci(x, resamples=4000, seed=1)
    assert low < x.mean() < high
    # the CI of a mean of n normal values is about mean +- 1.96 sd / sqrt(n)
    half = 1.96 * x.std(ddof=1) / math.sqrt(x.size)
    assert (high - low) / 2 == pytest.approx(half, rel=0.1)
    assert (low + high) / 2 == pytest.approx(x.mean(), abs=0.1 * half)
    # reproducible with the seed, different with another
    assert bootstrap_ci(x, resamples=4000, seed=1) == (low, high)
    assert bootstrap_ci(x, resamples=4000, seed=2) != (low, high)
    # a tiny sample: the resampled means of [0, 1] take values k/2, so the 95 % CI is [0, 1]
    assert bootstrap_ci([0.0, 1.0], resamples=2000) == (0.0, 1.0)
    # degenerate cases
    assert bootstrap_ci([3.0, 3.0, 3.0]) == (3.0, 3.0)
    assert bootstrap_ci([5.0]) == (5.0, 5.0)
    assert bootstrap_ci([]) is None
    assert bootstrap_ci([math.nan, math.inf]) is None
    # non-finite values are left out
    assert bootstrap_ci([1.0, 2.0, math.nan, math.inf, 3.0], seed=3) == bootstrap_ci([1.0, 2.0, 3.0], seed=3)
    with pytest.raises(ValueError):
        bootstrap_ci([1.0], confidence=1.5)


def test_summarize_counts_non_finite_values() -> None:
    s = summarize([1.0, 2.0, 4.0, math.nan, math.inf, -math.inf])
    assert (s["n"], s["n_nan"], s["n_inf"]) == (3, 1, 2)
    assert s["mean"] == pytest.approx(7 / 3)
    assert s["median"] == 2.0
    assert (s["min"], s["max"]) == (1.0, 4.0)
    assert s["ci_low"] <= s["mean"] <= s["ci_high"]
    empty = summarize([math.nan])
    assert empty["n"] == 0 and empty["mean"] is None and empty["ci_low"] is None


# -------------------------------------------------------------------------------------------- matching


def _label(value: int, name: str, code: str, meaning: str) -> Label:
    return Label(value, name, Code("91772007", "SCT", "Organ"), Code(code, "SCT", meaning), (1, 2, 3))


def test_match_labels_by_code_then_name() -> None:
    labels = [
        _label(1, "Lung", "39607008", "Lung"),
        _label(2, "Leber", "999", "Liver"),  # wrong code: matched by its type's meaning
        _label(3, "Aorta", "15825003", "Aorta"),  # not in the reference
    ]
    segments = {
        1: RefSegment(1, "left lung", ("SCT", "39607008", "Lung")),
        2: RefSegment(2, "right lung", ("SCT", "39607008", "Lung")),  # same code: one structure
        3: RefSegment(3, "liver", None),
        4: RefSegment(4, "Spleen", ("SCT", "78961009", "Spleen")),
    }
    m = match_labels(labels, segments)
    by_key = {s.key: s for s in m.structures}
    assert set(by_key) == {"SCT:39607008", "SCT:999"}
    assert by_key["SCT:39607008"].segment_numbers == [1, 2]
    assert by_key["SCT:39607008"].matched_by == "code"
    # the uncoded reference segment takes the matched model label's code as its identity
    assert by_key["SCT:999"].segment_numbers == [3] and by_key["SCT:999"].matched_by == "name"
    assert m.unmatched_model_labels == ["Aorta"]
    assert m.unmatched_reference_segments == ["Spleen"]


def test_structure_maps_relabel_both_maps() -> None:
    labels = [_label(1, "Lung", "39607008", "Lung"), _label(2, "Bone", "272673000", "Bone")]
    segments = {5: RefSegment(5, "bone", ("SCT", "272673000", "Bone")), 7: RefSegment(7, "other", None)}
    m = match_labels(labels, segments)
    pred = np.array([[[0, 1, 2, 2]]], np.uint8)
    ref = np.array([[[5, 7, 5, 0]]], np.uint8)
    p, r = structure_maps(pred, ref, m)
    assert p.tolist() == [[[0, 0, 1, 1]]] and r.tolist() == [[[1, 0, 1, 0]]]


# ------------------------------------------------------------------------------------------- discovery


def test_discovery_groups_series_and_finds_references(dataset: Path) -> None:
    d = discover_cases(dataset)
    assert d.series_found == 5
    kinds = {c.name: c.reference_kind for c in d.cases}
    assert kinds == {"case0": "seg", "case1": "seg", "case2": "npz", "case4": "npz"}
    assert [s["case"] for s in d.skipped] == ["case3"]
    assert "no reference" in d.skipped[0]["reason"]
    assert all(len(c.paths) == SHAPE[0] for c in d.cases)


def test_seg_matched_by_frame_references(dataset: Path, tmp_path: Path) -> None:
    """A SEG without a Referenced Series Sequence is matched through its frames' source images."""
    shutil.copytree(dataset / "case0", tmp_path / "series")
    ds = pydicom.dcmread(dataset / "refs" / "case0_seg.dcm")
    del ds.ReferencedSeriesSequence
    ds.save_as(tmp_path / "seg.dcm")
    d = discover_cases(tmp_path)
    assert [(c.name, c.reference_kind, c.reference_path) for c in d.cases] == [("series", "seg", tmp_path / "seg.dcm")]


# ----------------------------------------------------------------------------------------- full runs


def test_single_model_report(single: tuple[Path, dict, int]) -> None:
    out, report, rc = single
    assert rc == 0
    package = ModelPackage.load(DEFAULT_PACKAGE)
    model_codes = {f"{lab.type.scheme}:{lab.type.value}": lab.name for lab in package.labels}

    assert report["counts"] == {"series": 5, "evaluated": 3, "skipped": 2, "failed": 0}
    assert [c["case"] for c in report["cases"]] == ["case0", "case1", "case2"]
    assert [c["reference"]["kind"] for c in report["cases"]] == ["seg", "seg", "npz"]
    skipped = {s["case"]: s["reason"] for s in report["skipped"]}
    assert set(skipped) == {"case3", "case4"}
    assert "no reference" in skipped["case3"]
    assert "reference unusable" in skipped["case4"] and "shaped" in skipped["case4"]

    # every model label the reference SEG has is matched by its SNOMED code; the npz reference (names only)
    # is matched by name and keyed by the model label's code. Which labels the bundled model has may change.
    phantom = {f"SCT:{getattr(codes.SCT, n.capitalize()).value}": n for n in LABELS.values()}
    expected = set(model_codes) & set(phantom)
    keys = [info["key"] for info in report["labels"]]
    assert expected and set(keys) == expected
    for case in report["cases"]:
        result = case["results"]["A"]
        matched_by = {s["key"]: s["matched_by"] for s in result["matching"]["structures"]}
        if case["reference"]["kind"] == "seg":
            assert set(matched_by) == expected and set(matched_by.values()) == {"code"}
            unmatched = set(result["matching"]["unmatched_reference_segments"])
            assert unmatched == {phantom[k] for k in set(phantom) - expected}
        else:
            assert set(matched_by) <= expected and set(matched_by.values()) == {"name"}
        assert set(result["metrics"]) == set(matched_by)
        for values in result["metrics"].values():
            assert set(validate.METRICS) <= set(values)
            assert 0.0 <= float(values["dice"]) <= 1.0
            assert values["tp"] + values["fp"] + values["fn"] + values["tn"] == math.prod(SHAPE)

    for key in keys:
        agg = report["aggregate"]["A"][key]
        assert set(agg) == set(validate.METRICS)
        dice = agg["dice"]
        per_case = _floats(
            [c["results"]["A"]["metrics"][key]["dice"] for c in report["cases"] if key in c["results"]["A"]["metrics"]]
        )
        assert dice["n"] == len(per_case) >= 2 and dice["n_nan"] == dice["n_inf"] == 0
        assert dice["mean"] == pytest.approx(np.mean(per_case))
        assert dice["median"] == pytest.approx(np.median(per_case))
        assert 0.0 <= dice["ci_low"] <= dice["mean"] <= dice["ci_high"] <= 1.0
        for s in agg.values():
            if s["n"]:
                assert s["ci_low"] <= s["mean"] <= s["ci_high"]
    assert report["paired_difference"] is None

    md = (out / "report.md").read_text()
    for heading in ("# Validation report", "## Label matching", "## Summary per label", "## Per case", "## Skipped"):
        assert heading in md
    assert "| Label | Cases | Dice mean [95% CI] |" in md
    assert "| case0 |" in md and "| case3 | case3 | no reference" in md
    assert report["plots"] == [f"boxplot_{m}.png" for m in validate.PLOT_METRICS]
    for name in report["plots"]:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
        assert f"]({name})" in md


def test_report_json_is_strict(single: tuple[Path, dict, int]) -> None:
    out, _, _ = single

    def refuse(token: str) -> float:
        raise AssertionError(f"non-standard JSON token {token}")

    json.loads((out / "report.json").read_text(), parse_constant=refuse)


def test_two_configurations_paired_difference(dataset: Path, tmp_path: Path) -> None:
    """The bundled package twice, with different thread counts: the paired differences are ~0."""
    out = tmp_path / "out"
    rc = _run(
        str(dataset), "--out", str(out), "--model", str(DEFAULT_PACKAGE), "--threads", "1", "--threads", "2",
        "--bootstrap", "500", "--workers", "2",
    )  # fmt: skip
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert [(c["id"], c["threads"]) for c in report["configs"]] == [("A", 1), ("B", 2)]
    assert report["settings"]["resamples"] == 500
    paired = report["paired_difference"]
    assert paired and set(paired) == {info["key"] for info in report["labels"]}
    for per_metric in paired.values():
        assert set(per_metric) == set(validate.METRICS)
        for metric in ("dice", "hd95_mm", "volume_difference_ml"):
            s = per_metric[metric]
            # every case where both matched the label; a distance only where both found it (these small phantoms
            # squeeze the whole torso into 60 mm, and the model misses the flattened kidneys: an infinite HD95)
            assert s["n"] >= (2 if metric != "hd95_mm" else 0)
            if s["n"]:
                assert abs(s["mean"]) < 1e-6 and abs(s["ci_low"]) < 1e-6 and abs(s["ci_high"]) < 1e-6
    assert sum(per_metric["hd95_mm"]["n"] >= 2 for per_metric in paired.values()) >= 3
    md = (out / "report.md").read_text()
    assert "## Paired difference B − A" in md and "| Dice A | Dice B |" in md
    assert "Configuration B:" in md


def test_without_matplotlib_reports_are_written(dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "data"
    shutil.copytree(dataset / "case2", folder / "case2")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    stream = io.StringIO()
    report = run_validation(
        folder, [ModelConfig(threads=1)], tmp_path / "out", surface=False, resamples=100, progress=stream
    )
    assert report["counts"]["evaluated"] == 1
    assert report["plots"] == []
    assert "edge-runtime[validate]" in report["plots_note"]
    assert not list((tmp_path / "out").glob("*.png"))
    md = (tmp_path / "out" / "report.md").read_text()
    assert "no plots" in md and "edge-runtime[validate]" in md
    assert "Surface metrics (Hausdorff, HD95, ASSD) were not computed" in md
    assert "hd95_mm" not in report["metrics"]
    # not a terminal: one line per case
    assert stream.getvalue().startswith("[1/1] case2: ok (") and stream.getvalue().count("\n") == 1


def test_bad_arguments_exit_2(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.txt").write_text("nothing")
    assert _run(str(empty), "--out", str(tmp_path / "o1")) == 2
    assert "no DICOM image series" in capsys.readouterr().err

    assert _run(str(tmp_path / "missing"), "--out", str(tmp_path / "o2")) == 2
    assert "is not a folder" in capsys.readouterr().err

    assert _run(str(dataset), "--out", str(tmp_path / "o3"), "--model", str(tmp_path)) == 2
    assert "cannot load the model" in capsys.readouterr().err

    three = ("--threads", "1") * 3
    assert _run(str(dataset), "--out", str(tmp_path / "o4"), *three) == 2
    assert "at most two configurations" in capsys.readouterr().err

    # series, but none with a reference: the report lists them, exit 2
    only = tmp_path / "noref"
    shutil.copytree(dataset / "case3", only / "case3")
    assert _run(str(only), "--out", str(tmp_path / "o5"), "--threads", "1") == 2
    assert "no case could be evaluated" in capsys.readouterr().err
    assert json.loads((tmp_path / "o5" / "report.json").read_text())["skipped"][0]["case"] == "case3"


def test_progress_bar_on_a_terminal() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Tty()
    bar = Progress(4, stream, width=8)
    bar.start(0, "case0")
    bar.done(1, "case0", "ok")
    bar.done(4, "case3", "ok")
    bar.close()
    text = stream.getvalue()
    assert text.startswith("\r[        ] 0/4 cases")
    assert "\r[##      ] 1/4 cases" in text and "\r[########] 4/4 cases" in text
    assert text.endswith("\n") and text.count("\n") == 1
