"""The manifest's ``"nnunet"`` section: every option of nnU-Net's predictor pipeline that the runtime reproduces.

``edge-export package --nnunet`` writes it from the trained-model folder's plans.json and dataset.json (and the
options the user chose); ``ModelPackage`` parses it here and keeps it as ``package.nnunet``. A package with this
section is segmented by :mod:`edge_runtime.inference.nnunet.pipeline` instead of the generic pipeline. Shape::

    "nnunet": {
      "configuration": "3d_fullres", "folds": ["0", "1"],
      "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
      "spacing": [z, y, x],                      # the configuration's spacing, in nnU-Net's (transposed) order
      "patch_size": [z, y, x],                   # ditto; the ONNX model's window
      "normalization": [{"scheme": "CTNormalization", "use_mask": false,
                         "mean": .., "std": .., "percentile_00_5": .., "percentile_99_5": ..}],   # per channel
      "resampling_data": {"order": 3, "order_z": 0, "force_separate_z": null},
      "resampling_probabilities": {"order": 1, "order_z": 0, "force_separate_z": null},
      "anisotropy_threshold": 3.0,
      "tile_step_size": 0.5, "use_gaussian": true,
      "mirror_axes": [0, 1, 2], "use_mirroring": true,
      "accumulate": "float16",                   # nnU-Net's blended-logits dtype; "float32" is more precise
      "ensemble": "mean of the folds' logits in the model graph",
      "regions": [[1, 2, 3], [2, 3], [3]], "regions_class_order": [1, 2, 3],   # region-based models only
      "postprocessing": [{"function": "remove_all_but_largest_component_from_segmentation",
                          "labels_or_regions": [1, [2, 3]], "background_label": 0}],   # from postprocessing.pkl
      "use_postprocessing": true,
      "previous_stage": {"configuration": "3d_lowres", "package": "previous_stage",   # a cascade stage only
                         "one_hot_labels": [1, 2, 3], "resampling_seg": {"order": 1, "order_z": 0,
                                                                         "force_separate_z": null}}
    }

A region-based model (:mod:`.regions`) outputs one sigmoid per region, painted into labels in
``regions_class_order``; ``postprocessing`` (:mod:`.postprocessing`) is nnU-Net's postprocessing.pkl as data,
applied to the label map when ``use_postprocessing`` is true. A cascade stage (``3d_cascade_fullres``) names its
``previous_stage``: a package of its own inside this one, whose label map becomes one input channel per
``one_hot_labels`` entry (:mod:`.cascade`); the section's ``normalization`` then lists the image channels only.

Options for speed (``use_mirroring`` false, a larger ``tile_step_size``) are changed by re-exporting; the parity
gate then reports what they cost in Dice against nnU-Net run as its authors run it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from edge_runtime.inference.nnunet.postprocessing import KeepLargestComponent, parse_postprocessing

#: normalisation schemes reproduced (nnunetv2.preprocessing.normalization.default_normalization_schemes)
SCHEMES = ("CTNormalization", "ZScoreNormalization", "NoNormalization", "RescaleTo01Normalization",
           "RGBTo01Normalization")
#: nnunetv2.configuration.ANISO_THRESHOLD
ANISO_THRESHOLD = 3.0


@dataclass(frozen=True)
class ChannelNormalization:
    """One input channel's scheme; the CT statistics come from the dataset fingerprint (foreground voxels)."""

    scheme: str
    use_mask: bool = False
    mean: float = 0.0
    std: float = 1.0
    lower: float = -math.inf
    upper: float = math.inf


@dataclass(frozen=True)
class Resampling:
    """Arguments of nnU-Net's ``resample_data_or_seg_to_shape`` (``is_seg`` is always False here)."""

    order: int = 3
    order_z: int = 0
    #: None: decided from the spacings and ``anisotropy_threshold``; True/False: forced
    force_separate_z: bool | None = None


