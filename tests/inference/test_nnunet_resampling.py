"""nnU-Net's resampling as separable maps (``resampling.py``) and the logits' way back slab by slab
(``labelmap.py``), against scipy's own calls and nnunetv2's own functions."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import ndimage

from edge_runtime.inference.nnunet.labelmap import argmax_and_probability, labels_and_confidence
from edge_runtime.inference.nnunet.preprocessing import Case
from edge_runtime.inference.nnunet.resampling import (
    compute_new_shape,
    coordinate_map,
    for_each_slab,
    resample,
    resize,
)
from edge_runtime.inference.nnunet.settings import Resampling


def _nnunetv2():  # noqa: ANN202
    pytest.importorskip("nnunetv2", reason="nnunetv2 is not installed (scripts/bootstrap --dev installs it)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nnunetv2's import chain warns about its own dependencies
        import nnunetv2.inference.export_prediction as export
        import nnunetv2.preprocessing.resampling.default_resampling as resampling
    return resampling, export


@pytest.mark.parametrize("order", [0, 1, 2, 3, 5])
@pytest.mark.parametrize(("shape", "new_shape"), [((9, 14, 11), (4, 30, 11)), ((6, 5), (17, 2))])
def test_axis_maps_are_scipys_zoom_then_the_clip(shape: tuple, new_shape: tuple, order: int) -> None:
    image = np.random.default_rng(order).normal(0, 1, shape)
    expected = ndimage.zoom(image, np.divide(new_shape, shape), order=order, mode="nearest", grid_mode=True)
    if order > 0:
        np.clip(expected, image.min(), image.max(), out=expected)
    got = resize(image, new_shape, order)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("order", [0, 1, 3])
def test_the_separate_axis_map_is_map_coordinates(order: int) -> None:
    line = np.random.default_rng(1).normal(0, 1, 13)
    coords = 13 / 31 * (np.arange(31) + 0.5) - 0.5
    expected = ndimage.map_coordinates(line, coords[None], order=order, mode="nearest")
    np.testing.assert_allclose(coordinate_map(13, 31, order).matrix @ line, expected, rtol=0, atol=1e-12)


CASES = [
    # shape, spacing, new spacing, (order, order_z, force_separate_z), dtype: what each reaches
    ((2, 9, 40, 44), (5.0, 0.7, 0.7), (6.0, 5.0, 6.0), (3, 1, None), np.float32),  # separate z, linear along it
    ((2, 9, 40, 44), (5.0, 0.7, 0.7), (2.0, 0.7, 0.7), (3, 0, None), np.float32),  # only the separate axis
    ((1, 20, 16, 18), (1.0, 1.0, 1.0), (1.3, 0.6, 0.9), (3, 0, True), np.float32),  # forced separate, 3 axes
    ((2, 10, 12, 14), (5.0, 1.0, 1.0), (5.0, 0.4, 0.7), (3, 0, None), np.float32),  # in-plane only: slabs of slices
    ((1, 7, 16, 18), (4.0, 1.0, 1.0), (2.5, 0.6, 0.9), (3, 0, False), np.float32),  # forced 3D
    ((3, 6, 11, 7), (3.0, 1.6, 1.6), (0.5, 0.4, 0.45), (1, 0, None), np.float16),  # logits going back
    ((3, 5, 11, 7), (6.0, 1.6, 1.6), (2.0, 0.4, 0.45), (1, 0, None), np.float16),  # ... with separate z
]


@pytest.mark.parametrize(("shape", "spacing", "new_spacing", "how", "dtype"), CASES)
def test_resampling_is_nnunets_on_each_path(shape: tuple, spacing: tuple, new_spacing: tuple, how: tuple,
                                            dtype: type) -> None:
    theirs, _ = _nnunetv2()
    data: np.ndarray = np.random.default_rng(sum(shape)).normal(0, 5, shape).astype(dtype)
    new_shape = theirs.compute_new_shape(shape[1:], spacing, new_spacing)
    expected = theirs.resample_data_or_seg_to_shape(data, new_shape, spacing, new_spacing, is_seg=False,
                                                    order=how[0], order_z=how[1], force_separate_z=how[2])
    got = resample(data, new_shape, spacing, new_spacing, Resampling(*how), 3.0)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    if dtype == np.float32:
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    else:  # float64 sums in another order: at most one float16 step apart, and rarely
        step = np.spacing(np.abs(expected)).astype(np.float32)
        differ = got != expected
        assert np.all(np.abs(got.astype(np.float32) - expected.astype(np.float32))[differ] <= step[differ])
        assert differ.mean() < 0.01


def test_slabs_in_threads_make_the_whole_result_once() -> None:
    data = np.random.default_rng(5).normal(0, 3, (4, 6, 9, 8)).astype(np.float16)
    new_shape, spacing, new_spacing, how = (37, 41, 30), (3.0, 1.5, 1.2), (0.5, 0.33, 0.32), Resampling(1, 0, None)
    whole = resample(data, new_shape, spacing, new_spacing, how, 3.0, np.float64, threads=1)
    out = np.full((4, *new_shape), np.nan)
    seen = np.zeros(new_shape[0], dtype=int)

    def keep(rows: slice, slab: np.ndarray) -> None:
        assert slab.dtype == np.float64 and slab.shape == (4, rows.stop - rows.start, *new_shape[1:])
        out[:, rows] = slab
        seen[rows] += 1

    for_each_slab(data, new_shape, spacing, new_spacing, how, 3.0, keep, threads=3, slab_voxels=4 * 41 * 30 * 2)
    assert np.all(seen == 1)
    np.testing.assert_array_equal(out, whole)


def test_argmax_keeps_the_first_of_equal_logits_and_gives_its_softmax() -> None:
    logits = np.random.default_rng(7).normal(0, 3, (5, 40, 30)).astype(np.float16).astype(np.float32)
    logits[3, :10] = logits[1, :10] = logits.max(axis=0)[:10] + 1  # ties between classes 1 and 3: 1 wins
    labels, chosen = argmax_and_probability(logits, np.uint8)
    np.testing.assert_array_equal(labels, np.argmax(logits, axis=0))
    assert np.all(labels[:10] == 1)
    exp = np.exp(logits - logits.max(axis=0))
    np.testing.assert_allclose(chosen, (exp / exp.sum(axis=0)).max(axis=0), rtol=1e-6)


@pytest.mark.parametrize(("spacing", "transpose"), [((1.2, 0.9, 0.8), (1, 0, 2)), ((5.0, 0.8, 0.8), (0, 1, 2))])
def test_the_way_back_is_nnunets_export(spacing: tuple, transpose: tuple) -> None:
    """Logits on the configuration's grid -> label map and confidence on the image's grid, cropped and transposed
    as nnU-Net's ``convert_predicted_logits_to_segmentation_with_correct_shape`` does it."""
    _, export = _nnunetv2()
    import torch
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from export.nnunet_source import nnunet_settings
    from tests.export.fixtures import NNUNET_DATASET, nnunet_plans

    plans = nnunet_plans(transpose=transpose, spacing=(3.0, 1.5, 1.25))
    settings = nnunet_settings(plans, plans["configurations"]["3d_fullres"], "3d_fullres", ["0"], (0, 1, 2), False,
                               0.5, 1)
    manager = PlansManager(plans)
    config = manager.get_configuration("3d_fullres")
    # the image in its own axis order, the crop in nnU-Net's
    full = (30, 40, 36)
    full_t = tuple(full[a] for a in transpose)
    spacing_t = tuple(spacing[a] for a in transpose)
    bbox = [[2, full_t[0] - 1], [0, full_t[1]], [5, full_t[2] - 3]]  # nnU-Net's own type: lists
    cropped = tuple(hi - lo for lo, hi in bbox)
    grid = compute_new_shape(cropped, spacing_t, settings.spacing)
    logits = np.random.default_rng(2).normal(0, 4, (3, *grid)).astype(np.float16)
    properties = {"spacing": list(spacing), "shape_before_cropping": full_t, "bbox_used_for_cropping": bbox,
                  "shape_after_cropping_and_before_resampling": cropped}
    labels_manager = manager.get_label_manager(NNUNET_DATASET)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = export.convert_predicted_logits_to_segmentation_with_correct_shape(
            torch.from_numpy(logits), manager, config, labels_manager, properties, num_threads_torch=1)
        _, probabilities = export.convert_predicted_logits_to_segmentation_with_correct_shape(
            torch.from_numpy(logits), manager, config, labels_manager, properties, return_probabilities=True,
            num_threads_torch=1)
    case = Case(spacing_t, full_t, tuple((lo, hi) for lo, hi in bbox), cropped)
    labels, confidence = labels_and_confidence(logits, case, settings, np.uint8, threads=2)
    assert labels.shape == full and confidence.shape == full and confidence.dtype == np.float32
    # float64 sums in another order round a stored float16 logit one step the other way now and then; the label
    # of a voxel follows only where two classes are that close
    assert (labels != expected).mean() < 1e-3
    np.testing.assert_allclose(confidence, np.asarray(probabilities).max(axis=0), rtol=0, atol=1e-3)
