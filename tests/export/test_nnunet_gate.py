"""``edge-export package --nnunet DIR --folds 0 1``: nnU-Net's whole predictor pipeline in a package, gated
against nnunetv2's own ``nnUNetPredictor`` on a phantom CT and a real CT.

The model is ``tests/export/nnunet_model/trained``: nnunetv2's planner and trainer made it (two folds, briefly, on
phantom CTs, mirroring allowed on all axes; ``python -m tests.export.nnunet_model.make_model`` remakes it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.inference.package import ModelPackage
from export.cli import main
from export.models.default_package import PHANTOM_LABELS
from tests.export.nnunet_model.make_model import TRAINED
from tests.peers import SHARED_DATA

#: a real CT of the shared corpus: 28 slices of 512 x 512, 5 mm (the model resamples it to 13.5 x 16 x 16 mm)
REAL_CT = SHARED_DATA / "dcm_qa_ct" / "philips_S201_std_brain_5mm"
#: a phantom CT off the model's grid, so both pipelines resample it
PHANTOM_SHAPE, PHANTOM_SPACING = (20, 32, 32), (10.0, 12.0, 12.0)

# nnunetv2 and its helpers (batchgenerators, acvl_utils) warn about their own dependencies
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]


def _need_nnunetv2() -> None:
    pytest.importorskip("nnunetv2", reason="nnunetv2 is not installed (scripts/bootstrap --dev installs it)")
    if not (TRAINED / "fold_1" / "checkpoint_final.pth").is_file():
        pytest.skip("the nnU-Net test model is missing (python -m tests.export.nnunet_model.make_model)")


@pytest.fixture(scope="module")
def faithful(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The two-fold package with mirroring, built and gated by edge-export on a phantom and (when the shared
    corpus is present) the real CT."""
    _need_nnunetv2()
    tmp = tmp_path_factory.mktemp("nnunet")
    codes = tmp / "labels.json"
    codes.write_text(json.dumps(PHANTOM_LABELS))
    real = ["--parity-series", str(REAL_CT)] if REAL_CT.is_dir() else []
    rc = main(["package", "--nnunet", str(TRAINED), "--folds", "0", "1", "--labels-json", str(codes),
               "--parity-shape", *map(str, PHANTOM_SHAPE), *real, "--out", str(tmp / "pkg")])
    assert rc == 0, (tmp / "pkg.rejected" / "parity.md").read_text() if (tmp / "pkg.rejected").exists() else rc
    return tmp / "pkg"


def test_faithful_package_passes_the_gate_on_a_phantom_and_a_real_ct(faithful: Path) -> None:
    report = json.loads((faithful / "parity.json").read_text())
    assert report["passed"] is True and report["reference"].startswith("nnunetv2 ")
    volumes = {d["volume"] for d in report["segmentation"]}
    assert any(v.startswith("phantom") for v in volumes)
    if not REAL_CT.is_dir():
        pytest.skip("the real CT half needs the shared corpus (../shared/data)")
    assert any(v.startswith(REAL_CT.name) for v in volumes)
    assert all(d["dice"] >= 0.99 for d in report["segmentation"])
    # structured output on both: the model segments something, and nnU-Net and the runtime agree on it
    assert sum(d["reference_voxels"] for d in report["segmentation"]) > 1000
    assert report["needed_probability_error"] <= 0.02
    settings = ModelPackage.load(faithful).nnunet
    assert settings is not None and settings.folds == ("0", "1") and settings.use_mirroring
    assert settings.mirror_axes == (0, 1, 2) and settings.transpose_forward == (1, 0, 2)


def _variant(faithful: Path, tmp_path: Path, **changes: object) -> ModelPackage:
    """A copy of the package whose manifest's nnunet section differs (the manifest itself is not hashed)."""
    out = tmp_path / "variant"
    shutil.copytree(faithful, out)
    manifest = json.loads((out / "manifest.json").read_text())
    for key, value in changes.items():
        manifest["nnunet"][key] = value
    (out / "manifest.json").write_text(json.dumps(manifest))
    return ModelPackage.load(out)


def _phantom(shape: tuple[int, int, int] = PHANTOM_SHAPE) -> dict[str, tuple[np.ndarray, tuple[float, ...]]]:
    from phantom import make_phantom

    ph = make_phantom(shape, PHANTOM_SPACING, rng=7)
    return {"phantom 7": (ph.hu[None].astype(np.float32), PHANTOM_SPACING)}


