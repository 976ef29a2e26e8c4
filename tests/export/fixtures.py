"""Tiny torch modules for the export tests, importable by dotted path (``tests.export.fixtures:TinySegNet``).

``TinySegNet`` is a hand-set convolutional segmenter, not a random network: its first convolution computes
smoothed-intensity ramps (``k * (s - threshold)``) and its head turns them into lung-like (-950..-400 HU) and
bone-like (> 250 HU) logits for CT normalised as HU / 1024. Its outputs are therefore far from ties, so argmax
masks and Dice are meaningful after ONNX export and INT8 quantisation, while a seeded perturbation of every
weight keeps per-channel quantisation from being trivial. A max-pool / upsample branch makes it a (shallow)
encoder-decoder whose spatial sizes must be even, as real U-Nets require.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HU_SCALE = 1024.0

#: (threshold in HU, sign): feature = sign * k * (smoothed - threshold / 1024)
_RAMPS = ((-400.0, -1.0), (-950.0, -1.0), (250.0, 1.0), (-200.0, 1.0))


class TinySegNet(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 3, hidden: int = 8, seed: int = 0,
                 sharpness: float = 12.0):
        super().__init__()
        if num_classes < 2:
            raise ValueError("num_classes counts the background: at least 2")
        if hidden < len(_RAMPS):
            raise ValueError(f"hidden must be >= {len(_RAMPS)}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.conv1 = nn.Conv3d(in_channels, hidden, 3, padding=1)
        self.down = nn.Conv3d(hidden, hidden, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose3d(hidden, hidden, 2, stride=2)
        self.head = nn.Conv3d(2 * hidden, num_classes, 1)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
            box = torch.full((3, 3, 3), 1.0 / 27.0)
            for i, (hu, sign) in enumerate(_RAMPS):
                self.conv1.weight[i] = 0.0
                self.conv1.weight[i, :] = sign * sharpness * box / in_channels
                self.conv1.bias[i] = -sign * sharpness * hu / HU_SCALE
            # head: background 0; class 1 "lung" = ramp0 - 20 * ramp1 - 1 (not air); class 2 "bone" = ramp2 - 1
            self.head.weight[:, :4] = 0.0
            self.head.bias[:] = 0.0
            self.head.weight[1, 0] = 1.0
            self.head.weight[1, 1] = -20.0
            self.head.bias[1] = -1.0
            if num_classes > 2:
                self.head.weight[2, 2] = 1.0
                self.head.bias[2] = -1.0
            for k in range(3, num_classes):  # extra classes: soft tissue-ish, pushed down so they seldom win
                self.head.weight[k, 3] = 0.5
                self.head.bias[k] = -4.0 - k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x))
        low = F.leaky_relu(self.down(h), 0.01)
        return self.head(torch.cat([h, self.up(low)], dim=1))


def make_tiny(num_classes: int = 3, seed: int = 0) -> TinySegNet:
    """A factory function (``tests.export.fixtures:make_tiny``) as the ``--factory`` source takes them."""
    return TinySegNet(num_classes=num_classes, seed=seed)


class NotAModule:
    """A callable that returns something else than a module, for the loader's error path."""

    def __call__(self) -> object:
        return object()


TINY_LABELS = [
    {"value": 1, "name": "Lung", "category": {"value": "91772007", "scheme": "SCT", "meaning": "Organ"},
     "type": {"value": "39607008", "scheme": "SCT", "meaning": "Lung"}, "color": [197, 165, 145]},
    {"value": 2, "name": "Bone", "category": {"value": "85756007", "scheme": "SCT", "meaning": "Tissue"},
     "type": {"value": "272673000", "scheme": "SCT", "meaning": "Bone"}, "color": [241, 214, 145]},
]
#: manifest of a TinySegNet package: CT as HU / 1024, patch 16 x 32 x 32 at 5 x 6 x 6 mm
TINY_MANIFEST = {
    "name": "tiny-seg",
    "version": "0.0.1",
    "model": {"input": "image", "output": "logits", "input_channels": 1, "activation": "softmax"},
    "series_filter": {"modalities": ["CT"]},
    "preprocessing": {
        "target_spacing": [5.0, 6.0, 6.0],
        "normalization": {"kind": "ct_window", "lower": -1024, "upper": 1024, "mean": 0, "std": 1024},
    },
    "inference": {"patch_size": [16, 32, 32], "overlap": 0.5, "blending": "gaussian", "batch_size": 2},
    "labels": TINY_LABELS,
}


