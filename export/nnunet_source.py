"""An nnU-Net v2 trained-model folder as the runtime's nnU-Net pipeline runs it: every chosen fold's network,
averaged in one graph (:class:`FoldEnsemble`), and the ``"nnunet"`` manifest section
(:class:`~edge_runtime.inference.nnunet.settings.NnunetSettings`) from plans.json, dataset.json and the
checkpoints (``inference_allowed_mirroring_axes``).

The networks take windows in nnU-Net's own (transposed) axis order: the runtime pipeline transposes the volume as
nnU-Net's preprocessor does, so no axis adapter is needed. A 2D configuration's network is wrapped to take
``(N, C, 1, Y, X)`` windows, the runtime's 3D window shape.

A cascade stage (``3d_cascade_fullres``, whose plans name a ``previous_stage``) is loaded with its previous stage:
the trained-model folder of that configuration beside it in the results folder (nnU-Net names them
``<trainer>__<plans>__<configuration>``), with the same folds and options; its network takes the image channels
and one channel per foreground label of the previous stage's label map.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edge_runtime.inference.nnunet.settings import (
    ChannelNormalization,
    NnunetSettings,
    PreviousStage,
    Resampling,
)
from export.loaders.base import LoaderError, load_weights, parse_json, ready_module
from export.loaders.nnunet import _checkpoint_weights, _nnunet_configuration, _nnunet_network, _read_checkpoint

#: resampling functions whose arguments the runtime reproduces (nnunetv2.preprocessing.resampling.default_resampling)
RESAMPLING_FUNCTIONS = ("resample_data_or_seg_to_shape", "resample_data_or_seg_to_spacing")
#: where a cascade package keeps its previous stage (a package of its own)
PREVIOUS_STAGE_FOLDER = "previous_stage"


class FoldEnsemble(nn.Module):
    """The mean of the folds' logits, as ``nnUNetPredictor`` averages its folds (per window here; blending and
    averaging are linear, so the sum is the same)."""

    def __init__(self, networks: Sequence[nn.Module]):
        super().__init__()
        self.folds = nn.ModuleList(networks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.folds[0](x)
        for net in self.folds[1:]:
            out = out + net(x)
        return out / len(self.folds) if len(self.folds) > 1 else out


class Slices2d(nn.Module):
    """A 2D network on the runtime's 3D windows of one slice: ``(N, C, 1, Y, X)`` -> ``(N, K, 1, Y, X)``."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x[:, :, 0]).unsqueeze(2)


@dataclass
class NnunetSource:
    """What ``edge-export package --nnunet DIR --folds ...`` packages."""

    root: Path
    plans: dict[str, Any]
    dataset: dict[str, Any]
    configuration: str
    folds: tuple[str, ...]
    #: one network per fold (eval, CPU), in nnU-Net's axis order
    networks: list[nn.Module]
    #: the exported module: :class:`FoldEnsemble` (wrapped by :class:`Slices2d` for 2D)
    module: nn.Module
    settings: NnunetSettings
    label_names: dict[int, str]
    #: the network's input channels: the images', and a cascade stage's one-hot previous label map
    input_channels: int
    #: a cascade stage's previous stage (same folds and options); None for a model that takes the image alone
    previous: NnunetSource | None = None

    @property
    def image_channels(self) -> int:
        """The input channels that come from images (dataset.json ``channel_names``)."""
        stage = self.settings.previous_stage
        return self.input_channels - (len(stage.one_hot_labels) if stage is not None else 0)

    @property
    def num_classes(self) -> int:
        """Labels of the label map, background included."""
        return len(self.label_names) + 1

    @property
    def output_channels(self) -> int:
        """The network's outputs: one per class, or one sigmoid per region for a region-based model."""
        return len(self.settings.regions) or self.num_classes

    @property
    def window(self) -> tuple[int, int, int]:
        """The exported model's window: the patch, ``(1, Y, X)`` for 2D."""
        patch = self.settings.patch_size
        return (1, patch[0], patch[1]) if len(patch) == 2 else (patch[0], patch[1], patch[2])


