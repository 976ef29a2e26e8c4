"""nnU-Net's resampling (``nnunetv2.preprocessing.resampling.default_resampling``), in scipy alone.

nnU-Net resizes with scikit-image's ``resize(..., order, mode="edge", anti_aliasing=False)``, which is
``scipy.ndimage.zoom(image, out / in, order, mode="nearest", grid_mode=True)`` followed by a clip to the input's
range; :func:`resize` is exactly that, so the runtime does not need scikit-image. For anisotropic data
("separate z": the largest spacing over the smallest above ``ANISO_THRESHOLD``) nnU-Net resizes each slice across the
low-resolution axis in-plane with ``order`` and then resamples along that axis with ``order_z`` (0: nearest) by
``map_coordinates`` on the half-voxel-aligned grid; :func:`resample` reproduces both paths and nnU-Net's decision
between them (:func:`separate_z_axis`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from edge_runtime.inference.nnunet.settings import Resampling


def compute_new_shape(shape: Sequence[int], spacing: Sequence[float], new_spacing: Sequence[float]) -> tuple[int, ...]:
    """nnU-Net's ``compute_new_shape``: ``round(old spacing / new spacing * old shape)`` per axis."""
    return tuple(int(round(s / n * k)) for s, n, k in zip(spacing, new_spacing, shape, strict=True))


def _lowres_axes(spacing: Sequence[float]) -> list[int]:
    values = np.asarray(spacing, dtype=float)
    return [int(i) for i in np.where(max(values) / values == 1)[0]]


def separate_z_axis(
    spacing: Sequence[float], new_spacing: Sequence[float], force: bool | None, threshold: float
) -> int | None:
    """The axis nnU-Net resamples apart (``determine_do_sep_z_and_axis``), or None for one 3D resize."""
    if force is not None:
        axes = _lowres_axes(spacing) if force else None
    elif max(spacing) / min(spacing) > threshold:
        axes = _lowres_axes(spacing)
    elif max(new_spacing) / min(new_spacing) > threshold:
        axes = _lowres_axes(new_spacing)
    else:
        axes = None
    # two or three equally coarse axes: nnU-Net resamples in 3D
    return axes[0] if axes is not None and len(axes) == 1 else None


def resize(image: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """scikit-image's ``resize(image, shape, order, mode="edge", anti_aliasing=False)`` on a float64 image."""
    factors = np.divide(image.shape, shape)
    out = ndimage.zoom(image, [1 / f for f in factors], order=order, mode="nearest", cval=0, grid_mode=True)
    if order > 0:  # scikit-image clips higher-order interpolation to the input's range
        np.clip(out, image.min(), image.max(), out=out)
    return out


def resample(
    data: np.ndarray,
    new_shape: Sequence[int],
    spacing: Sequence[float],
    new_spacing: Sequence[float],
    how: Resampling,
    threshold: float,
    dtype: np.dtype | type | None = None,
) -> np.ndarray:
    """``resample_data_or_seg_to_shape(data, new_shape, spacing, new_spacing, is_seg=False, ...)`` for a
    ``(C, *spatial)`` array; the result has ``dtype`` (default: the input's)."""
    new_shape = tuple(int(v) for v in new_shape)
    shape = data.shape[1:]
    if tuple(shape) == new_shape:
        return data if dtype is None else data.astype(dtype, copy=False)
    out = np.zeros((data.shape[0], *new_shape), dtype=dtype or data.dtype)
    axis = separate_z_axis(spacing, new_spacing, how.force_separate_z, threshold)
    for c in range(data.shape[0]):
        channel = data[c].astype(np.float64, copy=False)
        if axis is None:
            out[c] = resize(channel, new_shape, how.order)
        else:
            out[c] = _resample_separate_z(channel, new_shape, axis, how)
    return out


def _resample_separate_z(image: np.ndarray, new_shape: tuple[int, ...], axis: int, how: Resampling) -> np.ndarray:
    in_plane = tuple(n for i, n in enumerate(new_shape) if i != axis)
    staged_shape = list(new_shape)
    staged_shape[axis] = image.shape[axis]
    staged = np.zeros(staged_shape)
    for k in range(image.shape[axis]):
        where = [slice(None)] * image.ndim
        where[axis] = k  # type: ignore[call-overload]
        staged[tuple(where)] = resize(image[tuple(where)], in_plane, how.order)
    if image.shape[axis] == new_shape[axis]:
        return staged
    # along the separate axis: map_coordinates on (i + 0.5) * scale - 0.5 (align_corners=False), 'nearest' edges;
    # the other axes keep a scale of 1, so their coordinates are the integer voxel centres themselves
    scale = float(staged.shape[axis]) / new_shape[axis]
    coords = scale * (np.arange(new_shape[axis]) + 0.5) - 0.5
    if how.order_z == 0:
        # nearest neighbour is separable: pick the source index as map_coordinates rounds it
        index = ndimage.map_coordinates(np.arange(staged.shape[axis], dtype=np.float64), coords[None], order=0,
                                        mode="nearest")
        return np.take(staged, index.astype(np.intp), axis=axis)
    grid = np.mgrid[tuple(slice(0, n) for n in new_shape)].astype(np.float64)
    grid[axis] = coords.reshape([-1 if i == axis else 1 for i in range(len(new_shape))]) * np.ones(new_shape)
    return ndimage.map_coordinates(staged, grid, order=how.order_z, mode="nearest")
