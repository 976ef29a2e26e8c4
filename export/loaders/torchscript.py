"""Source (b): a TorchScript file (``torch.jit.load``). MONAI's ``model.ts`` carries ``metadata.json`` and
``inference.json`` as extra files; when present they give the same hints as a bundle folder."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from export.loaders.axes import adapt
from export.loaders.base import LoadedModel, LoaderError, parse_json, ready_module
from export.loaders.monai import BundleConfig, config_hints, metadata_hints, reorder_hints


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
    module = ready_module(module, path.name)
    hints: dict[str, Any] = {"source": {"kind": "torchscript", "file": path.name}}
    channels = classes = None
    if extra["metadata.json"]:
        meta = parse_json(extra["metadata.json"], f"{path.name}:metadata.json")
        channels, classes = metadata_hints(meta, hints)
    if extra["inference.json"]:
        config = parse_json(extra["inference.json"], f"{path.name}:inference.json")
        config_hints(BundleConfig(config, path.parent, "inference.json"), hints)
        adapter_order = hints.pop("_axes", None)
        if adapter_order is not None:
            order, flips = adapter_order
            module = adapt(module, order, flips)
            reorder_hints(hints, module)
    return LoadedModel(module, channels, classes, hints)