# ---------------------------------------------------------------------------------------------------
# model folders in the layouts of other tools, written here (no downloads, no nnunetv2 / MONAI needed)
# ---------------------------------------------------------------------------------------------------

#: nnU-Net v2 (>= 2.3) plans for a small 3D U-Net, as nnUNetPlannerResEncM / ExperimentPlanner write them
NNUNET_ARCH = {
    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "arch_kwargs": {
        "n_stages": 3,
        "features_per_stage": [4, 8, 16],
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]],
        "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]],
        "n_conv_per_stage": [2, 2, 2],
        "n_conv_per_stage_decoder": [2, 2],
        "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    },
    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
}


def nnunet_plans(transpose: tuple[int, int, int] = (0, 1, 2), spacing=(3.0, 1.5, 1.25),
                 patch=(16, 32, 48)) -> dict:
    """plans.json content; ``spacing`` and ``patch`` are in the transposed order, as nnU-Net stores them."""
    backward = [transpose.index(i) for i in range(3)]
    return {
        "dataset_name": "Dataset999_Tiny",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": list(spacing),
        "original_median_shape_after_transp": [40, 128, 128],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": list(transpose),
        "transpose_backward": backward,
        "configurations": {
            "2d": {"data_identifier": "nnUNetPlans_2d", "patch_size": [128, 128], "spacing": [1.5, 1.25]},
            "3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": list(patch),
                "median_image_size_in_voxels": [40.0, 128.0, 128.0],
                "spacing": list(spacing),
                "normalization_schemes": ["CTNormalization"],
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
                "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {
                    "is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None
                },
                "architecture": NNUNET_ARCH,
                "batch_dice": False,
            },
            "3d_lowres_like": {"inherits_from": "3d_fullres", "spacing": [6.0, 3.0, 2.5]},
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {
                "max": 3071.0, "mean": 93.5, "median": 97.0, "min": -1024.0,
                "percentile_00_5": -958.0, "percentile_99_5": 1251.0, "std": 137.25,
            }
        },
    }


NNUNET_DATASET = {
    "channel_names": {"0": "CT"},
    "labels": {"background": 0, "liver": 1, "spleen": 2},
    "numTraining": 3,
    "file_ending": ".nii.gz",
}


def write_nnunet_folder(root, *, transpose=(0, 1, 2), seed: int = 0, folds=(0,)):  # noqa: ANN001, ANN201
    """A trained-model folder in nnU-Net v2's layout (``Dataset999_Tiny/nnUNetTrainer__nnUNetPlans__3d_fullres``)
    with an untrained network built, initialised and checkpointed as nnU-Net's trainer does (deep supervision
    on while training; ``network_weights`` + ``init_args`` + training log with numpy scalars)."""
    import json
    from pathlib import Path

    import numpy as np
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from dynamic_network_architectures.initialization.weight_init import InitWeights_He

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    plans = nnunet_plans(transpose)
    (root / "plans.json").write_text(json.dumps(plans, indent=4))
    (root / "dataset.json").write_text(json.dumps(NNUNET_DATASET, indent=4))
    kw = dict(NNUNET_ARCH["arch_kwargs"])
    kw.update(conv_op=nn.Conv3d, norm_op=nn.InstanceNorm3d, nonlin=nn.LeakyReLU)
    for fold in folds:
        torch.manual_seed(seed + int(fold) if str(fold).isdigit() else seed)
        net = PlainConvUNet(input_channels=1, num_classes=3, deep_supervision=True, **kw)
        net.apply(InitWeights_He(1e-2))
        with torch.no_grad():  # instance-norm affine parameters away from 1/0, so loading them is visible
            for m in net.modules():
                if isinstance(m, nn.InstanceNorm3d):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
        optimizer = torch.optim.SGD(net.parameters(), 0.01, weight_decay=3e-5, momentum=0.99, nesterov=True)
        checkpoint = {
            "network_weights": net.state_dict(),
            "optimizer_state": optimizer.state_dict(),
            "grad_scaler_state": None,
            "logging": {"train_losses": [np.float64(0.5)], "ema_fg_dice": [np.float64(0.1)], "lrs": [0.01]},
            "_best_ema": np.float64(0.1),
            "current_epoch": 1,
            "init_args": {
                "plans": plans, "configuration": "3d_fullres", "fold": fold, "dataset_json": NNUNET_DATASET,
                "device": torch.device("cpu"),
            },
            "trainer_name": "nnUNetTrainer",
            "inference_allowed_mirroring_axes": (0, 1, 2),
        }
        fold_dir = root / f"fold_{fold}"
        fold_dir.mkdir(exist_ok=True)
        torch.save(checkpoint, fold_dir / "checkpoint_final.pth")
    return root


