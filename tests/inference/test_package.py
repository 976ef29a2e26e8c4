from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edge_runtime.inference.package import DEFAULT_PACKAGE, ModelPackage, PackageError


def copy_default(tmp_path: Path) -> Path:
    dst = tmp_path / "pkg"
    shutil.copytree(DEFAULT_PACKAGE, dst)
    return dst


def edit_manifest(root: Path, change) -> None:  # noqa: ANN001
    path = root / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_bundled_package_loads_with_snomed_labels() -> None:
    pkg = ModelPackage.load(DEFAULT_PACKAGE)
    assert pkg.modalities == ("CT",)
    assert pkg.num_classes == len(pkg.labels) + 1
    assert all(lab.category.scheme == "SCT" and lab.type.scheme == "SCT" for lab in pkg.labels)
    assert len(pkg.model_sha256) == 64


def test_missing_package_and_manifest(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match="is not a directory"):
        ModelPackage.load(tmp_path / "nope")
    with pytest.raises(PackageError, match="no manifest.json"):
        ModelPackage.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(PackageError, match="cannot be read as JSON"):
        ModelPackage.load(tmp_path)


def test_all_problems_reported_together(tmp_path: Path) -> None:
    root = copy_default(tmp_path)

    def break_it(m: dict) -> None:
        del m["name"]
        m["inference"]["patch_size"] = [64, 64]
        m["inference"]["overlap"] = 1.5
        m["preprocessing"]["normalization"]["kind"] = "magic"
        m["labels"][0]["type"] = {"value": "1"}

    edit_manifest(root, break_it)
    with pytest.raises(PackageError) as err:
        ModelPackage.load(root)
    problems = err.value.problems
    assert "'name' is required" in problems
    assert any("patch_size" in p for p in problems)
    assert any("overlap" in p for p in problems)
    assert any("'magic'" in p and "ct_window" in p for p in problems)
    assert any("labels[0].type" in p for p in problems)


def test_tampered_model_is_refused(tmp_path: Path) -> None:
    root = copy_default(tmp_path)
    with open(root / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(PackageError, match="model.onnx has sha256 .* the manifest says"):
        ModelPackage.load(root)


def test_label_values_must_match_output_channels(tmp_path: Path) -> None:
    root = copy_default(tmp_path)
    edit_manifest(root, lambda m: m["labels"][0].update(value=7))
    with pytest.raises(PackageError, match=r"label values must be 1\.\."):
        ModelPackage.load(root)
