"""nnU-Net's resampling (``nnunetv2.preprocessing.resampling.default_resampling``), as separable linear maps.

nnU-Net resizes with scikit-image's ``resize(..., order, mode="edge", anti_aliasing=False)``, which is
``scipy.ndimage.zoom(image, out / in, order, mode="nearest", grid_mode=True)`` followed by a clip to the input's
range. For anisotropic data ("separate z": the largest spacing over the smallest above ``ANISO_THRESHOLD``) nnU-Net
resizes each slice across the low-resolution axis in-plane with ``order``, clips each slice to its own range, and
then resamples along that axis with ``order_z`` (0: nearest) by ``map_coordinates`` on the half-voxel-aligned grid;
:func:`resample` reproduces both paths and nnU-Net's choice between them (:func:`separate_z_axis`).

Why maps and not ``zoom`` itself: on a regular grid, every one of these steps is a tensor product of one linear map
per axis. The spline prefilter runs along each axis, the interpolation weights of an output voxel are a product of
per-axis weights, and ``mode="nearest"`` clamps each axis on its own. So each axis's map is a small
``(n_out, n_in)`` matrix, read off scipy itself by sending the unit vectors through the same 1D call
(:func:`zoom_map`, :func:`coordinate_map`); the numbers are scipy's up to float64 rounding, for any order. A
third-order map is dense (the prefilter is an infinite filter), applied as a matrix product; a first- or
zeroth-order map touches at most two input samples per output sample, applied as two
gathers. scipy's ``zoom`` instead evaluates 4^3 = 64 (order 3) or 8 (order 1) taps per output voxel, with the
weights recomputed for each, on one core: on a 300 x 512 x 512 CT that was most of the pipeline's time.

Large outputs (logits going back to the image's grid) are made slab by slab along the first axis and handed to a
consumer (:func:`for_each_slab`), so the caller can reduce each slab (argmax) without every class's full-size array
existing at once. Slabs run in threads (numpy and BLAS release the GIL), with BLAS held to one thread of its own.
The arithmetic is float64 as nnU-Net's unless the caller asks for float32 (the labels' way back from float16
logits does: :mod:`.labelmap`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage
from threadpoolctl import threadpool_limits

from edge_runtime.inference.nnunet.settings import Resampling

#: output voxels (all channels) per slab handed to a consumer: small enough to bound the working set (a few arrays
#: of this many values), large enough that numpy's per-call cost is lost
SLAB_VOXELS = 1 << 21
#: input elements cast to float64 at a time for a dense map (bounds the float64 copy of a large float32 image)
CAST_BLOCK = 1 << 22
#: output samples per matrix product of a dense map, and the relative weight below which it reads no further
ROW_BLOCK = 64
TRIM = 1e-15


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


@dataclass(frozen=True)
class AxisMap:
    """One axis's resampling, ``out = matrix @ in`` along the axis. A map with at most two non-zero weights per
    output sample (orders 0 and 1) also carries them as gathers: ``out[i] = sum_t weight[t, i] * in[index[t, i]]``."""

    matrix: np.ndarray
    index: np.ndarray | None = None
    weight: np.ndarray | None = None

    def rows(self, rows: slice) -> AxisMap:
        """The map of the output samples ``rows`` only."""
        if self.index is None or self.weight is None:
            return AxisMap(self.matrix[rows])
        return AxisMap(self.matrix[rows], self.index[:, rows], self.weight[:, rows])

    def support(self) -> slice:
        """The input samples the map reads."""
        used = np.flatnonzero(np.any(self.matrix != 0, axis=0))
        return slice(int(used[0]), int(used[-1]) + 1) if used.size else slice(0, 0)

    def shifted(self, start: int, stop: int) -> AxisMap:
        """The map reading ``in[start:stop]`` only (the caller passes that part)."""
        if self.index is None:
            return AxisMap(self.matrix[:, start:stop])
        return AxisMap(self.matrix[:, start:stop], self.index - start, self.weight)


def _from_columns(columns: list[np.ndarray]) -> AxisMap:
    matrix = np.stack(columns, axis=1)
    matrix.setflags(write=False)
    nonzero = matrix != 0
    if nonzero.sum(axis=1).max(initial=0) > 2:
        return AxisMap(matrix)
    # at most two taps per output sample: the first and last non-zero column of each row (the same one, weight 0
    # on the second, where a row has one)
    first = np.argmax(nonzero, axis=1)
    last = matrix.shape[1] - 1 - np.argmax(nonzero[:, ::-1], axis=1)
    rows = np.arange(matrix.shape[0])
    index = np.stack([first, last])
    weight = np.stack([matrix[rows, first], np.where(last != first, matrix[rows, last], 0.0)])
    return AxisMap(matrix, index.astype(np.intp), weight)


#: maps kept per process: a case uses up to six; a dense 1024-sample map is 8 MB
MAPS_CACHED = 16


@lru_cache(maxsize=MAPS_CACHED)
def zoom_map(n_in: int, n_out: int, order: int) -> AxisMap:
    """``ndimage.zoom(x, n_out / n_in, order, mode="nearest", grid_mode=True)`` on a length-``n_in`` axis (what
    scikit-image's ``resize(mode="edge", anti_aliasing=False)`` runs), as a map."""
    eye = np.eye(n_in)
    return _from_columns([ndimage.zoom(eye[j], n_out / n_in, order=order, mode="nearest", grid_mode=True)
                          for j in range(n_in)])


@lru_cache(maxsize=MAPS_CACHED)
def coordinate_map(n_in: int, n_out: int, order: int) -> AxisMap:
    """nnU-Net's step along the separate axis: ``map_coordinates`` at ``(i + 0.5) * n_in / n_out - 0.5``
    (align_corners=False) with ``mode="nearest"``, as a map."""
    coords = (float(n_in) / n_out * (np.arange(n_out) + 0.5) - 0.5)[None]
    eye = np.eye(n_in)
    return _from_columns([ndimage.map_coordinates(eye[j], coords, order=order, mode="nearest") for j in range(n_in)])


@dataclass(frozen=True)
class _Step:
    """Map ``amap`` along spatial ``axis``; or, with ``amap`` None, clip to ranges taken over every spatial axis
    but ``axis`` (None: over all of them)."""

    axis: int | None
    amap: AxisMap | None = None


def _plan(shape: Sequence[int], new_shape: Sequence[int], axis: int | None, how: Resampling) -> list[_Step]:
    """nnU-Net's order of operations. Maps along different axes commute, so within that order the first axis
    goes first (slabs along it are then cheap: see :func:`for_each_slab`) and the others from the last axis back
    (the gathers of a later step then copy whole contiguous rows)."""
    changed = sorted((a for a in range(len(shape)) if shape[a] != new_shape[a]), key=lambda a: (a != 0, -a))
    # scikit-image clips to the input's range; the weights of orders 0 and 1 are non-negative and sum to one, so
    # their results are in that range already
    clip = how.order > 1
    if axis is None:
        steps = [_Step(a, zoom_map(shape[a], new_shape[a], how.order)) for a in changed]
        return steps + ([_Step(None)] if clip else [])
    # in-plane resize of each slice (clipped to that slice's range), then the separate axis
    steps = [_Step(a, zoom_map(shape[a], new_shape[a], how.order)) for a in changed if a != axis]
    if clip:
        steps.append(_Step(axis))
    if axis in changed:
        steps.append(_Step(axis, coordinate_map(shape[axis], new_shape[axis], how.order_z)))
    return steps


def _clip_ranges(data: np.ndarray, axis: int | None, work: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Per channel (and per slice along ``axis``) minimum and maximum, shaped to broadcast over ``data``."""
    over = tuple(a + 1 for a in range(data.ndim - 1) if a != axis)
    return data.min(axis=over, keepdims=True).astype(work), data.max(axis=over, keepdims=True).astype(work)


def _apply(data: np.ndarray, amap: AxisMap, axis: int, work: np.dtype) -> np.ndarray:
    """``amap`` along array axis ``axis`` of ``data``, in ``work`` arithmetic: as gathers when the map has them (no
    BLAS: many small matrix products in OpenBLAS's threads, beside the slab threads, ran 50x slower on a loaded
    machine), as matrix products otherwise."""
    if amap.index is not None and amap.weight is not None:
        where = [1] * data.ndim
        where[axis] = -1
        weight = amap.weight.astype(work, copy=False)
        out = np.multiply(np.take(data, amap.index[0], axis=axis), weight[0].reshape(where), dtype=work)
        if np.any(weight[1]):
            out += np.multiply(np.take(data, amap.index[1], axis=axis), weight[1].reshape(where), dtype=work)
        return out
    return _dense(data, amap.matrix.astype(work, copy=False), axis)


def _row_blocks(matrix: np.ndarray) -> list[tuple[slice, slice]]:
    """Blocks of ``ROW_BLOCK`` output samples and the input samples each block reads. A third-order map is dense
    only in principle: its weights fall by a factor of 0.27 per input sample away from the output's position (the
    pole of the cubic spline prefilter), so the weights under ``TRIM`` times a row's largest (beyond about 26
    samples) are left out, changing a result by less than 1e-14 of the input's largest value."""
    magnitude = np.abs(matrix)
    keep = magnitude > TRIM * magnitude.max(axis=1, keepdims=True)
    blocks = []
    for lo in range(0, matrix.shape[0], ROW_BLOCK):
        rows = slice(lo, min(lo + ROW_BLOCK, matrix.shape[0]))
        used = np.flatnonzero(keep[rows].any(axis=0))
        blocks.append((rows, slice(int(used[0]), int(used[-1]) + 1)))
    return blocks


