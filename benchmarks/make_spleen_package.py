"""Build a model package with the MONAI spleen UNet (random, seeded weights) for latency benchmarks.

The network is exactly the one the issue's targets are stated for::

    monai.networks.nets.UNet(spatial_dims=3, in_channels=1, out_channels=2,
                             channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2)

(MONAI's defaults: instance norm, PReLU, dropout 0; ``--norm batch`` gives the spleen bundle's own
``norm="batch"``). It is exported through the project's own path (``export.onnx.export_onnx`` then
``export.package.write_package``) with a manifest that mirrors the MONAI ``spleen_ct_segmentation`` bundle:

* ``Spacingd(pixdim=(1.5, 1.5, 2.0))`` in (x, y, z) -> our ``target_spacing`` (z, y, x) = [2.0, 1.5, 1.5];
* ``ScaleIntensityRanged(a_min=-57, a_max=164, b_min=0, b_max=1, clip=True)`` -> ``ct_window``
  lower -57, upper 164, mean -57, std 221;
* ``SlidingWindowInferer(roi_size=(96, 96, 96), sw_batch_size=4, overlap=0.5)`` (constant blending) ->
  patch [96, 96, 96], overlap 0.5, batch 4, blending "constant";
* one label, Spleen (SCT 78961009), category Organ (SCT 91772007).

Beside the package it writes, for the anchors:

* ``model.ts``: the same module (same weights) as TorchScript with the bundle's ``metadata.json`` and
  ``inference.json`` as extra files, the layout MONAI Deploy's ``MonaiBundleInferenceOperator`` reads;
* ``weights.pt``: the state dict (PyTorch eager anchor).

Usage::

    python -m benchmarks.make_spleen_package [--out benchmarks/results/spleen-unet] [--seed 0] [--norm instance]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "spleen-unet"
SPLEEN_LABEL = {
    "value": 1,
    "name": "Spleen",
    "category": {"value": "91772007", "scheme": "SCT", "meaning": "Organ"},
    "type": {"value": "78961009", "scheme": "SCT", "meaning": "Spleen"},
    "color": [157, 108, 162],
}
#: ``monai.networks.nets.UNet`` arguments of the spleen bundle's network (all but ``norm``)
UNET_ARGS = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 2,
    "channels": [16, 32, 64, 128, 256],
    "strides": [2, 2, 2, 2],
    "num_res_units": 2,
}


def build_unet(norm: str = "instance", seed: int = 0):
    """The MONAI spleen UNet with seeded random weights, in eval mode."""
    import torch
    from monai.networks.nets import UNet

    torch.manual_seed(seed)
    kwargs = {} if norm == "instance" else {"norm": norm}
    net = UNet(**UNET_ARGS, **kwargs)
    if norm == "batch":  # random running statistics, so the folded BN is not an identity
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, torch.nn.BatchNorm3d):
                    m.running_mean.uniform_(-0.1, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def spleen_manifest(description: str, batch_size: int) -> dict:
    """The manifest fields that mirror the spleen bundle: input, CT window, spacing, sliding window, label."""
    return {
        "name": "spleen-unet-random",
        "version": "0.1.0",
        "description": description,
        "model": {"input": "image", "output": "logits", "input_channels": 1, "activation": "softmax"},
        "series_filter": {"modalities": ["CT"]},
        "preprocessing": {
            "target_spacing": [2.0, 1.5, 1.5],
            "normalization": {"kind": "ct_window", "lower": -57, "upper": 164, "mean": -57, "std": 221},
        },
        "inference": {"patch_size": [96, 96, 96], "overlap": 0.5, "blending": "constant", "batch_size": batch_size},
        "labels": [SPLEEN_LABEL],
    }


def manifest(norm: str) -> dict:
    description = (
        "Benchmark model: the MONAI spleen_ct_segmentation UNet architecture (16-32-64-128-256, 2 residual "
        f"units, {norm} norm) with seeded random weights. Latency only: it does not segment the spleen."
    )
    return {
        **spleen_manifest(description, batch_size=4),
        "algorithm": {"name": "spleen-unet-random", "version": "0.1.0", "family": "artificial-intelligence"},
        "source": {"kind": "module", "factory": "monai.networks.nets.UNet", "args": {**UNET_ARGS, "norm": norm}},
    }


def patch_tensor(kind: str, channels: dict[str, str]) -> dict:
    """A 96^3 float32 patch tensor in the bundle's ``network_data_format`` (``kind``: hounsfield, segmentation)."""
    return {
        "type": "image",
        "format": kind,
        "num_channels": len(channels),
        "spatial_shape": [96, 96, 96],
        "dtype": "float32",
        "value_range": [0, 1],
        "is_patch_data": True,
        "channel_def": channels,
    }


