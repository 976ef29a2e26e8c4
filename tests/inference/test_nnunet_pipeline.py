"""The runtime's nnU-Net pipeline, piece by piece, against nnunetv2's own functions (value for value)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from edge_runtime.inference.nnunet.prediction import compute_steps, gaussian_weights, mirror_combinations, pad_to
from edge_runtime.inference.nnunet.resampling import resample, separate_z_axis
from edge_runtime.inference.nnunet.settings import (
    ChannelNormalization,
    NnunetSettings,
    Resampling,
    parse_nnunet,
)


def _nnunetv2():  # noqa: ANN202
    pytest.importorskip("nnunetv2", reason="nnunetv2 is not installed (scripts/bootstrap --dev installs it)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nnunetv2's import chain warns about its own dependencies
        import nnunetv2.inference.sliding_window_prediction as sliding
        import nnunetv2.preprocessing.resampling.default_resampling as resampling
    return sliding, resampling


CASES = [
    # shape, spacing, new spacing, order: 3D path, separate z along 0 (thin in-plane), along 2, upsampling
    ((7, 20, 18), (1.0, 1.2, 0.9), (1.5, 1.5, 1.5), 3),
    ((9, 40, 44), (5.0, 0.7, 0.7), (6.0, 5.0, 6.0), 3),
    ((12, 10, 6), (0.8, 0.8, 4.0), (1.0, 1.0, 2.5), 1),
    ((6, 12, 12), (2.0, 2.0, 2.0), (0.9, 1.3, 1.1), 1),
]


@pytest.mark.parametrize(("shape", "spacing", "new_spacing", "order"), CASES)
def test_resampling_is_nnunets(shape: tuple, spacing: tuple, new_spacing: tuple, order: int) -> None:
    _, theirs = _nnunetv2()
    rng = np.random.default_rng(sum(shape))
    data = rng.normal(0, 100, (2, *shape)).astype(np.float32)
    new_shape = theirs.compute_new_shape(shape, spacing, new_spacing)
    expected = theirs.resample_data_or_seg_to_shape(data, new_shape, spacing, new_spacing, is_seg=False,
                                                    order=order, order_z=0, force_separate_z=None)
    got = resample(data, new_shape, spacing, new_spacing, Resampling(order, 0, None), 3.0)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    sep, axis = theirs.determine_do_sep_z_and_axis(None, spacing, new_spacing)
    assert separate_z_axis(spacing, new_spacing, None, 3.0) == (axis if sep else None)


def test_sliding_window_steps_and_gaussian_are_nnunets() -> None:
    theirs, _ = _nnunetv2()
    import torch

    for size, tile, step in (((64, 32, 64), (64, 32, 64), 0.5), ((150, 33, 97), (64, 32, 48), 0.5),
                             ((110, 70), (64, 48), 0.7), ((200, 41, 300), (80, 40, 112), 0.25)):
        assert compute_steps(size, tile, step) == theirs.compute_steps_for_sliding_window(size, tile, step)
    for tile in ((64, 32, 64), (20, 48, 33), (96, 80)):
        expected = theirs.compute_gaussian(tile, 1 / 8, value_scaling_factor=10, dtype=torch.float16,
                                           device=torch.device("cpu")).float().numpy()
        np.testing.assert_array_equal(gaussian_weights(tile), expected)
    assert mirror_combinations((0, 1, 2)) == [(0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]


def test_padding_centres_the_image_as_nnunet_does() -> None:
    data = np.arange(2 * 3 * 5 * 4, dtype=np.float32).reshape(2, 3, 5, 4)
    padded, undo = pad_to(data, (6, 4, 7))
    assert padded.shape == (2, 6, 5, 7)
    np.testing.assert_array_equal(padded[undo], data)
    assert undo[1:] == (slice(1, 4), slice(0, 5), slice(1, 5))  # the larger half after the content


def _settings(**changes: object) -> NnunetSettings:
    base = NnunetSettings(
        configuration="3d_fullres", folds=("0", "1"), transpose_forward=(1, 0, 2), transpose_backward=(1, 0, 2),
        spacing=(6.0, 5.0, 6.0), patch_size=(64, 32, 64),
        normalization=(ChannelNormalization("CTNormalization", False, -319.1, 497.4, -920.8, 764.2),),
        resampling_data=Resampling(3, 0, None), resampling_probabilities=Resampling(1, 0, None),
        mirror_axes=(0, 1, 2),
    )
    from dataclasses import replace

    return replace(base, **changes)  # type: ignore[arg-type]


def test_manifest_section_round_trips_and_problems_are_all_reported() -> None:
    settings = _settings()
    problems: list[str] = []
    assert parse_nnunet(settings.to_dict(), problems) == settings and problems == []
    bad = settings.to_dict()
    bad.update(transpose_backward=[0, 1, 2], tile_step_size=0, normalization=[{"scheme": "SomethingNew"}])
    bad["resampling_data"] = {"order": 7}
    assert parse_nnunet(bad, problems) is None
    text = "\n".join(problems)
    assert "not inverse permutations" in text and "tile_step_size" in text and "SomethingNew" in text
    assert "orders must be integers 0-5" in text and len(problems) == 4


def test_confidence_without_probabilities_is_the_chosen_softmax() -> None:
    from edge_runtime.inference.nnunet.pipeline import chosen_probability, softmax

    logits = np.random.default_rng(3).normal(0, 4, (4, 5, 6, 7)).astype(np.float16)
    expected = softmax(logits.astype(np.float32)).max(axis=0)
    np.testing.assert_allclose(chosen_probability(logits), expected, rtol=1e-6)
