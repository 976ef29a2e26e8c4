"""Contract A: the softmax probability of the chosen label per voxel, and per-class uint8 probabilities."""

from __future__ import annotations

import numpy as np

from edge_runtime.inference.package import ModelPackage
from edge_runtime.inference.pipeline import segment
from edge_runtime.inference.runner import Runner
from tests.inference.test_inference import make_package, make_volume


class LinearRunner(Runner):
    """Logit of class 1 = the input, every other class 0: a softmax we can write down."""

    name = "linear"

    def __init__(self, package: ModelPackage):
        super().__init__(package)

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        out = np.zeros((batch.shape[0], self.package.num_classes, *batch.shape[2:]), dtype=np.float32)
        out[:, 1] = batch[:, 0]
        return out


def expected_softmax(x: np.ndarray, k: int) -> np.ndarray:
    """(K, ...) softmax of logits (0, x, 0, 0, ...)."""
    e = np.exp(x.astype(np.float64))
    denom = e + (k - 1)
    out = np.repeat((1 / denom)[None], k, axis=0)
    out[1] = e / denom
    return out


def test_confidence_is_the_softmax_of_the_chosen_label_on_the_source_grid() -> None:
    rng = np.random.default_rng(3)
    array = rng.normal(scale=3.0, size=(11, 24, 20))
    package = make_package(target_spacing=None)
    result = segment(make_volume(array), package, LinearRunner(package))
    assert result.confidence is not None and result.probabilities is None
    assert result.confidence.shape == array.shape and result.confidence.dtype == np.float32
    softmax = expected_softmax(array, package.num_classes)
    np.testing.assert_allclose(result.confidence, softmax.max(axis=0), rtol=1e-5)
    np.testing.assert_array_equal(result.labels, (array > 0).astype(np.uint8))


def test_confidence_follows_the_label_back_to_a_resampled_source_grid() -> None:
    """Each source voxel takes the confidence of the model voxel whose label it took."""
    array = np.linspace(-4, 4, 30 * 32 * 32).reshape(30, 32, 32)
    package = make_package(target_spacing=(3.0, 2.0, 2.0))
    result = segment(make_volume(array, spacing=(1.5, 1.0, 1.0)), package, LinearRunner(package))
    assert result.confidence is not None
    assert result.confidence.shape == array.shape
    chosen = np.where(result.labels == 1, np.exp(array) / (np.exp(array) + 5), 1 / (np.exp(array) + 5))
    # nearest-neighbour mapping: within one model voxel of the exact value
    assert np.abs(result.confidence - chosen).max() < 0.1
    assert 1 / package.num_classes <= result.confidence.min() and result.confidence.max() <= 1


def test_probabilities_are_uint8_per_class_and_agree_with_labels_and_confidence() -> None:
    rng = np.random.default_rng(4)
    array = rng.normal(scale=3.0, size=(9, 20, 18))
    package = make_package(target_spacing=None)
    result = segment(make_volume(array), package, LinearRunner(package), probabilities=True)
    probs = result.probabilities
    assert probs is not None and result.confidence is not None
    assert probs.dtype == np.uint8 and probs.shape == (package.num_classes, *array.shape)
    expected = np.rint(expected_softmax(array, package.num_classes) * 255)
    assert np.abs(probs.astype(int) - expected).max() <= 1
    chosen = np.take_along_axis(probs, result.labels[None].astype(np.intp), axis=0)[0]
    assert np.abs(chosen / 255.0 - result.confidence).max() <= 1 / 255 + 1e-6
    assert np.abs(probs.sum(axis=0, dtype=int) - 255).max() <= package.num_classes