def _dense(data: np.ndarray, matrix: np.ndarray, axis: int) -> np.ndarray:
    """``matrix`` along ``axis`` as matrix products in the matrix's dtype, block of rows by block of rows (each with
    the input samples it reads: :func:`_row_blocks`), the input cast to that dtype a block of lines at a time."""
    pre, n = math.prod(data.shape[:axis]), data.shape[axis]
    post = math.prod(data.shape[axis + 1:])
    x = data.reshape(pre, n, post)
    work = matrix.dtype
    out = np.empty((pre, matrix.shape[0], post), dtype=work)
    blocks = _row_blocks(matrix)
    if post == 1:  # the last axis: rows of x times the matrix's transpose
        step = max(1, CAST_BLOCK // n)
        for lo in range(0, pre, step):
            part = x[lo:lo + step, :, 0].astype(work)
            for rows, cols in blocks:
                np.matmul(part[:, cols], matrix[rows, cols].T, out=out[lo:lo + step, rows, 0])
    elif pre == 1:  # the first axis: the matrix times blocks of columns
        step = max(1, CAST_BLOCK // n)
        for lo in range(0, post, step):
            part = x[0, :, lo:lo + step].astype(work)
            for rows, cols in blocks:
                np.matmul(matrix[rows, cols], part[cols], out=out[0, rows, lo:lo + step])
    else:
        step = max(1, CAST_BLOCK // (n * post))
        for lo in range(0, pre, step):
            part = x[lo:lo + step].astype(work)
            for rows, cols in blocks:
                np.matmul(matrix[rows, cols], part[:, cols], out=out[lo:lo + step, rows])
    return out.reshape(*data.shape[:axis], matrix.shape[0], *data.shape[axis + 1:])


Ranges = dict[int | None, tuple[np.ndarray, np.ndarray]]


def _run(data: np.ndarray, steps: Sequence[_Step], ranges: Ranges, work: np.dtype) -> np.ndarray:
    """The steps on ``(C, *spatial)`` data; the result is of dtype ``work`` when any step ran (the caller's array
    is never written)."""
    ours = False
    for step in steps:
        if step.amap is None:
            low, high = ranges[step.axis]
            data = np.clip(data, low, high, out=data if ours else None, dtype=work)
        else:
            assert step.axis is not None
            data = _apply(data, step.amap, step.axis + 1, work)
        ours = True
    return data


def default_threads() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def for_each_slab(
    data: np.ndarray,
    new_shape: Sequence[int],
    spacing: Sequence[float],
    new_spacing: Sequence[float],
    how: Resampling,
    threshold: float,
    consume: Callable[[slice, np.ndarray], None],
    *,
    threads: int | None = None,
    slab_voxels: int = SLAB_VOXELS,
    precision: type = np.float64,
) -> None:
    """``resample(data, ...)`` handed to ``consume(rows, slab)`` a slab of the first spatial axis at a time:
    ``slab`` is the ``(C, len(rows), ...)`` part of the result before any cast, computed in ``precision``
    arithmetic (nnU-Net's is float64). Slabs run in ``threads`` threads (default: every core), so ``consume`` must
    write only its own rows."""
    work = np.dtype(precision)
    new_shape = tuple(int(v) for v in new_shape)
    shape = tuple(data.shape[1:])
    axis = separate_z_axis(spacing, new_spacing, how.force_separate_z, threshold)
    steps = _plan(shape, new_shape, axis, how)
    ranges = {s.axis: _clip_ranges(data, s.axis, work) for s in steps if s.amap is None}
    # everything before the first axis's map runs on the whole array once; the first axis's map is then cut into
    # its output rows, and each slab runs it and the steps after it
    first = next((i for i, s in enumerate(steps) if s.axis == 0 and s.amap is not None), None)
    staged = _run(data, steps[:first], ranges, work) if first is not None else data
    rest = steps[first + 1:] if first is not None else []
    first_map = steps[first].amap if first is not None else None
    per_row = max(1, data.shape[0] * math.prod(new_shape[1:]))
    rows_per_slab = max(1, min(new_shape[0], slab_voxels // per_row))

    def one(lo: int) -> None:
        rows = slice(lo, min(lo + rows_per_slab, new_shape[0]))
        if first_map is None:  # the first axis keeps its size: a slab's rows are the input's rows
            sliced = {k: (low[:, rows], high[:, rows]) if k == 0 else (low, high)
                      for k, (low, high) in ranges.items()}
            slab = _run(staged[:, rows], steps, sliced, work).astype(work, copy=False)
        else:
            part = first_map.rows(rows)
            reads = part.support()
            slab = _run(_apply(staged[:, reads], part.shifted(reads.start, reads.stop), 1, work), rest, ranges, work)
        consume(rows, slab)

    starts = range(0, new_shape[0], rows_per_slab)
    workers = min(threads or default_threads(), len(starts))
    # BLAS at one thread, the slabs in ours: OpenBLAS's threads spin while they wait, and beside the slab threads,
    # ONNX Runtime's or other work on the machine they ran a 300x512x512 third-order resampling 3-5x slower
    with threadpool_limits(1, user_api="blas"):
        if workers <= 1:
            for lo in starts:
                one(lo)
            return
        with ThreadPoolExecutor(workers) as pool:
            for done in pool.map(one, starts):
                del done


def resample(
    data: np.ndarray,
    new_shape: Sequence[int],
    spacing: Sequence[float],
    new_spacing: Sequence[float],
    how: Resampling,
    threshold: float,
    dtype: np.dtype | type | None = None,
    *,
    threads: int | None = None,
) -> np.ndarray:
    """``resample_data_or_seg_to_shape(data, new_shape, spacing, new_spacing, is_seg=False, ...)`` for a
    ``(C, *spatial)`` array; the result has ``dtype`` (default: the input's), as nnU-Net casts its float64 result."""
    new_shape = tuple(int(v) for v in new_shape)
    if tuple(data.shape[1:]) == new_shape:
        return data if dtype is None else data.astype(dtype, copy=False)
    out = np.empty((data.shape[0], *new_shape), dtype=dtype or data.dtype)

    def keep(rows: slice, slab: np.ndarray) -> None:
        out[:, rows] = slab

    for_each_slab(data, new_shape, spacing, new_spacing, how, threshold, keep, threads=threads)
    return out


def resize(image: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """scikit-image's ``resize(image, shape, order, mode="edge", anti_aliasing=False)`` of one float64 image (any
    number of axes), float64."""
    shape = tuple(int(v) for v in shape)
    if image.shape == shape:
        return image.copy()
    steps = [_Step(a, zoom_map(n, m, order)) for a, (n, m) in enumerate(zip(image.shape, shape, strict=True)) if n != m]
    out = _run(image[None], steps, {}, np.dtype(np.float64))[0]
    if order > 0:
        np.clip(out, image.min(), image.max(), out=out)
    return out
