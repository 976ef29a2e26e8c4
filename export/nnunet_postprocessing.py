"""nnU-Net's ``postprocessing.pkl`` read as data, never executed.

``nnUNetv2_find_best_configuration`` pickles ``(functions, kwargs)`` into
``crossval_results_folds_<folds>/postprocessing.pkl``: a list of references to nnU-Net's own functions and a list of
their keyword arguments (``labels_or_regions``: ints, numpy ints, tuples and lists). Unpickling it with pickle's
defaults would import and could call anything the file names. Here a restricted unpickler resolves only the names
such a file holds (nnU-Net's post-processing function, numpy's scalar and dtype constructors) and maps the function
to a marker, so nothing of nnU-Net is imported or run; the result becomes the manifest's declarative steps
(:class:`~edge_runtime.inference.nnunet.postprocessing.KeepLargestComponent`). Anything else is refused by name.
"""

from __future__ import annotations

import importlib
import io
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.inference.nnunet.postprocessing import KEEP_LARGEST, KeepLargestComponent, parse_postprocessing
from export.loaders.base import LoaderError

#: where nnU-Net's function lives (its postprocessing.pkl names it by module and name)
KEEP_LARGEST_MODULE = "nnunetv2.postprocessing.remove_connected_components"
#: numpy's constructors for the numpy integer labels nnU-Net's LabelManager gives (np.unique): data only
NUMPY_NAMES = {("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("numpy", "dtype")}


class _Function:
    """Stands for a function the pickle names; never called."""

    def __init__(self, name: str):
        self.name = name


class _DataOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == (KEEP_LARGEST_MODULE, KEEP_LARGEST):
            return _Function(name)
        if (module, name) in NUMPY_NAMES:
            return getattr(importlib.import_module(module), name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of nnU-Net's post-processing")


def find_postprocessing(root: Path, folds: Sequence[str]) -> Path | None:
    """nnU-Net's file for these folds: ``crossval_results_folds_0_1_.../postprocessing.pkl`` in the trained-model
    folder (where nnUNetv2_find_best_configuration writes it), else ``postprocessing.pkl`` beside plans.json."""
    for path in (root / f"crossval_results_folds_{'_'.join(str(f) for f in folds)}" / "postprocessing.pkl",
                 root / "postprocessing.pkl"):
        if path.is_file():
            return path
    return None


def read_postprocessing(path: Path) -> tuple[KeepLargestComponent, ...]:
    """The steps of a postprocessing.pkl, or :class:`LoaderError` naming what the runtime cannot reproduce."""
    try:
        loaded = _DataOnly(io.BytesIO(path.read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise LoaderError(f"{path.name}: not nnU-Net's post-processing ({exc})") from exc
    if not (isinstance(loaded, (tuple, list)) and len(loaded) == 2
            and all(isinstance(part, (list, tuple)) for part in loaded) and len(loaded[0]) == len(loaded[1])):
        raise LoaderError(f"{path.name}: expected nnU-Net's (functions, kwargs) pair, got {type(loaded).__name__}")
    entries = []
    for function, kwargs in zip(*loaded, strict=True):
        if not isinstance(function, _Function) or not isinstance(kwargs, dict):
            raise LoaderError(f"{path.name}: a step is {function!r} with {kwargs!r}")
        entries.append({"function": function.name, **_plain(kwargs)})
    problems: list[str] = []
    steps = parse_postprocessing([_one_step(e) for e in entries], problems)
    if problems:
        raise LoaderError(f"{path.name}: " + "; ".join(problems))
    return steps


def _one_step(entry: dict[str, Any]) -> dict[str, Any]:
    """nnU-Net's kwargs as the manifest writes them: a lone region (a tuple) is one target, as nnU-Net's function
    wraps anything but a list in a list."""
    targets = entry.get("labels_or_regions")
    if isinstance(targets, tuple):
        entry["labels_or_regions"] = [list(targets)]
    return entry


def _plain(value: Any) -> Any:
    """numpy integers as ints, tuples kept (they mean regions), lists and dicts walked."""
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, list):
        return [list(v) if isinstance(v, tuple) else v for v in (_plain(v) for v in value)]
    return value