def load_nnunet_source(
    root: Path | str,
    folds: Sequence[str],
    *,
    configuration: str = "3d_fullres",
    checkpoint: str = "checkpoint_final.pth",
    allow_pickle: bool = False,
    use_mirroring: bool = True,
    tile_step_size: float = 0.5,
    postprocessing: Path | None = None,
    use_postprocessing: bool = True,
    previous_stage: Path | None = None,
) -> NnunetSource:
    """``postprocessing``: nnU-Net's postprocessing.pkl for these folds (None: looked for beside the folds,
    :func:`export.nnunet_postprocessing.find_postprocessing`); ``use_postprocessing`` False records it switched
    off. ``previous_stage``: a cascade stage's previous trained-model folder (None: the sibling folder nnU-Net
    names for it, :func:`find_previous_stage`)."""
    from edge_runtime.extras import MissingDependencyError, require

    root = Path(root)
    for name in ("plans.json", "dataset.json"):
        if not (root / name).is_file():
            raise LoaderError(f"{root} has no {name}: not an nnU-Net v2 trained-model folder")
    plans = parse_json((root / "plans.json").read_text(encoding="utf-8"), "plans.json")
    dataset = parse_json((root / "dataset.json").read_text(encoding="utf-8"), "dataset.json")
    config = _nnunet_configuration(plans, configuration, allow_2d=True, allow_cascade=True)
    label_names, regions, class_order = _labels(dataset)
    channels = dataset.get("channel_names", dataset.get("modality", {}))
    if not channels:
        raise LoaderError("dataset.json has no 'channel_names'")
    if not folds:
        raise LoaderError("no folds chosen")
    previous, stage = None, None
    if config.get("previous_stage"):
        name = str(config["previous_stage"])
        folder = previous_stage or find_previous_stage(root, configuration, name)
        # nnUNetv2_predict writes the previous stage's label map without post-processing
        previous = load_nnunet_source(folder, folds, configuration=name, checkpoint=checkpoint,
                                      allow_pickle=allow_pickle, use_mirroring=use_mirroring,
                                      tile_step_size=tile_step_size, use_postprocessing=False)
        if previous.label_names != label_names or previous.previous is not None:
            raise LoaderError(f"the previous stage {folder} is not {configuration!r}'s: its labels are "
                              f"{previous.label_names}, {configuration!r}'s {label_names}")
        stage = previous_stage_settings(config, dataset, name)
    try:
        require("dynamic_network_architectures", feature="loading nnU-Net models",
                package="dynamic_network_architectures")
    except MissingDependencyError as exc:
        raise LoaderError(str(exc)) from exc

    networks, mirror_axes = [], None
    for fold in folds:
        path = root / f"fold_{fold}" / checkpoint
        if not path.is_file():
            found = sorted(p.name for p in root.glob("fold_*"))
            raise LoaderError(f"no {checkpoint} in fold_{fold} (folds here: {', '.join(found) or 'none'})")
        ckpt = _read_checkpoint(path, allow_pickle)
        if mirror_axes is None:  # nnUNetPredictor takes the first fold's
            axes = ckpt.get("inference_allowed_mirroring_axes")
            mirror_axes = tuple(int(a) for a in axes) if axes is not None else ()
        inputs = len(channels) + (len(stage.one_hot_labels) if stage else 0)
        network = _nnunet_network(config, inputs, len(regions) or len(label_names) + 1)
        load_weights(network, _checkpoint_weights(ckpt), f"fold_{fold}/{checkpoint}")
        networks.append(ready_module(network, f"the nnU-Net network of fold {fold}"))
    module: nn.Module = FoldEnsemble(networks)
    if len(config["patch_size"]) == 2:
        module = Slices2d(module)
    from export.nnunet_postprocessing import find_postprocessing, read_postprocessing

    pkl = postprocessing or find_postprocessing(root, folds)
    steps = read_postprocessing(pkl) if pkl is not None else ()
    settings = replace(
        nnunet_settings(plans, config, configuration, folds, mirror_axes or (), use_mirroring, tile_step_size,
                        len(channels)),
        regions=regions, regions_class_order=class_order, postprocessing=steps, use_postprocessing=use_postprocessing,
        previous_stage=stage,
    )
    inputs = len(channels) + (len(stage.one_hot_labels) if stage else 0)
    return NnunetSource(root, plans, dataset, configuration, tuple(str(f) for f in folds), networks,
                        ready_module(module, "the fold ensemble"), settings, label_names, inputs, previous)


