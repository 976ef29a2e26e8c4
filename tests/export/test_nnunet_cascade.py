"""``edge-export package --nnunet DIR --configuration 3d_cascade_fullres --folds 0 1``: nnU-Net's 3d_lowres ->
3d_cascade_fullres cascade in one package, gated against nnunetv2's ``nnUNetPredictor`` run as its command line
chains the two stages, refused without its lowres stage, and served.

The model is ``tests/export/nnunet_cascade/Dataset987_PhantomCascade``: both stages trained by nnunetv2 itself on
phantom CTs (two folds each, mirroring allowed on every axis; ``python -m tests.export.nnunet_cascade.make_model``
remakes it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.errors import PackageError
from edge_runtime.inference.package import ModelPackage
from export.cli import main
from export.models.default_package import PHANTOM_LABELS
from tests.export.nnunet_cascade.make_model import TRAINED

CASCADE = TRAINED / "nnUNetTrainer__nnUNetPlans__3d_cascade_fullres"
LOWRES = TRAINED / "nnUNetTrainer__nnUNetPlans__3d_lowres"
#: a phantom off both stages' grids (lowres 24 x 18 x 18 mm, fullres 12 x 9 x 9 mm), so each resamples
PHANTOM_SHAPE, PHANTOM_SPACING = (16, 40, 40), (10.0, 7.5, 7.5)

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]


def _need_nnunetv2() -> None:
    pytest.importorskip("nnunetv2", reason="nnunetv2 is not installed (scripts/bootstrap --dev installs it)")
    if not all((folder / "fold_1" / "checkpoint_final.pth").is_file() for folder in (CASCADE, LOWRES)):
        pytest.skip("the nnU-Net cascade test model is missing (python -m tests.export.nnunet_cascade.make_model)")


def _package_args(source: Path, codes: Path, out: Path) -> list[str]:
    return ["package", "--nnunet", str(source), "--configuration", "3d_cascade_fullres", "--folds", "0", "1",
            "--labels-json", str(codes), "--parity-shape", *map(str, PHANTOM_SHAPE), "--out", str(out)]


@pytest.fixture(scope="module")
def codes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("codes") / "labels.json"
    path.write_text(json.dumps(PHANTOM_LABELS))
    return path


@pytest.fixture(scope="module")
def cascade(tmp_path_factory: pytest.TempPathFactory, codes: Path) -> Path:
    """The two-stage package, built and gated by edge-export against nnUNetPredictor's cascade on a phantom."""
    _need_nnunetv2()
    out = tmp_path_factory.mktemp("cascade") / "pkg"
    rc = main(_package_args(CASCADE, codes, out))
    rejected = out.with_name("pkg.rejected") / "parity.md"
    assert rc == 0, rejected.read_text() if rejected.exists() else rc
    return out


def test_the_cascade_package_passes_the_gate_against_nnunets_cascade(cascade: Path) -> None:
    report = json.loads((cascade / "parity.json").read_text())
    assert report["passed"] is True and "3d_cascade_fullres, after 3d_lowres" in report["reference"]
    assert all(d["dice"] >= 0.99 for d in report["segmentation"])
    assert sum(d["reference_voxels"] for d in report["segmentation"]) > 1000  # structured, not background alone
    assert report["needed_probability_error"] <= 0.02
    package = ModelPackage.load(cascade)
    settings, first = package.nnunet, package.previous_stage
    assert settings is not None and settings.previous_stage is not None and first is not None
    assert first.nnunet is not None and first.nnunet.configuration == "3d_lowres"
    assert settings.previous_stage.configuration == "3d_lowres" and settings.previous_stage.one_hot_labels == (
        1, 2, 3, 4, 5)
    assert settings.folds == first.nnunet.folds == ("0", "1")
    assert settings.use_mirroring and first.nnunet.use_mirroring and first.nnunet.spacing == tuple(
        2 * s for s in settings.spacing)
    assert package.input_channels == 6 and package.image_channels == 1 and first.input_channels == 1
    manifest = json.loads((cascade / "manifest.json").read_text())
    assert "previous_stage/manifest.json" in manifest["files"] and "channels" not in manifest  # one series in


