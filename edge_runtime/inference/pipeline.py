"""From a volume to a label map on the source grid: resample, normalise, sliding window, argmax, map back.

Grids are aligned on the centre of the first voxel. Along the slice axis the true slice positions are used,
so an irregularly spaced stack is interpolated onto a regular grid and every source slice takes the label of
the nearest model slice. In-plane resampling is separable linear interpolation; the way back is nearest
neighbour on the label map, which keeps the result exactly pixel-aligned with the source images.

Confidence comes from the blended logits the sliding window already holds: the softmax probability of the
chosen label is ``1 / sum_k exp(l_k - l_max)``, computed one class at a time on the model grid (one float32
volume of scratch, never a K-volume of probabilities), then mapped back like the labels, so each source voxel
carries the confidence of exactly the model voxel whose label it took.

The logits never exist for the whole volume: each row of model slices is reduced as soon as the sliding window
has finished it, and mapped back to the source slices that take it (:class:`Finishing`, over
:mod:`edge_runtime.inference.postprocess`), the same way streaming inference does while a series arrives. The
grid is anchored where the acquisition starts (:func:`acquisition_order`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from edge_runtime.imaging.geometry import SliceGeometry
from edge_runtime.imaging.volume import Volume
from edge_runtime.inference.package import ModelPackage, Normalization
from edge_runtime.inference.postprocess import Segmentation as Segmentation
from edge_runtime.inference.postprocess import SourceMaps, argmax_and_max, probabilities_uint8
from edge_runtime.inference.postprocess import chosen_probability as chosen_probability
from edge_runtime.inference.runner import Runner
from edge_runtime.inference.tiling import Blender, acquired_downwards, pad_value, window_starts

log = logging.getLogger(__name__)

#: model slices resampled at a time by :func:`model_slices`, so a slab never copies all its source slices at once
CHUNK = 16


def segment(
    volume: Volume,
    package: ModelPackage,
    runner: Runner,
    *,
    probabilities: bool = False,
    channels: np.ndarray | None = None,
) -> Segmentation:
    """``volume``'s label map; ``channels`` ``(C, Z, Y, X)`` on ``volume``'s grid are the model's input channels
    when they come from several series (:mod:`edge_runtime.inference.channels`), each normalised on its own."""
    if package.totalsegmentator is not None:  # TotalSegmentator's parts, each through nnU-Net's pipeline
        from edge_runtime.inference.totalsegmentator.pipeline import segment_totalsegmentator

        return segment_totalsegmentator(volume, package, runner, probabilities=probabilities)
    if package.nnunet is not None:  # nnU-Net's own predictor pipeline (its module builds on this one)
        from edge_runtime.inference.nnunet.pipeline import segment_nnunet

        return segment_nnunet(volume, package, runner, probabilities=probabilities, channels=channels)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    oriented, down = acquisition_order(volume)
    grid = ModelGrid.for_volume(oriented, package)
    if channels is None:
        image = normalize(grid.resample(oriented.array), package.normalization)
    else:
        image = np.stack([normalize(grid.resample(c[::-1] if down else c), package.normalization) for c in channels])
    timings["preprocess"] = time.perf_counter() - t0
    patch = package.patch_size
    fill = pad_value(package.normalization)
    blender = Blender(
        package,
        runner,
        grid.shape[1:],
        blending_weights(package),
        float(image.min()) if fill is None else fill,
    )
    maps = SourceMaps(
        (grid.back[1], grid.back[2]), probabilities=probabilities, reverse=down, capacity=grid.source_shape[0]
    )
    finishing = Finishing(blender, maps, timings)
    for z in window_starts(grid.shape[0], patch[0], package.overlap):
        finishing.timed("inference", blender.add_slab, z, image[..., z : z + patch[0], :, :])
        finishing.rows()
    del image
    return finishing.close(grid)


class Finishing:
    """The tail that batch and streaming inference share: finished rows of the blender reduced and mapped to the
    source grid as they come (:mod:`edge_runtime.inference.postprocess`), and the stages' seconds."""

    def __init__(self, blender: Blender, maps: SourceMaps, timings: dict[str, float]):
        self.blender, self.maps, self.timings = blender, maps, timings

    def timed(self, stage: str, work: Callable[..., object], *args: object) -> None:
        t0 = time.perf_counter()
        work(*args)
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - t0

    def rows(self, back: np.ndarray | None = None) -> None:
        """Reduce the rows the blender has finished; with ``back`` (each source slice's model row, as far as
        known), map the source slices that take them."""
        t0 = time.perf_counter()
        self.maps.add(*self.blender.take())
        if back is not None:
            self.maps.map(back)
        self.timings["postprocess"] = self.timings.get("postprocess", 0.0) + time.perf_counter() - t0

    def close(self, grid: ModelGrid) -> Segmentation:
        """Run the windows left, reduce the last rows and map every source slice: the segmentation."""
        self.timed("inference", self.blender.drain)
        t0 = time.perf_counter()
        self.maps.add(*self.blender.close(grid.shape[0]))
        self.maps.map(grid.back[0])
        self.timings["postprocess"] = self.timings.get("postprocess", 0.0) + time.perf_counter() - t0
        return self.maps.segmentation(self.timings, self.blender.windows)