@dataclass(frozen=True)
class PreviousStage:
    """A cascade's first stage: its package (a folder inside this package), and how its label map becomes input
    channels of this stage (nnU-Net's ``resampling_fn_seg`` arguments; one channel per foreground label, in
    ``LabelManager.foreground_labels`` order)."""

    configuration: str
    package: str
    one_hot_labels: tuple[int, ...]
    resampling: Resampling

    def to_dict(self) -> dict[str, Any]:
        return {"configuration": self.configuration, "package": self.package,
                "one_hot_labels": list(self.one_hot_labels), "resampling_seg": _resampling_dict(self.resampling)}


@dataclass(frozen=True)
class NnunetSettings:
    configuration: str
    folds: tuple[str, ...]
    transpose_forward: tuple[int, ...]
    transpose_backward: tuple[int, ...]
    spacing: tuple[float, ...]
    patch_size: tuple[int, ...]
    normalization: tuple[ChannelNormalization, ...]
    resampling_data: Resampling
    resampling_probabilities: Resampling
    anisotropy_threshold: float = ANISO_THRESHOLD
    tile_step_size: float = 0.5
    use_gaussian: bool = True
    mirror_axes: tuple[int, ...] = ()
    use_mirroring: bool = True
    accumulate: str = "float16"
    #: region-based models: the labels of each region (one sigmoid output per region); () for softmax models
    regions: tuple[tuple[int, ...], ...] = ()
    #: the label each region paints, in painting order (dataset.json ``regions_class_order``)
    regions_class_order: tuple[int, ...] = ()
    #: nnU-Net's postprocessing.pkl as steps; applied to the label map when ``use_postprocessing``
    postprocessing: tuple[KeepLargestComponent, ...] = ()
    use_postprocessing: bool = True
    #: a cascade stage: the stage before it; None for a model that takes the image alone
    previous_stage: PreviousStage | None = None

    @property
    def active_mirror_axes(self) -> tuple[int, ...]:
        return self.mirror_axes if self.use_mirroring else ()

    @property
    def active_postprocessing(self) -> tuple[KeepLargestComponent, ...]:
        return self.postprocessing if self.use_postprocessing else ()

    def to_dict(self) -> dict[str, Any]:
        """The manifest section (what :func:`parse_nnunet` reads back)."""
        resampling = _resampling_dict
        norms = []
        for n in self.normalization:
            entry: dict[str, Any] = {"scheme": n.scheme, "use_mask": n.use_mask}
            if n.scheme == "CTNormalization":
                entry.update(mean=n.mean, std=n.std, percentile_00_5=n.lower, percentile_99_5=n.upper)
            norms.append(entry)
        return {
            "configuration": self.configuration,
            "folds": list(self.folds),
            "transpose_forward": list(self.transpose_forward),
            "transpose_backward": list(self.transpose_backward),
            "spacing": list(self.spacing),
            "patch_size": list(self.patch_size),
            "normalization": norms,
            "resampling_data": resampling(self.resampling_data),
            "resampling_probabilities": resampling(self.resampling_probabilities),
            "anisotropy_threshold": self.anisotropy_threshold,
            "tile_step_size": self.tile_step_size,
            "use_gaussian": self.use_gaussian,
            "mirror_axes": list(self.mirror_axes),
            "use_mirroring": self.use_mirroring,
            "accumulate": self.accumulate,
            "ensemble": "mean of the folds' logits in the model graph",
            **({"regions": [list(r) for r in self.regions], "regions_class_order": list(self.regions_class_order)}
               if self.regions else {}),
            "postprocessing": [step.to_dict() for step in self.postprocessing],
            "use_postprocessing": self.use_postprocessing,
            **({"previous_stage": self.previous_stage.to_dict()} if self.previous_stage else {}),
        }


def _resampling_dict(r: Resampling) -> dict[str, Any]:
    return {"order": r.order, "order_z": r.order_z, "force_separate_z": r.force_separate_z}


