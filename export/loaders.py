"""Loaders: a trained model in one of the usual shapes -> a ``torch.nn.Module`` in eval mode, plus what the
source itself says about the manifest (geometry, normalisation, label names).

Sources:

* :func:`load_factory` -- an importable callable ``package.module:callable`` with keyword arguments and an
  optional state-dict file;
* :func:`load_torchscript` -- a TorchScript file (``torch.jit.load``); MONAI's ``model.ts`` extra files
  (``metadata.json``, ``inference.json``) are read for hints when present;
* :func:`load_monai_bundle` -- a MONAI bundle folder: ``configs/inference.json`` (or ``.yaml``) with the
  network definition (``network_def``: ``_target_`` + arguments) and ``models/model.pt`` (a state dict);
* :func:`load_nnunet` -- an nnU-Net v2 trained-model folder (``plans.json``, ``dataset.json``,
  ``fold_X/checkpoint_final.pth``), the network rebuilt with ``dynamic_network_architectures``.

Each returns a :class:`LoadedModel`. Its ``hints`` use the manifest's own keys and axis order (z, y, x):
``target_spacing``, ``normalization``, ``patch_size``, ``overlap``, ``blending``, ``batch_size``,
``modalities``, ``label_names`` ({value: name}, background excluded), ``name``, ``version``,
``description``, ``source`` (provenance for the manifest) and ``notes`` (things a user should know, e.g.
steps of the source's pipeline the runtime does not reproduce). Nothing here guesses SNOMED codes.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edge_runtime.errors import ExportError

log = logging.getLogger(__name__)

#: our axes (z, y, x) for a standard axial series point to patient Superior, Posterior, Left (DICOM LPS):
#: the runtime keeps the volume's own (slice, row, column) grid, sorted along the slice normal
RUNTIME_DIRECTIONS = ("S", "P", "L")
_OPPOSITE = {"R": "L", "L": "R", "A": "P", "P": "A", "S": "I", "I": "S"}
_AXIS_OF_LETTER = {"S": 0, "I": 0, "A": 1, "P": 1, "L": 2, "R": 2}


class LoaderError(ExportError, ValueError):
    """A model source is missing, malformed, or uses something this loader does not support."""


@dataclass
class LoadedModel:
    """A module ready for export (eval mode, CPU) and what its source says about the manifest."""

    module: nn.Module
    input_channels: int | None
    num_classes: int | None
    hints: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------------


def import_object(spec: str) -> Any:
    """``package.module:attr.sub`` or ``package.module.attr`` -> the object."""
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
    else:
        module_name, _, attr = spec.rpartition(".")
    if not module_name or not attr:
        raise LoaderError(f"{spec!r} is not an import path (expected 'package.module:callable')")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise LoaderError(f"cannot import module {module_name!r} for {spec!r}: {exc}") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise LoaderError(f"module {module_name!r} has no attribute {attr!r} (from {spec!r})") from exc
    return obj


def read_state_dict(path: Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A state dict from a ``.pt``/``.pth`` file: tensors only unless ``allow_pickle`` (which runs code from
    the file: only for files you trust). Common wrappers (``state_dict``, ``model``, ``network_weights``) and
    ``module.`` / ``_orig_mod.`` prefixes (DataParallel, ``torch.compile``) are removed."""
    path = Path(path)
    if not path.is_file():
        raise LoaderError(f"state dict file {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, ... depending on the file
        hint = "" if allow_pickle else (
            " If the file holds more than tensors (a training checkpoint) and you trust it, allow pickled "
            "objects (--allow-pickle)."
        )
        raise LoaderError(f"cannot read {path.name} as a state dict: {exc}.{hint}") from exc
    if isinstance(data, nn.Module):
        data = data.state_dict()
    for key in ("state_dict", "model", "network_weights", "model_state_dict", "net"):
        if isinstance(data, Mapping) and key in data and isinstance(data[key], Mapping):
            if all(isinstance(v, torch.Tensor) for v in data[key].values()):
                data = data[key]
                break
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        keys = f" (top-level keys: {_few([str(k) for k in data])})" if isinstance(data, Mapping) else ""
        raise LoaderError(f"{path.name} does not hold a state dict (a mapping of names to tensors){keys}")
    out = {}
    for name, tensor in data.items():
        for prefix in ("module.", "_orig_mod."):
            if name.startswith(prefix):
                name = name[len(prefix):]
        out[name] = tensor
    return out


def load_weights(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with an error that lists what is missing and what is left over."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: file {tuple(state[k].shape)}, module {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing in the file: {_few(missing)}")
        if unexpected:
            parts.append(f"not in the module: {_few(unexpected)}")
        if shapes:
            parts.append(f"shape differs: {_few(shapes)}")
        raise LoaderError(f"weights from {source} do not fit the module ({'; '.join(parts)})")
    module.load_state_dict(dict(state), strict=True)


def _few(items: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def _ready(module: Any, what: str) -> nn.Module:
    if not isinstance(module, nn.Module):
        raise LoaderError(f"{what} gave a {type(module).__name__}, not a torch.nn.Module")
    return module.cpu().eval()


def _int_kwarg(kwargs: Mapping[str, Any], *names: str) -> int | None:
    for name in names:
        value = kwargs.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


class AxisAdapter(nn.Module):
    """Runs a network trained on another axis order inside the runtime's (z, y, x) windows.

    ``order[i]`` is the runtime axis (0 = z, 1 = y, 2 = x) that becomes the network's spatial axis ``i``;
    ``flips[i]`` reverses the network's axis ``i``. Logits come back in the runtime's order.
    """

    def __init__(self, network: nn.Module, order: Sequence[int], flips: Sequence[bool]):
        super().__init__()
        if sorted(order) != [0, 1, 2] or len(flips) != 3:
            raise ValueError(f"order must permute (0, 1, 2) and flips have 3 entries, got {order}, {flips}")
        self.network = network
        self.order = [int(o) for o in order]
        self.flips = [bool(f) for f in flips]
        # (no annotations here: TorchScript infers these attribute types from the values)
        self._perm = [0, 1, *(2 + o for o in self.order)]
        self._inverse = [self._perm.index(i) for i in range(5)]
        self._dims = [2 + i for i, f in enumerate(self.flips) if f] or [-1]
        self._flip = any(self.flips)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # TorchScript-compatible (see :func:`adapt`)
        y = x.permute(self._perm)
        if self._flip:
            y = torch.flip(y, self._dims)
        out = self.network(y)
        if self._flip:
            out = torch.flip(out, self._dims)
        return out.permute(self._inverse)

    def to_runtime(self, values: Sequence[Any]) -> list[Any]:
        """Per-axis values in the network's order (e.g. a patch size) -> the runtime's (z, y, x) order."""
        out: list[Any] = [None, None, None]
        for i, axis in enumerate(self.order):
            out[axis] = values[i]
        return out


def adapt(network: nn.Module, order: Sequence[int], flips: Sequence[bool]) -> nn.Module:
    """:class:`AxisAdapter` around ``network``; scripted when ``network`` is TorchScript (a traced export cannot
    call a loaded ScriptModule from a plain module)."""
    adapter = AxisAdapter(network, order, flips).eval()
    if not isinstance(network, torch.jit.ScriptModule):
        return adapter
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit\.script.* deprecated")
        scripted = torch.jit.script(adapter)
    scripted.to_runtime = adapter.to_runtime  # type: ignore[attr-defined]
    return scripted


def orientation_adapter(axcodes: str | None) -> tuple[list[int], list[bool]]:
    """MONAI arrays are (x, y, z) voxel order; with ``Orientationd(axcodes=...)`` each axis points to a known
    patient direction. Returns (order, flips) mapping the runtime's (S, P, L) axes to that layout."""
    if not axcodes:
        return [2, 1, 0], [False, False, False]
    codes = axcodes.upper()
    if len(codes) != 3 or sorted(_AXIS_OF_LETTER[c] for c in codes if c in _AXIS_OF_LETTER) != [0, 1, 2]:
        raise LoaderError(f"Orientationd axcodes {axcodes!r} are not three distinct axes (e.g. 'RAS')")
    order = [_AXIS_OF_LETTER[c] for c in codes]
    flips = [c != RUNTIME_DIRECTIONS[_AXIS_OF_LETTER[c]] for c in codes]
    return order, flips


# ---------------------------------------------------------------------------------------------------
# (a) factory + state dict
# ---------------------------------------------------------------------------------------------------


def load_factory(
    spec: str,
    kwargs: Mapping[str, Any] | None = None,
    state_dict: Path | str | None = None,
    *,
    allow_pickle: bool = False,
) -> LoadedModel:
    """Call ``spec`` (``package.module:callable``) with ``kwargs``; load ``state_dict`` into the result."""
    factory = import_object(spec)
    if not callable(factory):
        raise LoaderError(f"{spec!r} is a {type(factory).__name__}, not a callable")
    kwargs = dict(kwargs or {})
    try:
        module = factory(**kwargs)
    except TypeError as exc:
        raise LoaderError(f"calling {spec}(**{kwargs}) failed: {exc}") from exc
    module = _ready(module, f"{spec}(**{kwargs})")
    source: dict[str, Any] = {"kind": "factory", "factory": spec, "kwargs": kwargs}
    if state_dict is not None:
        load_weights(module, read_state_dict(Path(state_dict), allow_pickle=allow_pickle), Path(state_dict).name)
        source["state_dict"] = Path(state_dict).name
    return LoadedModel(
        module=module,
        input_channels=_int_kwarg(kwargs, "in_channels", "input_channels", "num_input_channels"),
        num_classes=_int_kwarg(kwargs, "num_classes", "out_channels", "output_channels"),
        hints={"source": source},
    )


# ---------------------------------------------------------------------------------------------------
# (b) TorchScript
# ---------------------------------------------------------------------------------------------------


def load_torchscript(path: Path | str) -> LoadedModel:
    """``torch.jit.load`` on the CPU; MONAI-style extra files in the archive give hints when present."""
    path = Path(path)
    if not path.is_file():
        raise LoaderError(f"TorchScript file {path} does not exist")
    extra = {"metadata.json": "", "inference.json": ""}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit\.load.* deprecated")
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as exc:  # torch raises RuntimeError with C++ text for anything not TorchScript
        raise LoaderError(f"{path.name} is not a TorchScript archive: {str(exc).splitlines()[0]}") from exc
    module = _ready(module, path.name)
    hints: dict[str, Any] = {"source": {"kind": "torchscript", "file": path.name}}
    channels = classes = None
    if extra["metadata.json"]:
        meta = _json_text(extra["metadata.json"], f"{path.name}:metadata.json")
        channels, classes = _monai_metadata_hints(meta, hints)
    if extra["inference.json"]:
        config = _json_text(extra["inference.json"], f"{path.name}:inference.json")
        _monai_config_hints(_BundleConfig(config, path.parent, "inference.json"), hints)
        adapter_order = hints.pop("_axes", None)
        if adapter_order is not None:
            order, flips = adapter_order
            module = adapt(module, order, flips)
            _reorder_hints(hints, module)
    return LoadedModel(module, channels, classes, hints)


def _json_text(text: str | bytes, where: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LoaderError(f"{where} is not JSON: {exc}") from exc


# ---------------------------------------------------------------------------------------------------
# (c) MONAI bundle
# ---------------------------------------------------------------------------------------------------

_SKIP = object()


class _BundleConfig:
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
            other = _BundleConfig(_read_config(self.root / file), self.root, file)
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
            kwargs = {
                k: self.instantiate(v, f"{where}::{k}") for k, v in value.items() if not k.startswith("_")
            }
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
    return _json_text(text, path.name)


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
    config = _BundleConfig(_read_config(config_path), root, config_path.name)
    if not isinstance(config.config, dict) or network_key not in config.config:
        keys = sorted(config.config) if isinstance(config.config, dict) else []
        raise LoaderError(f"{config_path.name} has no {network_key!r} (it has: {', '.join(keys)})")
    try:
        network = config.instantiate(config.config[network_key], network_key)
    except _Expression as exc:
        network = _monai_parse(config_path, network_key, exc)
    network = _ready(network, f"{config_path.name}::{network_key}")

    hints: dict[str, Any] = {
        "source": {"kind": "monai-bundle", "folder": root.name, "config": config_path.name, "network": network_key}
    }
    meta_path = _find_config(root, ("metadata",))
    channels = classes = None
    if meta_path is not None:
        channels, classes = _monai_metadata_hints(_read_config(meta_path), hints)
    net_args = config.config[network_key]
    if isinstance(net_args, dict):
        try:
            args = config.literal({k: v for k, v in net_args.items() if not k.startswith("_")}, network_key)
        except _Expression:
            args = {}
        channels = channels or _int_kwarg(args, "in_channels", "input_channels")
        classes = classes or _int_kwarg(args, "out_channels", "num_classes")
    _monai_config_hints(config, hints)

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
        _reorder_hints(hints, module)
    else:
        hints.setdefault("notes", []).append(
            "reorient=False: the network gets (z, y, x) windows, not MONAI's (x, y, z); only right for a "
            "network trained that way"
        )
        _reorder_hints(hints, None)
    return LoadedModel(module, channels, classes, hints)


def _monai_parse(config_path: Path, key: str, exc: _Expression) -> Any:
    try:
        from monai.bundle import ConfigParser
    except ImportError:
        raise LoaderError(
            f"{config_path.name}: {exc} -- this loader does not evaluate expressions; install MONAI "
            "(pip install monai) to let its ConfigParser build the network, or write the value out"
        ) from exc
    log.info("%s holds a Python expression at %s; building %r with MONAI's ConfigParser", config_path.name,
             exc.where, key)
    parser = ConfigParser()
    parser.read_config(str(config_path))
    parser["bundle_root"] = str(config_path.parent.parent)
    return parser.get_parsed_content(key, instantiate=True)


def _monai_metadata_hints(meta: Any, hints: dict[str, Any]) -> tuple[int | None, int | None]:
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


def _monai_config_hints(config: _BundleConfig, hints: dict[str, Any]) -> None:
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
            norm: dict[str, Any] = {"kind": "ct_window", "lower": a_min, "upper": a_max,
                                    "mean": a_min - b_min * std, "std": std}
            if not args.get("clip", False):
                norm["lower"], norm["upper"] = -32768.0, 65535.0
                notes.append(f"{name} has clip=False: the window is left open (-32768..65535)")
            hints["normalization"] = norm
        elif name in ("NormalizeIntensityd", "NormalizeIntensity"):
            if args.get("nonzero"):
                notes.append(f"{name}(nonzero=True) normalises within the non-zero voxels; the runtime's zscore "
                             "uses the whole volume")
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


def _components(node: Any, where: str):
    if isinstance(node, dict):
        if "_target_" in node:
            yield where, node
        for k, v in node.items():
            yield from _components(v, f"{where}::{k}" if where else k)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _components(v, f"{where}[{i}]")


def _reorder_hints(hints: dict[str, Any], adapter: Any) -> None:
    """Per-axis hints from the network's order to the runtime's (z, y, x)."""
    for key, target in (("_spacing_net", "target_spacing"), ("_patch_net", "patch_size")):
        values = hints.pop(key, None)
        if values is None:
            continue
        to_runtime = getattr(adapter, "to_runtime", None)
        hints[target] = to_runtime(values) if to_runtime is not None else list(values)
    hints.pop("_axes", None)


# ---------------------------------------------------------------------------------------------------
# (d) nnU-Net v2
# ---------------------------------------------------------------------------------------------------

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
    plans = _json_text(plans_path.read_text(encoding="utf-8"), "plans.json")
    dataset = _json_text(dataset_path.read_text(encoding="utf-8"), "dataset.json")
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
            "dataset.json defines region-based labels (sigmoid outputs); the runtime supports softmax label maps only"
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
        require("dynamic_network_architectures", feature="loading nnU-Net models",
                package="dynamic_network_architectures")
    except MissingDependencyError as exc:
        raise LoaderError(str(exc)) from exc
    network = _nnunet_network(config, input_channels, num_classes)

    state = _nnunet_checkpoint(ckpt_path, allow_pickle)
    load_weights(network, state, f"{fold_dir.name}/{checkpoint}")
    network = _ready(network, "the nnU-Net network")

    transpose = [int(v) for v in plans.get("transpose_forward", [0, 1, 2])]
    if sorted(transpose) != [0, 1, 2]:
        raise LoaderError(f"plans.json transpose_forward {transpose} is not a permutation of (0, 1, 2)")
    module: nn.Module = network
    if transpose != [0, 1, 2]:
        # nnU-Net trains on data.transpose(transpose_forward); the adapter does the same per window
        module = adapt(network, transpose, [False, False, False])

    def to_runtime(values: Sequence[Any]) -> list[Any]:
        out: list[Any] = [None, None, None]
        for i, axis in enumerate(transpose):
            out[axis] = values[i]
        return out

    hints: dict[str, Any] = {
        "name": str(dataset.get("name") or plans.get("dataset_name") or root.name),
        "label_names": {v: n for v, n in names.items() if v > 0},
        "target_spacing": [float(v) for v in to_runtime(config["spacing"])],
        "patch_size": [int(v) for v in to_runtime(config["patch_size"])],
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
    notes.append("nnU-Net's test-time mirroring and ensembling over folds are not reproduced (one fold, no TTA)")
    return LoadedModel(module, input_channels, num_classes, hints)


def _nnunet_configuration(plans: dict[str, Any], name: str) -> dict[str, Any]:
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
    if "previous_stage" in config:
        raise LoaderError(f"configuration {name!r} is a cascade stage (needs {config['previous_stage']!r} first)")
    for key in ("spacing", "patch_size"):
        if key not in config:
            raise LoaderError(f"plans.json configuration {name!r} has no {key!r}")
    if len(config["patch_size"]) != 3:
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
    return [core.multiarray.scalar, core.multiarray._reconstruct, np.ndarray, np.dtype,
            *(type(np.dtype(k)) for k in kinds)]


def _nnunet_checkpoint(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
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
    state = {}
    for name, tensor in ckpt["network_weights"].items():
        state[name[len("_orig_mod."):] if name.startswith("_orig_mod.") else name] = tensor
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
