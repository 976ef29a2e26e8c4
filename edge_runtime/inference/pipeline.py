"""From a volume to a label map on the source grid: resample, normalise, sliding window, argmax, map back.

Grids are aligned on the centre of the first voxel. Along the slice axis the true slice positions are used,
so an irregularly spaced stack is interpolated onto a regular grid and every source slice takes the label of
the nearest model slice. In-plane resampling is separable linear interpolation; the way back is nearest
neighbour on the label map, which keeps the result exactly pixel-aligned with the source images.

Confidence comes from the blended logits the sliding window already holds: the softmax probability of the
chosen label is ``1 / sum_k exp(l_k - l_max)``, computed one class at a time on the model grid (one float32
volume of scratch, never a K-volume of probabilities), then mapped back like the labels, so each source voxel
carries the confidence of exactly the model voxel whose label it took.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from edge_runtime.imaging.volume import Volume
from edge_runtime.inference.package import ModelPackage, Normalization
from edge_runtime.inference.runner import Runner
from edge_runtime.inference.tiling import Blender, pad_value, window_starts

log = logging.getLogger(__name__)


@dataclass
class Segmentation:
    """A label map on the source grid (values are the package's label values; 0 is background).

    ``confidence`` is the softmax probability of the chosen label at each source voxel (float32, 0..1);
    ``probabilities`` (only when asked for) holds every class's softmax probability as uint8 0..255,
    indexed by class (0 = background), for a FRACTIONAL SEG. Pipelines that cannot compute them leave None.
    """

    labels: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)
    windows: int = 0
    confidence: np.ndarray | None = None
    probabilities: np.ndarray | None = None


def segment(
    volume: Volume,
    package: ModelPackage,
    runner: Runner,
    *,
    probabilities: bool = False,
    channels: np.ndarray | None = None,
) -> Segmentation:
    """``volume``'s label map; ``channels`` ``(C, Z, Y, X)`` on ``volume``'s grid are the model's input channels
    when they come from several series (:mod:`edge_runtime.imaging.multichannel`), each normalised on its own."""
    if package.totalsegmentator is not None:  # TotalSegmentator's parts, each through nnU-Net's pipeline
        from edge_runtime.inference.totalsegmentator.pipeline import segment_totalsegmentator

        return segment_totalsegmentator(volume, package, runner, probabilities=probabilities)
    if package.nnunet is not None:  # nnU-Net's own predictor pipeline (its module builds on this one)
        from edge_runtime.inference.nnunet.pipeline import segment_nnunet

        return segment_nnunet(volume, package, runner, probabilities=probabilities, channels=channels)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    grid = ModelGrid.for_volume(volume, package)
    if channels is None:
        image = normalize(grid.resample(volume.array), package.normalization)
    else:
        image = np.stack([normalize(grid.resample(c), package.normalization) for c in channels])
    timings["preprocess"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    logits, windows = sliding_window(image, package, runner)
    del image
    timings["inference"] = time.perf_counter() - t0
    return from_logits(logits, grid, timings, windows, probabilities=probabilities)


def from_logits(
    logits: np.ndarray, grid: ModelGrid, timings: dict[str, float], windows: int, *, probabilities: bool = False
) -> Segmentation:
    """Labels, confidence and (on request) probabilities from blended logits, on the source grid: the tail that
    whole-volume and streaming inference (:mod:`edge_runtime.inference.streaming`) share."""
    t0 = time.perf_counter()
    labels_model, best = _argmax_and_max(logits)
    labels = grid.back_to_source(labels_model)
    del labels_model
    per_class = softmax_uint8(logits, best, grid) if probabilities else None
    confidence = grid.back_to_source(chosen_probability(logits, best))
    del logits, best
    timings["postprocess"] = time.perf_counter() - t0
    return Segmentation(labels=labels, timings=timings, windows=windows, confidence=confidence, probabilities=per_class)


def argmax_labels(logits: np.ndarray) -> np.ndarray:
    """Argmax over the class axis as uint8/uint16, a few times faster than np.argmax's int64 for few classes."""
    return _argmax_and_max(logits)[0]


def _argmax_and_max(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The argmax over the class axis (uint8/uint16) and the maximum logit itself (float32)."""
    dtype = np.uint8 if logits.shape[0] < 256 else np.uint16
    best = logits[0].copy()
    labels = np.zeros(best.shape, dtype=dtype)
    for k in range(1, logits.shape[0]):
        better = logits[k] > best
        labels[better] = k
        np.maximum(best, logits[k], out=best)
    return labels, best


def _exp_sum(logits: np.ndarray, best: np.ndarray) -> np.ndarray:
    """``sum_k exp(l_k - best)`` (>= 1 where ``best`` is the maximum), with one volume of scratch."""
    total = np.zeros(best.shape, dtype=np.float32)
    scratch = np.empty(best.shape, dtype=np.float32)
    for k in range(logits.shape[0]):
        np.subtract(logits[k], best, out=scratch)
        np.exp(scratch, out=scratch)
        total += scratch
    return total


def chosen_probability(logits: np.ndarray, best: np.ndarray) -> np.ndarray:
    """Softmax probability of the argmax class: ``1 / sum_k exp(l_k - l_max)``, float32 in (0, 1]."""
    total = _exp_sum(logits, best)
    np.reciprocal(total, out=total)
    return total


def softmax_uint8(logits: np.ndarray, best: np.ndarray, grid: ModelGrid) -> np.ndarray:
    """Every class's softmax probability on the source grid as uint8 0..255 (``(K, Z, Y, X)``), one class at
    a time: the float32 work stays on the model grid, one volume at a time."""
    scale = _exp_sum(logits, best)
    np.reciprocal(scale, out=scale)
    scale *= 255.0
    out = np.empty((logits.shape[0], *grid.source_shape), dtype=np.uint8)
    scratch = np.empty(best.shape, dtype=np.float32)
    for k in range(logits.shape[0]):
        np.subtract(logits[k], best, out=scratch)
        np.exp(scratch, out=scratch)
        scratch *= scale
        np.rint(scratch, out=scratch)
        out[k] = grid.back_to_source(scratch.astype(np.uint8))
    return out


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
