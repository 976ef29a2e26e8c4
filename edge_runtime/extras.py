"""Import heavy optional dependencies where they are used, with a message naming the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from edge_runtime.errors import MissingDependencyError


def require(module: str, *, feature: str, extra: str | None = None, package: str | None = None) -> ModuleType:
    """Import ``module`` or raise an error that says which feature needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        how = f"pip install 'edge-runtime[{extra}]'" if extra else f"pip install {package or module}"
        raise MissingDependencyError(
            f"{feature} needs the Python package '{package or module}', which is not installed "
            f"({exc}). Install it with: {how}"
        ) from exc
