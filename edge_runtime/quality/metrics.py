"""Per-label segmentation quality metrics: prediction label map vs reference label map.

All metrics are computed per label of two integer label maps of the same shape (for a CT/MR series:
axes ``(slice, row, column)``), with the voxel spacing given in millimetres in the same axis order,
``(z, y, x)``. Only numpy and scipy are used.

Overlap metrics (from the confusion counts TP, FP, FN, TN of ``pred == label`` vs ``ref == label``
over the whole volume):

* Dice = F1 = 2 TP / (2 TP + FP + FN); Jaccard = TP / (TP + FP + FN)
* sensitivity (recall) = TP / (TP + FN); specificity = TN / (TN + FP); precision = TP / (TP + FP)
* accuracy = (TP + TN) / N

Surface metrics, in mm. The definition is MONAI's (``monai.metrics`` ``compute_hausdorff_distance`` /
``compute_average_surface_distance`` with ``symmetric=True``, no sub-voxel surfaces):

* the surface of a mask is its set of voxels that have at least one face neighbour (6-connectivity in
  3-D) outside the mask, i.e. ``mask & ~binary_erosion(mask)``; the volume border counts as outside;
* the distance from a surface voxel to the other surface is the Euclidean distance, in mm, between voxel
  centres (``distance_transform_edt(..., sampling=spacing)``);
* Hausdorff distance = the largest of those distances in either direction;
* HD95 = max(P95(pred surface -> ref surface), P95(ref surface -> pred surface)): the larger of the two
  *directed* 95th percentiles, each over surface voxels counted equally, with numpy's default (linear)
  percentile interpolation. This is MONAI's HD95. The DeepMind ``surface-distance`` package also takes
  the larger of the two directed percentiles, but over surface elements on the voxel-corner lattice
  weighted by their area, so its values differ from these by up to about one voxel diagonal. It is not
  the MedPy definition (one percentile of both directions pooled);
* ASSD (average symmetric surface distance) = the mean of all distances of both directions pooled:
  (sum d(pred -> ref) + sum d(ref -> pred)) / (n pred surface voxels + n ref surface voxels).

Volumes are in mL (1 mL = 1000 mm^3): ``volume_difference_ml`` = pred - ref (signed; take ``abs`` for
the absolute error) and ``relative_volume_difference`` = (pred - ref) / ref (signed).

Empty masks (a label absent from the prediction, the reference, or both) have defined results:

=========================  ===================  ===================  ===========================
metric                     both empty           pred empty only      ref empty only
=========================  ===================  ===================  ===========================
Dice, Jaccard, F1          1.0                  0.0                  0.0
sensitivity                NaN (TP+FN = 0)      0.0                  NaN (TP+FN = 0)
precision                  NaN (TP+FP = 0)      NaN (TP+FP = 0)      0.0
Hausdorff, HD95, ASSD      0.0                  inf                  inf
relative volume diff.      0.0                  -1.0                 inf
=========================  ===================  ===================  ===========================

The rule behind the table: a ratio whose denominator is zero is NaN (as in MONAI's confusion-matrix
metrics), except Dice, Jaccard and F1, whose denominators are zero only when both masks are empty,
which is a perfect prediction and scores 1.0 (MONAI ``DiceMetric(ignore_empty=False)``). Specificity
is NaN only when the reference fills the whole volume. Surface distances to an empty surface are
infinite (as in DeepMind's ``surface-distance`` and MONAI); two empty surfaces agree perfectly (0.0).
Accuracy and the volumes are always finite. ``to_dict()`` keeps NaN and inf as floats (``json.dumps``
writes them as ``NaN`` / ``Infinity``).

Speed: the confusion counts of all labels come from one pass over the volume (bincounts over slabs),
the bounding boxes of all labels from one ``scipy.ndimage.find_objects`` pass per map, and the surface
metrics of each label are computed on the bounding box of the union of its two masks, plus a one-voxel
margin, never on the whole volume.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np
from scipy import ndimage

__all__ = [
    "ConfusionCounts",
    "LabelMetrics",
    "SurfaceDistances",
    "compare_label_maps",
    "overlap_counts",
    "surface_distances",
]

# Label values up to this are used as array indices directly (bincount bins, find_objects list);
# label maps with larger values are first re-indexed to 1..K.
_DIRECT_MAX_LABEL = 65535
# Up to this many label indices n, the counting pass is one joint bincount (n^2 bins) per slab.
_JOINT_MAX_LABELS = 1024
# Voxels per slab in the single counting pass: bounds the temporaries to a few tens of MB.
_SLAB_VOXELS = 1 << 22
# Margin, in voxels, around the union bounding box of a label before its surfaces are computed.
_MARGIN = 1


class ConfusionCounts(NamedTuple):
    """Voxel counts of one label: ``pred == label`` against ``ref == label`` over the whole volume."""

    tp: int
    fp: int
    fn: int
    tn: int


class SurfaceDistances(NamedTuple):
    """Distances in mm from each surface voxel of one mask to the nearest surface voxel of the other.

    ``pred_to_ref`` has one entry per surface voxel of the prediction, ``ref_to_pred`` one per surface
    voxel of the reference (in no particular order). A mask that is empty has no surface voxels, so its
    array is empty, and the distances of the other mask's surface voxels to it are all ``inf``.
    """

    pred_to_ref: np.ndarray
    ref_to_pred: np.ndarray

    def hausdorff(self) -> float:
        """Symmetric Hausdorff distance in mm: the largest distance either way (0.0 if both empty)."""
        return max((float(d.max()) for d in self if d.size), default=0.0)

    def percentile(self, q: float = 95.0) -> float:
        """The larger of the two directed ``q``-th percentiles in mm (MONAI's HD95 for ``q=95``).

        Linear interpolation (numpy's default). 0.0 if both masks are empty, ``inf`` if exactly one is.
        """
        values = []
        for d in self:
            if d.size == 0:
                continue
            if not np.isfinite(d).all():  # distances to an empty surface: all inf
                return math.inf
            values.append(float(np.percentile(d, q)))
        return max(values, default=0.0)

    def average_symmetric(self) -> float:
        """ASSD in mm: the mean of both directions' distances pooled (0.0 if both empty, inf if one is)."""
        n = self.pred_to_ref.size + self.ref_to_pred.size
        if n == 0:
            return 0.0
        return float((self.pred_to_ref.sum() + self.ref_to_pred.sum()) / n)


@dataclass(frozen=True)
class LabelMetrics:
    """Metrics of one label; see the module docstring for definitions and the empty-mask conventions.

    The surface fields (``hausdorff_mm``, ``hd95_mm``, ``assd_mm``) are ``None`` when surface metrics
    were not requested.
    """

    label: int
    dice: float
    jaccard: float
    sensitivity: float
    specificity: float
    precision: float
    f1: float
    accuracy: float
    hausdorff_mm: float | None
    hd95_mm: float | None
    assd_mm: float | None
    volume_pred_ml: float
    volume_ref_ml: float
    volume_difference_ml: float
    relative_volume_difference: float
    tp: int
    fp: int
    fn: int
    tn: int

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict of Python ints, floats and ``None``."""
        return asdict(self)


def compare_label_maps(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    labels: Iterable[int] | None = None,
    *,
    surface: bool = True,
    workers: int = 1,
) -> dict[int, LabelMetrics]:
    """Compare a predicted label map with a reference label map, label by label.

    Args:
        pred: predicted label map, integer (or bool) array, 0 = background.
        ref: reference label map, same shape.
        spacing: voxel size in mm per array axis, e.g. ``(z, y, x)`` for ``(slice, row, column)``.
        labels: labels to evaluate (positive ints; a label absent from both maps gets the "both empty"
            results). Default: every nonzero label present in either map.
        surface: also compute the surface metrics (Hausdorff, HD95, ASSD); they cost far more than the
            overlap metrics.
        workers: threads for the counting pass and the per-label surface metrics (numpy and scipy's
            distance transform release the GIL, so this scales with cores); 1 = the calling thread only.

    Returns:
        ``{label: LabelMetrics}`` in ascending label order.
    """
    pred, ref = _check_label_maps(pred, ref)
    spacing_t = _check_spacing(spacing, pred.ndim)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    tally = _tally(pred, ref, labels, workers)

    dists: dict[int, SurfaceDistances] = {}
    if surface and tally.index_of:
        boxes_pred = ndimage.find_objects(tally.pred, max_label=tally.max_index)
        boxes_ref = ndimage.find_objects(tally.ref, max_label=tally.max_index)

        boxes = {
            idx: _union_box(
                boxes_pred[idx - 1] if idx <= len(boxes_pred) else None,
                boxes_ref[idx - 1] if idx <= len(boxes_ref) else None,
                pred.shape,
            )
            for idx in tally.index_of.values()
        }

        def label_distances(idx: int) -> SurfaceDistances:
            box = boxes[idx]
            if box is None:
                return SurfaceDistances(np.zeros(0), np.zeros(0))
            return _surface_distances_in_box(tally.pred[box] == idx, tally.ref[box] == idx, spacing_t)

        if workers == 1 or len(boxes) < 2:
            dists = {idx: label_distances(idx) for idx in boxes}
        else:  # largest boxes first, for an even load
            order = sorted(boxes, key=lambda i: -_box_size(boxes[i]))
            with ThreadPoolExecutor(max_workers=min(workers, len(order))) as pool:
                dists = dict(zip(order, pool.map(label_distances, order), strict=True))

    voxel_ml = float(np.prod(spacing_t)) / 1000.0
    return {
        label: _label_metrics(label, tally.counts(idx), dists.get(idx), voxel_ml)
        for label, idx in tally.index_of.items()
    }


def overlap_counts(
    pred: np.ndarray, ref: np.ndarray, labels: Iterable[int] | None = None
) -> dict[int, ConfusionCounts]:
    """Confusion counts of every label in one pass over the volume.

    ``labels`` as in :func:`compare_label_maps` (default: nonzero labels present in either map).
    """
    pred, ref = _check_label_maps(pred, ref)
    tally = _tally(pred, ref, labels)
    return {label: tally.counts(idx) for label, idx in tally.index_of.items()}


def surface_distances(pred_mask: np.ndarray, ref_mask: np.ndarray, spacing: Sequence[float]) -> SurfaceDistances:
    """Surface-to-surface distances in mm between two binary masks (nonzero = inside).

    Works on the bounding box of the union of both masks plus a margin, so the cost depends on the
    size of the objects, not of the volume. See :class:`SurfaceDistances` for the summaries.
    """
    pred_b = np.asarray(pred_mask).astype(bool, copy=False)
    ref_b = np.asarray(ref_mask).astype(bool, copy=False)
    if pred_b.shape != ref_b.shape:
        raise ValueError(f"mask shapes differ: {pred_b.shape} vs {ref_b.shape}")
    if pred_b.ndim == 0:
        raise ValueError("masks must have at least one dimension")
    spacing_t = _check_spacing(spacing, pred_b.ndim)
    found = ndimage.find_objects((pred_b | ref_b).view(np.uint8), max_label=1)
    box = _union_box(found[0], None, pred_b.shape)
    if box is None:
        return SurfaceDistances(np.zeros(0), np.zeros(0))
    return _surface_distances_in_box(pred_b[box], ref_b[box], spacing_t)


# --------------------------------------------------------------------------------------------------
# internals


def _check_label_maps(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"label map shapes differ: pred {pred.shape} vs ref {ref.shape}")
    if pred.ndim == 0 or pred.size == 0:
        raise ValueError(f"label maps must be non-empty arrays, got shape {pred.shape}")
    checked = []
    for name, arr in (("pred", pred), ("ref", ref)):
        if arr.dtype == np.bool_:
            arr = arr.view(np.uint8)
        elif not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"{name} must be an integer label map, got dtype {arr.dtype}")
        elif np.issubdtype(arr.dtype, np.signedinteger) and arr.min() < 0:
            raise ValueError(f"{name} has negative labels")
        checked.append(arr)
    return checked[0], checked[1]


def _check_spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    values = tuple(float(s) for s in spacing)
    if len(values) != ndim:
        raise ValueError(f"spacing needs one value per axis ({ndim}), got {len(values)}")
    if not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing must be positive and finite, got {values}")
    return values


def _check_labels(labels: Iterable[int] | None) -> list[int] | None:
    if labels is None:
        return None
    out = sorted({int(v) for v in labels})
    if out and out[0] <= 0:
        raise ValueError(f"labels must be positive (0 is background), got {out[0]}")
    return out


class _Tally(NamedTuple):
    """Label maps re-indexed for counting, and the per-index voxel counts from one pass."""

    pred: np.ndarray  # values index bincount bins and find_objects entries directly
    ref: np.ndarray
    max_index: int
    index_of: dict[int, int]  # label -> index in pred/ref, ascending label order
    pred_counts: np.ndarray
    ref_counts: np.ndarray
    tp_counts: np.ndarray

    def counts(self, idx: int) -> ConfusionCounts:
        if idx > self.max_index:  # a requested label above every value in both maps
            return ConfusionCounts(0, 0, 0, int(self.pred.size))
        tp, n_pred, n_ref = int(self.tp_counts[idx]), int(self.pred_counts[idx]), int(self.ref_counts[idx])
        return ConfusionCounts(tp, n_pred - tp, n_ref - tp, int(self.pred.size) - n_pred - n_ref + tp)


def _tally(pred: np.ndarray, ref: np.ndarray, labels: Iterable[int] | None, workers: int = 1) -> _Tally:
    wanted = _check_labels(labels)
    max_label = max(int(pred.max()), int(ref.max()))
    if max_label <= _DIRECT_MAX_LABEL:
        work_pred, work_ref, max_index = pred, ref, max_label
        index_to_label = np.arange(max_label + 1)
        index_of = None if wanted is None else {lab: lab for lab in wanted}
    else:
        # Large label values: re-index the labels of interest to 1..K, every other value to 0.
        values = np.union1d(_unique_nonzero(pred), _unique_nonzero(ref)) if wanted is None else np.asarray(wanted)
        work_pred, work_ref = _reindex(pred, values), _reindex(ref, values)
        max_index = int(values.size)
        index_to_label = np.concatenate(([0], values))
        index_of = None if wanted is None else {int(v): i + 1 for i, v in enumerate(values)}
    pred_counts, ref_counts, tp_counts = _label_histograms(work_pred, work_ref, max_index, workers)
    if index_of is None:  # default: the nonzero labels present in either map
        present = np.flatnonzero(pred_counts[1:] + ref_counts[1:]) + 1
        index_of = {int(index_to_label[i]): int(i) for i in present}
    return _Tally(work_pred, work_ref, max_index, index_of, pred_counts, ref_counts, tp_counts)


def _reindex(arr: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``values[k]`` -> ``k + 1``, anything else -> 0 (``values`` sorted)."""
    out = np.empty(arr.shape, np.uint16 if values.size < 65535 else np.uint32)
    values = values.astype(np.int64)
    for sl in _slabs(arr.shape):
        chunk = arr[sl].astype(np.int64)
        pos = np.searchsorted(values, chunk)
        hit = values[np.minimum(pos, values.size - 1)] == chunk if values.size else np.zeros(chunk.shape, bool)
        out[sl] = np.where(hit, pos + 1, 0)
    return out


def _unique_nonzero(arr: np.ndarray) -> np.ndarray:
    parts = [np.unique(arr[sl]) for sl in _slabs(arr.shape)]
    values = np.unique(np.concatenate(parts)).astype(np.int64)
    return values[values != 0]


def _slabs(shape: tuple[int, ...]) -> Iterable[tuple[slice, ...]]:
    """Slabs along the first axis of about ``_SLAB_VOXELS`` voxels each."""
    per_row = max(1, math.prod(shape[1:]))
    step = max(1, _SLAB_VOXELS // per_row)
    for start in range(0, shape[0], step):
        yield (slice(start, min(start + step, shape[0])),)


def _label_histograms(
    pred: np.ndarray, ref: np.ndarray, max_index: int, workers: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel counts per index in pred, in ref, and where both agree: one pass over the volume, by slabs.

    With few labels, one bincount of ``pred * n + ref`` per slab (the joint histogram, n^2 bins);
    with many, three bincounts of n bins each.
    """
    n = max_index + 1
    joint = n <= _JOINT_MAX_LABELS

    def count(sl: tuple[slice, ...]) -> np.ndarray:
        p = pred[sl].ravel()
        r = ref[sl].ravel()
        if not np.can_cast(r.dtype, np.intp):  # uint64 (values are <= _DIRECT_MAX_LABEL here)
            p, r = p.astype(np.intp), r.astype(np.intp)
        if joint:
            pr = p.astype(np.intp)
            pr *= n
            pr += r
            return np.bincount(pr, minlength=n * n)
        return np.concatenate(
            [np.bincount(p, minlength=n), np.bincount(r, minlength=n), np.bincount(p[p == r], minlength=n)]
        )

    slabs = list(_slabs(pred.shape))
    if workers > 1 and len(slabs) > 1:
        with ThreadPoolExecutor(max_workers=min(workers, len(slabs))) as pool:
            total = sum(pool.map(count, slabs))
    else:
        total = sum(map(count, slabs))
    if joint:
        matrix = np.asarray(total, np.int64).reshape(n, n)  # [pred index, ref index]
        return matrix.sum(axis=1), matrix.sum(axis=0), np.diagonal(matrix).copy()
    pred_counts, ref_counts, tp_counts = np.asarray(total, np.int64).reshape(3, n)
    return pred_counts, ref_counts, tp_counts


def _union_box(
    a: tuple[slice, ...] | None, b: tuple[slice, ...] | None, shape: tuple[int, ...]
) -> tuple[slice, ...] | None:
    """Bounding box of the union of two find_objects boxes, grown by ``_MARGIN`` within the volume."""
    boxes = [box for box in (a, b) if box is not None]
    if not boxes:
        return None
    return tuple(
        slice(
            max(0, min(bx[d].start for bx in boxes) - _MARGIN),
            min(n, max(bx[d].stop for bx in boxes) + _MARGIN),
        )
        for d, n in enumerate(shape)
    )


def _box_size(box: tuple[slice, ...] | None) -> int:
    return 0 if box is None else math.prod(s.stop - s.start for s in box)


def _surface(mask: np.ndarray) -> np.ndarray:
    # Face connectivity; border_value=0 makes voxels on the volume border surface voxels.
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _surface_distances_in_box(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...]) -> SurfaceDistances:
    """Surface distances of two boolean masks already cropped (with margin, or at the volume border)."""
    surf_pred = _surface(pred)
    surf_ref = _surface(ref)
    has_pred = bool(surf_pred.any())
    has_ref = bool(surf_ref.any())
    if has_ref:
        pred_to_ref = ndimage.distance_transform_edt(~surf_ref, sampling=spacing)[surf_pred]
    else:
        pred_to_ref = np.full(int(np.count_nonzero(surf_pred)), np.inf)
    if has_pred:
        ref_to_pred = ndimage.distance_transform_edt(~surf_pred, sampling=spacing)[surf_ref]
    else:
        ref_to_pred = np.full(int(np.count_nonzero(surf_ref)), np.inf)
    return SurfaceDistances(np.asarray(pred_to_ref, np.float64), np.asarray(ref_to_pred, np.float64))


def _ratio(num: int, den: int) -> float:
    return num / den if den else math.nan


def _label_metrics(label: int, c: ConfusionCounts, dist: SurfaceDistances | None, voxel_ml: float) -> LabelMetrics:
    perfect_empty = c.tp + c.fp + c.fn == 0
    dice = 1.0 if perfect_empty else 2 * c.tp / (2 * c.tp + c.fp + c.fn)
    jaccard = 1.0 if perfect_empty else c.tp / (c.tp + c.fp + c.fn)
    n_pred, n_ref = c.tp + c.fp, c.tp + c.fn
    vol_pred, vol_ref = n_pred * voxel_ml, n_ref * voxel_ml
    if n_ref:
        rel_vol = (n_pred - n_ref) / n_ref
    else:
        rel_vol = math.inf if n_pred else 0.0
    return LabelMetrics(
        label=int(label),
        dice=dice,
        jaccard=jaccard,
        sensitivity=_ratio(c.tp, n_ref),
        specificity=_ratio(c.tn, c.tn + c.fp),
        precision=_ratio(c.tp, n_pred),
        f1=dice,
        accuracy=(c.tp + c.tn) / (c.tp + c.fp + c.fn + c.tn),
        hausdorff_mm=None if dist is None else dist.hausdorff(),
        hd95_mm=None if dist is None else dist.percentile(95.0),
        assd_mm=None if dist is None else dist.average_symmetric(),
        volume_pred_ml=vol_pred,
        volume_ref_ml=vol_ref,
        volume_difference_ml=vol_pred - vol_ref,
        relative_volume_difference=rel_vol,
        tp=c.tp,
        fp=c.fp,
        fn=c.fn,
        tn=c.tn,
    )
