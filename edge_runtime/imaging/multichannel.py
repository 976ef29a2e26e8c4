"""Several series of one study on one grid: every channel resampled onto the first channel's voxels.

Series of one study that share a Frame of Reference share patient coordinates, not grids: a T2 may have thicker
slices, another field of view or another orientation than the T1 it is read with. The model needs the channels
voxel for voxel, so each is sampled at the first channel's voxel centres, found in patient coordinates (LPS mm)
through both volumes' geometry, with trilinear interpolation; along the other volume's slice axis its true slice
positions are used, so an irregular stack is interpolated correctly too. Points outside the other volume take
its lowest value (what lies outside a field of view is background, not the mean).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from edge_runtime.imaging.volume import Volume


def same_grid(a: Volume, b: Volume, tolerance_mm: float = 1e-3) -> bool:
    """Whether ``b``'s voxels sit where ``a``'s do (then no resampling is needed)."""
    return (
        a.array.shape == b.array.shape
        and np.allclose(a.origin, b.origin, atol=tolerance_mm)
        and np.allclose(a.row_direction, b.row_direction, atol=1e-6)
        and np.allclose(a.column_direction, b.column_direction, atol=1e-6)
        and np.allclose(a.spacing[1:], b.spacing[1:], atol=tolerance_mm)
        and np.allclose(a.positions, b.positions, atol=tolerance_mm)
    )


def resample_onto(reference: Volume, other: Volume) -> np.ndarray:
    """``other``'s values at ``reference``'s voxel centres, float32, shaped like ``reference.array``.

    One reference slice at a time, so the coordinates held are those of one plane, not of the volume."""
    if same_grid(reference, other):
        return other.array.astype(np.float32, copy=False)
    _, rows, cols = reference.array.shape
    i, j = np.meshgrid(np.arange(rows, dtype=np.float64), np.arange(cols, dtype=np.float64), indexing="ij")
    # the reference plane's points relative to its first slice's origin
    in_plane = (
        i[..., None] * (reference.column_direction * reference.spacing[1])
        + j[..., None] * (reference.row_direction * reference.spacing[2])
    ).reshape(-1, 3)
    source = other.array.astype(np.float32, copy=False)
    fill = float(source.min())
    slice_index = np.arange(len(other.positions), dtype=np.float64)
    out = np.empty(reference.array.shape, dtype=np.float32)
    for k, offset in enumerate(reference.positions):
        points = in_plane + (reference.origin + reference.normal * float(offset) - other.origin)
        along = points @ other.normal
        z = np.interp(along, other.positions, slice_index, left=-1.0, right=float(len(slice_index)))
        y = points @ other.column_direction / other.spacing[1]
        x = points @ other.row_direction / other.spacing[2]
        out[k] = ndimage.map_coordinates(source, [z, y, x], order=1, mode="constant", cval=fill).reshape(rows, cols)
    return out


def stack_channels(volumes: Sequence[Volume]) -> np.ndarray:
    """``(C, Z, Y, X)`` float32 on the first volume's grid, channels in the order given."""
    reference = volumes[0]
    out = np.empty((len(volumes), *reference.array.shape), dtype=np.float32)
    out[0] = reference.array
    for c, other in enumerate(volumes[1:], start=1):
        out[c] = resample_onto(reference, other)
    return out
