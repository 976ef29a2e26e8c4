"""The cascade's way in: the previous stage's label map resampled and one-hot encoded as nnU-Net does it, checked
against nnunetv2's own functions (``resample_data_or_seg_to_shape(is_seg=True)``, ``DefaultPreprocessor.run_case_npy``
with a previous-stage segmentation, ``convert_labelmap_to_one_hot``) on the same arrays."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage

from edge_runtime.inference.nnunet.cascade import resample_segmentation
from edge_runtime.inference.nnunet.settings import Resampling

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]


def _labels(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Smooth blobs of labels 0..3 with a band of -1 (background outside the non-zero mask), as int16."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=(4, *shape)), 2)
    seg = np.argmax(field, axis=0).astype(np.int16)
    seg[field.max(axis=0) < -0.05] = 0
    seg[:, :3] = -1
    return seg


@pytest.mark.parametrize(
    ("shape", "spacing", "new_spacing", "how"),
    [
        ((20, 30, 30), (2.0, 1.0, 1.0), (1.5, 1.6, 1.6), Resampling(1, 0, None)),  # one 3D resize
        ((10, 30, 30), (5.0, 1.0, 1.0), (2.5, 1.7, 1.7), Resampling(1, 0, None)),  # separate z, nearest along z
        ((10, 30, 30), (5.0, 1.0, 1.0), (2.5, 1.7, 1.7), Resampling(1, 1, None)),  # separate z, linear along z
        ((12, 30, 30), (1.0, 1.0, 1.0), (0.5, 0.5, 0.5), Resampling(1, 0, None)),  # x2: every boundary a tie
        ((12, 30, 30), (1.0, 1.0, 1.0), (1.3, 0.8, 0.7), Resampling(3, 0, None)),  # cubic indicators
    ],
)
def test_segmentation_resampling_is_nnunets(shape: tuple[int, int, int], spacing: tuple[float, float, float],
                                            new_spacing: tuple[float, float, float], how: Resampling) -> None:
    pytest.importorskip("nnunetv2", reason="nnunetv2 is not installed (scripts/bootstrap --dev installs it)")
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape

    seg = _labels(shape, seed=len(shape) + how.order + how.order_z)
    new_shape = [int(round(s / n * k)) for s, n, k in zip(spacing, new_spacing, shape, strict=True)]
    expected = resample_data_or_seg_to_shape(seg[None].astype(np.float32), new_shape, spacing, new_spacing,
                                             is_seg=True, order=how.order, order_z=how.order_z,
                                             force_separate_z=how.force_separate_z)[0]
    ours = resample_segmentation(seg, new_shape, spacing, new_spacing, how, 3.0)
    assert ours.shape == tuple(new_shape)
    assert np.array_equal(ours, expected), f"{int((ours != expected).sum())} of {ours.size} voxels differ"
    assert set(np.unique(ours)) <= set(np.unique(seg))


def test_the_cascade_input_is_what_nnunets_preprocessor_appends() -> None:
    """A CT with a zero corner (outside nnU-Net's non-zero mask, inside its crop) and the previous stage's labels
    on the image grid: the runtime's image channel and one-hot channels equal run_case_npy's + one-hot's."""
    pytest.importorskip("nnunetv2", reason="nnunetv2 is not installed (scripts/bootstrap --dev installs it)")
    pytest.importorskip("torch", reason="torch is not installed (the export extra)")
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.label_handling.label_handling import convert_labelmap_to_one_hot
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from edge_runtime.inference.nnunet.preprocessing import preprocess
    from export.nnunet_source import nnunet_settings, previous_stage_settings
    from phantom import make_phantom
    from tests.export.fixtures import NNUNET_DATASET, nnunet_plans

    plans = nnunet_plans(transpose=(1, 0, 2), spacing=(2.0, 3.0, 2.0), patch=(16, 16, 16))
    plans["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    dataset = copy.deepcopy(NNUNET_DATASET)
    manager = PlansManager(plans)
    config = manager.get_configuration("3d_cascade_fullres")
    merged = {**plans["configurations"]["3d_fullres"], **plans["configurations"]["3d_cascade_fullres"]}
    settings = nnunet_settings(plans, merged, "3d_cascade_fullres", ["0"], (0, 1, 2), True, 0.5, 1)
    settings = replace(settings, previous_stage=previous_stage_settings(merged, dataset, "3d_lowres"))

    spacing = (2.5, 1.4, 1.4)
    ph = make_phantom((16, 40, 36), spacing, rng=3)
    image = ph.hu[None].astype(np.float32)
    image[:, :, :6, :5] = 0  # a corner outside the non-zero mask that the crop keeps
    previous = np.clip(ph.labels, 0, 2).astype(np.uint8)  # the previous stage knows labels 0..2
    data, seg, _ = DefaultPreprocessor(verbose=False).run_case_npy(
        image, previous[None].astype(np.float32), {"spacing": list(spacing)}, manager, config, dataset)
    one_hot = convert_labelmap_to_one_hot(seg[0], manager.get_label_manager(dataset).foreground_labels, data.dtype)
    ours, case = preprocess(image, spacing, settings, previous)
    assert (seg == -1).any() and ours.shape == (3, *data.shape[1:])
    np.testing.assert_allclose(ours[:1], data, atol=1e-5)
    assert np.array_equal(ours[1:], one_hot)
    assert ours[1:].sum() > 0 and case.shape_before_cropping == tuple(image.shape[i + 1] for i in (1, 0, 2))
