"""Source (d): an nnU-Net v2 trained-model folder (``plans.json``, ``dataset.json``,
``fold_X/checkpoint_final.pth``), the network rebuilt with ``dynamic_network_architectures``, the package nnU-Net
builds its networks with (``nnunetv2`` itself is not needed)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from export.loaders.axes import adapt, to_runtime_order
from export.loaders.base import LoadedModel, LoaderError, import_object, load_weights, parse_json, ready_module

#: nnU-Net normalisation schemes the runtime reproduces
_NNUNET_NORMS = ("CTNormalization", "ZScoreNormalization", "NoNormalization")


def load_nnunet(
    root: Path | str,
    *,
    fold: int | str = 0,
    configuration: str = "3d_fullres",
    checkpoint: str = "checkpoint_final.pth",
    allow_pickle: bool = False,
) -> LoadedModel:
    """Rebuild the network of an nnU-Net v2 trained-model folder from its plans and load one fold's weights.

    Needs ``dynamic_network_architectures`` (the package nnU-Net builds its networks with); ``nnunetv2`` itself
    is not needed. Checkpoints are read with ``weights_only`` (tensors, plain data, ``torch.device`` and the
    numpy scalars of nnU-Net's training log); pass ``allow_pickle`` for a trusted checkpoint holding other
    objects.
    """
    from edge_runtime.extras import MissingDependencyError, require

    root = Path(root)
    plans_path, dataset_path = root / "plans.json", root / "dataset.json"
    for p in (plans_path, dataset_path):
        if not p.is_file():
            raise LoaderError(f"{root} has no {p.name}: not an nnU-Net v2 trained-model folder")
    plans = parse_json(plans_path.read_text(encoding="utf-8"), "plans.json")
    dataset = parse_json(dataset_path.read_text(encoding="utf-8"), "dataset.json")
    config = _nnunet_configuration(plans, configuration)
    fold_dir = root / f"fold_{fold}"
    ckpt_path = fold_dir / checkpoint
    if not ckpt_path.is_file():
        folds = sorted(p.name for p in root.glob("fold_*"))
        raise LoaderError(f"no {checkpoint} in {fold_dir.name} (folds here: {', '.join(folds) or 'none'})")

    labels = dataset.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise LoaderError("dataset.json has no 'labels'")
    if any(isinstance(v, (list, tuple)) for v in labels.values()) or "regions_class_order" in dataset:
        raise LoaderError(
            "dataset.json defines region-based labels (sigmoid outputs); the generic pipeline takes softmax label "
            "maps only: package it with --folds (nnU-Net's own pipeline, which paints regions as nnU-Net does)"
        )
    names = {int(v): str(k) for k, v in labels.items()}
    num_classes = len(names)
    if sorted(names) != list(range(num_classes)):
        raise LoaderError(f"dataset.json label values must be 0..{num_classes - 1}, got {sorted(names)}")
    channel_names = dataset.get("channel_names", dataset.get("modality", {}))
    input_channels = len(channel_names)
    if input_channels < 1:
        raise LoaderError("dataset.json has no 'channel_names'")

    try:
        require(
            "dynamic_network_architectures", feature="loading nnU-Net models", package="dynamic_network_architectures"
        )
    except MissingDependencyError as exc:
        raise LoaderError(str(exc)) from exc
    network = _nnunet_network(config, input_channels, num_classes)

    state = _nnunet_checkpoint(ckpt_path, allow_pickle)
    load_weights(network, state, f"{fold_dir.name}/{checkpoint}")
    network = ready_module(network, "the nnU-Net network")

    transpose = [int(v) for v in plans.get("transpose_forward", [0, 1, 2])]
    if sorted(transpose) != [0, 1, 2]:
        raise LoaderError(f"plans.json transpose_forward {transpose} is not a permutation of (0, 1, 2)")
    module: nn.Module = network
    if transpose != [0, 1, 2]:
        # nnU-Net trains on data.transpose(transpose_forward); the adapter does the same per window
        module = adapt(network, transpose, [False, False, False])

    hints: dict[str, Any] = {
        "name": str(dataset.get("name") or plans.get("dataset_name") or root.name),
        "label_names": {v: n for v, n in names.items() if v > 0},
        "target_spacing": [float(v) for v in to_runtime_order(config["spacing"], transpose)],
        "patch_size": [int(v) for v in to_runtime_order(config["patch_size"], transpose)],
        "overlap": 0.5,  # nnU-Net's default tile step size 0.5
        "blending": "gaussian",
        "source": {
            "kind": "nnunet-v2",
            "folder": root.name,
            "configuration": configuration,
            "fold": str(fold),
            "checkpoint": checkpoint,
            "plans": plans.get("plans_name"),
            "transpose_forward": transpose,
        },
        "notes": [],
    }
    _nnunet_normalization(plans, config, channel_names, hints)
    notes = hints["notes"]
    if plans.get("image_reader_writer") not in (None, "SimpleITKIO"):
        notes.append(
            f"trained with image reader {plans['image_reader_writer']}: check that its voxel order matches the "
            "DICOM (slice, row, column) order the runtime uses"
        )
    notes.append("the network only, on the runtime's generic pipeline (one fold, no test-time mirroring); "
                 "--folds gives nnU-Net's whole predictor pipeline instead")
    return LoadedModel(module, input_channels, num_classes, hints)


def _nnunet_configuration(plans: dict[str, Any], name: str, *, allow_2d: bool = False,
                          allow_cascade: bool = False) -> dict[str, Any]:
    """The configuration ``name`` with what it inherits; cascade stages are refused unless ``allow_cascade`` (they
    need the previous stage's segmentation: nnU-Net's pipeline packages both), 2D ones unless ``allow_2d``."""
    configs = plans.get("configurations", {})
    if name not in configs:
        raise LoaderError(f"plans.json has no configuration {name!r} (it has: {', '.join(sorted(configs))})")
    seen: list[str] = []
    config: dict[str, Any] = {}
    chain = name
    while chain is not None:
        if chain in seen:
            raise LoaderError(f"plans.json configurations inherit in a loop: {' -> '.join([*seen, chain])}")
        seen.append(chain)
        node = configs.get(chain)
        if node is None:
            raise LoaderError(f"configuration {seen[-2]!r} inherits from missing {chain!r}")
        config = {**node, **config}
        chain = node.get("inherits_from")
    if "previous_stage" in config and not allow_cascade:
        previous = config["previous_stage"]
        raise LoaderError(
            f"configuration {name!r} is a cascade stage: it takes the segmentation of {previous!r} as extra input "
            f"channels; package it with --folds (nnU-Net's pipeline, which runs {previous!r} first), or package "
            f"{previous!r} or 3d_fullres on its own"
        )
    for key in ("spacing", "patch_size"):
        if key not in config:
            raise LoaderError(f"plans.json configuration {name!r} has no {key!r}")
    if len(config["patch_size"]) != 3 and not (allow_2d and len(config["patch_size"]) == 2):
        raise LoaderError(f"configuration {name!r} is {len(config['patch_size'])}D; the runtime runs 3D models")
    return config


def _nnunet_network(config: dict[str, Any], input_channels: int, num_classes: int) -> nn.Module:
    arch = config.get("architecture")
    if isinstance(arch, dict):  # nnU-Net >= 2.3
        kwargs = dict(arch.get("arch_kwargs", {}))
        for key in arch.get("_kw_requires_import", []):
            if kwargs.get(key) is not None:
                kwargs[key] = import_object(str(kwargs[key]))
        cls = import_object(str(arch["network_class_name"]))
    elif "UNet_class_name" in config:  # nnU-Net 2.0 - 2.2
        from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

        classes = {"PlainConvUNet": PlainConvUNet, "ResidualEncoderUNet": ResidualEncoderUNet}
        if config["UNet_class_name"] not in classes:
            raise LoaderError(f"UNet_class_name {config['UNet_class_name']!r} is not one of {sorted(classes)}")
        cls = classes[config["UNet_class_name"]]
        stages = len(config["conv_kernel_sizes"])
        blocks = "n_blocks_per_stage" if cls is ResidualEncoderUNet else "n_conv_per_stage"
        kwargs = {
            "n_stages": stages,
            "features_per_stage": [
                min(config["UNet_base_num_features"] * 2**i, config["unet_max_num_features"]) for i in range(stages)
            ],
            "conv_op": nn.Conv3d,
            "kernel_sizes": config["conv_kernel_sizes"],
            "strides": config["pool_op_kernel_sizes"],
            blocks: config["n_conv_per_stage_encoder"],
            "n_conv_per_stage_decoder": config["n_conv_per_stage_decoder"],
            "conv_bias": True,
            "norm_op": nn.InstanceNorm3d,
            "norm_op_kwargs": {"eps": 1e-5, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": nn.LeakyReLU,
            "nonlin_kwargs": {"inplace": True},
        }
    else:
        raise LoaderError("plans.json configuration has neither 'architecture' nor 'UNet_class_name'")
    kwargs["deep_supervision"] = False  # nnU-Net's predictor builds the network without deep supervision
    try:
        return cls(input_channels=input_channels, num_classes=num_classes, **kwargs)
    except TypeError as exc:
        raise LoaderError(f"building {getattr(cls, '__name__', cls)} from plans.json failed: {exc}") from exc


def _numpy_safe_globals() -> list[Any]:
    """numpy scalars and arrays as nnU-Net's training log stores them: data, not code."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    kinds = (np.float64, np.float32, np.float16, np.int64, np.int32, np.bool_)
    return [
        core.multiarray.scalar,
        core.multiarray._reconstruct,
        np.ndarray,
        np.dtype,
        *(type(np.dtype(k)) for k in kinds),
    ]


def _nnunet_checkpoint(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    return _checkpoint_weights(_read_checkpoint(path, allow_pickle))


def _read_checkpoint(path: Path, allow_pickle: bool) -> dict[str, Any]:
    """The whole checkpoint (weights, ``inference_allowed_mirroring_axes``, ``init_args`` ...), tensors-only unless
    ``allow_pickle``."""
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as exc:  # UnpicklingError and friends
        raise LoaderError(
            f"cannot read {path.parent.name}/{path.name} tensors-only: {str(exc).splitlines()[0]}. If you trust "
            "the checkpoint, allow pickled objects (--allow-pickle)"
        ) from exc
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt:
        raise LoaderError(f"{path.name} has no 'network_weights': not an nnU-Net v2 checkpoint")
    return ckpt


def _checkpoint_weights(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The network weights, without the ``_orig_mod.`` prefix torch.compile leaves."""
    state = {}
    for name, tensor in ckpt["network_weights"].items():
        state[name[len("_orig_mod.") :] if name.startswith("_orig_mod.") else name] = tensor
    return state


def _nnunet_normalization(
    plans: dict[str, Any], config: dict[str, Any], channel_names: dict[str, Any], hints: dict[str, Any]
) -> None:
    schemes = config.get("normalization_schemes", [])
    if len(channel_names) > 1:
        if len(set(schemes)) > 1 or (schemes and schemes[0] == "CTNormalization"):
            raise LoaderError(
                f"{len(channel_names)} input channels with normalisation {schemes}: the manifest has one "
                "normalisation for all channels (per-channel CT windows are not supported)"
            )
    scheme = schemes[0] if schemes else "ZScoreNormalization"
    if scheme not in _NNUNET_NORMS:
        raise LoaderError(
            f"nnU-Net normalisation {scheme!r} is not reproduced by the runtime (supported: {', '.join(_NNUNET_NORMS)})"
        )
    modality = str(next(iter(channel_names.values()))).upper() if channel_names else ""
    hints["modalities"] = ["CT"] if scheme == "CTNormalization" or modality == "CT" else ["MR"]
    if scheme == "CTNormalization":
        props = plans.get("foreground_intensity_properties_per_channel", {}).get("0")
        if not isinstance(props, dict):
            raise LoaderError("plans.json has no foreground_intensity_properties_per_channel['0'] for CTNormalization")
        try:
            lower, upper = float(props["percentile_00_5"]), float(props["percentile_99_5"])
            mean, std = float(props["mean"]), max(float(props["std"]), 1e-8)
        except (KeyError, TypeError, ValueError) as exc:
            raise LoaderError(f"foreground intensity properties are incomplete: {exc}") from exc
        if not all(math.isfinite(v) for v in (lower, upper, mean, std)) or lower >= upper:
            raise LoaderError(f"foreground intensity properties are not usable: {props}")
        hints["normalization"] = {"kind": "ct_window", "lower": lower, "upper": upper, "mean": mean, "std": std}
    elif scheme == "ZScoreNormalization":
        if any(config.get("use_mask_for_norm", [])):
            hints["notes"].append(
                "nnU-Net normalised within the non-zero mask (use_mask_for_norm); the runtime's zscore uses the "
                "whole volume"
            )
        hints["normalization"] = {"kind": "zscore"}
    else:
        hints["normalization"] = {"kind": "none"}
