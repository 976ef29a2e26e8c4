"""Every class's softmax on the image's grid (a FRACTIONAL SEG's input), written slab by slab beside the labels,
against the way it was made before: the logits resampled at full size and stored in their own dtype, softmax over
all of them, the crop put back (background 1 outside it) and the transpose undone."""

from __future__ import annotations

import numpy as np
import pytest

from edge_runtime.inference.nnunet.labelmap import labels_and_confidence, labels_confidence_and_probabilities
from edge_runtime.inference.nnunet.preprocessing import Case
from edge_runtime.inference.nnunet.resampling import compute_new_shape, resample
from edge_runtime.inference.nnunet.settings import NnunetSettings, Resampling

TRANSPOSE = (1, 0, 2)
SETTINGS = NnunetSettings("3d_fullres", ("0",), TRANSPOSE, TRANSPOSE, (1.5, 1.5, 1.5), (16, 16, 16), (),
                          Resampling(), Resampling())
FULL_T, SPACING_T = (26, 20, 30), (1.2, 1.0, 0.9)
BBOX = ((1, 25), (0, 20), (3, 28))


def _full_size(logits: np.ndarray, case: Case) -> tuple[np.ndarray, np.ndarray]:
    """The labels and per-class softmax as the pipeline made them before the slabs."""
    stored = resample(logits, case.shape_after_cropping, case.spacing, SETTINGS.spacing,
                      SETTINGS.resampling_probabilities, SETTINGS.anisotropy_threshold).astype(np.float32)
    where = tuple(slice(lo, hi) for lo, hi in case.bbox)
    labels = np.zeros(case.shape_before_cropping, dtype=np.uint8)
    labels[where] = np.argmax(stored, axis=0)
    exp = np.exp(stored - stored.max(axis=0))
    probs = np.zeros((logits.shape[0], *case.shape_before_cropping), dtype=np.float32)
    probs[0] = 1
    every_class = (slice(None), *where)
    probs[every_class] = exp / exp.sum(axis=0)
    backward = list(SETTINGS.transpose_backward)
    return labels.transpose(backward), probs.transpose([0, *[a + 1 for a in backward]])


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_every_class_probability_comes_back_slab_by_slab_as_at_full_size(dtype: type) -> None:
    cropped = tuple(hi - lo for lo, hi in BBOX)
    grid = compute_new_shape(cropped, SPACING_T, SETTINGS.spacing)
    assert grid != cropped  # the way back resamples
    logits: np.ndarray = np.random.default_rng(5).normal(0, 3, (4, *grid)).astype(dtype)
    case = Case(SPACING_T, FULL_T, BBOX, cropped)
    labels, confidence, probs = labels_confidence_and_probabilities(logits, case, SETTINGS, np.uint8, threads=2)
    expected_labels, expected = _full_size(logits, case)
    assert probs.shape == (4, *labels.shape) and probs.dtype == np.float32 and probs.flags.c_contiguous
    if dtype == np.float32:  # both resample in float64 and store float32
        np.testing.assert_array_equal(labels, expected_labels)
        np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-7)
    else:  # float32 arithmetic against float64 rounds a stored float16 one step the other way now and then
        assert (labels != expected_labels).mean() < 1e-3
        np.testing.assert_allclose(probs, expected, rtol=0, atol=2e-3)
    # outside the crop: background, certain; the labels and confidence are those of the labels-only way back
    assert np.all(probs[0][:, 0] == 1) and np.all(probs[1:, :, 0] == 0) and np.all(probs[1:, :, :, :3] == 0)
    only_labels, only_confidence = labels_and_confidence(logits, case, SETTINGS, np.uint8, threads=2)
    np.testing.assert_array_equal(labels, only_labels)
    np.testing.assert_array_equal(confidence, only_confidence)
    np.testing.assert_allclose(probs.max(axis=0), confidence, rtol=1e-6)
