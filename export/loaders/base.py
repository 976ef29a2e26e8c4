"""What every loader shares: the result (:class:`LoadedModel`), the error (:class:`LoaderError`), import paths,
state-dict files and the checks that give a wrong file or a wrong module a message naming what does not fit."""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edge_runtime.errors import ExportError


class LoaderError(ExportError, ValueError):
    """A model source is missing, malformed, or uses something this loader does not support."""


@dataclass
class LoadedModel:
    """A module ready for export (eval mode, CPU) and what its source says about the manifest."""

    module: nn.Module
    input_channels: int | None
    num_classes: int | None
    hints: dict[str, Any] = field(default_factory=dict)


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
        hint = (
            ""
            if allow_pickle
            else (
                " If the file holds more than tensors (a training checkpoint) and you trust it, allow pickled "
                "objects (--allow-pickle)."
            )
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
        keys = f" (top-level keys: {first_few([str(k) for k in data])})" if isinstance(data, Mapping) else ""
        raise LoaderError(f"{path.name} does not hold a state dict (a mapping of names to tensors){keys}")
    out = {}
    for name, tensor in data.items():
        for prefix in ("module.", "_orig_mod."):
            if name.startswith(prefix):
                name = name[len(prefix) :]
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
            parts.append(f"missing in the file: {first_few(missing)}")
        if unexpected:
            parts.append(f"not in the module: {first_few(unexpected)}")
        if shapes:
            parts.append(f"shape differs: {first_few(shapes)}")
        raise LoaderError(f"weights from {source} do not fit the module ({'; '.join(parts)})")
    module.load_state_dict(dict(state), strict=True)


def first_few(items: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def ready_module(module: Any, what: str) -> nn.Module:
    if not isinstance(module, nn.Module):
        raise LoaderError(f"{what} gave a {type(module).__name__}, not a torch.nn.Module")
    return module.cpu().eval()


def int_argument(kwargs: Mapping[str, Any], *names: str) -> int | None:
    for name in names:
        value = kwargs.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def parse_json(text: str | bytes, where: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LoaderError(f"{where} is not JSON: {exc}") from exc
