"""Region-based nnU-Net models (BraTS-style sigmoid outputs painted in ``regions_class_order``) through the runtime's
nnU-Net pipeline, against nnunetv2's own ``LabelManager`` and ``nnUNetPredictor``.

The model is built by nnunetv2 from the committed test model's plans (its 3d_fullres network with one output per
region, random weights: no training needed to compare two implementations of the same pipeline) and a dataset.json
whose labels are regions.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.inference.nnunet.regions import paint_regions, sigmoid
from edge_runtime.inference.nnunet.settings import parse_nnunet
from tests.export.nnunet_model.make_model import TRAINED

# nnunetv2 and its helpers warn about their own dependencies
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

#: BraTS-like: three nested regions of the labels 1..3, painted 1, 2, 3 (the inner region last)
REGION_LABELS = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}
CLASS_ORDER = [1, 2, 3]
PHANTOM_SHAPE, PHANTOM_SPACING = (20, 32, 32), (10.0, 12.0, 12.0)


def _need_nnunetv2() -> None:
    pytest.importorskip("nnunetv2", reason="nnunetv2 is not installed (scripts/bootstrap --dev installs it)")
    if not (TRAINED / "plans.json").is_file():
        pytest.skip("the nnU-Net test model is missing (python -m tests.export.nnunet_model.make_model)")


def make_region_model(root: Path, seed: int = 0, postprocessing: list[dict] | None = None) -> Path:
    """An nnU-Net results folder with a region-based dataset.json and one fold of random weights built by
    nnunetv2 from the test model's 3d_fullres plans (mirroring allowed on all axes); ``postprocessing``: the
    kwargs of a postprocessing.pkl written where nnUNetv2_find_best_configuration puts it."""
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    (root / "fold_0").mkdir(parents=True)
    shutil.copyfile(TRAINED / "plans.json", root / "plans.json")
    dataset = json.loads((TRAINED / "dataset.json").read_text())
    dataset.update(labels=REGION_LABELS, regions_class_order=CLASS_ORDER, name="PhantomRegions")
    (root / "dataset.json").write_text(json.dumps(dataset))
    config = PlansManager(json.loads((root / "plans.json").read_text())).get_configuration("3d_fullres")
    torch.manual_seed(seed)
    network = get_network_from_plans(config.network_arch_class_name, config.network_arch_init_kwargs,
                                     config.network_arch_init_kwargs_req_import, 1, len(CLASS_ORDER),
                                     deep_supervision=False)
    torch.save({"network_weights": network.state_dict(), "trainer_name": "nnUNetTrainer",
                "inference_allowed_mirroring_axes": (0, 1, 2)}, root / "fold_0" / "checkpoint_final.pth")
    if postprocessing is not None:
        from tests.export.test_nnunet_postprocessing import nnunet_pickle

        (root / "crossval_results_folds_0").mkdir()
        nnunet_pickle(root / "crossval_results_folds_0" / "postprocessing.pkl", postprocessing)
    return root


def phantom_volumes() -> dict[str, tuple[np.ndarray, tuple[float, ...]]]:
    from phantom import make_phantom

    ph = make_phantom(PHANTOM_SHAPE, PHANTOM_SPACING, rng=5)
    return {"phantom 5": (ph.hu[None].astype(np.float32), PHANTOM_SPACING)}


def test_sigmoid_and_painting_are_nnunets_label_manager() -> None:
    _need_nnunetv2()
    import torch
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    manager = LabelManager(REGION_LABELS, CLASS_ORDER)
    assert manager.has_regions and manager.num_segmentation_heads == 3
    logits = np.random.default_rng(1).normal(0, 2, (3, 9, 10, 11)).astype(np.float16)
    logits[:, 0, 0, :3] = 0  # on the threshold: sigmoid exactly 0.5 is not painted
    expected = manager.apply_inference_nonlin(logits).numpy()
    np.testing.assert_allclose(sigmoid(logits), expected, rtol=0, atol=1e-6)
    theirs = manager.convert_probabilities_to_segmentation(torch.from_numpy(expected)).numpy()
    ours = paint_regions(sigmoid(logits), CLASS_ORDER)
    np.testing.assert_array_equal(ours, theirs)
    assert set(np.unique(ours)) == {0, 1, 2, 3}


def test_region_settings_round_trip_and_bad_class_orders_are_refused() -> None:
    from tests.inference.test_nnunet_pipeline import _settings

    settings = _settings(regions=((1, 2, 3), (2, 3), (3,)), regions_class_order=(1, 2, 3))
    problems: list[str] = []
    assert parse_nnunet(settings.to_dict(), problems) == settings and problems == []
    for order in ([1, 2], [1, 2, 4], [0, 1, 2]):
        bad = settings.to_dict() | {"regions_class_order": order}
        assert parse_nnunet(bad, problems) is None
    assert len(problems) == 3 and all("regions_class_order" in p for p in problems)


def test_a_region_model_with_postprocessing_packaged_by_edge_export_passes_the_gate(tmp_path: Path) -> None:
    """edge-export packages the region model and its postprocessing.pkl behind the gate (nnUNetPredictor with
    mirroring, then nnunetv2's apply_postprocessing, against the runtime on a phantom CT: Dice per label >= 0.99,
    sigmoids within 0.02); the package's runner takes one output per region and the service path's segment()
    gives nnU-Net's label map, with post-processing and with it switched off in the manifest."""
    _need_nnunetv2()
    from edge_runtime.imaging.volume import load_volume
    from edge_runtime.inference.package import ModelPackage
    from edge_runtime.inference.pipeline import segment
    from edge_runtime.inference.runner.onnxruntime import OnnxRuntimeRunner
    from export.cli import main
    from export.models.default_package import PHANTOM_LABELS
    from export.nnunet_parity import NnunetReference, run_nnunet_gate
    from export.nnunet_source import load_nnunet_source
    from export.parity import label_dice
    from phantom import make_phantom, write_series

    steps: list[dict] = [{"labels_or_regions": [1, 2, 3]}, {"labels_or_regions": (2, 3)}, {"labels_or_regions": 1}]
    root = make_region_model(tmp_path / "regions", postprocessing=steps)
    codes = tmp_path / "labels.json"
    codes.write_text(json.dumps(PHANTOM_LABELS[:3]))
    rc = main(["package", "--nnunet", str(root), "--folds", "0", "--labels-json", str(codes),
               "--parity-shape", *map(str, PHANTOM_SHAPE), "--out", str(tmp_path / "pkg")])
    rejected = tmp_path / "pkg.rejected" / "parity.md"
    assert rc == 0, rejected.read_text() if rejected.exists() else rc
    report = json.loads((tmp_path / "pkg" / "parity.json").read_text())
    assert report["passed"] and {d["label"] for d in report["segmentation"]} == {1, 2, 3}
    assert all(d["dice"] >= 0.99 for d in report["segmentation"])
    # random weights still paint every label somewhere, so the Dice compares something
    assert all(d["reference_voxels"] > 0 for d in report["segmentation"])
    package = ModelPackage.load(tmp_path / "pkg")
    assert package.nnunet is not None and package.nnunet.regions_class_order == (1, 2, 3)
    assert package.num_classes == 3 and [lab.value for lab in package.labels] == [1, 2, 3]
    assert len(package.nnunet.active_postprocessing) == 3 and "3 post-processing step(s)" in report["reference"]

    ph = make_phantom(PHANTOM_SHAPE, PHANTOM_SPACING, rng=9)
    volume = load_volume(list(write_series(ph.hu, ph.spacing, tmp_path / "ct").paths))
    with OnnxRuntimeRunner(package) as runner:
        result = segment(volume, package, runner, probabilities=True)
    assert result.probabilities is not None and result.probabilities.shape == (4, *volume.array.shape)
    names = {lab.value: lab.name for lab in package.labels}
    raw = None
    for use_postprocessing in (True, False):
        if not use_postprocessing:  # switched off in the manifest (not hashed), as a site would
            manifest = json.loads((tmp_path / "pkg" / "manifest.json").read_text())
            manifest["nnunet"]["use_postprocessing"] = False
            (tmp_path / "pkg" / "manifest.json").write_text(json.dumps(manifest))
            package = ModelPackage.load(tmp_path / "pkg")
            with OnnxRuntimeRunner(package) as runner:
                result = segment(volume, package, runner)
            raw = result.labels
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            source = load_nnunet_source(root, ["0"], use_postprocessing=use_postprocessing)
            reference = NnunetReference(source, use_mirroring=True, tile_step_size=0.5)
            expected, _ = reference.predict(volume.array[None], volume.spacing)
        assert all(d.dice >= 0.99 for d in label_dice("dicom", expected, result.labels, names, 4))
        if use_postprocessing:
            processed = result.labels
    assert raw is not None and int((raw != processed).sum()) > 0  # post-processing removed something here

    # the painting order is checked: the same package painting the regions the other way round is refused
    manifest["nnunet"]["regions_class_order"] = [3, 2, 1]
    (tmp_path / "pkg" / "manifest.json").write_text(json.dumps(manifest))
    report = run_nnunet_gate(load_nnunet_source(root, ["0"], use_postprocessing=False),
                             ModelPackage.load(tmp_path / "pkg"), phantom_volumes())
    assert not report.passed and any("Dice" in f for f in report.failures())
