"""Streaming inference: segment a series while it arrives, slab by slab, and finish it at completion.

The time between a scanner's first and last slice is otherwise idle. As slices are decoded (the service's
decode-ahead), a :class:`StreamingSession` per series keeps them in spatial order, measured from the end where
the acquisition starts (the first two slices' instance numbers tell which: :func:`tiling.acquired_downwards`).
Once the slices from that end on form a regular, gap-free run, the worker, while it has no job, does the work
the final grid will need, as soon as what it depends on is in:

- each model slice whose source slices (the interpolation's support) are in is resampled and normalised;
- each z-window of the common tiling (:mod:`tiling`) whose model slices are ready is run and blended;
- each row of model slices no window still to come can touch is reduced (argmax, confidence), its logits are
  dropped, and the source slices that take it get their labels (:mod:`postprocess`).

At completion only the model slices of the last instants, the windows the run did not reach (at least the one
aligned to the end) and the rows they touch remain.

Streaming speculates: it takes the first slice for the anchored end of the stack, the arrival to go on from
there and the spacing seen so far to hold. Nothing streamed is trusted at completion: the volume is built as
for batch inference, with all its checks, and every streamed model slice must have been interpolated from the
same instances with the same weights, and every mapped source slice must take the same model row, as the final
grid says; then the inputs, the window placement, the batches, the order of blending and the reduction are
those of batch inference, so the label map is the same, voxel for voxel. When the evidence breaks (a slice
beyond the anchored end or inside the part already segmented, a second stack, a slice not decoded ahead) or
the package's pipeline needs the whole volume (per-image z-score, nnU-Net's own pipeline, no target slice
spacing), the series is segmented whole and the reason goes to the log and to ``measurements.json``.

While the slices arrive in acquisition order they are also laid side by side in one array (:mod:`placement`),
so the volume built at completion is a view of them rather than a copy of the whole series.

Memory: the decoded slices (the decode-ahead cache's, laid side by side, not copied twice), the model slices
still to be run (at most a stride and a patch deep), the blended logits of the rows in flight, and the outputs
on the source grid.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from edge_runtime.imaging.geometry import GeometryPolicy, SliceGeometry
from edge_runtime.imaging.volume import SliceCache, Volume
from edge_runtime.inference.package import ModelPackage
from edge_runtime.inference.pipeline import (
    Finishing,
    ModelGrid,
    Segmentation,
    acquisition_order,
    blending_weights,
    interpolation_recipe,
    model_slices,
    position_along,
    unit_normal,
)
from edge_runtime.inference.placement import ArrivalStack
from edge_runtime.inference.postprocess import SourceMaps
from edge_runtime.inference.runner import Runner
from edge_runtime.inference.stream_record import Timeline, unsupported
from edge_runtime.inference.tiling import Blender, acquired_downwards, pad_value, stride, window_starts

log = logging.getLogger(__name__)

#: model slices made in one step of the worker while the series arrives (about a tenth of a second's work)
PREPARE = 8
#: source slices of room kept in the outputs beyond twice those arrived, so that the outputs do not grow (a copy
#: of them all) at completion; room not written takes no memory
RESERVE = 64


@dataclass
class _Slice:
    uid: str
    #: position along the slice normal (mm), and along the model grid (the same, or its negative when the
    #: acquisition goes down)
    dist: float
    u: float
    geometry: SliceGeometry
    pixels: np.ndarray
    #: arrival order in the series (0 = first)
    seq: int
    number: object
    #: the caller's name for the slice (the spooled file)
    key: Path | None = None


@dataclass
class _Plan:
    """What the regular run from the anchored end allows now: its slices and the model grid over them."""

    run: list[_Slice]
    grid: ModelGrid


class StreamingSession:
    """One series segmented while it arrives. ``add`` runs on the decoder thread, ``step`` and ``finish`` on the
    worker (the runner is not thread-safe); a lock guards the slices and the evidence between them."""

    def __init__(
        self, package: ModelPackage, policy: GeometryPolicy, weights: np.ndarray, *, probabilities: bool = False
    ):
        self.package, self.policy, self.weights = package, policy, weights
        #: every class's probability is kept too (for a FRACTIONAL SEG)
        self.probabilities = probabilities
        self.broken = ""
        #: in grid order (ascending ``u``)
        self.slices: list[_Slice] = []
        self.timeline = Timeline()
        self._lock = threading.Lock()
        self._key: tuple | None = None
        self._normal = np.zeros(3)
        #: whether the acquisition goes down the slice normal (decided by the first two slices)
        self._down: bool | None = None
        #: ``u`` of the anchored end, fixed when the first model slice is made
        self._anchor: float | None = None
        #: the highest ``u`` a model slice or a mapped source slice used
        self._top = -np.inf
        self._plane: tuple[np.ndarray, np.ndarray] | None = None
        #: each source row's and column's nearest model row and column
        self._plane_back: tuple[np.ndarray, np.ndarray] | None = None
        #: model slices made and still to be run, and how many were made from the first on
        self._prepared: dict[int, np.ndarray] = {}
        self._ready = 0
        #: model slice -> (source index, other source index, weight) it was interpolated from, and the instances
        #: (SOP Instance UIDs, in grid order) behind those indices and the mapped source slices
        self._used: dict[int, tuple[int, int, np.float32]] = {}
        self._uids: list[str] = []
        #: the nearest model row of each slice of the run, as the last plan saw it
        self._back = np.zeros(0, dtype=np.intp)
        self._finishing: Finishing | None = None
        self._arrived = 0
        #: why nothing (more) could be streamed, for the timeline
        self.waiting = ""
        #: the slices side by side in acquisition order, while they arrive in it (:mod:`placement`), and the
        #: slices moved there since the caller last looked (key, the row it lives in now)
        self._stack: ArrivalStack | None = None
        self._placing = True
        self.moved: list[tuple[Path, np.ndarray]] = []

    # -- arrival (decoder thread) ---------------------------------------------------------------------------

    def add(self, ds: Dataset, pixels: np.ndarray, key: Path | None = None) -> bool:
        """Place one decoded slice (``key``: the caller's name for it, as :attr:`moved` gives it back); True
        when there is work for the worker."""
        geometry = SliceGeometry.from_dataset(ds)
        if geometry is None:  # localizers and the like: set aside, as the volume loader does
            return False
        with self._lock:
            if self.broken:
                return False
            if self._key is None:
                self._start(geometry)
            elif _stack_key(geometry) != self._key:
                self._break("a second stack (another orientation or image size)")
            if pixels.shape != (geometry.rows, geometry.columns):
                self._break("pixel data does not match the image size")
            if self.broken:
                return False
            dist = position_along(geometry.ipp, self._normal)
            new = _Slice(str(ds.get("SOPInstanceUID", "")), dist, dist, geometry, pixels, self._arrived, None, key)
            new.number = ds.get("InstanceNumber")
            if self._down is None and self.slices:
                self._orient(self.slices[0], new)
            new.u = -dist if self._down else dist
            us = [s.u for s in self.slices]
            at = bisect.bisect(us, new.u)
            near = [u for u in us[max(0, at - 1) : at + 1] if abs(u - new.u) < self.policy.position_tolerance_mm]
            if near:
                self._break("two instances at one slice position")
            elif self._anchor is not None and new.u < self._top:
                where = "beyond the end it was anchored at" if new.u < self._anchor else "inside"
                self._break(f"a slice arrived {where} the part already segmented (arrival not in acquisition order)")
            else:
                self.slices.insert(at, new)
                self._arrived += 1
                if self._placing:
                    self._place(at, new)
            return not self.broken and self._plan() is not None

    def take_moved(self) -> list[tuple[Path, np.ndarray]]:
        """The slices laid side by side since the last call: (key, the row each lives in now)."""
        with self._lock:
            moved, self.moved = self.moved, []
        return moved

    def _place(self, at: int, new: _Slice) -> None:
        """Lay the new slice beside the others while the arrival keeps to acquisition order (under the lock)."""
        if self._down is None:  # the first slice: where it goes depends on the direction
            return
        if self._stack is None:
            if self.slices[0].seq != 0:
                self._placing = False
                return
            try:
                self._stack = ArrivalStack(new.pixels.shape, self.policy.max_voxels, down=self._down)
            except MemoryError:  # address space refused (a small device without overcommit): copy at the end
                self._placing = False
                return
            todo = list(self.slices)
        elif at == len(self.slices) - 1:
            todo = [new]
        else:
            self._placing = False
            return
        for s in todo:
            row = self._stack.place(s.pixels)
            if row is None:
                self._placing = False
                return
            s.pixels = row
            if s.key is not None:
                self.moved.append((s.key, row))

    def _start(self, geometry: SliceGeometry) -> None:
        self._key = _stack_key(geometry)
        iop = np.asarray(geometry.iop, dtype=np.float64)
        normal = np.cross(iop[:3], iop[3:])
        if len(iop) != 6 or not 0.99 < np.linalg.norm(normal) < 1.01:
            self._break("ImageOrientationPatient is not two orthonormal directions")
        self._normal = unit_normal(geometry.iop)

    def _orient(self, first: _Slice, second: _Slice) -> None:
        """Decide, from the first two slices, the end the grid is anchored at (as batch inference decides from
        the whole stack: :func:`pipeline.acquisition_order`)."""
        low, high = sorted((first, second), key=lambda s: s.dist)
        self._down = acquired_downwards([low.number, high.number])
        first.u = -first.dist if self._down else first.dist

    def _break(self, reason: str) -> None:
        if not self.broken:
            self.broken = reason

    # -- while arriving (worker thread) ---------------------------------------------------------------------

    def _run(self) -> int:
        """How many slices, from the anchored end, are evenly spaced: the part that can be segmented now. The
        run stops at a gap (slices still to come) or at uneven spacing (left for completion, where the volume's
        checks decide); the slice at the anchored end must also have been the first to arrive, the evidence of
        an arrival in acquisition order (a series sent the other way round, or shuffled, is segmented whole)."""
        if self._anchor is None and (not self.slices or self.slices[0].seq != 0):
            self.waiting = "arrival not in acquisition order (the first slice to arrive is not at an end)"
            return 0
        self.waiting = "the series completed before a slab could run"
        if len(self.slices) < 2:
            return len(self.slices)
        steps = np.diff([s.u for s in self.slices])
        base = float(steps.min())
        tol = max(self.policy.spacing_rtol * base, self.policy.position_tolerance_mm)
        uneven = np.abs(steps - base) > tol
        if not uneven.any():
            return len(self.slices)
        i = int(np.argmax(uneven))
        multiple = steps[i] / base
        if multiple < 1.5 or abs(multiple - round(multiple)) > 2 * self.policy.spacing_rtol:
            self.waiting = f"uneven slice spacing ({base:.3g} and {steps[i]:.3g} mm)"
        return i + 1

    def _plan(self) -> _Plan | None:
        """The run and its model grid, if long enough (call under the lock)."""
        if self.broken:
            return None
        n = self._run()
        if n < self.policy.min_slices:
            return None
        run = self.slices[:n]
        grid = ModelGrid.for_volume(_outline(run), self.package)
        if self._plane is not None and not all(map(np.array_equal, self._plane, grid.coords[1:])):
            self._break("the in-plane grid changed")
            return None
        self._back = grid.back[0]
        return _Plan(run, grid)

    def step(self, runner: Runner) -> bool:
        """Do one piece of work, if any is ready: make up to :data:`PREPARE` model slices, run one batch of the
        slab in hand (reducing and mapping the rows it finishes), or begin the next slab. One call is one runner
        call at most, so a series that completes meanwhile waits for one batch, not a slab."""
        busy = self._finishing is not None and self._finishing.blender.busy
        with self._lock:
            plan = self._plan()
            todo = 0 if plan is None else plan.grid.shape[0] - self._ready
        if plan is not None and (todo >= PREPARE or (todo > 0 and not busy)):
            self._prepare(plan, min(todo, PREPARE))
            if self._finishing is not None and not busy:  # the slab in hand is done: rows below the last
                t0 = time.perf_counter()  # window's lowest possible start are final now
                self._finish_rows(self._finishing)
                with self._lock:
                    self.timeline.streamed_s += time.perf_counter() - t0
            return True
        if busy:
            self._run_batch()
            return True
        pz, stride_z = self.package.patch_size[0], stride(self.package.patch_size[0], self.package.overlap)
        start = self.timeline.slabs_streamed * stride_z
        if plan is None or start + pz > self._ready:
            return False
        t0 = time.perf_counter()
        assert self._plane is not None and self._plane_back is not None
        finishing = self._finishing_for(runner, self._plane, self._plane_back, down=bool(self._down))
        finishing.blender.begin_slab(start, np.stack([self._prepared[j] for j in range(start, start + pz)]))
        with self._lock:
            self.timeline.slabs_streamed += 1
            self._prune()
            self.timeline.streamed_s += time.perf_counter() - t0
        self._run_batch()
        return True

    def _prepare(self, plan: _Plan, k: int) -> None:
        """Make model slices ``_ready`` .. ``_ready + k`` of the run's grid: what they take is fixed under the
        lock (no slice may arrive below it from now on), the pixel work is done outside it."""
        t0 = time.perf_counter()
        with self._lock:
            if self._anchor is None:
                self._anchor = plan.run[0].u
                self._plane = (plan.grid.coords[1], plan.grid.coords[2])
                self._plane_back = (plan.grid.back[1], plan.grid.back[2])
            js = range(self._ready, self._ready + k)
            coords = plan.grid.coords[0][js.start : js.stop]
            lo, hi, w = interpolation_recipe(coords, len(plan.run))
            self._note_used(plan.run, int(hi.max()))
        assert self._plane is not None
        image = model_slices([s.pixels for s in plan.run], coords, self._plane, self.package)
        with self._lock:
            for i, j in enumerate(js):
                self._prepared[j] = image[i]
                self._used[j] = (int(lo[i]), int(hi[i]), w[i])
            self._ready += k
            self.timeline.streamed_s += time.perf_counter() - t0

    def _note_used(self, run: list[_Slice], last: int) -> None:
        """Slices up to ``last`` of the run are in the result now: none may arrive below them any more."""
        self._top = max(self._top, run[last].u)
        if last >= len(self._uids):
            self._uids = [s.uid for s in run[: last + 1]]

    def _run_batch(self) -> None:
        finishing = self._finishing
        assert finishing is not None
        t0, before = time.perf_counter(), finishing.blender.windows
        finishing.blender.run(calls=1)
        self._finish_rows(finishing)
        with self._lock:
            self.timeline.windows_streamed += finishing.blender.windows - before
            self.timeline.streamed_s += time.perf_counter() - t0

    def _lowest_start(self) -> int:
        """Where the next window can start at the lowest: a stride above the last one begun, or (the last
        window) a patch below the grid's top, which is at least as high as the model slices made so far
        (finish() checks both)."""
        pz = self.package.patch_size[0]
        return min(self.timeline.slabs_streamed * stride(pz, self.package.overlap), self._ready - pz)

    def _prune(self) -> None:
        """Let go of the model slices no window still to come takes (under the lock)."""
        low = self._lowest_start()
        for j in [j for j in self._prepared if j < low]:
            del self._prepared[j]

    def _finish_rows(self, finishing: Finishing) -> None:
        """Reduce the rows no window still to come can touch, and map the source slices that take them."""
        with self._lock:
            back, arrived = self._back, len(self.slices)
            finishing.blender.promise(self._lowest_start())
            self._prune()
        finishing.rows(back)
        finishing.maps.reserve(2 * arrived + RESERVE)  # ahead, while there is time: growing copies them all
        with self._lock:
            if finishing.maps.mapped:
                self._note_used(self.slices, len(finishing.maps.mapped) - 1)

    # -- at completion (worker thread) ----------------------------------------------------------------------

    def finish(self, volume: Volume, runner: Runner, *, probabilities: bool = False) -> Segmentation | str:
        """The segmentation of the completed ``volume``, reusing what was streamed; a reason when it cannot."""
        with self._lock:
            if self.broken:
                return self.broken
            t0 = time.perf_counter()
            if volume.multiframe:
                return "a multi-frame instance"
            oriented, down = acquisition_order(volume)
            if self._ready and down != self._down:
                return "the instance numbers of the whole stack run the other way than those of its first slices"
            grid = ModelGrid.for_volume(oriented, self.package)
            problem = self._check(oriented, grid)
            self.slices = []  # the volume holds the pixels now: let the decoded slices go
        if problem:
            return problem
        if probabilities and self._finishing is not None and not self._finishing.maps.wants_probabilities:
            return "every class's probability was asked for only at completion"
        pz, overlap = self.package.patch_size[0], self.package.overlap
        depth = grid.shape[0]
        starts = window_starts(depth, pz, overlap)
        done = self.timeline.slabs_streamed
        if starts[:done] != [k * stride(pz, overlap) for k in range(done)]:
            return "the streamed windows are not those of the final grid"
        if self._finishing is not None and starts[done:] and starts[done] < self._finishing.blender.base:
            return "a window of the final grid starts below rows already finished"
        plane = (grid.coords[1], grid.coords[2])
        finishing = self._finishing_for(runner, plane, (grid.back[1], grid.back[2]), down=down)
        finishing.timings = timings = {}
        finishing.maps.reserve(grid.source_shape[0])
        if self._ready < depth:
            rest = model_slices(oriented.array, grid.coords[0][self._ready :], plane, self.package)
            self._prepared.update(zip(range(self._ready, depth), rest, strict=True))
        timings["preprocess"] = time.perf_counter() - t0
        for start in starts[done:]:
            finishing.timed("inference", finishing.blender.run)
            slab = np.stack([self._prepared[j] for j in range(start, min(start + pz, depth))])
            finishing.timed("inference", finishing.blender.begin_slab, start, slab)
            finishing.timed("inference", finishing.blender.run)
            finishing.rows()
        self._prepared.clear()
        self.timeline.slabs_at_completion = len(starts) - done
        if done:
            self.timeline.mode = "streaming"
        else:  # the same computation as batch inference, from the first slab on
            self.timeline.reason = self.waiting or "the series completed before a slab could run"
        return finishing.close(grid)

    def _finishing_for(
        self,
        runner: Runner,
        plane: tuple[np.ndarray, np.ndarray],
        plane_back: tuple[np.ndarray, np.ndarray],
        *,
        down: bool,
    ) -> Finishing:
        """The series' accumulator and source maps, made on first use for the in-plane model grid ``plane``
        (``plane_back``: each source row's and column's nearest model row and column)."""
        if self._finishing is None:
            fill = pad_value(self.package.normalization)
            assert fill is not None  # unsupported() turned such packages away
            size = (len(plane[0]), len(plane[1]))
            blender = Blender(self.package, runner, size, self.weights, fill)
            maps = SourceMaps(plane_back, probabilities=self.probabilities, reverse=down)
            self._finishing = Finishing(blender, maps, {})
        return self._finishing

    def _check(self, volume: Volume, grid: ModelGrid) -> str:
        """Were the streamed slabs made from exactly what the final grid takes? "" when they were."""
        if not self._used:
            return ""
        uids = [str(ds.get("SOPInstanceUID", "")) for ds in volume.datasets]
        if uids[: len(self._uids)] != self._uids:
            return "the slices segmented early are not the first of the final stack"
        if self._plane is None or not all(map(np.array_equal, self._plane, grid.coords[1:])):
            return "the in-plane grid changed"
        js = np.fromiter(self._used, dtype=np.intp)
        if js.max() >= grid.shape[0]:
            return "the final stack is shorter than the part segmented early"
        lo, hi, w = interpolation_recipe(grid.coords[0][js], len(uids))
        used = np.array([self._used[int(j)][:2] for j in js]).reshape(-1, 2)
        weights = np.array([self._used[int(j)][2] for j in js], dtype=np.float32)
        if not (np.array_equal(used[:, 0], lo) and np.array_equal(used[:, 1], hi) and np.array_equal(weights, w)):
            return "slice positions moved: the streamed slabs were interpolated differently"
        mapped = self._finishing.maps.mapped if self._finishing is not None else []
        if mapped != [int(v) for v in grid.back[0][: len(mapped)]]:
            return "slice positions moved: source slices took other model rows than the final grid gives them"
        return ""


def _stack_key(g: SliceGeometry) -> tuple:
    """What one stack shares (as the geometry policy groups slices)."""
    return (tuple(np.round(g.iop, 3)), g.rows, g.columns, tuple(round(v, 4) for v in g.pixel_spacing))


def _outline(run: list[_Slice]) -> Volume:
    """A volume without pixels (a zero-strided array), enough for :meth:`ModelGrid.for_volume`."""
    first = run[0].geometry
    dists = np.array([s.u for s in run])
    iop = np.asarray(first.iop, dtype=np.float64)
    return Volume(
        array=np.broadcast_to(np.float32(0), (len(run), first.rows, first.columns)),
        spacing=(float(np.median(np.diff(dists))), *first.pixel_spacing),
        positions=dists - dists[0],
        origin=np.asarray(first.ipp, dtype=np.float64),
        row_direction=iop[:3],
        column_direction=iop[3:],
        datasets=[],
        regular=True,
    )


class Streams:
    """The series being streamed, by spool series id; at most ``max_series`` at once (the oldest is dropped
    and will be segmented whole). ``probabilities``: keep every class's probability (a FRACTIONAL SEG is made)."""

    def __init__(
        self, package: ModelPackage, policy: GeometryPolicy, *, max_series: int = 2, probabilities: bool = False
    ):
        self.package, self.policy, self.max_series = package, policy, max_series
        self.probabilities = probabilities
        self.reason = unsupported(package)
        self._weights = blending_weights(package)
        self._sessions: OrderedDict[int, StreamingSession] = OrderedDict()
        self._lock = threading.Lock()

    def arrived(self, series_id: int, path: Path, cache: SliceCache) -> bool:
        """A slice was decoded into ``cache``; True when there is work for the worker (wake it)."""
        if self.reason:
            return False
        hit = cache.get(path)
        with self._lock:
            session = self._sessions.get(series_id)
            if hit is None:  # not decoded ahead (cache full, or not a single-frame image)
                if session is not None:
                    session._break("a slice was not decoded ahead")
                return False
            if str(hit[0].get("Modality", "")).upper() not in self.package.modalities:
                return False
            if session is None:
                session = StreamingSession(self.package, self.policy, self._weights, probabilities=self.probabilities)
                self._sessions[series_id] = session
                while len(self._sessions) > self.max_series:
                    self._sessions.popitem(last=False)
        ready = session.add(*hit, key=path)
        for moved, row in session.take_moved():  # the cache holds the row now, not a copy of its own
            cache.replace(moved, row)
        return ready

    def drop(self, series_id: int) -> None:
        """Forget a series (refused before it was segmented)."""
        with self._lock:
            self._sessions.pop(series_id, None)

    def step(self, runner: Runner) -> bool:
        """One piece of work for the oldest series that has some; False when none has."""
        with self._lock:
            sessions = list(self._sessions.values())
        return any(s.step(runner) for s in sessions)

    def segment(
        self,
        series_id: int,
        volume: Volume,
        runner: Runner,
        whole: Callable[[], Segmentation],
        *,
        probabilities: bool = False,
    ) -> tuple[Segmentation, Timeline]:
        """Finish the series' streamed segmentation, or segment it ``whole`` and say why."""
        with self._lock:
            session = self._sessions.pop(series_id, None)
        timeline = session.timeline if session is not None else Timeline()
        reason = self.reason or ("" if session is not None else "no slice was decoded ahead")
        result: Segmentation | str = reason
        if session is not None and not reason:
            result = session.finish(volume, runner, probabilities=probabilities)
        if isinstance(result, Segmentation):
            return result, timeline
        timeline.mode, timeline.reason = "whole-series", result
        return whole(), timeline
