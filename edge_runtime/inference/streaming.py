"""Streaming inference: segment a series while it arrives, slab by slab, and finish it at completion.

The time between a scanner's first and last slice is otherwise idle. As slices are decoded (the service's
decode-ahead), a :class:`StreamingSession` per series keeps them in spatial order. Once the slices from the
lowest one up form a regular, gap-free run, every z-window of the common tiling (:mod:`tiling`) whose model
slices lie within that run is resampled, normalised, run and blended, on the worker thread while it has no
job. At completion only the windows the run did not reach (at least the one aligned to the end) remain.

Streaming speculates: it takes the lowest slice seen when the first slab runs for the start of the stack, the
arrival to be ascending and the spacing seen so far to hold. Nothing streamed is trusted at completion: the
volume is built as for batch inference, with all its checks, and every streamed model slice must have been
interpolated from the same instances with the same weights as the final grid says; then the inputs, the
window placement, the batches and the order of blending are those of batch inference, so the label map is the
same, voxel for voxel. When the evidence breaks (a slice below or inside the part already segmented, a second
stack, a slice not decoded ahead) or the package's pipeline needs the whole volume (per-image
z-score, nnU-Net's own pipeline, no target slice spacing), the series is segmented whole and the reason goes to
the log and to ``measurements.json``.

Memory: the slices in the decode-ahead cache (shared, not copied), the blended-logits accumulator and one slab.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from edge_runtime.imaging.geometry import GeometryPolicy, SliceGeometry
from edge_runtime.imaging.volume import SliceCache, Volume
from edge_runtime.inference.package import ModelPackage
from edge_runtime.inference.pipeline import ModelGrid, Segmentation, blending_weights, from_logits, normalize
from edge_runtime.inference.runner import Runner
from edge_runtime.inference.tiling import Blender, pad_value, stride, window_starts

log = logging.getLogger(__name__)

#: model slices resampled at a time, so a slab never copies all its source slices at once
CHUNK = 16


def unsupported(package: ModelPackage) -> str | None:
    """Why this package's pipeline cannot be streamed; None when it can."""
    if "nnunet" in package.manifest:
        return "the package's nnU-Net pipeline takes the whole volume"
    if package.input_channels > 1:
        return "the model takes several series (channels) as one input"
    if package.normalization.kind == "zscore":
        return "per-image z-score normalisation needs the whole volume"
    if pad_value(package.normalization) is None:
        return f"{package.normalization.kind} normalisation pads with the image minimum, known only at the end"
    if package.target_spacing is None or package.target_spacing[0] is None:
        return "without a target slice spacing the model grid follows the whole stack"
    return None


@dataclass
class Timeline:
    """What streaming did for one series (``measurements.json`` ``streaming``, and the log)."""

    mode: str = "whole-series"
    #: why the series was segmented whole ("" when streamed)
    reason: str = ""
    #: z-windows (slabs) begun while the series arrived, and their network windows run then
    slabs_streamed: int = 0
    windows_streamed: int = 0
    #: seconds of resampling + inference spent while the series arrived
    streamed_s: float = 0.0
    #: z-windows left for completion
    slabs_at_completion: int = 0

    def summary(self) -> str:
        """One line for the log."""
        total = self.slabs_streamed + self.slabs_at_completion
        if self.mode == "streaming":
            return (
                f"streamed {self.slabs_streamed} of {total} slabs ({self.windows_streamed} windows, "
                f"{self.streamed_s:.2f} s) while it arrived"
            )
        return f"segmented whole at completion: {self.reason}"

    def as_dict(self) -> dict[str, Any]:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}


@dataclass
class _Slice:
    uid: str
    #: position along the slice normal (mm)
    dist: float
    geometry: SliceGeometry
    pixels: np.ndarray
    #: arrival order in the series (0 = first)
    seq: int


@dataclass
class _Slab:
    """One z-window ready to run: its start and, per model slice, the source slices and weight it takes."""

    start: int
    sources: list[np.ndarray]
    coords: np.ndarray
    plane: tuple[np.ndarray, np.ndarray]
    uids: list[str]


