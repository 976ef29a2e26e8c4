"""One placement of the sliding windows and one order of blending their logits, for batch and streaming alike.

A series segmented while it arrives is cut into windows before its length is known, so where a window sits may
depend only on where the grid starts: windows at a fixed stride from the first model slice, and one more aligned
to the end once the end is known (:func:`window_starts`). Whole-volume inference uses the same placement and the
same :class:`Blender`, which adds the windows' logits slab by slab along z, in y then x order within a slab, and
sends the runner the same batches (a slab's last batch may be short: no batch spans two slabs, so a slab is
finished as soon as its own windows have run). Float sums depend on their order, so this is what
makes a streamed label map the same, voxel for voxel, as the one batch inference gives from the same input.

The grid starts where the acquisition starts (:func:`acquired_downwards`): a series whose instance numbers count
down along the slice normal (a scanner going head first from the top) is tiled from its highest slice, so that
the windows streamed while it arrives are those of the final placement.

Rows of model slices are finished as soon as no window still to come touches them (:meth:`Blender.take`): the
post-processing works on them while later windows run, and the accumulator holds only the rows in flight.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np

from edge_runtime.inference.package import ModelPackage, Normalization
from edge_runtime.inference.runner import Runner


def stride(patch: int, overlap: float) -> int:
    """Distance between the starts of neighbouring windows along one axis."""
    return max(1, int(patch * (1 - overlap)))


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Starts at a fixed stride from 0 while a window fits, then one window aligned to the end if needed.

    Every start but the last depends only on ``patch`` and ``overlap``, never on ``size``: that is what lets a
    series be tiled while it is still arriving. It takes as many windows as spreading them evenly would.
    """
    if size <= patch:
        return [0]
    starts = list(range(0, size - patch + 1, stride(patch, overlap)))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return starts


def acquired_downwards(instance_numbers: Sequence[object]) -> bool:
    """Whether the acquisition went down the slice normal: the InstanceNumber of the first slice (in spatial
    order, lowest first) above that of the last. Missing or unreadable numbers say nothing: upwards, the
    default. Batch and streaming inference decide the grid's anchor with this one rule."""
    try:
        first, last = int(str(instance_numbers[0])), int(str(instance_numbers[-1]))
    except (IndexError, TypeError, ValueError):
        return False
    return first > last


def pad_value(norm: Normalization) -> float | None:
    """What padding holds: the lowest value the intensity window can give (air), known before any pixel is seen.

    None when only the whole image can tell (its minimum, for ``zscore`` and ``none``)."""
    if norm.kind == "ct_window" and np.isfinite(norm.lower):
        return float((norm.lower - norm.mean) / norm.std)
    return None


