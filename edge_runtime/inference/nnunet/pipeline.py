"""A volume through nnU-Net's whole predictor pipeline, as ``nnUNetPredictor.predict_single_npy_array`` runs it.

preprocess (transpose, crop to non-zero, normalise, resample: :mod:`.preprocessing`) -> Gaussian sliding window
with test-time mirroring over the package's ensembled folds (:mod:`.prediction`) -> logits resampled back to the
cropped shape with nnU-Net's probability resampling -> softmax and argmax (a region-based model: sigmoid and
nnU-Net's painting in ``regions_class_order``, :mod:`.regions`) -> the crop put back into the full shape ->
transpose back -> nnU-Net's postprocessing.pkl steps when the package carries them (:mod:`.postprocessing`).
The volume's ``(slice, row, column)`` array and spacing are what nnU-Net's SimpleITK reader gives for the same
series, so the model sees what it was trained on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edge_runtime.imaging.volume import Volume
from edge_runtime.inference.nnunet.labelmap import labels_and_confidence, labels_confidence_and_probabilities
from edge_runtime.inference.nnunet.labelmap import softmax as softmax
from edge_runtime.inference.nnunet.postprocessing import apply_postprocessing
from edge_runtime.inference.nnunet.prediction import predict_logits
from edge_runtime.inference.nnunet.preprocessing import preprocess, target_spacing
from edge_runtime.inference.nnunet.regions import label_probabilities, paint_regions, sigmoid
from edge_runtime.inference.nnunet.resampling import resample
from edge_runtime.inference.nnunet.settings import NnunetSettings
from edge_runtime.inference.package import ModelPackage
from edge_runtime.inference.pipeline import Segmentation
from edge_runtime.inference.runner import Runner

log = logging.getLogger(__name__)


@dataclass
class CaseResult:
    """One case on the source grid."""

    labels: np.ndarray
    #: softmax probability of the chosen label, float32
    confidence: np.ndarray
    #: ``(K, Z, Y, X)`` float32 softmax per class when asked for (a region model: ``(R, Z, Y, X)`` sigmoid per
    #: region, as nnU-Net returns them)
    probabilities: np.ndarray | None
    timings: dict[str, float]
    windows: int


def segment_nnunet(volume: Volume, package: ModelPackage, runner: Runner, *, probabilities: bool = False,
                   channels: np.ndarray | None = None) -> Segmentation:
    """The volume's label map as nnU-Net's predictor would give it for the same series (``probabilities``: every
    class's softmax as uint8 0..255, for a FRACTIONAL SEG). ``channels`` ``(C, Z, Y, X)`` on the volume's grid:
    the input channels from several series; without them the one series fills every channel."""
    settings = package.nnunet
    if settings is None:
        raise ValueError(f"{package.identity} has no 'nnunet' section")
    image = np.repeat(volume.array[None], package.image_channels, axis=0) if channels is None else channels
    case = predict_package_case(image, volume.spacing, package, runner, probabilities=probabilities)
    per_class = None
    if case.probabilities is not None:
        probs = case.probabilities
        if settings.regions:
            probs = label_probabilities(probs, settings.regions_class_order, len(package.labels) + 1)
        per_class = np.rint(probs * 255).astype(np.uint8)
    return Segmentation(labels=case.labels, timings=case.timings, windows=case.windows, confidence=case.confidence,
                        probabilities=per_class)


def predict_package_case(image: np.ndarray, spacing: Sequence[float], package: ModelPackage, runner: Runner, *,
                         probabilities: bool = False) -> CaseResult:
    """The package's case; a cascade stage runs its previous stage first (on ``runner``'s previous-stage runner,
    without post-processing, as ``nnUNetv2_predict`` writes the label map the next stage reads) and takes its
    label map as input. Timings of the previous stage are prefixed with its configuration."""
    settings = package.nnunet
    if settings is None:
        raise ValueError(f"{package.identity} has no 'nnunet' section")
    first = package.previous_stage
    if settings.previous_stage is None or first is None or first.nnunet is None:
        return predict_case(image, spacing, settings, runner, package.num_classes, package.batch_size,
                            probabilities=probabilities)
    from edge_runtime.inference.nnunet.cascade import previous_runner

    earlier = predict_case(image, spacing, first.nnunet, previous_runner(runner), first.num_classes,
                           first.batch_size)
    case = predict_case(image, spacing, settings, runner, package.num_classes, package.batch_size,
                        probabilities=probabilities, previous=earlier.labels)
    case.timings = {**{f"{first.nnunet.configuration}_{k}": v for k, v in earlier.timings.items()}, **case.timings}
    case.windows += earlier.windows
    return case


def predict_case(
    image: np.ndarray,
    spacing: Sequence[float],
    settings: NnunetSettings,
    runner: Runner,
    num_classes: int,
    batch_size: int = 1,
    *,
    probabilities: bool = False,
    previous: np.ndarray | None = None,
) -> CaseResult:
    """``image`` ``(C, Z, Y, X)`` with its ``(z, y, x)`` spacing -> the case on the image's grid. ``num_classes``:
    the model's output channels (a region model's are its regions). ``previous``: a cascade stage's previous
    label map on the image's grid."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    data, case = preprocess(image, spacing, settings, previous)
    timings["preprocess"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    logits, windows = predict_logits(
        data, runner, num_classes, settings.patch_size, tile_step_size=settings.tile_step_size,
        use_gaussian=settings.use_gaussian, mirror_axes=settings.active_mirror_axes, batch_size=batch_size,
        accumulate=settings.accumulate,
    )
    del data
    timings["inference"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if not settings.regions:  # resampled, reduced and uncropped per slab (every class's softmax when asked for)
        label_dtype = np.uint8 if num_classes < 256 else np.uint16
        probs = None
        if probabilities:
            labels, confidence, probs = labels_confidence_and_probabilities(logits, case, settings, label_dtype)
        else:
            labels, confidence = labels_and_confidence(logits, case, settings, label_dtype)
        del logits
        labels = apply_postprocessing(labels, settings.active_postprocessing)
        timings["postprocess"] = time.perf_counter() - t0
        return CaseResult(labels, confidence, probs, timings, windows)
    # a region model: convert_predicted_logits_to_segmentation_with_correct_shape, logits back to the cropped
    # shape first (in their own dtype, as nnU-Net keeps its float16), then sigmoid and painting
    logits = resample(logits, case.shape_after_cropping, target_spacing(settings, case.spacing), case.spacing,
                      settings.resampling_probabilities, settings.anisotropy_threshold)
    where = tuple(slice(lo, hi) for lo, hi in case.bbox)
    return _finish_regions(logits, case.shape_before_cropping, where, settings, timings, windows, t0,
                           probabilities=probabilities)


def _finish_regions(logits: np.ndarray, full_shape: Sequence[int], where: tuple[slice, ...],
                    settings: NnunetSettings, timings: dict[str, float], windows: int, t0: float, *,
                    probabilities: bool) -> CaseResult:
    """A region model's resampled logits -> sigmoid, painted labels, confidence (the painted region's probability;
    background: one minus the largest), probabilities 0 outside the crop as ``revert_cropping_on_probabilities``
    leaves them for regions."""
    region_probs = sigmoid(logits)
    del logits
    order = settings.regions_class_order
    labels_crop = paint_regions(region_probs, order, np.uint8 if max(order) < 256 else np.uint16)
    per_label = label_probabilities(region_probs, order, max(order) + 1)
    labels = np.zeros(tuple(full_shape), dtype=labels_crop.dtype)
    labels[where] = labels_crop
    confidence = np.ones(tuple(full_shape), dtype=np.float32)
    confidence[where] = np.take_along_axis(per_label, labels_crop[None].astype(np.intp), axis=0)[0]
    del per_label
    backward = list(settings.transpose_backward)
    probs = None
    if probabilities:
        probs = np.zeros((region_probs.shape[0], *full_shape), dtype=np.float32)
        every_region = (slice(None), *where)
        probs[every_region] = region_probs
        probs = np.ascontiguousarray(probs.transpose([0, *[a + 1 for a in backward]]))
    labels = apply_postprocessing(np.ascontiguousarray(labels.transpose(backward)), settings.active_postprocessing)
    confidence = np.ascontiguousarray(confidence.transpose(backward))
    timings["postprocess"] = time.perf_counter() - t0
    return CaseResult(labels, confidence, probs, timings, windows)


def chosen_probability(logits: np.ndarray) -> np.ndarray:
    """The softmax probability of the largest logit, ``1 / sum(exp(l - max))``, one slice at a time (no float32
    copy of every class at once)."""
    out = np.empty(logits.shape[1:], dtype=np.float32)
    for i in range(logits.shape[1]):
        part = logits[:, i].astype(np.float32)
        part -= part.max(axis=0)
        np.exp(part, out=part)
        out[i] = 1.0 / part.sum(axis=0)
    return out
