"""A volume through TotalSegmentator's steps around nnU-Net (``totalsegmentator.nnunet.nnUNet_predict_image``).

reorient to the closest canonical orientation, in the axis order nnU-Net's reader gives for TotalSegmentator's
NIfTI (:func:`canonical_axes`) -> TotalSegmentator's own resampling to its isotropic grid (:func:`ts_resample`)
-> nnU-Net's predictor pipeline for every part at once (:mod:`edge_runtime.inference.nnunet`: crop, normalise per
part, sliding window without mirroring) -> each part's logits back to the grid and reduced to its labels slab by
slab (:mod:`edge_runtime.inference.nnunet.labelmap`, one call per part) -> each part's indices mapped to the
package's labels, a later part overwriting an earlier one where it found something (:func:`merge_parts`) -> back
to the source grid with ``order`` 0 -> the source's axis order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from edge_runtime.imaging.volume import Volume
from edge_runtime.inference.nnunet.labelmap import labels_and_confidence
from edge_runtime.inference.nnunet.prediction import predict_logits
from edge_runtime.inference.nnunet.preprocessing import Case, preprocess
from edge_runtime.inference.nnunet.settings import NnunetSettings
from edge_runtime.inference.package import ModelPackage
from edge_runtime.inference.pipeline import Segmentation
from edge_runtime.inference.runner import Runner
from edge_runtime.inference.totalsegmentator.settings import Part

log = logging.getLogger(__name__)

#: patient LPS axes as RAS: x and y change sign
_LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class Axes:
    """How the source array becomes the canonical one: ``canonical = flip(source, flips).transpose(order)``."""

    order: tuple[int, int, int]
    flips: tuple[int, ...]

    def forward(self, array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.flip(array, self.flips).transpose(self.order)) if self.flips else \
            np.ascontiguousarray(array.transpose(self.order))

    def backward(self, array: np.ndarray) -> np.ndarray:
        inverse = [self.order.index(i) for i in range(3)]
        out = array.transpose(inverse)
        return np.ascontiguousarray(np.flip(out, self.flips) if self.flips else out)

    def spacing(self, spacing: Sequence[float]) -> tuple[float, float, float]:
        a, b, c = (float(spacing[i]) for i in self.order)
        return a, b, c


def canonical_axes(affine: np.ndarray) -> Axes:
    """The reorientation of nibabel's ``as_closest_canonical`` (each array axis to the RAS axis it is closest to,
    pointing the positive way), followed by nnU-Net's readers' ``(k, j, i)`` order: the canonical array's axes
    are (S, A, R). ``affine`` maps the source's (slice, row, column) indices to LPS millimetres."""
    directions = affine[:3, :3] * _LPS_TO_RAS[:, None]  # RAS direction of each source axis (columns)
    world = [int(np.argmax(np.abs(directions[:, a]))) for a in range(3)]
    if sorted(world) != [0, 1, 2]:
        raise ValueError(f"the series' axes are too oblique to reorient: RAS axes {world} for its three axes")
    flips = tuple(a for a in range(3) if directions[world[a], a] < 0)
    # canonical axis t holds RAS axis 2 - t (S, A, R); it comes from the source axis that points along it
    order = tuple(world.index(2 - t) for t in range(3))
    return Axes(order, flips)  # type: ignore[arg-type]


def ts_resample(array: np.ndarray, zoom: Sequence[float], order: int, dtype: str | None = None) -> np.ndarray:
    """``totalsegmentator.resampling.resample_img``: ``ndimage.zoom(mode="nearest")`` on the float64 data that
    nibabel's ``get_fdata`` gives, then ``change_spacing``'s cast."""
    data = array if order == 0 else array.astype(np.float64)
    out = ndimage.zoom(data, tuple(float(z) for z in zoom), order=order, mode="nearest")
    return out.astype(dtype) if dtype is not None else out


def merge_parts(part_labels: Sequence[np.ndarray], parts: Sequence[Part], dtype: type = np.uint8) -> np.ndarray:
    """TotalSegmentator's combining loop: each part's indices through its lookup table, copied over the
    combined map wherever the mapped value is not background (so a later part wins where two overlap)."""
    combined: np.ndarray = np.zeros(part_labels[0].shape, dtype=dtype)
    for labels, part in zip(part_labels, parts, strict=True):
        mapped = np.asarray(part.labels, dtype=dtype)[labels]
        np.copyto(combined, mapped, where=mapped != 0)
    return combined


