"""The manifest's ``"totalsegmentator"`` section and the merge, without torch (the export side is tested in
``tests/export/test_totalsegmentator.py``)."""

from __future__ import annotations

import numpy as np

from edge_runtime.inference.totalsegmentator.pipeline import merge_parts
from edge_runtime.inference.totalsegmentator.settings import parse_totalsegmentator

SECTION = {
    "task": "total", "resample_mm": 1.5,
    "parts": [{"task_id": 291, "part": "class_map_part_organs", "dataset": "Dataset291_x", "classes": 3,
               "labels": [0, 1, 2]},
              {"task_id": 292, "part": "class_map_part_vertebrae", "dataset": "Dataset292_x", "classes": 2,
               "labels": [0, 3]}],
}


def test_a_section_is_read_and_its_output_channels_are_every_parts_classes() -> None:
    problems: list[str] = []
    settings = parse_totalsegmentator(SECTION, problems)
    assert problems == [] and settings is not None
    assert settings.output_channels == 5 and [p.labels for p in settings.parts] == [(0, 1, 2), (0, 3)]
    assert parse_totalsegmentator(settings.to_dict(), []) == settings
    assert parse_totalsegmentator(None, problems) is None and problems == []


def test_every_problem_of_a_section_is_named() -> None:
    bad = {**SECTION, "orientation": "LPS", "resample_order": 7,
           "parts": [{"task_id": 291, "part": "organs", "classes": 3, "labels": [1, 2, 3]}]}
    problems: list[str] = []
    assert parse_totalsegmentator(bad, problems) is None
    assert len(problems) == 3
    assert any("orientation" in p for p in problems) and any("resample_order" in p for p in problems)
    assert any("parts[0]" in p for p in problems)


def test_a_later_part_overwrites_an_earlier_one_only_where_it_found_something() -> None:
    settings = parse_totalsegmentator(SECTION, [])
    assert settings is not None
    organs = np.array([[0, 1, 2, 2]], dtype=np.uint8)
    vertebrae = np.array([[1, 0, 1, 0]], dtype=np.uint8)
    assert merge_parts([organs, vertebrae], settings.parts).tolist() == [[3, 1, 3, 2]]


def test_each_part_goes_back_slab_by_slab_as_it_would_alone_at_full_size() -> None:
    """``parts_back`` (each part's logits through the slab-by-slab way back) against each part resampled at full
    size by itself, argmax, softmax, crop put back and transpose undone: nnU-Net's way back for that part alone.
    Float32 logits: both resample in float64 and store float32, so the labels are equal voxel for voxel."""
    from edge_runtime.inference.nnunet.preprocessing import Case
    from edge_runtime.inference.nnunet.resampling import compute_new_shape, resample
    from edge_runtime.inference.nnunet.settings import NnunetSettings, Resampling
    from edge_runtime.inference.totalsegmentator.pipeline import parts_back

    parts = parse_totalsegmentator(SECTION, [])
    assert parts is not None
    settings = NnunetSettings("3d_fullres", ("0",), (1, 0, 2), (1, 0, 2), (1.5, 1.5, 1.5), (16, 16, 16), (),
                              Resampling(), Resampling())
    full_t, spacing_t = (26, 20, 30), (1.2, 1.0, 0.9)
    bbox = ((1, 25), (0, 20), (3, 28))
    cropped = tuple(hi - lo for lo, hi in bbox)
    grid = compute_new_shape(cropped, spacing_t, settings.spacing)
    assert grid != cropped  # the way back resamples
    logits = np.random.default_rng(4).normal(0, 3, (5, *grid)).astype(np.float32)
    case = Case(spacing_t, full_t, bbox, cropped)
    labels, confidence = parts_back(logits, case, settings, parts.parts)
    start = 0
    for part, ours, sure in zip(parts.parts, labels, confidence, strict=True):
        own = resample(logits[start:start + part.classes], cropped, spacing_t, settings.spacing,
                       settings.resampling_probabilities, settings.anisotropy_threshold)
        start += part.classes
        expected = np.zeros(full_t, dtype=np.uint8)
        expected[tuple(slice(lo, hi) for lo, hi in bbox)] = np.argmax(own, axis=0)
        exp = np.exp(own - own.max(axis=0))
        chosen = np.ones(full_t, dtype=np.float32)
        chosen[tuple(slice(lo, hi) for lo, hi in bbox)] = (exp / exp.sum(axis=0)).max(axis=0)
        np.testing.assert_array_equal(ours, expected.transpose(settings.transpose_backward))
        np.testing.assert_allclose(sure, chosen.transpose(settings.transpose_backward), rtol=1e-6)
        assert 0 < (ours > 0).mean() < 1  # the part claims some voxels, not all