def parse_nnunet(node: Any, problems: list[str]) -> NnunetSettings | None:
    """The section as settings, or None when the manifest has none; each problem is appended to ``problems``."""
    if node is None:
        return None
    before = len(problems)
    if not isinstance(node, dict):
        problems.append(f"'nnunet' must be an object, got {type(node).__name__}")
        return None

    def want(key: str, check: Any, what: str, default: Any = ...) -> Any:
        if key not in node:
            if default is ...:
                problems.append(f"'nnunet.{key}' is required")
            return None if default is ... else default
        value = node[key]
        if not check(value):
            problems.append(f"'nnunet.{key}' must be {what}, got {value!r}")
            return None if default is ... else default
        return value

    def ints(v: Any) -> bool:
        return isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)

    def numbers(v: Any) -> bool:
        return isinstance(v, list) and all(_is_number(i) and i > 0 for i in v)

    configuration = want("configuration", lambda v: isinstance(v, str), "a string")
    folds = want("folds", lambda v: isinstance(v, list) and v and all(isinstance(f, str) for f in v),
                 "a non-empty list of strings")
    forward = want("transpose_forward", ints, "a list of axis indices")
    backward = want("transpose_backward", ints, "a list of axis indices")
    spacing = want("spacing", numbers, "a list of positive numbers")
    patch = want("patch_size", lambda v: ints(v) and all(i > 0 for i in v), "a list of positive integers")
    norms = want("normalization", lambda v: isinstance(v, list) and v, "a non-empty list (one entry per channel)")
    data = _resampling(node.get("resampling_data"), "resampling_data", problems)
    probs = _resampling(node.get("resampling_probabilities"), "resampling_probabilities", problems)
    threshold = want("anisotropy_threshold", lambda v: _is_number(v) and v > 1, "a number > 1", ANISO_THRESHOLD)
    step = want("tile_step_size", lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]", 0.5)
    gaussian = want("use_gaussian", lambda v: isinstance(v, bool), "true or false", True)
    mirror_axes = want("mirror_axes", ints, "a list of axis indices", [])
    mirroring = want("use_mirroring", lambda v: isinstance(v, bool), "true or false", True)
    accumulate = want("accumulate", lambda v: v in ("float16", "float32"), "float16 or float32", "float16")
    regions, class_order = _regions(node.get("regions"), node.get("regions_class_order"), problems)
    postprocessing = parse_postprocessing(node.get("postprocessing"), problems)
    use_postprocessing = want("use_postprocessing", lambda v: isinstance(v, bool), "true or false", True)
    previous = _previous_stage(node.get("previous_stage"), problems)

    if forward is not None and backward is not None:
        if sorted(forward) != list(range(len(forward))) or [forward[i] for i in backward] != list(range(len(forward))):
            problems.append(f"'nnunet.transpose_forward' {forward} and 'transpose_backward' {backward} are not "
                            "inverse permutations")
    if spacing is not None and patch is not None and len(spacing) != len(patch):
        problems.append(f"'nnunet.spacing' has {len(spacing)} axes, 'patch_size' {len(patch)}")
    if patch is not None and len(patch) not in (2, 3):
        problems.append(f"'nnunet.patch_size' must have 2 or 3 axes, got {patch}")
    if mirror_axes and patch is not None and max(mirror_axes) >= len(patch):
        problems.append(f"'nnunet.mirror_axes' {mirror_axes} do not fit a {len(patch)}D patch")
    channels = [_channel(n, i, problems) for i, n in enumerate(norms or [])]
    if len(problems) > before or None in (configuration, folds, forward, backward, spacing, patch, data, probs):
        return None
    return NnunetSettings(
        configuration=configuration, folds=tuple(folds), transpose_forward=tuple(forward),
        transpose_backward=tuple(backward), spacing=tuple(float(s) for s in spacing), patch_size=tuple(patch),
        normalization=tuple(c for c in channels if c is not None), resampling_data=data,  # type: ignore[arg-type]
        resampling_probabilities=probs,  # type: ignore[arg-type]
        anisotropy_threshold=float(threshold), tile_step_size=float(step), use_gaussian=gaussian,
        mirror_axes=tuple(mirror_axes), use_mirroring=mirroring, accumulate=accumulate, regions=regions,
        regions_class_order=class_order, postprocessing=postprocessing, use_postprocessing=use_postprocessing,
        previous_stage=previous,
    )