def test_gate_refuses_a_package_whose_normalisation_differs(faithful: Path, tmp_path: Path) -> None:
    from export.nnunet_parity import run_nnunet_gate
    from export.nnunet_source import load_nnunet_source

    wrong = _variant(faithful, tmp_path, normalization=[{"scheme": "ZScoreNormalization", "use_mask": False}])
    report = run_nnunet_gate(load_nnunet_source(TRAINED, ["0", "1"]), wrong, _phantom())
    assert not report.passed
    failures = "\n".join(report.failures())
    assert "Dice" in failures and "probabilities differ" in failures
    assert report.needed_probability_error > 0.1


def test_mirroring_off_passes_against_the_same_settings_and_reports_its_cost(faithful: Path, tmp_path: Path) -> None:
    from export.nnunet_parity import run_nnunet_gate
    from export.nnunet_source import load_nnunet_source

    fast = _variant(faithful, tmp_path, use_mirroring=False)
    report = run_nnunet_gate(load_nnunet_source(TRAINED, ["0", "1"], use_mirroring=False), fast, _phantom())
    assert report.passed, report.failures()
    assert report.cost and {d.label for d in report.cost} == {1, 2, 3, 4, 5}
    assert "What the speed settings cost" in report.markdown()


def test_the_service_path_segments_a_dicom_series_as_the_gate_did(faithful: Path, tmp_path: Path) -> None:
    """segment() dispatches to the nnU-Net pipeline: the label map of a DICOM series read by the runtime's volume
    builder is nnUNetPredictor's for the same pixels and spacing."""
    from edge_runtime.imaging.volume import load_volume
    from edge_runtime.inference.pipeline import segment
    from edge_runtime.inference.runner.onnxruntime import OnnxRuntimeRunner
    from export.nnunet_parity import NnunetReference
    from export.nnunet_source import load_nnunet_source
    from export.parity import label_dice
    from phantom import make_phantom, write_series

    ph = make_phantom(PHANTOM_SHAPE, PHANTOM_SPACING, rng=11)
    info = write_series(ph.hu, ph.spacing, tmp_path / "ct")
    volume = load_volume(list(info.paths))
    package = ModelPackage.load(faithful)
    with OnnxRuntimeRunner(package) as runner:
        result = segment(volume, package, runner, probabilities=True)
    assert result.labels.shape == volume.array.shape and result.windows >= 1
    assert result.confidence is not None and 0.0 < float(result.confidence.min()) <= 1.0
    assert result.probabilities is not None and result.probabilities.dtype == np.uint8
    reference = NnunetReference(load_nnunet_source(TRAINED, ["0", "1"]), use_mirroring=True, tile_step_size=0.5)
    expected, _ = reference.predict(volume.array[None], volume.spacing)
    names = {lab.value: lab.name for lab in package.labels}
    assert all(d.dice >= 0.99 for d in label_dice("dicom", expected, result.labels, names, package.num_classes))
    assert int((result.labels > 0).sum()) > 100


def test_a_2d_configuration_runs_slice_by_slice_as_nnunet_does(tmp_path: Path) -> None:
    """The model's plans also hold nnU-Net's 2d configuration: a network built by nnunetv2 from it (random
    weights, saved as a fold checkpoint) through the runtime's pipeline equals nnUNetPredictor's."""
    _need_nnunetv2()
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from export.nnunet_parity import run_nnunet_gate
    from export.nnunet_source import load_nnunet_source
    from export.onnx import export_onnx_with_info
    from export.package import write_package

    root = tmp_path / "2d"
    (root / "fold_0").mkdir(parents=True)
    for name in ("plans.json", "dataset.json"):
        shutil.copyfile(TRAINED / name, root / name)
    config = PlansManager(json.loads((root / "plans.json").read_text())).get_configuration("2d")
    torch.manual_seed(0)
    network = get_network_from_plans(config.network_arch_class_name, config.network_arch_init_kwargs,
                                     config.network_arch_init_kwargs_req_import, 1, 6, deep_supervision=False)
    torch.save({"network_weights": network.state_dict(), "trainer_name": "nnUNetTrainer",
                "inference_allowed_mirroring_axes": (0, 1)}, root / "fold_0" / "checkpoint_final.pth")
    source = load_nnunet_source(root, ["0"], configuration="2d")
    assert source.window[0] == 1 and source.settings.mirror_axes == (0, 1)
    info = export_onnx_with_info(source.module, tmp_path / "model.onnx", example_shape=(1, 1, *source.window))
    manifest = {"name": "2d", "version": "0", "model": {"input": "image", "output": "logits"},
                "preprocessing": {"target_spacing": None, "normalization": {"kind": "none"}},
                "inference": {"patch_size": list(source.window), "batch_size": 2}, "labels": PHANTOM_LABELS,
                "nnunet": source.settings.to_dict()}
    package = write_package(tmp_path / "pkg", info.path, manifest)
    report = run_nnunet_gate(source, package, _phantom((6, 32, 32)))  # a few slices: 2D windows are per slice
    assert report.passed, report.failures()
