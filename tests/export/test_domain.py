"""edge-export fills the package's ``"domain"`` from what it knows, and ``--domain`` replaces it key by key."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from edge_runtime.inference.domain import parse_domain
from edge_runtime.inference.package import DEFAULT_PACKAGE, MANIFEST_NAME
from export.commands import CommandError, export_domain
from export.models.default_package import unet_manifest


def test_the_bundled_domain_is_what_the_training_recipe_covered() -> None:
    recipe = json.loads((DEFAULT_PACKAGE / "training.json").read_text())
    bundled = json.loads((DEFAULT_PACKAGE / MANIFEST_NAME).read_text())
    built = unet_manifest(recipe)
    assert built["domain"] == bundled["domain"] and built["confidence"] == bundled["confidence"]
    domain = built["domain"]
    assert domain["extent_mm"]["z"] == recipe["data"]["fov_z_mm"]
    assert domain["spacing_mm"]["z"] == [1.0, 3.0]  # pool 1-3 mm, model grid 1.5 mm, held-out 1-3 mm
    problems: list[str] = []
    assert parse_domain(domain, problems) is not None and problems == []


def nnunet_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "nnunet"
    folder.mkdir()
    fingerprint = {
        "spacings": [[2.5, 0.7, 0.7], [1.0, 0.9, 0.9], [5.0, 0.8, 0.8]],
        "shapes_after_crop": [[120, 400, 420], [300, 380, 390], [50, 410, 400]],
    }
    (folder / "dataset_fingerprint.json").write_text(json.dumps(fingerprint))
    return folder


def test_an_nnunet_fingerprint_gives_spacing_and_extent_ranges(tmp_path: Path) -> None:
    args = argparse.Namespace(nnunet=nnunet_folder(tmp_path), domain=None)
    domain = export_domain(args, ["CT"])
    assert domain["spacing_mm"] == {"z": [1.0, 5.0], "y": [0.7, 0.9], "x": [0.7, 0.9]}
    assert domain["extent_mm"]["z"] == [250.0, None]  # 50 x 5 mm: the smallest cropped case, a lower bound
    assert domain["intensity"] == {"air_hu": [-1100.0, -850.0], "body_median_hu": [-150.0, 150.0]}
    assert export_domain(argparse.Namespace(nnunet=None, domain=None), ["MR"]) == {
        "modalities": ["MR"],
        "image_type": {"exclude": ["LOCALIZER", "DERIVED"]},
    }


def test_the_users_domain_file_replaces_keys_and_is_validated(tmp_path: Path) -> None:
    override = tmp_path / "domain.json"
    override.write_text(json.dumps({"body_parts": ["ABDOMEN"], "contrast": "with"}))
    args = argparse.Namespace(nnunet=nnunet_folder(tmp_path), domain=override)
    domain = export_domain(args, ["CT"])
    assert domain["body_parts"] == ["ABDOMEN"] and domain["contrast"] == "with"
    assert domain["spacing_mm"]["z"] == [1.0, 5.0]  # the filled keys the file does not name stay
    override.write_text(json.dumps({"extent_mm": {"z": [300, 100]}, "contrast": "sometimes"}))
    with pytest.raises(CommandError) as caught:
        export_domain(args, ["CT"])
    assert "'domain.extent_mm.z' has min 300 > max 100" in str(caught.value)
    assert "'domain.contrast' is 'sometimes'" in str(caught.value)
