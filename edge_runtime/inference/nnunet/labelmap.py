"""The logits' way back to the image's grid as a label map, slab by slab (``convert_predicted_logits_to_segmentation
_with_correct_shape``; every class's softmax too when a FRACTIONAL SEG asks for it, written from the same slabs).

nnU-Net resamples every class's logits to the cropped shape (float64 arithmetic, stored in the logits' own dtype,
float16), takes the argmax (the first maximum wins), puts the crop back into the full shape and transposes back.
Here each slab of the resampled logits (:func:`.resampling.for_each_slab`) is rounded to the logits' dtype as
nnU-Net stores it, reduced at once to its label and the chosen label's softmax probability, and written through a
transposed view straight into the arrays the caller gets: no full-size array of every class, no separate argmax,
uncrop or transpose pass, and the slabs run on every core.

Float16 logits are resampled in float32 arithmetic, 13 bits finer than what is stored, with 3-4x less memory
traffic than float64. Measured against nnunetv2's own resampling of random float16 logits (6 classes, 24x22x24
to 256x150x256): stored values one float16 step apart at 2.6e-4 of them (float64 sums in another order than
scipy's: 2.6e-5), argmax different at 3 of 9.8 M voxels (float64: 2).
"""

from __future__ import annotations

import numpy as np

from edge_runtime.inference.nnunet.preprocessing import Case, target_spacing
from edge_runtime.inference.nnunet.resampling import for_each_slab
from edge_runtime.inference.nnunet.settings import NnunetSettings


def labels_and_confidence(logits: np.ndarray, case: Case, settings: NnunetSettings, label_dtype: type,
                          *, threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The label map and the chosen label's probability (float32) on the image's grid, in the image's axis order:
    ``(K, *spatial)`` logits on the configuration's grid in. Outside the crop: background, probability 1."""
    labels, confidence, _ = _way_back(logits, case, settings, label_dtype, threads=threads, per_class=False)
    return labels, confidence


def labels_confidence_and_probabilities(logits: np.ndarray, case: Case, settings: NnunetSettings,
                                        label_dtype: type, *, threads: int | None = None
                                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`labels_and_confidence` and every class's softmax ``(K, *spatial)`` float32 on the image's grid
    (``revert_cropping_on_probabilities``: background 1 outside the crop), written slab by slab like the labels, so
    neither the resampled logits nor their softmax exist at full size beside it."""
    labels, confidence, probabilities = _way_back(logits, case, settings, label_dtype, threads=threads,
                                                  per_class=True)
    assert probabilities is not None
    return labels, confidence, probabilities


def _way_back(logits: np.ndarray, case: Case, settings: NnunetSettings, label_dtype: type, *,
              threads: int | None, per_class: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    full_t = case.shape_before_cropping  # nnU-Net's (transposed) axis order
    shape = tuple(full_t[a] for a in settings.transpose_backward)
    cropped = case.shape_after_cropping != tuple(full_t)
    labels: np.ndarray = np.zeros(shape, dtype=label_dtype)
    # every voxel of the crop is written by a slab (in parallel, first touch): only outside it needs the 1
    confidence = np.empty(shape, dtype=np.float32)
    if cropped:
        confidence.fill(1)
    # views in nnU-Net's axis order, cropped: what a slab's rows are written into
    where = tuple(slice(lo, hi) for lo, hi in case.bbox)
    labels_crop = labels.transpose(settings.transpose_forward)[where]
    confidence_crop = confidence.transpose(settings.transpose_forward)[where]
    probabilities = probabilities_crop = None
    if per_class:
        probabilities = np.zeros((logits.shape[0], *shape), dtype=np.float32)
        if cropped:
            probabilities[0] = 1
        every_class = (slice(None), *where)
        probabilities_crop = probabilities.transpose([0, *[a + 1 for a in settings.transpose_forward]])[every_class]

    def reduce(rows: slice, slab: np.ndarray) -> None:
        stored = slab.astype(logits.dtype).astype(np.float32, copy=False)  # nnU-Net's logits are stored, then read
        labels_crop[rows], confidence_crop[rows] = argmax_and_probability(stored, label_dtype)
        if probabilities_crop is not None:
            probabilities_crop[:, rows] = softmax(stored)  # a copy of its own: astype copied

    for_each_slab(logits, case.shape_after_cropping, target_spacing(settings, case.spacing), case.spacing,
                  settings.resampling_probabilities, settings.anisotropy_threshold, reduce, threads=threads,
                  precision=np.float32 if logits.dtype == np.float16 else np.float64)
    return labels, confidence, probabilities


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the class axis of float32 logits, in place."""
    logits -= logits.max(axis=0)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=0)
    return logits


def argmax_and_probability(logits: np.ndarray, label_dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """Per voxel of ``(K, ...)`` float32 logits: the first class with the largest logit (numpy's and torch's
    argmax), and its softmax probability ``1 / sum(exp(l - max))``. One pass per class over contiguous arrays
    (``np.argmax`` along the first axis strides across classes, many times slower)."""
    best = logits[0].copy()
    label = np.zeros(best.shape, dtype=label_dtype)
    for k in range(1, logits.shape[0]):
        np.copyto(label, k, where=logits[k] > best)
        np.maximum(best, logits[k], out=best)
    total = np.zeros_like(best)
    shifted = np.empty_like(best)
    for k in range(logits.shape[0]):
        np.subtract(logits[k], best, out=shifted)
        np.exp(shifted, out=shifted)
        total += shifted
    np.divide(1.0, total, out=total)
    return label, total
