"""nnU-Net's cascade: a ``3d_lowres`` stage whose label map becomes input channels of ``3d_cascade_fullres``.

nnU-Net runs the stages as two predictions: ``nnUNetv2_predict -c 3d_lowres`` writes each case's label map on the
image's own grid (no post-processing), and ``nnUNetv2_predict -c 3d_cascade_fullres -prev_stage_predictions``
reads it back (as float32, SimpleITK's reader) beside the image. ``DefaultPreprocessor.run_case_npy`` then treats
it as the case's segmentation: transposed and cropped with the image, voxels outside the non-zero mask that are
background marked -1 (``crop_to_nonzero``), resampled to the stage's spacing with ``resampling_fn_seg``
(``resample_data_or_seg_to_shape(is_seg=True)``), and appended to the normalised image as one float channel per
foreground label (``convert_labelmap_to_one_hot(seg, label_manager.foreground_labels)``: background and -1 give
no channel). :func:`previous_stage_channels` is that path; :func:`resample_segmentation` is nnU-Net's
segmentation resampling, whose in-plane step is batchgenerators' ``resize_segmentation``
(:func:`resize_segmentation`: every label's indicator resized, the per-voxel largest wins, exact ties go to the
nearest-neighbour label when it is one of them).

The package holds the previous stage as a package of its own (``previous_stage``), and the service's runner for a
cascade package is a :class:`CascadeRunner`: this stage's runner with the previous stage's beside it, on the same
backend and device.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from edge_runtime.errors import RunnerError
from edge_runtime.inference.nnunet.resampling import resize, separate_z_axis
from edge_runtime.inference.nnunet.settings import PreviousStage, Resampling
from edge_runtime.inference.package import ModelPackage
from edge_runtime.inference.runner.base import Runner

#: crop_to_nonzero's mark for background outside the non-zero mask
OUTSIDE = -1


def previous_stage_channels(
    labels: np.ndarray,
    transpose: Sequence[int],
    where: tuple[slice, ...],
    mask: np.ndarray,
    new_shape: Sequence[int],
    spacing: Sequence[float],
    new_spacing: Sequence[float],
    stage: PreviousStage,
    threshold: float,
) -> np.ndarray:
    """``(L, *new_shape)`` float32 one-hot channels of the previous stage's label map (on the image's grid), as
    ``run_case_npy`` and ``convert_labelmap_to_one_hot`` give them: transposed, cropped to ``where``, background
    outside ``mask`` (the cropped non-zero mask) marked -1, resampled from ``spacing`` to ``new_spacing``."""
    seg = np.ascontiguousarray(labels.transpose(list(transpose))[where], dtype=np.int16)
    seg[(seg == 0) & ~mask] = OUTSIDE
    seg = resample_segmentation(seg, new_shape, spacing, new_spacing, stage.resampling, threshold)
    out = np.empty((len(stage.one_hot_labels), *seg.shape), dtype=np.float32)
    for k, value in enumerate(stage.one_hot_labels):
        np.equal(seg, value, out=out[k], casting="unsafe")
    return out


def resample_segmentation(
    seg: np.ndarray,
    new_shape: Sequence[int],
    spacing: Sequence[float],
    new_spacing: Sequence[float],
    how: Resampling,
    threshold: float,
) -> np.ndarray:
    """``resample_data_or_seg_to_shape(seg[None], new_shape, spacing, new_spacing, is_seg=True, ...)[0]`` for one
    ``(Z, Y, X)`` integer label map (nnU-Net's choice of separate z included)."""
    new_shape = tuple(int(v) for v in new_shape)
    if seg.shape == new_shape:
        return seg
    axis = separate_z_axis(spacing, new_spacing, how.force_separate_z, threshold)
    if axis is None:
        return resize_segmentation(seg, new_shape, how.order)
    staged_shape = list(new_shape)
    staged_shape[axis] = seg.shape[axis]
    in_plane = tuple(n for i, n in enumerate(new_shape) if i != axis)
    staged = np.empty(staged_shape, dtype=seg.dtype)
    for k in range(seg.shape[axis]):
        at = tuple(k if i == axis else slice(None) for i in range(seg.ndim))
        staged[at] = resize_segmentation(seg[at], in_plane, how.order)
    if seg.shape[axis] == new_shape[axis]:
        return staged
    # along the separate axis, on map_coordinates' (i + 0.5) * scale - 0.5 grid with 'nearest' edges
    scale = staged.shape[axis] / new_shape[axis]
    coords = scale * (np.arange(new_shape[axis]) + 0.5) - 0.5
    if how.order_z == 0:
        index = ndimage.map_coordinates(np.arange(staged.shape[axis], dtype=np.float64), coords[None], order=0,
                                        mode="nearest").astype(np.intp)
        return np.take(staged, index, axis=axis)
    grid = np.mgrid[tuple(slice(0, n) for n in new_shape)].astype(np.float64)
    grid[axis] = coords.reshape([-1 if i == axis else 1 for i in range(len(new_shape))]) * np.ones(new_shape)
    out = np.zeros(new_shape, dtype=seg.dtype)
    for value in np.unique(staged):  # ascending: a later label paints over an earlier one
        score = ndimage.map_coordinates((staged == value).astype(np.float64), grid, order=how.order_z, mode="nearest")
        out[np.round(score) > 0.5] = value
    return out


def resize_segmentation(seg: np.ndarray, new_shape: Sequence[int], order: int) -> np.ndarray:
    """batchgenerators' ``resize_segmentation(seg, new_shape, order)`` (``seg_tiebreak="nearest"``): each label's
    indicator resized as scikit-image resizes (edge mode, clipped), the label of the largest score wins (the first,
    in ascending label order, on a tie), and where the nearest-neighbour sample's label shares the top score (and
    it is above zero) that label wins instead."""
    new_shape = tuple(int(v) for v in new_shape)
    if order == 0:
        return resize(seg.astype(np.float64), new_shape, 0).astype(seg.dtype)
    values = np.unique(seg)
    if len(values) == 1:
        return np.full(new_shape, values[0], dtype=seg.dtype)
    nearest = np.searchsorted(values, resize(seg.astype(np.float64), new_shape, 0))
    best = np.zeros(new_shape)
    winner = np.zeros(new_shape, dtype=np.intp)
    nearest_score = np.zeros(new_shape)
    for i, value in enumerate(values):
        score = resize((seg == value).astype(np.float64), new_shape, order)
        np.copyto(winner, i, where=score > best)
        np.copyto(nearest_score, score, where=nearest == i)
        np.maximum(best, score, out=best)
    tie = (nearest_score == best) & (nearest_score > 0)
    winner[tie] = nearest[tie]
    return values[winner]


class CascadeRunner(Runner):
    """A cascade package's runner: ``infer`` runs this (last) stage; :attr:`previous` runs the stage before it.
    Both run on the same backend and device, and close together."""

    def __init__(self, package: ModelPackage, final: Runner, previous: Runner):
        super().__init__(package)
        self.final = final
        self.previous = previous
        self.name = final.name

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.final.infer(batch)

    def _infer(self, batch: np.ndarray) -> np.ndarray:  # pragma: no cover - infer() delegates
        return self.final.infer(batch)

    def describe(self) -> str:
        return f"{self.final.describe()} (cascade; previous stage: {self.previous.describe()})"

    def ready(self) -> tuple[bool, str]:
        ok, why = self.final.ready()
        ok_prev, why_prev = self.previous.ready()
        return ok and ok_prev, why if not ok else why_prev

    def close(self) -> None:
        try:
            self.previous.close()
        finally:
            self.final.close()


def previous_runner(runner: Runner) -> Runner:
    """The previous stage's runner of a cascade package's runner (:class:`RunnerError` when it has none)."""
    if not isinstance(runner, CascadeRunner):
        raise RunnerError(f"{runner.package.identity} is a cascade stage; its runner must carry the previous "
                          f"stage's (load it with load_runner), got a plain {runner.name} runner")
    return runner.previous