def acquisition_order(volume: Volume) -> tuple[Volume, bool]:
    """``volume`` as the model grid runs over it, and whether that is downwards: a series whose instance numbers
    count down along the slice normal is turned over (a view; array, positions and instances only), so the grid
    is anchored where the acquisition starts (:func:`tiling.acquired_downwards`). Its positions are measured
    from the top slice as streaming measures them (:func:`position_along`), so both give the same grid."""
    if volume.multiframe or len(volume.datasets) < 2:
        return volume, False
    if not acquired_downwards([ds.get("InstanceNumber") for ds in (volume.datasets[0], volume.datasets[-1])]):
        return volume, False
    top = SliceGeometry.from_dataset(volume.datasets[-1])
    if top is None:
        return volume, False
    normal = unit_normal(top.iop)
    u = np.array([-position_along(_ipp(ds), normal) for ds in volume.datasets[::-1]])
    turned = dataclasses.replace(volume, array=volume.array[::-1], positions=u - u[0], datasets=volume.datasets[::-1])
    return turned, True


def unit_normal(iop: Sequence[float]) -> np.ndarray:
    """The slice normal (row x column direction) of ImageOrientationPatient, of unit length."""
    v = np.asarray(iop, dtype=np.float64)
    normal = np.cross(v[:3], v[3:])
    return normal / max(float(np.linalg.norm(normal)), 1e-12)


def position_along(ipp: Sequence[float], normal: np.ndarray) -> float:
    """ImagePositionPatient projected on the slice normal (mm), computed alike wherever it is needed."""
    return float((np.array([ipp], dtype=np.float64) @ normal)[0])


def _ipp(ds: Dataset) -> tuple[float, ...]:
    return tuple(float(v) for v in ds.ImagePositionPatient)


def argmax_labels(logits: np.ndarray) -> np.ndarray:
    """Argmax over the class axis as uint8/uint16, a few times faster than np.argmax's int64 for few classes."""
    return argmax_and_max(logits)[0]


def softmax_uint8(logits: np.ndarray, best: np.ndarray, grid: ModelGrid) -> np.ndarray:
    """Every class's softmax probability on the source grid as uint8 0..255 (``(K, Z, Y, X)``)."""
    on_model = probabilities_uint8(logits, best)
    return np.stack([grid.back_to_source(k) for k in on_model])


@dataclass(frozen=True)
class ModelGrid:
    """Where the model's regular grid samples the source volume, axis by axis (fractional source indices)."""

    source_shape: tuple[int, int, int]
    coords: tuple[np.ndarray, np.ndarray, np.ndarray]
    #: for each source index, the nearest model index (used to map the labels back)
    back: tuple[np.ndarray, np.ndarray, np.ndarray]

    @classmethod
    def for_volume(cls, volume: Volume, package: ModelPackage) -> ModelGrid:
        target = package.target_spacing or (None, None, None)
        coords = []
        back = []
        for axis in range(3):
            n = volume.array.shape[axis]
            if axis == 0:
                positions = volume.positions.astype(np.float64)
            else:
                positions = np.arange(n, dtype=np.float64) * volume.spacing[axis]
            step = target[axis]
            if step is None:
                if axis == 0 and not volume.regular:
                    step = volume.spacing[0]
                else:
                    idx = np.arange(n, dtype=np.float64)
                    coords.append(idx)
                    back.append(np.arange(n))
                    continue
            extent = positions[-1] - positions[0]
            m = int(np.floor(extent / step + 1e-6)) + 1
            model_positions = positions[0] + np.arange(m) * step
            coords.append(np.interp(model_positions, positions, np.arange(n, dtype=np.float64)))
            back.append(np.clip(np.rint((positions - positions[0]) / step), 0, m - 1).astype(np.intp))
        return cls(tuple(volume.array.shape), tuple(coords), tuple(back))  # type: ignore[arg-type]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(len(c) for c in self.coords)  # type: ignore[return-value]

    def resample(self, array: np.ndarray) -> np.ndarray:
        """A new float32 array on the model grid (never ``array`` itself: callers normalise it in place)."""
        out = array
        for axis, c in enumerate(self.coords):
            if len(c) == out.shape[axis] and np.array_equal(c, np.arange(len(c))):
                continue
            out = _linear_along(out, axis, c)
        return np.array(out, dtype=np.float32, order="C", copy=out is array)

    def back_to_source(self, labels: np.ndarray) -> np.ndarray:
        return labels[np.ix_(*self.back)]


