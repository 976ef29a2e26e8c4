"""Loaders of ``export/loaders/``: each source gives an eval-mode module with the source's weights, and the
source's own preprocessing read into manifest hints. Models are built in the tests; nothing is downloaded."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from export.loaders import (  # noqa: E402
    LoaderError,
    load_factory,
    load_monai_bundle,
    load_nnunet,
    load_torchscript,
    orientation_adapter,
)
from tests.export.fixtures import (  # noqa: E402
    NNUNET_DATASET,
    NNUNETV2_REFERENCE,
    NNUNETV2_SPACING,
    TinySegNet,
    XYZProbe,
    nnunet_plans,
    write_monai_bundle,
    write_nnunet_folder,
    write_nnunet_folder_with_nnunetv2,
)


def same_outputs(a: torch.nn.Module, b: torch.nn.Module, shape=(1, 1, 16, 32, 32)) -> bool:  # noqa: ANN001
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return bool(torch.allclose(a(x), b(x), atol=1e-6))


def script(module: torch.nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit\.script.*deprecated")
        return torch.jit.script(module)


# ---------------------------------------------------------------------------------------------------
# (a) factory + state dict
# ---------------------------------------------------------------------------------------------------


def test_factory_with_kwargs_and_state_dict(tmp_path: Path) -> None:
    trained = TinySegNet(num_classes=4, seed=7).eval()
    torch.save({"state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()}}, tmp_path / "w.pt")
    loaded = load_factory("tests.export.fixtures:TinySegNet", {"num_classes": 4}, tmp_path / "w.pt")
    assert not loaded.module.training
    assert loaded.num_classes == 4 and loaded.input_channels is None
    assert loaded.hints["source"] == {
        "kind": "factory", "factory": "tests.export.fixtures:TinySegNet", "kwargs": {"num_classes": 4},
        "state_dict": "w.pt",
    }
    assert same_outputs(loaded.module, trained)
    assert not same_outputs(loaded.module, TinySegNet(num_classes=4, seed=0).eval())


def test_factory_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(LoaderError, match="no attribute 'Nope'"):
        load_factory("tests.export.fixtures:Nope")
    with pytest.raises(LoaderError, match="cannot import module 'no_such_pkg.mod'"):
        load_factory("no_such_pkg.mod:fn")
    with pytest.raises(LoaderError, match="not a torch.nn.Module"):
        load_factory("tests.export.fixtures:NotAModule")
    with pytest.raises(LoaderError, match="unexpected keyword"):
        load_factory("tests.export.fixtures:TinySegNet", {"channels": 3})
    torch.save(TinySegNet(num_classes=3).state_dict(), tmp_path / "w3.pt")
    with pytest.raises(LoaderError, match=r"shape differs: head\.bias: file \(3,\), module \(5,\)"):
        load_factory("tests.export.fixtures:TinySegNet", {"num_classes": 5}, tmp_path / "w3.pt")
    torch.save({"weights": TinySegNet().state_dict(), "epoch": object.__name__}, tmp_path / "bad.pt")
    with pytest.raises(LoaderError, match=r"does not hold a state dict .*\(top-level keys: weights, epoch\)"):
        load_factory("tests.export.fixtures:TinySegNet", {}, tmp_path / "bad.pt")


# ---------------------------------------------------------------------------------------------------
# (b) TorchScript
# ---------------------------------------------------------------------------------------------------


def test_torchscript_file(tmp_path: Path) -> None:
    net = TinySegNet(seed=3).eval()
    script(net).save(str(tmp_path / "model.ts"))
    loaded = load_torchscript(tmp_path / "model.ts")
    assert loaded.hints["source"] == {"kind": "torchscript", "file": "model.ts"}
    assert loaded.num_classes is None
    assert same_outputs(loaded.module, net)


def test_torchscript_with_monai_extra_files_gets_hints_and_axes(tmp_path: Path) -> None:
    bundle = write_monai_bundle(tmp_path / "b")
    extra = {name: (bundle / "configs" / name).read_text() for name in ("metadata.json", "inference.json")}
    script(XYZProbe()).save(str(tmp_path / "model.ts"), _extra_files=extra)
    loaded = load_torchscript(tmp_path / "model.ts")
    # scripted around the loaded ScriptModule, so the TorchScript exporter can take it whole
    assert isinstance(loaded.module, torch.jit.ScriptModule) and loaded.module.original_name == "AxisAdapter"
    with torch.no_grad():
        labels = loaded.module(torch.zeros(1, 1, 4, 6, 8)).argmax(1)[0]
    assert bool((labels[:, :, 4:] == 1).all()) and bool((labels[:, :, :4] == 0).all())
    assert loaded.num_classes == 3 and loaded.input_channels == 1
    # and it exports whole (TorchScript exporter), flips and permutes included
    import onnxruntime as ort

    from export.onnx import export_onnx

    path = export_onnx(loaded.module, tmp_path / "m.onnx", example_shape=(1, 1, 4, 6, 8))
    x = np.zeros((2, 1, 6, 10, 12), np.float32)
    (got,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x})
    with torch.no_grad():
        assert np.allclose(got, loaded.module(torch.from_numpy(x)).numpy(), atol=1e-6)
    assert loaded.hints["patch_size"] == [16, 32, 48]
    assert loaded.hints["target_spacing"] == [4.0, 1.25, 1.5]


def test_not_torchscript(tmp_path: Path) -> None:
    (tmp_path / "x.ts").write_bytes(b"not a zip")
    with pytest.raises(LoaderError, match="not a TorchScript archive"):
        load_torchscript(tmp_path / "x.ts")


# ---------------------------------------------------------------------------------------------------
# (c) MONAI bundle
# ---------------------------------------------------------------------------------------------------


def test_monai_bundle_network_weights_and_hints(tmp_path: Path) -> None:
    trained = TinySegNet(seed=5).eval()
    bundle = write_monai_bundle(tmp_path / "bundle", weights=trained)
    loaded = load_monai_bundle(bundle)
    h = loaded.hints
    assert loaded.input_channels == 1 and loaded.num_classes == 3
    # ScaleIntensityRanged(-1024..1024 -> -1..1, clip) is the ct_window -1024..1024, mean 0, std 1024
    assert h["normalization"] == {"kind": "ct_window", "lower": -1024.0, "upper": 1024.0, "mean": 0.0, "std": 1024.0}
    # Spacingd pixdim (x, y, z) = (1.5, 1.25, 4.0) via "@pixdim"; roi_size (x, y, z) = (48, 32, 16)
    assert h["target_spacing"] == [4.0, 1.25, 1.5]
    assert h["patch_size"] == [16, 32, 48]
    assert (h["overlap"], h["batch_size"], h["blending"]) == (0.25, 3, "constant")
    assert h["label_names"] == {1: "lung", 2: "bone"}
    assert (h["name"], h["version"], h["modalities"]) == ("Tiny CT bundle", "0.4.2", ["CT"])
    assert h["source"]["axes"] == {"order": [2, 1, 0], "flips": [True, True, False]}
    # the adapter feeds the network MONAI's (x, y, z) RAS array and returns (z, y, x) logits
    x = torch.randn(1, 1, 16, 32, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = trained(x.permute(0, 1, 4, 3, 2).flip(2, 3)).flip(2, 3).permute(0, 1, 4, 3, 2)
        assert torch.allclose(loaded.module(x), want, atol=1e-6)


def test_monai_axis_adapter_puts_patient_left_where_the_runtime_has_it(tmp_path: Path) -> None:
    # XYZProbe's class 1 covers the lower half of the network's first axis: in RAS, patient Left
    bundle = write_monai_bundle(tmp_path / "b", target="tests.export.fixtures:XYZProbe",
                                network_args={"in_channels": 1, "out_channels": 2}, weights=XYZProbe())
    loaded = load_monai_bundle(bundle)
    with torch.no_grad():
        labels = loaded.module(torch.zeros(1, 1, 4, 6, 8)).argmax(1)[0]
    # runtime columns run toward patient Left (DICOM LPS): class 1 must be in the high columns
    assert bool((labels[:, :, 4:] == 1).all()) and bool((labels[:, :, :4] == 0).all())


def test_orientation_adapter_codes() -> None:
    assert orientation_adapter("RAS") == ([2, 1, 0], [True, True, False])
    assert orientation_adapter("LPS") == ([2, 1, 0], [False, False, False])
    assert orientation_adapter("SPL") == ([0, 1, 2], [False, False, False])
    with pytest.raises(LoaderError, match="three distinct axes"):
        orientation_adapter("RRS")


def test_monai_bundle_yaml_config(tmp_path: Path) -> None:
    pytest.importorskip("yaml")
    bundle = write_monai_bundle(tmp_path / "b", yaml=True)
    assert load_monai_bundle(bundle).hints["patch_size"] == [16, 32, 48]


def test_monai_bundle_refusals(tmp_path: Path) -> None:
    with pytest.raises(LoaderError, match="not a MONAI bundle"):
        load_monai_bundle(tmp_path)
    bundle = write_monai_bundle(tmp_path / "b")
    (bundle / "models" / "model.pt").unlink()
    with pytest.raises(LoaderError, match="models/model.pt"):
        load_monai_bundle(bundle)
    # a Python expression in the network definition: evaluated only through MONAI's own ConfigParser
    bundle = write_monai_bundle(tmp_path / "c", network_args={"in_channels": "$1 + 0", "num_classes": 3},
                                weights=TinySegNet())
    try:
        import monai  # noqa: F401
    except ImportError:
        with pytest.raises(LoaderError, match=r"Python expression \('\$1 \+ 0'\)"):
            load_monai_bundle(bundle)
    else:  # MONAI's ConfigParser evaluates it
        assert load_monai_bundle(bundle).module.network.in_channels == 1
    # sigmoid post-processing: multi-label outputs the runtime cannot express
    bundle = write_monai_bundle(tmp_path / "d")
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    config["postprocessing"]["transforms"][0] = {"_target_": "Activationsd", "keys": "pred", "sigmoid": True}
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    with pytest.raises(LoaderError, match="sigmoid"):
        load_monai_bundle(bundle)


def test_monai_short_target_name_resolves_through_monai_or_is_refused(tmp_path: Path) -> None:
    args = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "channels": [4, 8], "strides": [2],
            "num_res_units": 1}
    try:
        from monai.networks.nets import UNet
    except ImportError:
        bundle = write_monai_bundle(tmp_path / "b", target="UNet", network_args=args, weights=TinySegNet())
        with pytest.raises(LoaderError, match="MONAI short name"):
            load_monai_bundle(bundle)
        return
    trained = UNet(**args).eval()
    bundle = write_monai_bundle(tmp_path / "b", target="UNet", network_args=args, weights=trained)
    loaded = load_monai_bundle(bundle, reorient=False)
    assert type(loaded.module).__name__ == "UNet"
    assert same_outputs(loaded.module, trained)


# ---------------------------------------------------------------------------------------------------
# (d) nnU-Net v2
# ---------------------------------------------------------------------------------------------------


def test_nnunet_folder_network_weights_and_preprocessing(tmp_path: Path) -> None:
    pytest.importorskip("dynamic_network_architectures")
    root = write_nnunet_folder(tmp_path / "nnUNetTrainer__nnUNetPlans__3d_fullres")
    loaded = load_nnunet(root, fold=0)
    h = loaded.hints
    assert (loaded.input_channels, loaded.num_classes) == (1, 3)
    assert type(loaded.module).__name__ == "PlainConvUNet" and not loaded.module.training
    assert h["target_spacing"] == [3.0, 1.5, 1.25] and h["patch_size"] == [16, 32, 48]
    # CTNormalization: clip to the foreground 0.5 / 99.5 percentiles, then (x - mean) / std
    assert h["normalization"] == {"kind": "ct_window", "lower": -958.0, "upper": 1251.0, "mean": 93.5, "std": 137.25}
    assert h["label_names"] == {1: "liver", 2: "spleen"}
    assert (h["overlap"], h["blending"], h["modalities"]) == (0.5, "gaussian", ["CT"])
    # the weights are the checkpoint's (instance-norm affine parameters were set away from 1 / 0)
    ckpt = torch.load(root / "fold_0" / "checkpoint_final.pth", weights_only=False)
    state = loaded.module.state_dict()
    assert all(torch.equal(state[k], v) for k, v in ckpt["network_weights"].items())
    with torch.no_grad():
        out = loaded.module(torch.randn(2, 1, 16, 32, 48))
    assert out.shape == (2, 3, 16, 32, 48)  # one output: deep supervision off


def test_nnunet_transpose_forward_is_undone_per_window(tmp_path: Path) -> None:
    pytest.importorskip("dynamic_network_architectures")
    root = write_nnunet_folder(tmp_path / "t", transpose=(2, 0, 1))
    plain = load_nnunet(write_nnunet_folder(tmp_path / "p"))  # same seed, same weights, no transpose
    loaded = load_nnunet(root)
    h = loaded.hints
    # plans hold (transposed) spacing (3.0, 1.5, 1.25) and patch (16, 32, 48): axis i is original axis t[i]
    assert h["target_spacing"] == [1.5, 1.25, 3.0] and h["patch_size"] == [32, 48, 16]
    x = torch.randn(1, 1, 32, 48, 16)
    with torch.no_grad():
        want = plain.module(x.permute(0, 1, 4, 2, 3)).permute(0, 1, 3, 4, 2)
        assert torch.allclose(loaded.module(x), want, atol=1e-5)


def test_nnunet_refusals(tmp_path: Path) -> None:
    pytest.importorskip("dynamic_network_architectures")
    root = write_nnunet_folder(tmp_path / "m")
    with pytest.raises(LoaderError, match=r"no checkpoint_final.pth in fold_3 \(folds here: fold_0\)"):
        load_nnunet(root, fold=3)
    with pytest.raises(LoaderError, match="no configuration '2d_x'"):
        load_nnunet(root, configuration="2d_x")
    assert load_nnunet(root, configuration="3d_lowres_like").hints["target_spacing"] == [6.0, 3.0, 2.5]
    regions = dict(NNUNET_DATASET, labels={"background": 0, "whole": [1, 2], "core": 2},
                   regions_class_order=[1, 2])
    (root / "dataset.json").write_text(json.dumps(regions))
    with pytest.raises(LoaderError, match="region-based"):
        load_nnunet(root)
    (root / "dataset.json").write_text(json.dumps(NNUNET_DATASET))
    plans = nnunet_plans()
    plans["configurations"]["3d_fullres"]["normalization_schemes"] = ["RescaleTo01Normalization"]
    (root / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(LoaderError, match="RescaleTo01Normalization"):
        load_nnunet(root)
    with pytest.raises(LoaderError, match="not an nnU-Net v2 trained-model folder"):
        load_nnunet(tmp_path)


def test_nnunet_folder_written_by_nnunetv2_itself(tmp_path: Path) -> None:
    pytest.importorskip("nnunetv2", reason="nnunetv2 is not installed (scripts/bootstrap --dev installs it, --no-deps)")
    root = write_nnunet_folder_with_nnunetv2(tmp_path)  # planned, preprocessed, checkpointed by nnunetv2 (~10 s)
    plans = json.loads((root / "plans.json").read_text())
    dataset = json.loads((root / "dataset.json").read_text())
    preprocessed = tmp_path / "nnUNet_preprocessed" / plans["dataset_name"]
    fingerprint = json.loads((preprocessed / "dataset_fingerprint.json").read_text())
    config = plans["configurations"]["3d_fullres"]
    loaded = load_nnunet(root)  # tensors-only: nnU-Net's own checkpoint needs no --allow-pickle
    h = loaded.hints
    assert (loaded.input_channels, loaded.num_classes) == (1, 3)
    assert type(loaded.module).__name__ == "AxisAdapter" and not loaded.module.training
    # the planner put the coarse x axis first; plans.json holds spacing and patch in that (transposed) order, the
    # hints in the runtime's (z, y, x): axis j is plans axis transpose_backward[j]
    assert plans["transpose_forward"] == h["source"]["transpose_forward"] == [2, 0, 1]
    back = plans["transpose_backward"]
    assert h["target_spacing"] == [config["spacing"][i] for i in back]
    assert np.allclose(h["target_spacing"], NNUNETV2_SPACING)  # float32 in NIfTI: 0.8999999761581421
    assert h["patch_size"] == [config["patch_size"][i] for i in back]
    # CTNormalization with the foreground intensity statistics of the fingerprint, copied into plans.json
    assert config["normalization_schemes"] == ["CTNormalization"]
    props = plans["foreground_intensity_properties_per_channel"]["0"]
    assert props == fingerprint["foreground_intensity_properties_per_channel"]["0"]
    assert h["normalization"] == {"kind": "ct_window", "lower": props["percentile_00_5"],
                                  "upper": props["percentile_99_5"], "mean": props["mean"], "std": props["std"]}
    assert h["label_names"] == {v: k for k, v in dataset["labels"].items() if v > 0} == {1: "liver", 2: "spleen"}
    assert (h["modalities"], h["name"]) == (["CT"], plans["dataset_name"])
    # numerical parity with the network nnunetv2's nnUNetPredictor builds from the folder (input and logits in
    # nnU-Net's transposed axis order; the loaded module takes and gives the runtime's)
    ref = torch.load(tmp_path / NNUNETV2_REFERENCE)
    to_runtime = [0, 1, *(2 + i for i in back)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the reference was computed (OMP_NUM_THREADS=1): the same reduction order
    try:
        with torch.no_grad():
            got = loaded.module(ref["input"].permute(to_runtime))
    finally:
        torch.set_num_threads(threads)
    want = ref["logits"].permute(to_runtime)
    assert got.shape == want.shape == (1, 3, *h["patch_size"])
    assert want.abs().max() > 0.1  # not a degenerate comparison
    torch.testing.assert_close(got, want, rtol=0.0, atol=1e-5)


def test_nnunet_checkpoint_with_arbitrary_objects_needs_allow_pickle(tmp_path: Path) -> None:
    pytest.importorskip("dynamic_network_architectures")
    root = write_nnunet_folder(tmp_path / "m")
    path = root / "fold_0" / "checkpoint_final.pth"
    ckpt = torch.load(path, weights_only=False)
    ckpt["trainer_object"] = np.random.default_rng(0)  # not data: a pickled class instance
    torch.save(ckpt, path)
    with pytest.raises(LoaderError, match="--allow-pickle"):
        load_nnunet(root)
    assert load_nnunet(root, allow_pickle=True).num_classes == 3