def test_the_service_path_runs_both_stages_and_the_lowres_map_is_what_the_cascade_reads(cascade: Path,
                                                                                        tmp_path: Path) -> None:
    """A DICOM series through segment() (the service's call) with the runner load_runner() gives a cascade package
    (both stages' models): the label map comes from both stages, and the fullres stage depends on its input
    channels: run with an empty previous label map it segments another label map (so the gate's agreement above
    covers the hand-over)."""
    from edge_runtime.imaging.volume import load_volume
    from edge_runtime.inference.nnunet.cascade import previous_runner
    from edge_runtime.inference.nnunet.pipeline import predict_case
    from edge_runtime.inference.pipeline import segment
    from edge_runtime.inference.runner import load_runner
    from phantom import make_phantom, write_series

    package = ModelPackage.load(cascade)
    ph = make_phantom(PHANTOM_SHAPE, PHANTOM_SPACING, rng=5)
    volume = load_volume(list(write_series(ph.hu, ph.spacing, tmp_path / "ct").paths))
    with load_runner(package) as runner:
        assert previous_runner(runner).package.identity.endswith("3d_lowres stage 0.1.0")
        chained = segment(volume, package, runner)
        assert package.nnunet is not None
        blind = predict_case(volume.array[None], volume.spacing, package.nnunet, runner, package.num_classes,
                             previous=np.zeros(volume.array.shape, dtype=np.uint8))
    assert chained.labels.shape == volume.array.shape and chained.confidence is not None
    assert "3d_lowres_inference" in chained.timings and "inference" in chained.timings
    assert np.mean(chained.labels != blind.labels) > 0.01
    assert np.mean(chained.labels == ph.labels) > 0.8  # and the chain segments the phantom


def test_a_cascade_without_its_lowres_stage_is_refused_at_export(tmp_path: Path, codes: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    _need_nnunetv2()
    alone = tmp_path / TRAINED.name / CASCADE.name
    shutil.copytree(CASCADE, alone)
    assert main(_package_args(alone, codes, tmp_path / "pkg")) == 2
    err = capsys.readouterr().err
    assert "cascade stage" in err and "'3d_lowres'" in err and "nnUNetTrainer__nnUNetPlans__3d_lowres is missing" in err
    assert "--previous-stage DIR" in err and not (tmp_path / "pkg").exists()


def test_a_cascade_package_without_its_previous_stage_is_refused_at_load(cascade: Path, tmp_path: Path) -> None:
    broken = tmp_path / "pkg"
    shutil.copytree(cascade, broken)
    shutil.rmtree(broken / "previous_stage")
    with pytest.raises(PackageError) as missing:
        ModelPackage.load(broken)
    text = str(missing.value)
    assert "previous_stage/manifest.json is listed in the manifest but missing" in text
    assert "the cascade's previous stage ('nnunet.previous_stage.package' 'previous_stage') cannot be loaded" in text
    shutil.copytree(cascade / "previous_stage", broken / "previous_stage")
    (broken / "previous_stage" / "model.onnx").write_bytes(b"not the model")
    with pytest.raises(PackageError, match="previous stage .* model.onnx has sha256"):
        ModelPackage.load(broken)


@pytest.mark.e2e
@pytest.mark.slow  # a service start (about 8 s) beyond CI's budget; segment() is checked above in CI
def test_a_series_pushed_to_the_service_comes_back_as_the_cascades_seg(cascade: Path, tmp_path: Path) -> None:
    """DCMTK pushes a phantom CT series; the service runs both stages and sends a SEG whose segments are the
    package's labels, on the pushed series, judged by dciodvfy."""
    import pydicom

    from phantom import make_phantom, write_series
    from tests.peers import served_seg

    package = ModelPackage.load(cascade)
    ph = make_phantom(PHANTOM_SHAPE, PHANTOM_SPACING, rng=9)
    info = write_series(ph.hu, ph.spacing, tmp_path / "ct")
    seg = pydicom.dcmread(served_seg(tmp_path, cascade, list(info.paths), info.series_uid, timeout=240))
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [lab.name for lab in package.labels]
    assert str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID) == info.series_uid


@pytest.mark.slow  # nnUNetPredictor's cascade on a 28 x 512 x 512 CT with mirroring: minutes on two cores
def test_the_cascade_passes_the_gate_on_a_real_ct(tmp_path: Path, codes: Path) -> None:
    """The same gate on a real CT of the shared corpus (5 mm Philips head CT), beside the phantom."""
    from tests.peers import SHARED_DATA

    _need_nnunetv2()
    real = SHARED_DATA / "dcm_qa_ct" / "philips_S201_std_brain_5mm"
    if not real.is_dir():
        pytest.skip("the real CT needs the shared corpus (../shared/data)")
    out = tmp_path / "pkg"
    assert main([*_package_args(CASCADE, codes, out), "--parity-series", str(real)]) == 0
    report = json.loads((out / "parity.json").read_text())
    on_real = [d for d in report["segmentation"] if d["volume"].startswith(real.name)]
    assert on_real and all(d["dice"] >= 0.99 for d in on_real)
