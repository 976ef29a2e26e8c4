"""Source (c): a MONAI bundle folder: ``configs/inference.json`` (or ``.yaml``) with the network definition
(``network_def``: ``_target_`` + arguments) and ``models/model.pt`` (a state dict).

The bundle's config is read by :class:`BundleConfig`, a minimal resolver of MONAI's config syntax, so MONAI itself
is needed only for short ``_target_`` names and Python expressions. The preprocessing transforms and the sliding
window inferer found anywhere in the config become manifest hints (:func:`config_hints`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from export.loaders.axes import adapt, orientation_adapter
from export.loaders.base import (
    LoadedModel,
    LoaderError,
    import_object,
    int_argument,
    load_weights,
    parse_json,
    read_state_dict,
    ready_module,
)

log = logging.getLogger(__name__)


class BundleConfig:
    """A minimal resolver for MONAI bundle configs: ``_target_`` components, ``@id`` references and ``%id``
    macros. Python expressions (``$...``) are not evaluated; see :func:`load_monai_bundle`."""

    def __init__(self, config: Any, root: Path, name: str):
        self.config = config
        self.root = root
        self.name = name

    @staticmethod
    def split_id(ref: str) -> list[str]:
        return [p for p in ref.replace("#", "::").split("::") if p != ""]

    def lookup(self, ref: str) -> Any:
        node = self.config
        for part in self.split_id(ref):
            if isinstance(node, list):
                try:
                    node = node[int(part)]
                except (ValueError, IndexError) as exc:
                    raise LoaderError(f"{self.name}: reference {ref!r} does not exist") from exc
            elif isinstance(node, dict) and part in node:
                node = node[part]
            else:
                raise LoaderError(f"{self.name}: reference {ref!r} does not exist")
        return node

    def literal(self, value: Any, where: str, depth: int = 0) -> Any:
        """``value`` with references and macros replaced; components are left as dicts."""
        if depth > 50:
            raise LoaderError(f"{self.name}: references nest too deep at {where}")
        if isinstance(value, str):
            if value.startswith("@"):
                return self.literal(self.lookup(value[1:]), value, depth + 1)
            if value.startswith("%"):
                return self.literal(self.macro(value[1:]), value, depth + 1)
            if value.startswith("$"):
                inner = value[1:].strip()
                if inner.startswith("@") and all(c.isalnum() or c in "_:#@" for c in inner[1:]):
                    return self.literal(self.lookup(inner[1:]), value, depth + 1)
                raise _Expression(where, value)
            return value
        if isinstance(value, list):
            return [self.literal(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
        if isinstance(value, dict):
            return {k: self.literal(v, f"{where}::{k}", depth + 1) for k, v in value.items()}
        return value

    def macro(self, ref: str) -> Any:
        file, sep, inner = ref.partition("#") if "#" in ref else ref.partition("::")
        if file.endswith((".json", ".yaml", ".yml")):
            other = BundleConfig(_read_config(self.root / file), self.root, file)
            return other.lookup(inner) if inner else other.config
        return self.lookup(ref)

    def instantiate(self, value: Any, where: str) -> Any:
        if isinstance(value, str):
            resolved = self.literal(value, where)
            return self.instantiate(resolved, where) if resolved is not value else value
        if isinstance(value, list):
            return [self.instantiate(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, dict):
            if "_target_" not in value:
                return {k: self.instantiate(v, f"{where}::{k}") for k, v in value.items()}
            if str(self.literal(value.get("_disabled_", False), where)).lower() in ("true", "1"):
                return None
            target = self.literal(value["_target_"], f"{where}::_target_")
            kwargs = {k: self.instantiate(v, f"{where}::{k}") for k, v in value.items() if not k.startswith("_")}
            component = resolve_target(target) if isinstance(target, str) else target
            mode = value.get("_mode_", "default")
            if mode == "callable":
                import functools

                return functools.partial(component, **kwargs) if kwargs else component
            try:
                return component(**kwargs)
            except TypeError as exc:
                raise LoaderError(f"{self.name}: instantiating {target}(**{kwargs}) at {where} failed: {exc}") from exc
        return value


class _Expression(LoaderError):
    def __init__(self, where: str, value: str):
        self.where = where
        self.value = value
        super().__init__(f"{where} is a Python expression ({value!r})")


def resolve_target(target: str) -> Any:
    """A bundle ``_target_``: an import path, or a MONAI short name (``UNet``) when MONAI is installed."""
    if ":" in target or "." in target:
        return import_object(target)
    try:
        from monai.bundle.config_item import ComponentLocator
    except ImportError as exc:
        raise LoaderError(
            f"_target_ {target!r} is a MONAI short name; resolving it needs MONAI (pip install monai), or write "
            f"the full import path (e.g. 'monai.networks.nets.{target}')"
        ) from exc
    found = ComponentLocator().get_component_module_name(target)
    if not found:
        raise LoaderError(f"_target_ {target!r} is not a MONAI component")
    if isinstance(found, list):
        raise LoaderError(f"_target_ {target!r} is ambiguous in MONAI ({', '.join(found)}); give the full path")
    return import_object(f"{found}:{target}")


def _read_config(path: Path) -> Any:
    if not path.is_file():
        raise LoaderError(f"bundle config {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        from edge_runtime.extras import MissingDependencyError, require

        try:
            yaml = require("yaml", feature="reading a YAML bundle config", package="pyyaml")
        except MissingDependencyError as exc:
            raise LoaderError(str(exc)) from exc
        return yaml.safe_load(text)
    return parse_json(text, path.name)


def _find_config(root: Path, names: Sequence[str]) -> Path | None:
    for name in names:
        for suffix in (".json", ".yaml", ".yml"):
            p = root / "configs" / f"{name}{suffix}"
            if p.is_file():
                return p
    return None


def load_monai_bundle(
    root: Path | str,
    *,
    network_key: str = "network_def",
    weights: Path | str | None = None,
    reorient: bool = True,
    allow_pickle: bool = False,
) -> LoadedModel:
    """Build ``network_key`` of ``configs/inference.(json|yaml)`` and load ``models/model.pt`` into it.

    With ``reorient`` (default) the network is wrapped in an :class:`AxisAdapter`: MONAI feeds networks
    (x, y, z) arrays (in the axcodes of ``Orientationd`` when the bundle has one), the runtime (z, y, x) in
    the series' own orientation; the patch size and spacing hints are given in the runtime's order either way.
    When the network definition holds a Python expression and MONAI is installed, MONAI's own
    ``ConfigParser`` builds it (logged); without MONAI such a bundle is refused with the expression named.
    """
    root = Path(root)
    if not root.is_dir():
        raise LoaderError(f"MONAI bundle {root} is not a folder")
    config_path = _find_config(root, ("inference",))
    if config_path is None:
        raise LoaderError(f"{root} has no configs/inference.json (or .yaml): not a MONAI bundle")
    config = BundleConfig(_read_config(config_path), root, config_path.name)
    if not isinstance(config.config, dict) or network_key not in config.config:
        keys = sorted(config.config) if isinstance(config.config, dict) else []
        raise LoaderError(f"{config_path.name} has no {network_key!r} (it has: {', '.join(keys)})")
    try:
        network = config.instantiate(config.config[network_key], network_key)
    except _Expression as exc:
        network = _monai_parse(config_path, network_key, exc)
    network = ready_module(network, f"{config_path.name}::{network_key}")

    hints: dict[str, Any] = {
        "source": {"kind": "monai-bundle", "folder": root.name, "config": config_path.name, "network": network_key}
    }
    meta_path = _find_config(root, ("metadata",))
    channels = classes = None
    if meta_path is not None:
        channels, classes = metadata_hints(_read_config(meta_path), hints)
    net_args = config.config[network_key]
    if isinstance(net_args, dict):
        try:
            args = config.literal({k: v for k, v in net_args.items() if not k.startswith("_")}, network_key)
        except _Expression:
            args = {}
        channels = channels or int_argument(args, "in_channels", "input_channels")
        classes = classes or int_argument(args, "out_channels", "num_classes")
    config_hints(config, hints)

    weights_path = Path(weights) if weights is not None else root / "models" / "model.pt"
    if weights_path.is_file():
        load_weights(network, read_state_dict(weights_path, allow_pickle=allow_pickle), weights_path.name)
        resolved = weights_path.resolve()
        inside = resolved.is_relative_to(root.resolve())
        hints["source"]["weights"] = str(resolved.relative_to(root.resolve())) if inside else weights_path.name
    else:
        raise LoaderError(f"no weights at {weights_path} (a MONAI bundle keeps its state dict in models/model.pt)")

    axes = hints.pop("_axes", None)
    module: nn.Module = network
    if reorient:
        order, flips = axes if axes is not None else orientation_adapter(None)
        module = adapt(network, order, flips)
        hints["source"]["axes"] = {"order": list(order), "flips": list(flips)}
        reorder_hints(hints, module)
    else:
        hints.setdefault("notes", []).append(
            "reorient=False: the network gets (z, y, x) windows, not MONAI's (x, y, z); only right for a "
            "network trained that way"
        )
        reorder_hints(hints, None)
    return LoadedModel(module, channels, classes, hints)


def _monai_parse(config_path: Path, key: str, exc: _Expression) -> Any:
    try:
        from monai.bundle import ConfigParser
    except ImportError:
        raise LoaderError(
            f"{config_path.name}: {exc} -- this loader does not evaluate expressions; install MONAI "
            "(pip install monai) to let its ConfigParser build the network, or write the value out"
        ) from exc
    log.info(
        "%s holds a Python expression at %s; building %r with MONAI's ConfigParser", config_path.name, exc.where, key
    )
    parser = ConfigParser()
    parser.read_config(str(config_path))
    parser["bundle_root"] = str(config_path.parent.parent)
    return parser.get_parsed_content(key, instantiate=True)


def metadata_hints(meta: Any, hints: dict[str, Any]) -> tuple[int | None, int | None]:
    if not isinstance(meta, dict):
        return None, None
    for key in ("name", "version", "description"):
        if isinstance(meta.get(key), str):
            hints[key] = meta[key]
    fmt = meta.get("network_data_format", {})
    channels = classes = None
    image = fmt.get("inputs", {}).get("image", {}) if isinstance(fmt, dict) else {}
    pred = fmt.get("outputs", {}).get("pred", {}) if isinstance(fmt, dict) else {}
    if isinstance(image, dict):
        channels = image.get("num_channels") if isinstance(image.get("num_channels"), int) else None
        modality = str(image.get("modality", "")).upper()
        if modality in ("CT", "MR", "MRI"):
            hints["modalities"] = ["MR" if modality.startswith("MR") else "CT"]
    if isinstance(pred, dict):
        classes = pred.get("num_channels") if isinstance(pred.get("num_channels"), int) else None
        channel_def = pred.get("channel_def")
        if isinstance(channel_def, dict):
            names = {int(k): str(v) for k, v in channel_def.items() if str(k).isdigit() and int(k) > 0}
            if names:
                hints["label_names"] = names
    return channels, classes


def _short(target: Any) -> str:
    return str(target).replace(":", ".").rsplit(".", 1)[-1] if isinstance(target, str) else ""


def config_hints(config: BundleConfig, hints: dict[str, Any]) -> None:
    """Preprocessing and inferer settings from anywhere in the config, in MONAI's (x, y, z) order for now."""
    notes = hints.setdefault("notes", [])
    for where, node in _components(config.config, ""):
        name = _short(node.get("_target_"))
        try:
            args = config.literal({k: v for k, v in node.items() if not k.startswith("_")}, where)
        except LoaderError as exc:
            notes.append(f"{name} at {where} not read: {exc}")
            continue
        if name in ("ScaleIntensityRanged", "ScaleIntensityRange"):
            a_min, a_max = float(args["a_min"]), float(args["a_max"])
            b_min = args.get("b_min")
            b_max = args.get("b_max")
            b_min = 0.0 if b_min is None else float(b_min)
            b_max = 1.0 if b_max is None else float(b_max)
            std = (a_max - a_min) / (b_max - b_min)
            norm: dict[str, Any] = {
                "kind": "ct_window",
                "lower": a_min,
                "upper": a_max,
                "mean": a_min - b_min * std,
                "std": std,
            }
            if not args.get("clip", False):
                norm["lower"], norm["upper"] = -32768.0, 65535.0
                notes.append(f"{name} has clip=False: the window is left open (-32768..65535)")
            hints["normalization"] = norm
        elif name in ("NormalizeIntensityd", "NormalizeIntensity"):
            if args.get("nonzero"):
                notes.append(
                    f"{name}(nonzero=True) normalises within the non-zero voxels; the runtime's zscore "
                    "uses the whole volume"
                )
            hints.setdefault("normalization", {"kind": "zscore"})
        elif name in ("Spacingd", "Spacing"):
            pixdim = args.get("pixdim")
            if isinstance(pixdim, (int, float)):
                pixdim = [pixdim] * 3
            if isinstance(pixdim, list) and len(pixdim) == 3:
                hints["_spacing_net"] = [float(v) if float(v) > 0 else None for v in pixdim]
        elif name in ("Orientationd", "Orientation"):
            if args.get("axcodes"):
                hints["_axcodes"] = str(args["axcodes"])
        elif name == "SlidingWindowInferer":
            roi = args.get("roi_size")
            if isinstance(roi, int):
                roi = [roi] * 3
            if isinstance(roi, list) and len(roi) == 3:
                hints["_patch_net"] = [int(v) for v in roi]
            if "overlap" in args:
                overlap = args["overlap"]
                hints["overlap"] = float(max(overlap) if isinstance(overlap, list) else overlap)
            if isinstance(args.get("sw_batch_size"), int):
                hints["batch_size"] = int(args["sw_batch_size"])
            hints["blending"] = "gaussian" if str(args.get("mode", "constant")) == "gaussian" else "constant"
        elif name in ("Activationsd", "Activations"):
            if args.get("sigmoid"):
                raise LoaderError(
                    f"the bundle's postprocessing applies a sigmoid ({where}): multi-label outputs are not "
                    "supported (the runtime takes the argmax of softmax logits)"
                )
    hints["_axes"] = orientation_adapter(hints.pop("_axcodes", None))


def _components(node: Any, where: str) -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(node, dict):
        if "_target_" in node:
            yield where, node
        for k, v in node.items():
            yield from _components(v, f"{where}::{k}" if where else k)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _components(v, f"{where}[{i}]")


def reorder_hints(hints: dict[str, Any], adapter: Any) -> None:
    """Per-axis hints from the network's order to the runtime's (z, y, x)."""
    for key, target in (("_spacing_net", "target_spacing"), ("_patch_net", "patch_size")):
        values = hints.pop(key, None)
        if values is None:
            continue
        to_runtime = getattr(adapter, "to_runtime", None)
        hints[target] = to_runtime(values) if to_runtime is not None else list(values)
    hints.pop("_axes", None)