def find_previous_stage(root: Path, configuration: str, previous: str) -> Path:
    """The previous stage's trained-model folder beside ``root``: nnU-Net's ``<trainer>__<plans>__<configuration>``
    with the previous configuration, or :class:`LoaderError` saying what is missing and how to get it."""
    suffix = f"__{configuration}"
    folder = root.with_name(root.name[: -len(suffix)] + f"__{previous}") if root.name.endswith(suffix) else None
    if folder is not None and (folder / "plans.json").is_file():
        return folder
    where = (f"{folder} is missing" if folder is not None else
             f"{root.name} is not named <trainer>__<plans>__{configuration}, so its sibling cannot be found")
    raise LoaderError(
        f"configuration {configuration!r} is a cascade stage: it takes the segmentation of {previous!r}, whose "
        f"trained model must come with it, and {where}; train it (nnUNetv2_train DATASET {previous} FOLD, for each "
        "fold) or name its folder with --previous-stage DIR"
    )


def previous_stage_settings(config: dict[str, Any], dataset: dict[str, Any], previous: str) -> PreviousStage:
    """How the previous stage's label map enters: ``resampling_fn_seg`` with its arguments, one channel per
    foreground label (``LabelManager``: every label value of dataset.json, regions flattened, but background and
    ``ignore``)."""
    fn = config.get("resampling_fn_seg", "resample_data_or_seg_to_shape")
    kwargs = config.get("resampling_fn_seg_kwargs", {"is_seg": True, "order": 1, "order_z": 0})
    if fn not in RESAMPLING_FUNCTIONS or not kwargs.get("is_seg", True):
        raise LoaderError(f"the runtime cannot reproduce this configuration:\n  - resampling_fn_seg {fn!r} with "
                          f"{kwargs} is not nnU-Net's default segmentation resampling")
    values: set[int] = set()
    for name, value in dataset["labels"].items():
        if name != "ignore":
            values.update(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    how = Resampling(int(kwargs.get("order", 1)), int(kwargs.get("order_z", 0)), kwargs.get("force_separate_z"))
    return PreviousStage(previous, PREVIOUS_STAGE_FOLDER, tuple(sorted(values - {0})), how)


def _labels(dataset: dict[str, Any]) -> tuple[dict[int, str], tuple[tuple[int, ...], ...], tuple[int, ...]]:
    """Label names (1..L), and for a region-based model its regions and ``regions_class_order``
    (``LabelManager``: regions are the non-background entries of ``labels`` in order, lists or single labels)."""
    labels = dataset.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise LoaderError("dataset.json has no 'labels'")
    if "ignore" in labels:
        labels = {k: v for k, v in labels.items() if k != "ignore"}  # never predicted
    if any(isinstance(v, (list, tuple)) and len(v) > 1 for v in labels.values()):
        return _region_labels(labels, dataset.get("regions_class_order"))
    names = {int(v[0] if isinstance(v, (list, tuple)) else v): str(k) for k, v in labels.items()}
    if sorted(names) != list(range(len(names))):
        raise LoaderError(f"dataset.json label values must be 0..{len(names) - 1}, got {sorted(names)}")
    return {v: n for v, n in names.items() if v > 0}, (), ()


def _region_labels(labels: dict[str, Any], order: Any) -> tuple[dict[int, str], tuple[tuple[int, ...], ...],
                                                                  tuple[int, ...]]:
    regions: list[tuple[int, ...]] = []
    region_names: list[str] = []
    for name, value in labels.items():
        members = tuple(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
        if set(members) == {0}:
            continue  # background
        regions.append(members)
        region_names.append(str(name))
    if not isinstance(order, list) or len(order) != len(regions):
        raise LoaderError(f"dataset.json defines {len(regions)} regions but regions_class_order is {order!r} "
                          "(one label per region needed)")
    class_order = tuple(int(v) for v in order)
    if sorted(set(class_order)) != list(range(1, len(set(class_order)) + 1)):
        raise LoaderError(f"regions_class_order {list(class_order)} must paint the labels 1..L")
    # label c is named after the last region that paints it (painting goes in order, later regions win)
    names = {value: region_names[i] for i, value in enumerate(class_order)}
    return dict(sorted(names.items())), tuple(regions), class_order


def nnunet_settings(
    plans: dict[str, Any],
    config: dict[str, Any],
    configuration: str,
    folds: Sequence[str],
    mirror_axes: Sequence[int],
    use_mirroring: bool,
    tile_step_size: float,
    channels: int,
) -> NnunetSettings:
    """The manifest's ``"nnunet"`` section from the plans; what the runtime cannot reproduce is refused here."""
    forward = tuple(int(v) for v in plans.get("transpose_forward", [0, 1, 2]))
    backward = tuple(int(v) for v in plans.get("transpose_backward", [0, 1, 2]))
    problems = []
    resampling = {}
    for key in ("resampling_fn_data", "resampling_fn_probabilities"):
        fn = config.get(key, "resample_data_or_seg_to_shape")
        kwargs = config.get(f"{key}_kwargs", {})
        if fn not in RESAMPLING_FUNCTIONS or kwargs.get("is_seg"):
            problems.append(f"{key} {fn!r} with {kwargs} is not nnU-Net's default resampling")
            continue
        resampling[key] = Resampling(int(kwargs.get("order", 3)), int(kwargs.get("order_z", 0)),
                                     kwargs.get("force_separate_z"))
    schemes = list(config.get("normalization_schemes", []))
    masks = list(config.get("use_mask_for_norm", [False] * len(schemes)))
    if len(schemes) != channels:
        problems.append(f"{len(schemes)} normalisation schemes for {channels} input channels")
    norms = []
    for c, (scheme, use_mask) in enumerate(zip(schemes, masks, strict=False)):
        if scheme == "CTNormalization":
            props = plans.get("foreground_intensity_properties_per_channel", {}).get(str(c), {})
            try:
                norms.append(ChannelNormalization(scheme, bool(use_mask), float(props["mean"]), float(props["std"]),
                                                  float(props["percentile_00_5"]), float(props["percentile_99_5"])))
            except (KeyError, TypeError, ValueError):
                problems.append(f"channel {c}: CTNormalization without foreground intensity properties")
        else:
            norms.append(ChannelNormalization(str(scheme), bool(use_mask)))
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise LoaderError(f"the runtime cannot reproduce this configuration:\n{lines}")
    from edge_runtime.inference.nnunet.settings import parse_nnunet

    draft = NnunetSettings(
        configuration=configuration, folds=tuple(str(f) for f in folds), transpose_forward=forward,
        transpose_backward=backward, spacing=tuple(float(s) for s in config["spacing"]),
        patch_size=tuple(int(p) for p in config["patch_size"]), normalization=tuple(norms),
        resampling_data=resampling["resampling_fn_data"],
        resampling_probabilities=resampling["resampling_fn_probabilities"],
        tile_step_size=float(tile_step_size), mirror_axes=tuple(mirror_axes), use_mirroring=use_mirroring,
    )
    checked: list[str] = []
    settings = parse_nnunet(draft.to_dict(), checked)  # the runtime's own reading of what will be written
    if settings is None:
        raise LoaderError("the nnunet settings do not validate:\n" + "\n".join(f"  - {p}" for p in checked))
    return settings


def runtime_hints(source: NnunetSource) -> dict[str, Any]:
    """The generic manifest fields (read by tools that do not know the nnunet section): spacing in the runtime's
    (z, y, x) order, channel 0's normalisation, the window, the overlap nnU-Net's step size gives."""
    settings = source.settings
    spacing = list(settings.spacing)
    if len(spacing) == 2:
        spacing = [None, *spacing]  # type: ignore[list-item]
    backward = settings.transpose_backward
    target = [spacing[i] for i in backward] if len(backward) == 3 else spacing
    first = settings.normalization[0]
    if first.scheme == "CTNormalization":
        norm: dict[str, Any] = {"kind": "ct_window", "lower": first.lower, "upper": first.upper,
                                "mean": first.mean, "std": first.std}
    elif first.scheme == "ZScoreNormalization":
        norm = {"kind": "zscore"}
    else:
        norm = {"kind": "none"}
    modality = str(next(iter(source.dataset.get("channel_names", {"0": ""}).values()))).upper()
    return {
        "target_spacing": target,
        "normalization": norm,
        "patch_size": list(source.window),
        "overlap": round(1.0 - settings.tile_step_size, 6),
        "modalities": ["CT"] if first.scheme == "CTNormalization" or modality == "CT" else ["MR"],
    }
