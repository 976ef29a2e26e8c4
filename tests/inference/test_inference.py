"""Preprocessing, sliding window and the way back to the source grid, with a fake runner of our interface."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edge_runtime.imaging.volume import Volume
from edge_runtime.inference.package import DEFAULT_PACKAGE, ModelPackage, Normalization
from edge_runtime.inference.pipeline import (
    ModelGrid,
    gaussian_importance,
    segment,
    sliding_window,
    window_starts,
)
from edge_runtime.inference.runner import Runner


class ThresholdRunner(Runner):
    """Label 1 where the (normalised) input is positive; counts the windows it saw."""

    name = "threshold"

    def __init__(self, package: ModelPackage):
        super().__init__(package)
        self.calls = 0
        self.windows = 0

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        self.windows += batch.shape[0]
        positive = (batch[:, 0] > 0).astype(np.float32)
        out = np.zeros((batch.shape[0], self.package.num_classes, *batch.shape[2:]), dtype=np.float32)
        out[:, 0] = 1 - positive
        out[:, 1] = positive
        return out


def make_package(**changes: object) -> ModelPackage:
    base = ModelPackage.load(DEFAULT_PACKAGE)
    defaults = dict(normalization=Normalization("none"), patch_size=(8, 16, 16), overlap=0.5, batch_size=3)
    defaults.update(changes)
    return dataclasses.replace(base, **defaults)


def make_volume(array: np.ndarray, spacing=(2.0, 1.0, 1.0), positions=None) -> Volume:  # noqa: ANN001
    n = array.shape[0]
    pos = np.arange(n) * spacing[0] if positions is None else np.asarray(positions, dtype=float)
    return Volume(
        array=array.astype(np.float32),
        spacing=spacing,
        positions=pos - pos[0],
        origin=np.zeros(3),
        row_direction=np.array([1.0, 0, 0]),
        column_direction=np.array([0, 1.0, 0]),
        datasets=[],
        regular=positions is None,
    )


def test_window_starts_cover_and_overlap() -> None:
    assert window_starts(10, 16, 0.5) == [0]
    starts = window_starts(100, 32, 0.5)
    assert starts[0] == 0 and starts[-1] == 68
    assert all(b - a <= 16 for a, b in zip(starts, starts[1:], strict=False))


def test_gaussian_importance_peaks_in_the_centre_and_is_never_zero() -> None:
    w = gaussian_importance((8, 16, 16))
    assert w.max() == 1.0 and w.min() > 0
    assert w[4, 8, 8] > w[0, 0, 0]


def test_sliding_window_reproduces_a_pointwise_model_exactly() -> None:
    rng = np.random.default_rng(1)
    image = rng.normal(size=(21, 37, 30)).astype(np.float32)
    package = make_package()
    runner = ThresholdRunner(package)
    logits, windows = sliding_window(image, package, runner)
    assert logits.shape == (package.num_classes, *image.shape)
    np.testing.assert_array_equal(logits.argmax(0), (image > 0).astype(int))
    assert windows == runner.windows and runner.calls == -(-windows // 3)


def test_volume_smaller_than_the_patch_is_padded() -> None:
    image = np.ones((3, 5, 7), dtype=np.float32)
    logits, windows = sliding_window(image, make_package(), ThresholdRunner(make_package()))
    assert windows == 1 and logits.shape[1:] == (3, 5, 7) and (logits.argmax(0) == 1).all()


def test_segment_maps_back_to_every_source_voxel() -> None:
    """A cube resampled to a coarser grid comes back pixel-aligned on the source grid."""
    array = np.full((30, 64, 64), -1.0)
    array[10:20, 16:48, 20:40] = 1.0
    package = make_package(target_spacing=(3.0, 2.0, 2.0))
    volume = make_volume(array, spacing=(1.5, 1.0, 1.0))
    result = segment(volume, package, ThresholdRunner(package))
    assert result.labels.shape == array.shape
    agreement = np.mean(result.labels == (array > 0))
    assert agreement > 0.98
    assert (result.labels[14, 30, 30] == 1) and (result.labels[0, 0, 0] == 0)
    assert set(result.timings) == {"preprocess", "inference", "postprocess"}


def test_irregular_slices_are_interpolated_along_true_positions() -> None:
    positions = [0, 1, 2, 3, 5, 7, 8, 9, 12, 13]  # mm
    array = np.stack([np.full((8, 8), p, dtype=float) for p in positions]) - 6.0  # value = position - 6
    package = make_package(target_spacing=(1.0, None, None), patch_size=(4, 8, 8))
    volume = make_volume(array, spacing=(1.0, 1.0, 1.0), positions=positions)
    grid = ModelGrid.for_volume(volume, package)
    assert grid.shape[0] == 14  # 0..13 mm at 1 mm
    resampled = grid.resample(volume.array)
    np.testing.assert_allclose(resampled[:, 0, 0], np.arange(14) - 6.0, atol=1e-5)
    result = segment(volume, package, ThresholdRunner(package))
    np.testing.assert_array_equal(result.labels[:, 0, 0], (np.asarray(positions) > 6).astype(int))


def test_ct_window_normalisation() -> None:
    package = make_package(normalization=Normalization("ct_window", -1000, 1000, 0, 1000))
    array = np.array([[[-3000.0, -500.0, 0.0, 500.0, 3000.0]]] * 3)
    volume = make_volume(array)
    grid = ModelGrid.for_volume(volume, dataclasses.replace(package, target_spacing=None))
    from edge_runtime.inference.pipeline import normalize

    out = normalize(grid.resample(volume.array), package.normalization)
    np.testing.assert_allclose(out[0, 0], [-1, -0.5, 0, 0.5, 1])


@pytest.mark.parametrize("batch", [1, 4])
def test_batch_size_does_not_change_the_result(batch: int) -> None:
    rng = np.random.default_rng(2)
    image = rng.normal(size=(12, 20, 20)).astype(np.float32)
    a, _ = sliding_window(
        image, make_package(batch_size=batch), ThresholdRunner(make_package(batch_size=batch))
    )
    b, _ = sliding_window(image, make_package(batch_size=2), ThresholdRunner(make_package(batch_size=2)))
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_segment_leaves_the_volume_untouched() -> None:
    """The volume's intensities are measured after segmentation: normalisation must not leak into them."""
    array = np.linspace(-1000, 1000, 8 * 16 * 16).reshape(8, 16, 16)
    volume = make_volume(array)
    package = make_package(
        normalization=Normalization("ct_window", -1000, 1000, 0, 1000), target_spacing=None
    )
    before = volume.array.copy()
    first = segment(volume, package, ThresholdRunner(package)).labels
    np.testing.assert_array_equal(volume.array, before)
    np.testing.assert_array_equal(segment(volume, package, ThresholdRunner(package)).labels, first)
