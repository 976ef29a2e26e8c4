"""Axis order: networks trained on another voxel order (MONAI's (x, y, z), nnU-Net's ``transpose_forward``) run
inside the runtime's (z, y, x) windows through an :class:`AxisAdapter`, which also maps per-axis hints back."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from export.loaders.base import LoaderError

#: our axes (z, y, x) for a standard axial series point to patient Superior, Posterior, Left (DICOM LPS):
#: the runtime keeps the volume's own (slice, row, column) grid, sorted along the slice normal
RUNTIME_DIRECTIONS = ("S", "P", "L")
_AXIS_OF_LETTER = {"S": 0, "I": 0, "A": 1, "P": 1, "L": 2, "R": 2}


def to_runtime_order(values: Sequence[Any], order: Sequence[int]) -> list[Any]:
    """Per-axis values in a network's axis order -> the runtime's (z, y, x); ``order[i]`` is the runtime axis of
    the network's axis ``i`` (as in :class:`AxisAdapter`)."""
    out: list[Any] = [None, None, None]
    for i, axis in enumerate(order):
        out[axis] = values[i]
    return out


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
        return to_runtime_order(values, self.order)


def adapt(network: nn.Module, order: Sequence[int], flips: Sequence[bool]) -> nn.Module:
    """:class:`AxisAdapter` around ``network``; scripted when ``network`` is TorchScript (a traced export cannot
    call a loaded ScriptModule from a plain module)."""
    adapter = AxisAdapter(network, order, flips).eval()
    if not isinstance(network, torch.jit.ScriptModule):
        return adapter
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit\.script.* deprecated")
        scripted = torch.jit.script(adapter)
    scripted.to_runtime = adapter.to_runtime
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
