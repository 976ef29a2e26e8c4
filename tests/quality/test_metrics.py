"""Tests of edge_runtime.quality.metrics against independent implementations.

Reference: SimpleITK (ITK's C++ filters). ``LabelOverlapMeasuresImageFilter`` gives Dice, Jaccard,
false negative error (1 - sensitivity), false positive error (1 - specificity) and false discovery rate
(1 - precision) per label. For the surface metrics, ``LabelContourImageFilter`` (face connectivity, on a
zero-padded image so the volume border counts as outside) yields the same surface voxels as our
``mask & ~binary_erosion(mask)``, ``HausdorffDistanceImageFilter`` on those contours the Hausdorff
distance, and ``SignedMaurerDistanceMapImageFilter`` the voxel-to-surface distances from which HD95 and
ASSD follow: the same definition as ours (MONAI's), so agreement is to float32 rounding, well inside the
one-voxel-diagonal tolerance asked for.

Optional cross-check: DeepMind's ``surface-distance`` package, whose surfaces lie on the voxel-corner
lattice and are area weighted; its Hausdorff distance is provably within one voxel diagonal of ours and
its HD95/ASSD are checked to be on these shapes. Skipped when the package is not installed.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
from scipy import ndimage

from edge_runtime.quality.metrics import (
    ConfusionCounts,
    LabelMetrics,
    compare_label_maps,
    overlap_counts,
    surface_distances,
)

SURFACE_ATOL = 1e-4  # mm; SimpleITK's distance maps are float32


@pytest.fixture(scope="module")
def sitk():
    return pytest.importorskip(
        "SimpleITK", reason="SimpleITK is the independent reference implementation (pip install SimpleITK)"
    )


# ---------------------------------------------------------------------------------------------- helpers


def _blobs(rng: np.random.Generator, shape: tuple[int, ...], sigma: float, level: float = 0.5) -> np.ndarray:
    return ndimage.gaussian_filter(rng.random(shape), sigma) > level


def _random_label_map(rng: np.random.Generator, shape: tuple[int, ...], n_labels: int) -> np.ndarray:
    """Ellipsoids of varied sizes and positions, later labels drawn over earlier ones."""
    out = np.zeros(shape, np.uint8)
    grid = np.indices(shape, dtype=np.float64)
    for label in range(1, n_labels + 1):
        centre = rng.uniform(0, shape)
        radii = rng.uniform(1.5, max(shape) / 3, len(shape))
        inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)) <= 1.0
        out[inside] = label
    return out


def _perturb(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """Shift by a voxel or two, then flip some voxels: a plausible imperfect prediction."""
    shift = tuple(int(s) for s in rng.integers(-2, 3, labels.ndim))
    out = np.roll(labels, shift, axis=tuple(range(labels.ndim)))
    noise = rng.random(labels.shape) < 0.02
    out[noise] = rng.integers(0, labels.max() + 1, int(noise.sum()))
    return out.astype(labels.dtype)


def _image(sitk, mask: np.ndarray, spacing: tuple[float, ...], pad: int = 0):
    img = sitk.GetImageFromArray(np.pad(mask.astype(np.uint8), pad))
    img.SetSpacing(tuple(float(s) for s in spacing[::-1]))  # numpy (z, y, x) -> ITK (x, y, z)
    return img


def _sitk_overlap(sitk, pred: np.ndarray, ref: np.ndarray, label: int) -> dict[str, float]:
    f = sitk.LabelOverlapMeasuresImageFilter()
    f.Execute(sitk.GetImageFromArray(pred), sitk.GetImageFromArray(ref))  # source = pred, target = ref
    return {
        "dice": f.GetDiceCoefficient(label),
        "jaccard": f.GetJaccardCoefficient(label),
        "sensitivity": 1.0 - f.GetFalseNegativeError(label),
        "specificity": 1.0 - f.GetFalsePositiveError(label),
        "precision": 1.0 - f.GetFalseDiscoveryRate(label),
    }


def _sitk_surface(sitk, pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...]) -> dict[str, float]:
    """HD, HD95, ASSD from ITK filters (both masks non-empty)."""
    inner = tuple(slice(1, -1) for _ in pred.shape)
    contours = [
        sitk.LabelContour(_image(sitk, m, spacing, pad=1), fullyConnected=False, backgroundValue=0)
        for m in (pred, ref)
    ]
    hd_filter = sitk.HausdorffDistanceImageFilter()
    hd_filter.Execute(contours[0], contours[1])
    on_surface = [sitk.GetArrayFromImage(c)[inner].astype(bool) for c in contours]
    distance_maps = [
        np.abs(
            sitk.GetArrayFromImage(
                sitk.SignedMaurerDistanceMap(
                    c, insideIsPositive=False, squaredDistance=False, useImageSpacing=True
                )
            )[inner].astype(np.float64)
        )
        for c in contours
    ]
    pred_to_ref = distance_maps[1][on_surface[0]]
    ref_to_pred = distance_maps[0][on_surface[1]]
    pooled = np.concatenate([pred_to_ref, ref_to_pred])
    return {
        "hausdorff_mm": hd_filter.GetHausdorffDistance(),
        "hd95_mm": max(np.percentile(pred_to_ref, 95), np.percentile(ref_to_pred, 95)),
        "assd_mm": float(pooled.mean()),
    }


def _same(a: dict, b: dict) -> bool:
    """Equal dicts of metrics, NaN equal to NaN."""
    return a.keys() == b.keys() and all(
        x == y or (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y))
        for x, y in ((a[k], b[k]) for k in a)
    )


def _diag(spacing: tuple[float, ...]) -> float:
    return math.sqrt(sum(s * s for s in spacing))


def _single(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...], label: int = 1) -> LabelMetrics:
    return compare_label_maps(pred.astype(np.uint8), ref.astype(np.uint8), spacing, labels=[label])[label]


SPACINGS = [(1.0, 1.0, 1.0), (2.5, 0.7, 0.9), (5.0, 0.45, 0.45), (0.8, 3.0, 1.6)]


# ---------------------------------------------------------------------------------- against SimpleITK


@pytest.mark.parametrize("seed", range(4))
def test_overlap_metrics_match_simpleitk_on_label_maps(sitk, seed: int) -> None:
    rng = np.random.default_rng(seed)
    ref = _random_label_map(rng, (18, 30, 26), n_labels=6)
    pred = _perturb(rng, ref)
    spacing = SPACINGS[seed]
    result = compare_label_maps(pred, ref, spacing, surface=False)
    assert list(result) == [int(v) for v in np.union1d(pred, ref) if v != 0]
    voxel_ml = math.prod(spacing) / 1000.0
    for label, m in result.items():
        p, r = pred == label, ref == label
        if not (p.any() and r.any()):
            continue
        expected = _sitk_overlap(sitk, pred, ref, label)
        for name, value in expected.items():
            assert getattr(m, name) == pytest.approx(value, abs=1e-6), (label, name)
        assert m.f1 == m.dice
        assert m.accuracy == pytest.approx(float(np.mean(p == r)), abs=1e-12)
        assert (m.tp, m.fp, m.fn, m.tn) == (
            int(np.sum(p & r)),
            int(np.sum(p & ~r)),
            int(np.sum(~p & r)),
            int(np.sum(~p & ~r)),
        )
        assert m.volume_pred_ml == pytest.approx(p.sum() * voxel_ml)
        assert m.volume_ref_ml == pytest.approx(r.sum() * voxel_ml)
        assert m.volume_difference_ml == pytest.approx((p.sum() - r.sum()) * voxel_ml)
        assert m.relative_volume_difference == pytest.approx((p.sum() - r.sum()) / r.sum())
        assert m.hausdorff_mm is None and m.hd95_mm is None and m.assd_mm is None


@pytest.mark.parametrize("seed", range(4))
def test_surface_metrics_match_simpleitk_on_label_maps(sitk, seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    ref = _random_label_map(rng, (16, 28, 24), n_labels=5)
    pred = _perturb(rng, ref)
    spacing = SPACINGS[seed]
    for label, m in compare_label_maps(pred, ref, spacing).items():
        p, r = pred == label, ref == label
        if not (p.any() and r.any()):
            continue
        expected = _sitk_surface(sitk, p, r, spacing)
        for name, value in expected.items():
            assert getattr(m, name) == pytest.approx(value, abs=SURFACE_ATOL), (label, name)
            assert abs(getattr(m, name) - value) <= _diag(spacing)


def _mask_pairs() -> list[tuple[str, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(7)
    shape = (14, 19, 17)
    outer = _blobs(rng, shape, 3.0, 0.45)
    pairs = [
        ("smooth blobs", _blobs(rng, shape, 2.0), _blobs(rng, shape, 2.0)),
        ("salt and pepper", rng.random(shape) < 0.3, rng.random(shape) < 0.3),
        ("nested", outer, ndimage.binary_erosion(outer, iterations=2)),
    ]
    single = np.zeros(shape, bool)
    single[7, 9, 8] = True
    pairs.append(("single voxel vs blob", single, _blobs(rng, shape, 2.5, 0.48)))
    other = np.zeros(shape, bool)
    other[2, 15, 3] = True
    pairs.append(("single voxel vs single voxel", single, other))
    corner = np.zeros(shape, bool)
    corner[:5, :6, :4] = True  # touches three faces of the volume
    pairs.append(("touching the border", corner, np.roll(corner, 1, axis=2)))
    pairs.append(
        (
            "full volume vs slab",
            np.ones(shape, bool),
            np.pad(np.ones((10, 19, 17), bool), ((2, 2), (0, 0), (0, 0))),
        )
    )
    return pairs


MASK_PAIRS = _mask_pairs()


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name,pred,ref", MASK_PAIRS, ids=[p[0] for p in MASK_PAIRS])
def test_surface_and_overlap_match_simpleitk_on_mask_pairs(sitk, name, pred, ref, spacing) -> None:
    assert pred.any() and ref.any(), name
    m = _single(pred, ref, spacing)
    expected = _sitk_surface(sitk, pred, ref, spacing)
    for metric, value in expected.items():
        assert getattr(m, metric) == pytest.approx(value, abs=SURFACE_ATOL), metric
    overlap = _sitk_overlap(sitk, pred.astype(np.uint8), ref.astype(np.uint8), 1)
    for metric, value in overlap.items():
        assert getattr(m, metric) == pytest.approx(value, abs=1e-6), metric


def test_surface_metrics_ignore_everything_outside_the_crop(sitk) -> None:
    """Small objects in a large volume: the cropped computation equals the whole-volume reference."""
    rng = np.random.default_rng(3)
    pred = np.zeros((40, 90, 80), np.uint8)
    ref = np.zeros_like(pred)
    pred[30:36, 70:78, 5:12] = _blobs(rng, (6, 8, 7), 1.0, 0.45)
    ref[31:37, 69:76, 6:12] = 1
    pred[0:3, 0:4, 75:80] = 2  # at the volume border
    ref[0:2, 1:4, 76:80] = 2
    spacing = (3.0, 0.8, 0.8)
    result = compare_label_maps(pred, ref, spacing)
    for label in (1, 2):
        expected = _sitk_surface(sitk, pred == label, ref == label, spacing)
        for metric, value in expected.items():
            assert getattr(result[label], metric) == pytest.approx(value, abs=SURFACE_ATOL), (label, metric)


# --------------------------------------------------------------------- against DeepMind surface-distance


@pytest.mark.parametrize("seed", range(6))
def test_within_one_voxel_diagonal_of_deepmind_surface_distance(seed: int) -> None:
    sd = pytest.importorskip(
        "surface_distance",
        reason="optional cross-check with DeepMind's surface-distance (pip install surface-distance)",
    )
    rng = np.random.default_rng(200 + seed)
    shape = tuple(int(n) for n in rng.integers(10, 30, 3))
    spacing = SPACINGS[seed % len(SPACINGS)]
    if seed % 3 == 0:
        pred, ref = rng.random(shape) < 0.3, rng.random(shape) < 0.3
    else:
        pred, ref = _blobs(rng, shape, 1.0 + seed % 3), _blobs(rng, shape, 1.0 + seed % 3)
    assert pred.any() and ref.any()
    with warnings.catch_warnings():  # surface-distance 0.1 uses scipy.ndimage's deprecated namespaces
        warnings.simplefilter("ignore", DeprecationWarning)
        d = sd.compute_surface_distances(ref, pred, spacing)  # (mask_gt, mask_pred)
        dice = sd.compute_dice_coefficient(ref, pred)
        hd = sd.compute_robust_hausdorff(d, 100)
        hd95 = sd.compute_robust_hausdorff(d, 95)
    area_gt, area_pred = d["surfel_areas_gt"], d["surfel_areas_pred"]
    assd = (np.sum(d["distances_gt_to_pred"] * area_gt) + np.sum(d["distances_pred_to_gt"] * area_pred)) / (
        np.sum(area_gt) + np.sum(area_pred)
    )
    m = _single(pred, ref, spacing)
    assert m.dice == pytest.approx(dice, abs=1e-6)
    diag = _diag(spacing)
    assert abs(m.hausdorff_mm - hd) <= diag
    assert abs(m.hd95_mm - hd95) <= diag
    assert abs(m.assd_mm - assd) <= diag


# ------------------------------------------------------------------------------ empty-mask conventions


def test_both_empty() -> None:
    pred = np.zeros((4, 5, 6), np.uint8)
    pred[0, 0, 0] = 1
    m = compare_label_maps(pred, pred.copy(), (2.0, 1.0, 1.0), labels=[1, 3])[3]
    assert (m.dice, m.jaccard, m.f1, m.accuracy, m.specificity) == (1.0, 1.0, 1.0, 1.0, 1.0)
    assert math.isnan(m.sensitivity) and math.isnan(m.precision)
    assert (m.hausdorff_mm, m.hd95_mm, m.assd_mm) == (0.0, 0.0, 0.0)
    assert (m.volume_pred_ml, m.volume_ref_ml, m.volume_difference_ml, m.relative_volume_difference) == (
        0,
        0,
        0,
        0,
    )
    assert (m.tp, m.fp, m.fn, m.tn) == (0, 0, 0, pred.size)
    # a label above every value present in the maps
    assert compare_label_maps(pred, pred, (1, 1, 1), labels=[200])[200].dice == 1.0


def test_all_background_volume_has_no_default_labels() -> None:
    empty = np.zeros((3, 4, 5), np.uint16)
    assert compare_label_maps(empty, empty, (1, 1, 1)) == {}
    assert overlap_counts(empty, empty) == {}


def test_pred_empty() -> None:
    ref = np.zeros((6, 7, 8), np.uint8)
    ref[2:4, 2:5, 3:6] = 1
    m = _single(np.zeros_like(ref), ref, (1.5, 1.0, 1.0))
    assert (m.dice, m.jaccard, m.f1, m.sensitivity, m.specificity) == (0.0, 0.0, 0.0, 0.0, 1.0)
    assert math.isnan(m.precision)
    assert m.hausdorff_mm == m.hd95_mm == m.assd_mm == math.inf
    assert m.relative_volume_difference == -1.0
    assert m.volume_difference_ml == pytest.approx(-18 * 1.5 / 1000)


def test_ref_empty() -> None:
    pred = np.zeros((6, 7, 8), np.uint8)
    pred[5, 6, 7] = 1
    m = _single(pred, np.zeros_like(pred), (1.0, 1.0, 1.0))
    assert (m.dice, m.jaccard, m.precision) == (0.0, 0.0, 0.0)
    assert math.isnan(m.sensitivity)
    assert m.hausdorff_mm == m.hd95_mm == m.assd_mm == math.inf
    assert m.relative_volume_difference == math.inf
    d = surface_distances(pred, np.zeros_like(pred), (1.0, 1.0, 1.0))
    assert d.pred_to_ref.tolist() == [math.inf] and d.ref_to_pred.size == 0


def test_reference_fills_the_volume() -> None:
    ref = np.ones((3, 4, 5), np.uint8)
    m = _single(ref, ref, (1.0, 1.0, 1.0))
    assert (m.dice, m.sensitivity, m.precision, m.accuracy) == (1.0, 1.0, 1.0, 1.0)
    assert math.isnan(m.specificity)  # TN + FP = 0
    assert (m.hausdorff_mm, m.hd95_mm, m.assd_mm) == (0.0, 0.0, 0.0)


# ------------------------------------------------------------------------------------ known geometry


def test_single_voxels_anisotropic_spacing() -> None:
    spacing = (3.0, 0.5, 0.7)
    pred = np.zeros((5, 6, 7), np.uint8)
    ref = np.zeros_like(pred)
    pred[1, 2, 3] = 1
    ref[3, 5, 3] = 1
    expected = math.hypot(2 * 3.0, 3 * 0.5)
    m = _single(pred, ref, spacing)
    assert m.hausdorff_mm == pytest.approx(expected)
    assert m.hd95_mm == pytest.approx(expected)
    assert m.assd_mm == pytest.approx(expected)
    same = _single(pred, pred, spacing)
    assert (same.dice, same.hausdorff_mm, same.hd95_mm, same.assd_mm) == (1.0, 0.0, 0.0, 0.0)


def test_shifted_slab_along_slices() -> None:
    """A slab shifted by two slices: every surface voxel that moved is 2 * dz away."""
    pred = np.zeros((12, 8, 8), np.uint8)
    pred[2:6] = 1
    ref = np.roll(pred, 2, axis=0)
    m = _single(pred, ref, (2.5, 0.8, 0.8))
    assert m.hausdorff_mm == pytest.approx(5.0)
    assert m.dice == pytest.approx(0.5)
    assert m.jaccard == pytest.approx(1 / 3)


# -------------------------------------------------------------------------------------- API details


def test_overlap_counts_match_boolean_counts() -> None:
    rng = np.random.default_rng(11)
    pred = rng.integers(0, 5, (9, 10, 11)).astype(np.int16)
    ref = rng.integers(0, 5, (9, 10, 11)).astype(np.int16)
    counts = overlap_counts(pred, ref)
    assert list(counts) == [1, 2, 3, 4]
    for label, c in counts.items():
        p, r = pred == label, ref == label
        assert c == ConfusionCounts(
            int(np.sum(p & r)), int(np.sum(p & ~r)), int(np.sum(~p & r)), int(np.sum(~p & ~r))
        )
        assert sum(c) == pred.size
    assert list(overlap_counts(pred, ref, labels=[4, 2])) == [2, 4]


def test_default_labels_are_the_union_of_present_labels() -> None:
    pred = np.zeros((4, 4, 4), np.uint8)
    ref = np.zeros_like(pred)
    pred[0, 0, 0], pred[1, 1, 1] = 2, 7
    ref[2, 2, 2], ref[3, 3, 3] = 7, 9
    assert list(compare_label_maps(pred, ref, (1, 1, 1))) == [2, 7, 9]
    assert list(compare_label_maps(pred, ref, (1, 1, 1), labels=(9, 2))) == [2, 9]


def test_large_label_values_and_dtypes_give_the_same_results() -> None:
    rng = np.random.default_rng(5)
    ref = _random_label_map(rng, (10, 16, 14), n_labels=4)
    pred = _perturb(rng, ref)
    spacing = (2.0, 0.9, 0.9)
    base = compare_label_maps(pred, ref, spacing)
    big = {0: 0, 1: 70_000, 2: 2, 3: 5_000_000, 4: 123_456_789}
    lut = np.array([big[i] for i in range(5)], np.int64)
    for dtype in (np.int64, np.uint64, np.uint32):
        relabelled = compare_label_maps(lut[pred].astype(dtype), lut[ref].astype(dtype), spacing)
        assert list(relabelled) == sorted(big[k] for k in base)
        for label, m in base.items():
            assert _same(relabelled[big[label]].to_dict(), {**m.to_dict(), "label": big[label]})
    subset = compare_label_maps(lut[pred], lut[ref], spacing, labels=[5_000_000, 42])
    assert _same(subset[5_000_000].to_dict(), {**base[3].to_dict(), "label": 5_000_000})
    assert subset[42].dice == 1.0
    for dtype in (np.uint8, np.int16, np.uint64):
        same = compare_label_maps(pred.astype(dtype), ref.astype(dtype), spacing)
        assert list(same) == list(base)
        assert all(_same(same[k].to_dict(), base[k].to_dict()) for k in base)
    # label values up to 65535 index the counts directly; past 1023 the counting avoids a joint histogram
    for scale, dtype in ((250, np.uint16), (16_000, np.int32), (16_000, np.uint64)):
        scaled = compare_label_maps(
            (pred.astype(np.int64) * scale).astype(dtype),
            (ref.astype(np.int64) * scale).astype(dtype),
            spacing,
            workers=2,
        )
        assert list(scaled) == [k * scale for k in base]
        assert all(
            _same(scaled[k * scale].to_dict(), {**base[k].to_dict(), "label": k * scale}) for k in base
        )


def test_bool_masks_and_2d_arrays() -> None:
    rng = np.random.default_rng(9)
    pred, ref = _blobs(rng, (30, 40), 2.0), _blobs(rng, (30, 40), 2.0)
    m = compare_label_maps(pred, ref, (0.5, 0.7))[1]
    d = surface_distances(pred, ref, (0.5, 0.7))
    assert m.hausdorff_mm == d.hausdorff()
    assert m.hd95_mm == d.percentile(95)
    assert m.assd_mm == d.average_symmetric()
    assert m.dice == pytest.approx(2 * np.sum(pred & ref) / (pred.sum() + ref.sum()))


def test_surface_false_leaves_overlap_unchanged() -> None:
    rng = np.random.default_rng(2)
    ref = _random_label_map(rng, (8, 12, 12), n_labels=3)
    pred = _perturb(rng, ref)
    with_surface = compare_label_maps(pred, ref, (1, 1, 1))
    without = compare_label_maps(pred, ref, (1, 1, 1), surface=False)
    surface_fields = {"hausdorff_mm", "hd95_mm", "assd_mm"}
    for label, m in with_surface.items():
        a, b = m.to_dict(), without[label].to_dict()
        assert all(b[k] is None for k in surface_fields)
        assert _same(
            {k: v for k, v in a.items() if k not in surface_fields},
            {k: v for k, v in b.items() if k not in surface_fields},
        )


def test_threads_give_the_same_results() -> None:
    rng = np.random.default_rng(4)
    ref = _random_label_map(rng, (12, 20, 18), n_labels=6)
    pred = _perturb(rng, ref)
    serial = compare_label_maps(pred, ref, (2.0, 0.7, 0.7), labels=range(1, 9))
    threaded = compare_label_maps(pred, ref, (2.0, 0.7, 0.7), labels=range(1, 9), workers=3)
    assert list(threaded) == list(serial)
    assert all(_same(threaded[k].to_dict(), serial[k].to_dict()) for k in serial)
    with pytest.raises(ValueError):
        compare_label_maps(pred, ref, (1, 1, 1), workers=0)


def test_to_dict_is_json_serialisable() -> None:
    pred = np.zeros((3, 3, 3), np.uint8)
    pred[1, 1, 1] = 1
    m = _single(pred, np.zeros_like(pred), (1, 1, 1))
    d = m.to_dict()
    assert list(d) == list(LabelMetrics.__dataclass_fields__)
    assert all(type(v) in (int, float) for v in d.values())
    assert json.loads(json.dumps(d))["hausdorff_mm"] == math.inf


@pytest.mark.parametrize(
    "pred,ref,spacing,labels,error",
    [
        (np.zeros((2, 2, 2), np.uint8), np.zeros((2, 2, 3), np.uint8), (1, 1, 1), None, ValueError),
        (np.zeros((2, 2, 2), np.float32), np.zeros((2, 2, 2), np.float32), (1, 1, 1), None, TypeError),
        (np.full((2, 2, 2), -1, np.int16), np.zeros((2, 2, 2), np.int16), (1, 1, 1), None, ValueError),
        (np.zeros((2, 2, 2), np.uint8), np.zeros((2, 2, 2), np.uint8), (1, 1), None, ValueError),
        (np.zeros((2, 2, 2), np.uint8), np.zeros((2, 2, 2), np.uint8), (1, 0, 1), None, ValueError),
        (np.zeros((2, 2, 2), np.uint8), np.zeros((2, 2, 2), np.uint8), (1, 1, 1), [0], ValueError),
    ],
)
def test_invalid_input(pred, ref, spacing, labels, error) -> None:
    with pytest.raises(error):
        compare_label_maps(pred, ref, spacing, labels)


def test_metrics_module_does_not_import_torch() -> None:
    code = "import sys, edge_runtime.quality.metrics; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
