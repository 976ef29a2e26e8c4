"""Source (a): an importable callable ``package.module:callable`` with keyword arguments and an optional
state-dict file."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from export.loaders.base import (
    LoadedModel,
    LoaderError,
    import_object,
    int_argument,
    load_weights,
    read_state_dict,
    ready_module,
)


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
    module = ready_module(module, f"{spec}(**{kwargs})")
    source: dict[str, Any] = {"kind": "factory", "factory": spec, "kwargs": kwargs}
    if state_dict is not None:
        load_weights(module, read_state_dict(Path(state_dict), allow_pickle=allow_pickle), Path(state_dict).name)
        source["state_dict"] = Path(state_dict).name
    return LoadedModel(
        module=module,
        input_channels=int_argument(kwargs, "in_channels", "input_channels", "num_input_channels"),
        num_classes=int_argument(kwargs, "num_classes", "out_channels", "output_channels"),
        hints={"source": source},
    )