def segment_totalsegmentator(volume: Volume, package: ModelPackage, runner: Runner, *, probabilities: bool = False
                             ) -> Segmentation:
    """The volume's label map as TotalSegmentator's multi-part prediction gives it, with the chosen label's
    probability (from the part that set the voxel). Per-class probabilities are not given: each part has its
    own softmax, so there is no one distribution to write as a FRACTIONAL SEG."""
    ts, settings = package.totalsegmentator, package.nnunet
    if ts is None or settings is None:
        raise ValueError(f"{package.identity} lacks the 'totalsegmentator' or the 'nnunet' section")
    if probabilities:
        log.info("%s: per-class probabilities are not produced for a multi-part TotalSegmentator package",
                 package.identity)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    axes = canonical_axes(volume.affine()) if ts.orientation == "ras_canonical" else Axes((0, 1, 2), ())
    image, spacing = axes.forward(volume.array), axes.spacing(volume.spacing)
    source_shape = image.shape
    if ts.resample_mm is not None and spacing != (ts.resample_mm,) * 3:
        zoom = [s / ts.resample_mm for s in spacing]
        image = ts_resample(image, zoom, ts.resample_order, ts.resample_dtype)
        spacing = (ts.resample_mm,) * 3
    grid = (np.repeat(image[None], package.input_channels, axis=0), spacing)
    del image
    part_labels, part_confidence, windows = predict_parts(*grid, package, runner, timings)
    del grid
    t0 = time.perf_counter()
    dtype = np.uint8 if len(package.labels) < 256 else np.uint16
    labels = merge_parts(part_labels, ts.parts, dtype)
    confidence = merged_confidence(part_labels, part_confidence, ts.parts)
    del part_labels, part_confidence
    if labels.shape != source_shape:
        back = [t / s for t, s in zip(source_shape, labels.shape, strict=True)]
        labels = _fit(ts_resample(labels, back, ts.resample_back_order), source_shape)
        confidence = _fit(ts_resample(confidence, back, 0), source_shape)
    timings["postprocess"] += time.perf_counter() - t0
    return Segmentation(labels=axes.backward(labels), timings=timings, windows=windows,
                        confidence=axes.backward(confidence))


def predict_parts(image: np.ndarray, spacing: Sequence[float], package: ModelPackage, runner: Runner,
                  timings: dict[str, float]) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    """nnU-Net's pipeline for every part at once on TotalSegmentator's grid (``image`` ``(C, Z, Y, X)``, one
    channel per part): each part's label map (its own class indices) and chosen-label probability, as nnU-Net
    would write them for that part alone, and the number of windows."""
    settings, ts = package.nnunet, package.totalsegmentator
    assert settings is not None and ts is not None
    t0 = time.perf_counter()
    data, case = preprocess(image, spacing, settings)
    timings["preprocess"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    logits, windows = predict_logits(
        data, runner, ts.output_channels, settings.patch_size, tile_step_size=settings.tile_step_size,
        use_gaussian=settings.use_gaussian, mirror_axes=settings.active_mirror_axes, batch_size=package.batch_size,
        accumulate=settings.accumulate,
    )
    del data
    timings["inference"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    labels, confidence = parts_back(logits, case, settings, ts.parts)
    del logits
    timings["postprocess"] = time.perf_counter() - t0
    return labels, confidence, windows


def parts_back(logits: np.ndarray, case: Case, settings: NnunetSettings, parts: Sequence[Part]
               ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Every part's ``(K_part, ...)`` logits back to the image's grid, each reduced to its label map and chosen
    probability slab by slab (nnU-Net's way back for that part alone): no full-size array of a part's classes,
    no separate argmax, uncrop or transpose pass."""
    labels, confidence, start = [], [], 0
    for part in parts:
        own, sure = labels_and_confidence(logits[start:start + part.classes], case, settings,
                                          np.uint8 if part.classes < 256 else np.uint16)
        start += part.classes
        labels.append(own)
        confidence.append(sure)
    return labels, confidence


def merged_confidence(part_labels: Sequence[np.ndarray], part_confidence: Sequence[np.ndarray],
                      parts: Sequence[Part]) -> np.ndarray:
    """The chosen label's probability from the part that set each voxel (the merge's winner); where no part
    found anything, the least sure part's background probability."""
    out = np.minimum.reduce(list(part_confidence))
    for labels, probability, part in zip(part_labels, part_confidence, parts, strict=True):
        np.copyto(out, probability, where=np.asarray(part.labels)[labels] != 0)
    return out


def _fit(array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """``ndimage.zoom`` rounds its output shape; TotalSegmentator asks for the source shape, so trim or pad by
    edge values where a rounding left one voxel too many or too few."""
    if array.shape == tuple(shape):
        return array
    array = array[tuple(slice(0, n) for n in shape)]
    pad = [(0, n - s) for n, s in zip(shape, array.shape, strict=True)]
    return np.pad(array, pad, mode="edge")