def model_slices(
    sources: Sequence[np.ndarray] | np.ndarray,
    z: np.ndarray,
    plane: tuple[np.ndarray, np.ndarray],
    package: ModelPackage,
) -> np.ndarray:
    """Normalised model slices at fractional source indices ``z`` (into ``sources``, in spatial order), computed
    a chunk at a time with the same operations, element for element, as resampling the whole volume."""
    out = np.empty((len(z), len(plane[0]), len(plane[1])), dtype=np.float32)
    for c0 in range(0, len(z), CHUNK):
        c = z[c0 : c0 + CHUNK]
        lo = int(np.floor(c.min()))
        hi = min(int(np.floor(c.max())) + 1, len(sources) - 1)
        stack = np.stack([sources[i] for i in range(lo, hi + 1)])
        # shifting by a whole number of slices is exact: the interpolation weights are the batch ones
        grid = ModelGrid(stack.shape, (c - lo, *plane), back=(np.arange(0),) * 3)
        out[c0 : c0 + len(c)] = normalize(grid.resample(stack), package.normalization)
    return out


def _recipe(coords: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The source slices and weight each model slice is interpolated from (as ``pipeline._linear_along``); a
    slice that falls exactly on a source slice takes only that one (the other has weight 0, whichever it is)."""
    lo = np.clip(np.floor(coords).astype(np.intp), 0, n - 1)
    w = (coords - lo).astype(np.float32)
    return lo, np.where(w == 0, lo, np.minimum(lo + 1, n - 1)), w


class StreamingSession:
    """One series segmented while it arrives. ``add`` runs on the decoder thread, ``step`` and ``finish`` on the
    worker (the runner is not thread-safe); a lock guards the slices and the evidence between them."""

    def __init__(self, package: ModelPackage, policy: GeometryPolicy, weights: np.ndarray):
        self.package, self.policy, self.weights = package, policy, weights
        self.broken = ""
        self.slices: list[_Slice] = []
        self.timeline = Timeline()
        self._lock = threading.Lock()
        self._key: tuple | None = None
        self._normal = np.zeros(3)
        #: position of the lowest slice, fixed when the first slab runs
        self._anchor: float | None = None
        #: position of the highest slice a streamed slab used
        self._top = -np.inf
        self._blender: Blender | None = None
        self._plane: tuple[np.ndarray, np.ndarray] | None = None
        #: model slice -> (source index, other source index, weight) it was interpolated from, and the instances
        #: (SOP Instance UIDs, in spatial order) behind those indices
        self._used: dict[int, tuple[int, int, np.float32]] = {}
        self._uids: list[str] = []
        self._arrived = 0
        #: why nothing (more) could be streamed, for the timeline
        self.waiting = ""

    # -- arrival (decoder thread) ---------------------------------------------------------------------------

    def add(self, ds: Dataset, pixels: np.ndarray) -> bool:
        """Place one decoded slice; True when a slab is ready to run."""
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
            dist = float((np.array([geometry.ipp]) @ self._normal)[0])
            dists = [s.dist for s in self.slices]
            at = bisect.bisect(dists, dist)
            near = [d for d in dists[max(0, at - 1) : at + 1] if abs(d - dist) < self.policy.position_tolerance_mm]
            if near:
                self._break("two instances at one slice position")
            elif self._anchor is not None and dist < self._top:
                where = "below" if dist < self._anchor else "inside"
                self._break(f"a slice arrived {where} the part already segmented (arrival not ascending)")
            else:
                uid = str(ds.get("SOPInstanceUID", ""))
                self.slices.insert(at, _Slice(uid, dist, geometry, pixels, self._arrived))
                self._arrived += 1
            return not self.broken and self._next() is not None

    def _start(self, geometry: SliceGeometry) -> None:
        self._key = _stack_key(geometry)
        iop = np.asarray(geometry.iop, dtype=np.float64)
        normal = np.cross(iop[:3], iop[3:])
        if len(iop) != 6 or not 0.99 < np.linalg.norm(normal) < 1.01:
            self._break("ImageOrientationPatient is not two orthonormal directions")
        self._normal = normal / max(float(np.linalg.norm(normal)), 1e-12)

    def _break(self, reason: str) -> None:
        if not self.broken:
            self.broken = reason

    # -- while arriving (worker thread) ---------------------------------------------------------------------

    def _run(self) -> int:
        """How many slices, from the lowest, are evenly spaced: the part that can be segmented now. The run stops
        at a gap (slices still to come) or at uneven spacing (left for completion, where the volume's checks
        decide); the lowest slice must also have been the first to arrive, the evidence of an ascending
        arrival (a series sent top down, or shuffled, is segmented whole)."""
        if self._anchor is None and (not self.slices or self.slices[0].seq != 0):
            self.waiting = "arrival not ascending (the lowest slice was not the first to arrive)"
            return 0
        self.waiting = "the series completed before a slab could run"
        if len(self.slices) < 2:
            return len(self.slices)
        steps = np.diff([s.dist for s in self.slices])
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

    def _next(self) -> _Slab | None:
        """The next stride window, if the regular run from the lowest slice covers it (call under the lock)."""
        if self.broken:
            return None
        n = self._run()
        if n < self.policy.min_slices:
            return None
        run = self.slices[:n]
        grid = ModelGrid.for_volume(_outline(run), self.package)
        pz = self.package.patch_size[0]
        start = self.timeline.slabs_streamed * stride(pz, self.package.overlap)
        if start + pz > grid.shape[0]:
            return None
        if self._plane is not None and not all(map(np.array_equal, self._plane, grid.coords[1:])):
            self._break("the in-plane grid changed")
            return None
        coords = grid.coords[0][start : start + pz]
        return _Slab(start, [s.pixels for s in run], coords, (grid.coords[1], grid.coords[2]), [s.uid for s in run])

    def step(self, runner: Runner) -> bool:
        """Run one batch of the slab in hand, or begin the next ready slab; False when nothing is ready. One call
        is one runner call at most, so a series that completes meanwhile waits for one batch, not a slab."""
        if self._blender is not None and self._blender.busy:
            self._run_batch()
            return True
        with self._lock:
            slab = self._next()
            if slab is None:
                return False
            if self._anchor is None:
                self._anchor = self.slices[0].dist
            lo, hi, w = _recipe(slab.coords, len(slab.sources))
            self._top = max(self._top, self.slices[int(hi.max())].dist)
        t0 = time.perf_counter()
        image = model_slices(slab.sources, slab.coords, slab.plane, self.package)
        if self._blender is None:
            self._plane = slab.plane
        self._blender_for(runner, slab.plane).begin_slab(slab.start, image)
        with self._lock:
            for k in range(len(slab.coords)):
                self._used[slab.start + k] = (int(lo[k]), int(hi[k]), w[k])
            self._uids = slab.uids[: max(len(self._uids), int(hi.max()) + 1)]
            self.timeline.slabs_streamed += 1
            self.timeline.streamed_s += time.perf_counter() - t0
        self._run_batch()
        return True

    def _run_batch(self) -> None:
        assert self._blender is not None
        t0, before = time.perf_counter(), self._blender.windows
        self._blender.run(calls=1)
        with self._lock:
            self.timeline.windows_streamed += self._blender.windows - before
            self.timeline.streamed_s += time.perf_counter() - t0

    # -- at completion (worker thread) ----------------------------------------------------------------------

    def finish(self, volume: Volume, runner: Runner, *, probabilities: bool = False) -> Segmentation | str:
        """The segmentation of the completed ``volume``, reusing what was streamed; a reason when it cannot."""
        with self._lock:
            if self.broken:
                return self.broken
            t0 = time.perf_counter()
            grid = ModelGrid.for_volume(volume, self.package)
            problem = self._check(volume, grid)
            self.slices = []  # the volume holds the pixels now: let the decoded slices go
        if problem:
            return problem
        pz = self.package.patch_size[0]
        starts = window_starts(grid.shape[0], pz, self.package.overlap)
        done = self.timeline.slabs_streamed
        if starts[:done] != [k * stride(pz, self.package.overlap) for k in range(done)]:
            return "the streamed windows are not those of the final grid"
        plane = (grid.coords[1], grid.coords[2])
        blender = self._blender_for(runner, plane)
        blender.reserve(grid.shape[0])
        timings = {"preprocess": time.perf_counter() - t0}
        t0 = time.perf_counter()
        blender.run()  # the rest of the slab in hand
        timings["inference"] = time.perf_counter() - t0
        for start in starts[done:]:
            t0 = time.perf_counter()
            image = model_slices(volume.array, grid.coords[0][start : start + pz], plane, self.package)
            t1 = time.perf_counter()
            blender.add_slab(start, image)
            timings["preprocess"] += t1 - t0
            timings["inference"] += time.perf_counter() - t1
        t0 = time.perf_counter()
        logits = blender.logits(grid.shape[0])
        timings["inference"] += time.perf_counter() - t0
        self.timeline.slabs_at_completion = len(starts) - done
        if done:
            self.timeline.mode = "streaming"
        else:  # the same computation as batch inference, from the first slab on
            self.timeline.reason = self.waiting or "the series completed before a slab could run"
        return from_logits(logits, grid, timings, blender.windows, probabilities=probabilities)

    def _blender_for(self, runner: Runner, plane: tuple[np.ndarray, np.ndarray]) -> Blender:
        """The series' accumulator, made on first use for the in-plane model grid ``plane``."""
        if self._blender is None:
            fill = pad_value(self.package.normalization)
            assert fill is not None  # unsupported() turned such packages away
            self._blender = Blender(self.package, runner, (len(plane[0]), len(plane[1])), self.weights, fill)
        return self._blender

    def _check(self, volume: Volume, grid: ModelGrid) -> str:
        """Were the streamed slabs made from exactly what the final grid takes? "" when they were."""
        if volume.multiframe:
            return "a multi-frame instance"
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
        lo, hi, w = _recipe(grid.coords[0][js], len(uids))
        used = np.array([self._used[int(j)][:2] for j in js]).reshape(-1, 2)
        weights = np.array([self._used[int(j)][2] for j in js], dtype=np.float32)
        if not (np.array_equal(used[:, 0], lo) and np.array_equal(used[:, 1], hi) and np.array_equal(weights, w)):
            return "slice positions moved: the streamed slabs were interpolated differently"
        return ""


def _stack_key(g: SliceGeometry) -> tuple:
    """What one stack shares (as the geometry policy groups slices)."""
    return (tuple(np.round(g.iop, 3)), g.rows, g.columns, tuple(round(v, 4) for v in g.pixel_spacing))


def _outline(run: list[_Slice]) -> Volume:
    """A volume without pixels (a zero-strided array), enough for :meth:`ModelGrid.for_volume`."""
    first = run[0].geometry
    dists = np.array([s.dist for s in run])
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
    and will be segmented whole)."""

    def __init__(self, package: ModelPackage, policy: GeometryPolicy, *, max_series: int = 2):
        self.package, self.policy, self.max_series = package, policy, max_series
        self.reason = unsupported(package)
        self._weights = blending_weights(package)
        self._sessions: OrderedDict[int, StreamingSession] = OrderedDict()
        self._lock = threading.Lock()

    def arrived(self, series_id: int, path: Path, cache: SliceCache) -> bool:
        """A slice was decoded into ``cache``; True when a slab became ready (wake the worker)."""
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
                session = self._sessions[series_id] = StreamingSession(self.package, self.policy, self._weights)
                while len(self._sessions) > self.max_series:
                    self._sessions.popitem(last=False)
        return session.add(*hit)

    def drop(self, series_id: int) -> None:
        """Forget a series (refused before it was segmented)."""
        with self._lock:
            self._sessions.pop(series_id, None)

    def step(self, runner: Runner) -> bool:
        """Run one ready slab of the oldest series that has one; False when none has."""
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
