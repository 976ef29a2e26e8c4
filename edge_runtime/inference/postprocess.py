"""From finished rows of blended logits to labels, confidence and probabilities on the source grid, row by row.

The sliding window finishes the model grid from its anchored end on (:meth:`tiling.Blender.take`). Each finished
block of model rows is reduced at once (argmax, the chosen label's softmax probability, every class's on
request) and the logits behind it are dropped; a source slice takes the model row nearest to it
(:class:`pipeline.ModelGrid`'s ``back``), so it is mapped as soon as that row is finished, and model rows no
source slice still needs are dropped in turn. Batch and streaming inference both go through this, block for
block, so they give the same arrays; every operation is per voxel, so the blocks do not change any value
either. Memory: the blocks in flight on the model grid, and the outputs on the source grid (series-sized: the
SEG is made from them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt


@dataclass
class Segmentation:
    """A label map on the source grid (values are the package's label values; 0 is background).

    ``confidence`` is the softmax probability of the chosen label at each source voxel (float32, 0..1);
    ``probabilities`` (only when asked for) holds every class's softmax probability as uint8 0..255,
    indexed by class (0 = background), for a FRACTIONAL SEG. Pipelines that cannot compute them leave None.
    """

    labels: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)
    windows: int = 0
    confidence: np.ndarray | None = None
    probabilities: np.ndarray | None = None


def argmax_and_max(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The argmax over the class axis (uint8/uint16, a few times faster than np.argmax's int64 for few classes)
    and the maximum logit itself (float32)."""
    dtype = np.uint8 if logits.shape[0] < 256 else np.uint16
    best = logits[0].copy()
    labels = np.zeros(best.shape, dtype=dtype)
    for k in range(1, logits.shape[0]):
        better = logits[k] > best
        labels[better] = k
        np.maximum(best, logits[k], out=best)
    return labels, best


def _exp_sum(logits: np.ndarray, best: np.ndarray) -> np.ndarray:
    """``sum_k exp(l_k - best)`` (>= 1 where ``best`` is the maximum), with one volume of scratch."""
    total = np.zeros(best.shape, dtype=np.float32)
    scratch = np.empty(best.shape, dtype=np.float32)
    for k in range(logits.shape[0]):
        np.subtract(logits[k], best, out=scratch)
        np.exp(scratch, out=scratch)
        total += scratch
    return total


def chosen_probability(logits: np.ndarray, best: np.ndarray) -> np.ndarray:
    """Softmax probability of the argmax class: ``1 / sum_k exp(l_k - l_max)``, float32 in (0, 1]."""
    total = _exp_sum(logits, best)
    np.reciprocal(total, out=total)
    return total


def probabilities_uint8(logits: np.ndarray, best: np.ndarray) -> np.ndarray:
    """Every class's softmax probability as uint8 0..255 (``(K, ...)`` like ``logits``), one class at a time:
    the float32 scratch is one class deep."""
    scale = _exp_sum(logits, best)
    np.reciprocal(scale, out=scale)
    scale *= 255.0
    out = np.empty(logits.shape, dtype=np.uint8)
    scratch = np.empty(best.shape, dtype=np.float32)
    for k in range(logits.shape[0]):
        np.subtract(logits[k], best, out=scratch)
        np.exp(scratch, out=scratch)
        scratch *= scale
        np.rint(scratch, out=scratch)
        out[k] = scratch
    return out


class Growing:
    """An array filled slice by slice along ``axis``, at its end or (``reverse``) from its end towards its start,
    so that the filled part is in spatial order either way; room grows by half again, so appends copy little."""

    def __init__(
        self, shape: tuple[int, ...], dtype: npt.DTypeLike, axis: int = 0, *, reverse: bool = False, capacity: int = 16
    ):
        self.axis, self.reverse, self.n = axis, reverse, 0
        self._buf: np.ndarray = np.empty(shape[:axis] + (capacity,) + shape[axis:], dtype=dtype)

    def reserve(self, total: int) -> None:
        """Room for ``total`` slices in all, made now (while there is time) rather than by a later append; room
        grows by half again at least, so reserving a little more each time copies little."""
        cap = self._buf.shape[self.axis]
        if total > cap:
            self._grow(max(total, cap + cap // 2))

    def slots(self, k: int) -> np.ndarray:
        """A view of the next ``k`` slices along the axis, in filling order (written by the caller)."""
        cap = self._buf.shape[self.axis]
        if self.n + k > cap:
            self._grow(max(self.n + k, cap + cap // 2))
            cap = self._buf.shape[self.axis]
        if self.reverse:
            view = np.flip(self._along(self._buf, cap - self.n - k, cap - self.n), axis=self.axis)
        else:
            view = self._along(self._buf, self.n, self.n + k)
        self.n += k
        return view

    def _grow(self, new: int) -> None:
        cap = self._buf.shape[self.axis]
        shape = list(self._buf.shape)
        shape[self.axis] = new
        buf = np.empty(shape, dtype=self._buf.dtype)
        if self.reverse:
            self._along(buf, new - self.n, new)[...] = self._along(self._buf, cap - self.n, cap)
        else:
            self._along(buf, 0, self.n)[...] = self._along(self._buf, 0, self.n)
        self._buf = buf

    @property
    def array(self) -> np.ndarray:
        """The filled part, in spatial order."""
        cap = self._buf.shape[self.axis]
        return self._along(self._buf, cap - self.n, cap) if self.reverse else self._along(self._buf, 0, self.n)

    def _along(self, a: np.ndarray, start: int, stop: int) -> np.ndarray:
        where = [slice(None)] * a.ndim
        where[self.axis] = slice(start, stop)
        return a[tuple(where)]


class SourceMaps:
    """Labels, confidence and (``probabilities``) every class's probability on the source grid, made from
    finished blocks of model rows (``add``) as soon as the source slices that take them are known (``map``).

    ``plane`` is the in-plane nearest-model-index of each source row and column; ``reverse``: the model grid
    runs down the source slices (a series acquired downwards), whose outputs are then filled from the top.
    """

    def __init__(
        self,
        plane: tuple[np.ndarray, np.ndarray],
        *,
        probabilities: bool = False,
        reverse: bool = False,
        capacity: int = 16,
    ):
        self.plane = plane
        #: the flat index, into a model row, of each source pixel's nearest model pixel (set by the first rows)
        self._flat = np.zeros(0, dtype=np.intp)
        self.rows_done = 0
        #: the nearest model row of each source slice mapped so far, in the model grid's order
        self.mapped: list[int] = []
        self._rows: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}
        self._size = (len(plane[0]), len(plane[1]))
        self._reverse, self._capacity = reverse, capacity
        self._labels: Growing | None = None
        self._confidence = Growing(self._size, np.float32, reverse=reverse, capacity=capacity)
        self._probabilities: Growing | None = None
        self.wants_probabilities = probabilities

    def reserve(self, total: int) -> None:
        """Room for ``total`` source slices, made now rather than while the last slices are mapped."""
        for out in (self._labels, self._confidence, self._probabilities):
            if out is not None:
                out.reserve(total)

    def add(self, first: int, logits: np.ndarray) -> None:
        """Reduce the blended logits ``(K, rows, Y, X)`` of model rows ``first`` .. (the next rows to finish)."""
        if first != self.rows_done:
            raise ValueError(f"model rows from {first} added; rows below {self.rows_done} are done")
        if not logits.shape[1]:
            return
        labels, best = argmax_and_max(logits)
        confidence = chosen_probability(logits, best)
        per_class = probabilities_uint8(logits, best) if self.wants_probabilities else None
        if self._labels is None:
            self._flat = (self.plane[0][:, None] * logits.shape[-1] + self.plane[1][None, :]).reshape(-1)
            room = max(self._capacity, self._confidence.n)
            self._labels = Growing(self._size, labels.dtype, reverse=self._reverse, capacity=room)
            if per_class is not None:
                self._probabilities = Growing(
                    (len(per_class), *self._size), np.uint8, 1, reverse=self._reverse, capacity=room
                )
        for r in range(logits.shape[1]):
            self._rows[first + r] = (labels[r], confidence[r], None if per_class is None else per_class[:, r])
        self.rows_done = first + logits.shape[1]

    def map(self, back: np.ndarray) -> None:
        """Map the source slices not yet mapped whose nearest model row (``back``, per source slice in the model
        grid's order, as far as known) is done; then forget the model rows no later slice can take."""
        start = len(self.mapped)
        stop = start + int(np.searchsorted(back[start:], self.rows_done))  # ``back`` never decreases
        if stop > start:
            assert self._labels is not None
            rows = [int(v) for v in back[start:stop]]
            labels = self._labels.slots(len(rows))
            confidence = self._confidence.slots(len(rows))
            probabilities = self._probabilities.slots(len(rows)) if self._probabilities is not None else None
            for k, v in enumerate(rows):
                row_labels, row_confidence, row_probabilities = self._rows[v]
                self._gather(row_labels, labels[k])
                self._gather(row_confidence, confidence[k])
                if probabilities is not None and row_probabilities is not None:
                    for c in range(len(row_probabilities)):
                        self._gather(row_probabilities[c], probabilities[c, k])
            self.mapped += rows
        # the next source slice takes the row of the first one not mapped, or (not yet known) one above the last
        keep = int(back[len(self.mapped)]) if len(self.mapped) < len(back) else (self.mapped or [0])[-1]
        for v in [v for v in self._rows if v < keep]:
            del self._rows[v]

    def _gather(self, row: np.ndarray, out: np.ndarray) -> None:
        """``out`` (one source slice, C-contiguous) = ``row`` (one model row) at each source pixel's nearest model
        pixel: one flat gather, a few times faster than indexing with ``np.ix_``."""
        if out.flags.c_contiguous:
            np.take(row.reshape(-1), self._flat, out=out.reshape(-1), mode="clip")
        else:
            out[...] = np.take(row.reshape(-1), self._flat).reshape(out.shape)

    def segmentation(self, timings: dict[str, float], windows: int) -> Segmentation:
        """The outputs, once every source slice is mapped."""
        assert self._labels is not None, "no model rows were added"
        probabilities = None
        if self._probabilities is not None:
            probabilities = np.ascontiguousarray(self._probabilities.array)
        return Segmentation(
            labels=self._labels.array,
            timings=timings,
            windows=windows,
            confidence=self._confidence.array,
            probabilities=probabilities,
        )