def bundle_configs(norm: str) -> dict[str, dict]:
    """The parts of the spleen bundle's configs that MONAI Deploy's bundle operator uses (model-zoo
    ``models/spleen_ct_segmentation/configs``; LoadImaged/SaveImaged are filtered out by the SDK anyway)."""
    metadata = {
        "version": "0.5.9-bench",
        "monai_version": "1.6.1",
        "task": "Decathlon spleen segmentation (random weights, latency benchmark)",
        "description": "spleen UNet architecture with random weights",
        "network_data_format": {
            "inputs": {"image": {**patch_tensor("hounsfield", {"0": "image"}), "modality": "CT"}},
            "outputs": {"pred": patch_tensor("segmentation", {"0": "background", "1": "spleen"})},
        },
    }
    inference = {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "device": "$torch.device('cpu')",
        "network_def": {"_target_": "UNet", **UNET_ARGS, "norm": norm},
        "network": "$@network_def.to(@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image"},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
                {"_target_": "Spacingd", "keys": "image", "pixdim": [1.5, 1.5, 2.0], "mode": "bilinear"},
                {
                    "_target_": "ScaleIntensityRanged",
                    "keys": "image",
                    "a_min": -57,
                    "a_max": 164,
                    "b_min": 0,
                    "b_max": 1,
                    "clip": True,
                },
                {"_target_": "EnsureTyped", "keys": "image"},
            ],
        },
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [96, 96, 96], "sw_batch_size": 4, "overlap": 0.5},
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                {
                    "_target_": "Invertd",
                    "keys": "pred",
                    "transform": "@preprocessing",
                    "orig_keys": "image",
                    "nearest_interp": False,
                    "to_tensor": True,
                },
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
                {
                    "_target_": "SaveImaged",
                    "keys": "pred",
                    "output_dir": "@output_dir",
                    "output_ext": ".nii.gz",
                    "output_postfix": "trans",
                    "separate_folder": True,
                },
            ],
        },
    }
    return {"metadata.json": metadata, "inference.json": inference}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--norm",
        choices=("instance", "batch"),
        default="instance",
        help="instance: MONAI's UNet default (the issue's shape); batch: the spleen bundle's",
    )
    args = ap.parse_args(argv)

    import torch

    from export.onnx import export_onnx
    from export.package import add_file, write_package
    from export.parity import check_parity

    net = build_unet(args.norm, args.seed)
    params = sum(p.numel() for p in net.parameters())
    out: Path = args.out
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(net, Path(tmp) / "model.onnx", example_shape=(1, 1, 96, 96, 96))
        package = write_package(out, onnx_path, manifest(args.norm))
    rng = np.random.default_rng(args.seed)
    report = check_parity(
        net, str(package.model_path), {"random": rng.uniform(0, 1, (1, 1, 96, 96, 96)).astype(np.float32)}
    )
    (out / "parity.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    add_file(out, out / "parity.json")
    print(report.table())

    # the same weights for the anchors: state dict (eager) and TorchScript bundle (MONAI Deploy)
    torch.save(net.state_dict(), out / "weights.pt")
    scripted = torch.jit.script(net)
    extra = {name: json.dumps(cfg, indent=2) for name, cfg in bundle_configs(args.norm).items()}
    torch.jit.save(scripted, str(out / "model.ts"), _extra_files=extra)
    (out / "unet.json").write_text(
        json.dumps({"norm": args.norm, "seed": args.seed, "parameters": params}, indent=2) + "\n", encoding="utf-8"
    )
    print(
        f"wrote {out} ({package.identity}, {params:,} parameters, norm={args.norm}, seed={args.seed}); "
        f"model.ts and weights.pt beside it"
    )
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
