"""The training script works end to end, and the bundled package is the trained, parity-checked U-Net."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.inference.package import DEFAULT_PACKAGE, ModelPackage
from phantom import LABELS

pytest.importorskip("torch")
pytest.importorskip("onnx")


# slow (about a minute: 18 s of training, the held-out cases, two exports): the training script is a workstation
# tool; CI keeps the check below that the bundled package is the trained one, with its recipe and parity
@pytest.mark.slow
# torch.onnx's dynamo exporter warns about its own API (dynamic_axes, pytree internals) on every export
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")
def test_tiny_training_runs_end_to_end(tmp_path: Path) -> None:
    from export.models.train_phantom_unet import main

    out = tmp_path / "run"
    code = main(
        [
            "--out", str(out),
            "--minutes", "0.3",
            "--small",
            "--pool", "4",
            "--target-spacing", "6", "6", "6",
            "--patch", "16", "32", "32",
            "--channels", "4", "8", "16",
            "--val", "1",
            "--val-every", "5",
            "--fov-z", "200", "300",
            "--fov-xy", "300", "400",
            "--heldout", "small",
        ]
    )
    assert code == 0
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["training"]["steps"] > 0
    assert recipe["training"]["wall_seconds"]["total"] < 0.3 * 60 + 60
    assert recipe["validation"]["history"], "at least the final validation ran"
    held = recipe["heldout"]
    assert set(held["mean_dice"]) == set(LABELS.values())
    assert held["cases"] and all(0.0 <= d <= 1.0 for c in held["cases"] for d in c["dice"].values())
    assert all(0.0 <= v <= 1.0 for v in held["mean_dice"].values())  # 18 s of training proves the path, not Dice

    package = ModelPackage.load(out / "package")
    assert package.patch_size == (16, 32, 32) and package.target_spacing == (6.0, 6.0, 6.0)
    assert [lab.name for lab in package.labels] == ["Lung", "Liver", "Spleen", "Kidney", "Bone"]
    assert json.loads((out / "package" / "parity.json").read_text())["passed"]
    assert json.loads((out / "package" / "training.json").read_text()) == recipe

    # the checkpoint re-exports to the same package without retraining
    from export.cli import main as export_main

    again_args = ["default-model", "--out", str(tmp_path / "again"), "--checkpoint", str(out / "phantom_unet.pt")]
    assert export_main(again_args) == 0
    again = ModelPackage.load(tmp_path / "again")
    assert again.manifest["preprocessing"] == package.manifest["preprocessing"]
    assert json.loads((tmp_path / "again" / "training.json").read_text()) == recipe


def test_default_package_is_the_trained_unet_with_its_recipe_heldout_dice_and_parity() -> None:
    """The bundled package is the phantom-trained U-Net: at most 10 MB, trained within 20 minutes on the CPU,
    every label at Dice >= 0.90 on every held-out phantom, its parity report and recipe inside."""
    package = ModelPackage.load(DEFAULT_PACKAGE)
    assert [lab.name for lab in package.labels] == ["Lung", "Liver", "Spleen", "Kidney", "Bone"]
    assert [lab.type.value for lab in package.labels] == ["39607008", "10200004", "78961009", "64033007", "272673000"]
    assert {lab.category.meaning for lab in package.labels[:4]} == {"Organ"}
    assert package.labels[4].category.value == "85756007"
    assert "not a clinical model" in package.description.lower()
    assert (DEFAULT_PACKAGE / "model.onnx").stat().st_size <= 10 * 1024 * 1024
    assert not list(DEFAULT_PACKAGE.glob("*.pt")), "training checkpoints do not belong in the runtime package"

    parity = json.loads((DEFAULT_PACKAGE / "parity.json").read_text())
    assert parity["passed"]
    assert {r["input"] for r in parity["results"]} >= {"random", "phantom"}
    names = {lab.name for lab in package.labels}
    assert {d["name"] for d in parity["segmentation"]} == names, "per-label Dice through the sliding window"
    assert all(d["dice"] >= parity["min_dice"] for d in parity["segmentation"])
    assert (DEFAULT_PACKAGE / "parity.md").read_text().startswith("# Parity")

    training = json.loads((DEFAULT_PACKAGE / "training.json").read_text())
    data = training["data"]
    assert list(package.target_spacing) == data["target_spacing"]
    assert list(package.patch_size) == data["patch_size"]
    norm = package.normalization
    assert (norm.kind, norm.lower, norm.upper, norm.mean, norm.std) == (
        "ct_window", *(data["normalization"][k] for k in ("lower", "upper", "mean", "std"))
    )
    assert package.overlap == training["inference"]["overlap"]
    assert package.batch_size == training["inference"]["batch_size"]
    # 20 minutes of wall-clock time on a 2-core machine, phantom generation and validation included
    assert training["training"]["budget_clock"] == "wall"
    assert training["training"]["budget_seconds_charged"] <= 20 * 60
    assert training["training"]["wall_seconds"]["total"] <= 20 * 60 + 5
    assert training["training"]["threads"] <= 2
    assert "DIR" in training["command"].split()

    held = training["heldout"]
    assert held["geometry"] == "realistic" and len(held["cases"]) >= 3
    seeds = set(held["seeds"])
    assert not seeds & set(training["validation"]["seeds"])
    lo, hi = (int(v) for v in data["pool_seeds"].split(".."))
    assert not any(lo <= s <= hi for s in seeds), "held-out phantoms must not come from the training pool"
    assert all(case["shape"][1:] == [512, 512] for case in held["cases"])
    for case in held["cases"]:
        assert set(case["dice"]) == set(LABELS.values())
    minimum = {name: min(case["dice"][name] for case in held["cases"]) for name in LABELS.values()}
    assert held["min_dice"] == pytest.approx(minimum, abs=1e-4)
    assert held["all_labels_at_least_0.90"] == all(v >= 0.90 for v in minimum.values())
    assert held["all_labels_at_least_0.90"] and all(np.isfinite(v) and v >= 0.90 for v in minimum.values())