# ---------------------------------------------------------------------------------------------------
# an nnU-Net v2 trained-model folder written by nnunetv2 itself (``pip install --no-deps nnunetv2`` + light deps,
# see scripts/bootstrap): planned from a tiny raw dataset, with an untrained network saved by nnU-Net's trainer
# ---------------------------------------------------------------------------------------------------

#: raw dataset for nnunetv2: Dataset987_TinyCT, three cases of (z, y, x) voxels at (z, y, x) spacing in mm. The
#: sizes and spacings differ per axis, so a mixed-up axis shows, and x is the coarse axis (more than 3x the
#: others): nnU-Net's planner moves it first (``transpose_forward`` [2, 0, 1]) and plans 1x3x3 kernels for it
NNUNETV2_DATASET_ID = 987
NNUNETV2_SHAPE = (28, 32, 12)
NNUNETV2_SPACING = (0.9, 0.8, 3.0)
#: written by :func:`write_nnunet_folder_with_nnunetv2` beside the folders: ``{"input", "logits"}``, a random
#: input in nnU-Net's (transposed) axis order and the logits of the network nnunetv2's own ``nnUNetPredictor``
#: builds from the trained-model folder
NNUNETV2_REFERENCE = "nnunetv2_reference.pt"


def write_nnunet_folder_with_nnunetv2(tmp_path) -> Path:  # noqa: ANN001
    """Have nnunetv2's own code write a trained-model folder, in a subprocess (nnunetv2 reads ``nnUNet_raw``,
    ``nnUNet_preprocessed`` and ``nnUNet_results`` from the environment; the subprocess also keeps its global
    settings and warnings out of the test process): fingerprint extraction, ``ExperimentPlanner`` planning and
    3d_fullres preprocessing of a tiny raw dataset, then ``nnUNetTrainer`` (3d_fullres, fold 0, CPU) initialised
    and checkpointed by its own ``save_checkpoint``, untrained, beside the plans.json / dataset.json the trainer
    copies there when training starts. Returns that folder,
    ``tmp_path/nnUNet_results/Dataset987_TinyCT/nnUNetTrainer__nnUNetPlans__3d_fullres``; ``tmp_path`` also holds
    :data:`NNUNETV2_REFERENCE`, the logits of the network nnunetv2's predictor builds from it, and nnU-Net's raw
    and preprocessed folders (``dataset_fingerprint.json``). Takes about 10 s, most of it importing nnunetv2."""
    import os
    import subprocess
    import sys

    tmp_path = Path(tmp_path)
    env = dict(os.environ)
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[var] = str(tmp_path / var)
    # one process / thread wherever nnU-Net would size its pools by the machine; no torch.compile, no wandb
    env.update(nnUNet_def_n_proc="1", nnUNet_n_proc_DA="1", nnUNet_compile="0", OMP_NUM_THREADS="1")
    env.pop("nnUNet_wandb_enabled", None)
    code = "import sys; from tests.export.fixtures import _nnunetv2_main; _nnunetv2_main(sys.argv[1])"
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"nnunetv2 failed ({proc.returncode}; its dependencies: scripts/bootstrap --dev):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    name = f"Dataset{NNUNETV2_DATASET_ID:03d}_TinyCT"
    return tmp_path / "nnUNet_results" / name / "nnUNetTrainer__nnUNetPlans__3d_fullres"


