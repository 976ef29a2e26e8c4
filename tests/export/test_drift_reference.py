"""``edge-export drift-reference``'s parts: series found in a folder, their features, the manifest section."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from edge_runtime.inference.package import DEFAULT_PACKAGE, ModelPackage
from edge_runtime.inference.runner import load_runner
from edge_runtime.quality.drift import build_reference
from export.drift_reference import features_of, folder_volumes, write_reference
from phantom import make_phantom, write_series


def test_series_in_a_folder_are_found_segmented_and_recorded(tmp_path: Path) -> None:
    for seed in (1, 2):
        ph = make_phantom((12, 48, 48), (4.0, 4.0, 4.0), rng=seed)
        write_series(ph.hu, ph.spacing, tmp_path / "cases" / f"case{seed}", extra={"ManufacturerModelName": f"M{seed}"})
    (tmp_path / "cases" / "notes.txt").write_text("not DICOM")
    named = list(folder_volumes(tmp_path / "cases", ("CT",)))
    assert sorted(name for name, _ in named) == ["case1", "case2"]

    package = ModelPackage.load(DEFAULT_PACKAGE)
    runner = load_runner(package, "onnxruntime", "cpu", threads=1)
    try:
        samples = features_of(iter(v for _, v in named), package, runner)
    finally:
        runner.close()
    assert {s["scanner"] for s in samples} == {"edge_runtime M1", "edge_runtime M2"}
    assert all(-200 < float(s["intensity_p50"]) < 200 and s["spacing_slice"] == 4.0 for s in samples)
    assert all(f"volume_ml.{lab.name.lower()}" in samples[0] for lab in package.labels)

    copy = tmp_path / "package"
    shutil.copytree(DEFAULT_PACKAGE, copy)
    rng = np.random.default_rng(0)
    population = [{**samples[i % 2], "intensity_p50": float(rng.normal(0, 10))} for i in range(12)]
    write_reference(copy, build_reference(population, "test"))
    loaded = ModelPackage.load(copy)  # file hashes still verify: the manifest itself is not hashed
    assert loaded.drift_reference is not None and loaded.drift_reference.series == 12
    assert "intensity_p50" in loaded.drift_reference.numeric and "scanner" in loaded.drift_reference.categorical