def model_slices(
    sources: Sequence[np.ndarray] | np.ndarray,
    z: np.ndarray,
    plane: tuple[np.ndarray, np.ndarray],
    package: ModelPackage,
) -> np.ndarray:
    """Normalised model slices at fractional source indices ``z`` (into ``sources``, in grid order), computed
    a chunk at a time with the same operations, element for element, as resampling the whole volume."""
    out = np.empty((len(z), len(plane[0]), len(plane[1])), dtype=np.float32)
    for c0 in range(0, len(z), CHUNK):
        c = z[c0 : c0 + CHUNK]
        lo = int(np.floor(c.min()))
        hi = min(int(np.floor(c.max())) + 1, len(sources) - 1)
        stack = np.stack([sources[i] for i in range(lo, hi + 1)])
        # shifting by a whole number of slices is exact: the interpolation weights are the batch ones
        grid = ModelGrid(stack.shape, (c - lo, *plane), back=(np.arange(0),) * 3)
        out[c0 : c0 + len(c)] = normalize(grid.resample(stack), package.normalization)
    return out


def interpolation_recipe(coords: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The source slices and weight each model slice is interpolated from (as ``pipeline._linear_along``); a
    slice that falls exactly on a source slice takes only that one (the other has weight 0, whichever it is)."""
    lo = np.clip(np.floor(coords).astype(np.intp), 0, n - 1)
    w = (coords - lo).astype(np.float32)
    return lo, np.where(w == 0, lo, np.minimum(lo + 1, n - 1)), w


def _linear_along(array: np.ndarray, axis: int, coords: np.ndarray) -> np.ndarray:
    n = array.shape[axis]
    lo = np.clip(np.floor(coords).astype(np.intp), 0, n - 1)
    hi = np.minimum(lo + 1, n - 1)
    w = (coords - lo).astype(np.float32)
    shape = [1, 1, 1]
    shape[axis] = len(coords)
    w = w.reshape(shape)
    a = np.take(array, lo, axis=axis)
    b = np.take(array, hi, axis=axis)
    a *= 1 - w
    a += b * w
    return a


def normalize(image: np.ndarray, norm: Normalization) -> np.ndarray:
    if norm.kind == "ct_window":
        np.clip(image, norm.lower, norm.upper, out=image)
        image -= norm.mean
        image /= norm.std
    elif norm.kind == "zscore":
        std = float(image.std())
        image -= float(image.mean())
        image /= std if std > 0 else 1.0
    return image


def gaussian_importance(patch: tuple[int, int, int], sigma_scale: float = 0.125) -> np.ndarray:
    """nnU-Net's blending weights: a Gaussian over the patch, never exactly zero at the edges."""
    weights = np.ones(patch, dtype=np.float32)
    for axis, size in enumerate(patch):
        x = np.arange(size, dtype=np.float32) - (size - 1) / 2
        g = np.exp(-0.5 * (x / (size * sigma_scale)) ** 2)
        shape = [1, 1, 1]
        shape[axis] = size
        weights = weights * g.reshape(shape)
    weights /= weights.max()
    floor = weights[weights > 0].min()
    return np.maximum(weights, floor).astype(np.float32)


def blending_weights(package: ModelPackage) -> np.ndarray:
    """Each window's weight per voxel when overlapping windows are blended."""
    patch = package.patch_size
    return gaussian_importance(patch) if package.blending == "gaussian" else np.ones(patch, dtype=np.float32)


def _windows(shape: tuple[int, ...], patch: tuple[int, int, int], overlap: float) -> Iterator[tuple[slice, ...]]:
    for z in window_starts(shape[0], patch[0], overlap):
        for y in window_starts(shape[1], patch[1], overlap):
            for x in window_starts(shape[2], patch[2], overlap):
                yield (slice(z, z + patch[0]), slice(y, y + patch[1]), slice(x, x + patch[2]))


def sliding_window(image: np.ndarray, package: ModelPackage, runner: Runner) -> tuple[np.ndarray, int]:
    """Blend logits of overlapping windows into ``(K, Z, Y, X)`` logits over the whole image (``(Z, Y, X)``, or
    ``(C, Z, Y, X)`` for several input channels), placed and blended as :mod:`edge_runtime.inference.tiling`
    does for streaming too."""
    patch = package.patch_size
    fill = pad_value(package.normalization)
    depth, rows, cols = image.shape[-3:]
    blender = Blender(
        package,
        runner,
        (rows, cols),
        blending_weights(package),
        float(image.min()) if fill is None else fill,
        depth=depth,
    )
    for z in window_starts(depth, patch[0], package.overlap):
        blender.add_slab(z, image[..., z : z + patch[0], :, :])
    return blender.logits(depth), blender.windows