def _previous_stage(node: Any, problems: list[str]) -> PreviousStage | None:
    """``previous_stage``: the stage's configuration, its package folder (relative, inside this package), the
    labels one-hot encoded (distinct, > 0) and ``resampling_seg``."""
    if node is None:
        return None
    where = "'nnunet.previous_stage'"
    if not isinstance(node, dict):
        problems.append(f"{where} must be an object, got {type(node).__name__}")
        return None
    configuration, package, labels = node.get("configuration"), node.get("package"), node.get("one_hot_labels")
    before = len(problems)
    if not isinstance(configuration, str) or not configuration:
        problems.append(f"{where}.configuration must name the previous configuration, got {configuration!r}")
    if not isinstance(package, str) or not package or package.startswith(("/", "\\")) or ".." in package.split("/"):
        problems.append(f"{where}.package must be a folder inside this package, got {package!r}")
    if not (isinstance(labels, list) and labels and all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                        for v in labels) and len(set(labels)) == len(labels)):
        problems.append(f"{where}.one_hot_labels must list distinct labels > 0, got {labels!r}")
    how = _resampling(node.get("resampling_seg"), "previous_stage.resampling_seg", problems)
    if len(problems) > before or how is None:
        return None
    return PreviousStage(str(configuration), str(package), tuple(int(v) for v in labels), how)  # type: ignore[union-attr]


def _regions(regions: Any, order: Any, problems: list[str]) -> tuple[tuple[tuple[int, ...], ...], tuple[int, ...]]:
    """``regions`` and ``regions_class_order``: both or neither; one painted label per region, the labels 1..L."""
    if regions is None and order is None:
        return (), ()

    def positive(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    if not (isinstance(regions, list) and regions and all(isinstance(r, list) and r and all(positive(i) for i in r)
                                                          for r in regions)):
        problems.append(f"'nnunet.regions' must be a non-empty list of non-empty label lists, got {regions!r}")
        return (), ()
    if not (isinstance(order, list) and len(order) == len(regions) and all(positive(i) for i in order)):
        problems.append(f"'nnunet.regions_class_order' must list one label > 0 per region ({len(regions)}), "
                        f"got {order!r}")
        return (), ()
    if sorted(set(order)) != list(range(1, len(set(order)) + 1)):
        problems.append(f"'nnunet.regions_class_order' must paint the labels 1..L, got {order}")
        return (), ()
    return tuple(tuple(r) for r in regions), tuple(order)


def _resampling(node: Any, key: str, problems: list[str]) -> Resampling | None:
    if not isinstance(node, dict):
        problems.append(f"'nnunet.{key}' must be an object with order, order_z and force_separate_z")
        return None
    order, order_z, force = node.get("order", 3), node.get("order_z", 0), node.get("force_separate_z")
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 5 for v in (order, order_z)):
        problems.append(f"'nnunet.{key}' orders must be integers 0-5, got {order!r}, {order_z!r}")
        return None
    if force is not None and not isinstance(force, bool):
        problems.append(f"'nnunet.{key}.force_separate_z' must be true, false or null, got {force!r}")
        return None
    return Resampling(order, order_z, force)


def _channel(node: Any, index: int, problems: list[str]) -> ChannelNormalization | None:
    where = f"'nnunet.normalization[{index}]'"
    if not isinstance(node, dict) or node.get("scheme") not in SCHEMES:
        scheme = node.get("scheme") if isinstance(node, dict) else node
        problems.append(f"{where} scheme is {scheme!r}; reproduced: {', '.join(SCHEMES)}")
        return None
    use_mask = node.get("use_mask", False)
    if not isinstance(use_mask, bool):
        problems.append(f"{where}.use_mask must be true or false, got {use_mask!r}")
        return None
    if node["scheme"] != "CTNormalization":
        return ChannelNormalization(node["scheme"], use_mask)
    keys = ("mean", "std", "percentile_00_5", "percentile_99_5")
    raw = [node.get(k) for k in keys]
    values = [float(v) for v in raw if _is_number(v)]  # type: ignore[arg-type]
    if len(values) != len(keys) or not all(math.isfinite(v) for v in values) or values[2] >= values[3]:
        problems.append(f"{where} CTNormalization needs finite {', '.join(keys)} with percentile_00_5 < "
                        f"percentile_99_5, got {dict(zip(keys, raw, strict=True))}")
        return None
    mean, std, lower, upper = values
    return ChannelNormalization("CTNormalization", use_mask, mean, std, lower, upper)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