class Blender:
    """Blended logits ``(K, Z, Y, X)`` on the model grid, slab by slab along z.

    ``add_slab`` takes the normalised model slices of one z-window (a short last slab is padded with ``fill``),
    runs its windows in y-then-x order and adds their weighted logits (``begin_slab`` and ``run`` do the same a
    batch at a time). ``take`` hands out the rows no window still to come can touch, divided by their summed
    weights, and forgets them; ``close`` hands out the rest. ``logits`` gives the whole grid at once instead
    (when nothing was taken, and ``depth`` made room for it). Memory: a ring of rows a stride and a patch deep
    (model slice ``j`` in row ``j % capacity``; a window that wraps around is added in two parts, which changes
    no sum), one slab and one batch of windows.
    """

    def __init__(
        self,
        package: ModelPackage,
        runner: Runner,
        plane: tuple[int, int],
        weights: np.ndarray,
        fill: float,
        *,
        depth: int = 0,
    ):
        self.package, self.runner, self.weights, self.fill = package, runner, weights, fill
        self.patch = package.patch_size
        self.plane = plane
        self.padded_plane = (max(plane[0], self.patch[1]), max(plane[1], self.patch[2]))
        self.windows = 0
        #: the model slice held in row 0 of the accumulator (rows below it were taken)
        self.base = 0
        capacity = max(depth, self.patch[0] + stride(self.patch[0], package.overlap))
        self._sums = np.zeros((package.num_classes, capacity, *self.padded_plane), np.float32)
        self._norm = np.zeros(self._sums.shape[1:], dtype=np.float32)
        self._batch = np.empty((package.batch_size, package.input_channels, *self.patch), dtype=np.float32)
        #: windows in the batch being filled: their (z, y, x) starts
        self._pending: list[tuple[int, int, int]] = []
        #: the slab whose windows are running, where it starts (-1: none yet), and its windows (y, x) still to run
        self._slab = np.empty((0, 0, 0), dtype=np.float32)
        self._z0 = -1
        self._queue: deque[tuple[int, int]] = deque()
        #: no slab will begin below this model slice (the caller's word: :meth:`promise`)
        self._floor = 0

    def add_slab(self, z0: int, slab: np.ndarray) -> None:
        """Run the windows of the z-window starting at model slice ``z0``; ``slab`` holds its model slices."""
        self.begin_slab(z0, slab)
        self.run()

    def begin_slab(self, z0: int, slab: np.ndarray) -> None:
        """Queue the windows of the z-window at ``z0`` (after the previous slab's have all run, and above its
        start); a slab of several input channels is ``(C, Z, Y, X)``."""
        pz, py, px = self.patch
        if self._queue:
            raise RuntimeError("the previous slab still has windows to run")
        if z0 <= self._z0 or z0 < self.base:
            raise ValueError(f"slab at {z0}: slabs go up the grid (last at {self._z0}, rows below {self.base} taken)")
        if slab.shape[-2:] != self.plane or slab.shape[-3] > pz:
            raise ValueError(f"slab of shape {slab.shape}; expected at most {pz} slices of {self.plane}")
        padded = slab
        if slab.shape[-3:] != (pz, *self.padded_plane):
            padded = np.full((*slab.shape[:-3], pz, *self.padded_plane), self.fill, dtype=np.float32)
            padded[..., : slab.shape[-3], : self.plane[0], : self.plane[1]] = slab
        if z0 + pz - self.base > self._sums.shape[1]:
            raise RuntimeError(f"slab at {z0} while rows from {self.base} are held: take the finished rows first")
        self._slab, self._z0 = padded, z0
        ys = window_starts(self.padded_plane[0], py, self.package.overlap)
        xs = window_starts(self.padded_plane[1], px, self.package.overlap)
        self._queue = deque((y, x) for y in ys for x in xs)

    @property
    def busy(self) -> bool:
        """Windows of the current slab are still to run."""
        return bool(self._queue)

    def run(self, calls: int | None = None) -> None:
        """Run the current slab's windows in order; with ``calls``, stop after that many runner calls, so a
        caller with other work waits for at most one batch."""
        made = 0
        while self._queue and (calls is None or made < calls):
            y, x = self._queue.popleft()
            self._batch[len(self._pending)] = self._slab[..., y : y + self.patch[1], x : x + self.patch[2]]
            self._pending.append((self._z0, y, x))
            self.windows += 1
            if len(self._pending) == self.package.batch_size:
                self._flush()
                made += 1
        if not self._queue:
            if calls is None or made < calls:
                self._flush()  # the slab's last batch, however short
            self._slab = np.empty((0, 0, 0), dtype=np.float32)

    def promise(self, z: int) -> None:
        """No slab will begin below model slice ``z``: once the slab in hand has been added, the rows below
        ``z`` are final (a series still arriving knows this of its last window before it knows where it is)."""
        self._floor = max(self._floor, z)

    @property
    def finished(self) -> int:
        """The model slices below this one are final: every window that touches them has been added (windows
        still to come start at the current slab, or above it and at the promised floor)."""
        if self._z0 < 0:
            return 0
        if self._queue or self._pending:
            return min([self._z0] + [z for z, _, _ in self._pending])
        return max(self._z0, min(self._floor, self._z0 + self.patch[0]))

    def take(self, upto: int | None = None, *, last: bool = False) -> tuple[int, np.ndarray]:
        """``(first, logits)``: the blended logits of model slices ``first`` .. ``upto`` (default: those
        :attr:`finished`), which the accumulator then forgets; an empty block when there are none."""
        upto = self.finished if upto is None else upto
        if upto > self.finished:
            raise ValueError(f"rows up to {upto} asked for; only those below {self.finished} are finished")
        first, n = self.base, max(0, upto - self.base)
        rows, cols = self.plane
        parts = [self._sums[:, ring, :rows, :cols] / self._norm[ring, :rows, :cols] for ring, _ in self._ring(first, n)]
        out = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
        for ring, _ in [] if last else self._ring(first, n):  # the last rows need no clean ring after them
            self._sums[:, ring] = 0
            self._norm[ring] = 0
        self.base += n
        return first, out

    def drain(self) -> None:
        """Run every window added so far, the last batch however short."""
        self.run()
        self._flush()

    def close(self, depth: int) -> tuple[int, np.ndarray]:
        """Run what is left and hand out the rest of a grid ``depth`` model slices deep."""
        self.drain()
        self._z0 = max(self._z0, depth)
        return self.take(depth, last=True)

    def logits(self, depth: int) -> np.ndarray:
        """The blended logits of a grid ``depth`` model slices deep (after every slab has been added)."""
        if self.base or max(depth, self.patch[0]) > self._sums.shape[1]:
            raise RuntimeError(f"the whole grid ({depth} rows) is not held: rows were taken, or no room was made")
        self.drain()
        full = self._sums[:, : max(depth, self.patch[0])]
        full /= self._norm[: full.shape[1]]
        return full[:, :depth, : self.plane[0], : self.plane[1]]

    def _flush(self) -> None:
        if not self._pending:
            return
        out = self.runner.infer(self._batch[: len(self._pending)])
        pz, py, px = self.patch
        for i, (z, y, x) in enumerate(self._pending):
            weighted = out[i] * self.weights
            for ring, part in self._ring(z, pz):
                self._sums[:, ring, y : y + py, x : x + px] += weighted[:, part]
                self._norm[ring, y : y + py, x : x + px] += self.weights[part]
        self._pending.clear()

    def _ring(self, first: int, n: int) -> list[tuple[slice, slice]]:
        """Where model slices ``first`` .. ``first + n`` sit in the ring: (ring rows, rows of the block), one
        part or two."""
        cap = self._sums.shape[1]
        if n > cap:
            raise RuntimeError(f"{n} rows asked for; the accumulator holds {cap}")
        p = first % cap
        if p + n <= cap:
            return [(slice(p, p + n), slice(0, n))]
        return [(slice(p, cap), slice(0, cap - p)), (slice(0, p + n - cap), slice(cap - p, n))]