def _nnunetv2_raw_case(rng, shape):  # noqa: ANN001, ANN202
    """A CT-like case: a soft-tissue body in air, a 'liver' and a 'spleen' ellipsoid at random places."""
    import numpy as np

    z, y, x = np.meshgrid(*(np.linspace(-1.0, 1.0, n) for n in shape), indexing="ij")
    hu = np.where((y / 0.9) ** 2 + (x / 0.85) ** 2 < 1.0, 30.0, -1000.0)
    labels = np.zeros(shape, np.uint8)
    for value, centre_x, mean in ((1, -0.35, 60.0), (2, 0.4, 45.0)):
        c = rng.uniform(-0.15, 0.15, 3) + (0.0, 0.0, centre_x)
        r = rng.uniform(0.3, 0.45, 3)
        inside = ((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2 < 1.0
        labels[inside] = value
        hu[inside] = mean
    hu = hu + rng.normal(0.0, 20.0, shape)
    return hu.astype(np.float32), labels


def _nnunetv2_main(work: str) -> None:
    """Subprocess side of :func:`write_nnunet_folder_with_nnunetv2` (the nnU-Net environment is set)."""
    import json
    import os

    import numpy as np
    import SimpleITK as sitk
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprint_dataset,
        plan_experiments,
        preprocess,
    )
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.run.run_training import get_trainer_from_args

    name = f"Dataset{NNUNETV2_DATASET_ID:03d}_TinyCT"
    raw = Path(os.environ["nnUNet_raw"]) / name
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    for i in range(NNUNET_DATASET["numTraining"]):
        hu, labels = _nnunetv2_raw_case(rng, NNUNETV2_SHAPE)
        for array, path in ((hu, raw / "imagesTr" / f"tiny_{i:03d}_0000.nii.gz"),
                            (labels, raw / "labelsTr" / f"tiny_{i:03d}.nii.gz")):
            image = sitk.GetImageFromArray(array)
            image.SetSpacing(tuple(reversed(NNUNETV2_SPACING)))  # SimpleITK: (x, y, z)
            sitk.WriteImage(image, str(path))
    (raw / "dataset.json").write_text(json.dumps(NNUNET_DATASET, indent=4))

    class SmallSampleFingerprintExtractor(DatasetFingerprintExtractor):
        """nnU-Net's extractor, sampling 1e5 foreground voxels for the intensity statistics instead of 1e8 (drawn
        with replacement, so 1e8 float32 values, 400 MB passed between processes and copied, whatever the dataset's
        size: 7 s of a 9 s fingerprint extraction here). The statistics land in plans.json as usual."""

        def __init__(self, *args, **kwargs):  # noqa: ANN002, ANN003
            super().__init__(*args, **kwargs)
            self.num_foreground_voxels_for_intensitystats = 1e5

    extract_fingerprint_dataset(NNUNETV2_DATASET_ID, SmallSampleFingerprintExtractor, num_processes=1,
                                verbose=False, show_progress_bar=False)
    plans_identifier = plan_experiments([NNUNETV2_DATASET_ID])  # nnU-Net's default ExperimentPlanner
    preprocess([NNUNETV2_DATASET_ID], plans_identifier, configurations=("3d_fullres",), num_processes=(1,),
               verbose=False, show_progress_bar=False)  # the trainer's initialize() wants the preprocessed data

    # what nnUNetv2_train does up to the first epoch, without data loading and training
    trainer = get_trainer_from_args(str(NNUNETV2_DATASET_ID), "3d_fullres", 0, "nnUNetTrainer", plans_identifier,
                                    device=torch.device("cpu"))
    trainer.initialize()
    # as nnUNetTrainer.on_train_start: plans and dataset.json go beside the folds for inference
    from batchgenerators.utilities.file_and_folder_operations import save_json

    save_json(trainer.plans_manager.plans, os.path.join(trainer.output_folder_base, "plans.json"), sort_keys=False)
    save_json(trainer.dataset_json, os.path.join(trainer.output_folder_base, "dataset.json"), sort_keys=False)
    trainer.save_checkpoint(os.path.join(trainer.output_folder, "checkpoint_final.pth"))

    # the network nnunetv2 builds for inference from that folder, on a random input of the planned patch size
    predictor = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(trainer.output_folder_base, use_folds=(0,),
                                                   checkpoint_name="checkpoint_final.pth")
    network = predictor.network
    network.load_state_dict(predictor.list_of_parameters[0])
    network.eval()
    patch = predictor.configuration_manager.patch_size
    x = torch.randn((1, 1, *patch), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = network(x)
    torch.save({"input": x, "logits": logits}, Path(work) / NNUNETV2_REFERENCE)


class XYZProbe(nn.Module):
    """A network whose logits depend on the axis order and direction of its input: class 1 wins where the
    (network's) first spatial index is in its lower half, so feeding it the wrong axes shows."""

    def __init__(self, in_channels: int = 1, out_channels: int = 2):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[2]
        ramp = torch.arange(n, dtype=x.dtype, device=x.device).reshape(1, 1, n, 1, 1) - (n - 1) / 2
        fg = -self.scale * ramp + 0.0 * x
        bg = torch.zeros_like(fg)
        return torch.cat([bg, fg], dim=1)


def write_monai_bundle(root, *, target: str = "tests.export.fixtures.TinySegNet", axcodes: str | None = "RAS",  # noqa: ANN001, ANN201
                       network_args: dict | None = None, weights: nn.Module | None = None, yaml: bool = False):
    """A MONAI bundle folder (``configs/inference.json``, ``configs/metadata.json``, ``models/model.pt``) in the
    layout of MONAI's model zoo (modelled on spleen_ct_segmentation), with ``_target_`` pointing at ``target``."""
    import json
    from pathlib import Path

    root = Path(root)
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(exist_ok=True)
    args = network_args if network_args is not None else {"in_channels": 1, "num_classes": 3}
    preprocessing = [
        {"_target_": "LoadImaged", "keys": "image"},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Spacingd", "keys": "image", "pixdim": "@pixdim", "mode": "bilinear"},
        {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -1024, "a_max": 1024,
         "b_min": -1.0, "b_max": 1.0, "clip": True},
        {"_target_": "EnsureTyped", "keys": "image"},
    ]
    if axcodes:
        preprocessing.insert(2, {"_target_": "Orientationd", "keys": "image", "axcodes": axcodes})
    config = {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "pixdim": [1.5, 1.25, 4.0],
        "network_def": {"_target_": target, **args},
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [48, 32, 16], "sw_batch_size": 3,
                    "overlap": 0.25},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
        ]},
    }
    metadata = {
        "version": "0.4.2",
        "name": "Tiny CT bundle",
        "description": "A test bundle",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "hounsfield", "modality": "CT", "num_channels": 1,
                                 "spatial_shape": [48, 32, 16]}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": 3,
                                 "channel_def": {"0": "background", "1": "lung", "2": "bone"}}},
        },
    }
    if yaml:
        import yaml as pyyaml

        (root / "configs" / "inference.yaml").write_text(pyyaml.safe_dump(config))
    else:
        (root / "configs" / "inference.json").write_text(json.dumps(config, indent=4))
    (root / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=4))
    net = weights if weights is not None else TinySegNet(**args)
    torch.save(net.state_dict(), root / "models" / "model.pt")
    return root
