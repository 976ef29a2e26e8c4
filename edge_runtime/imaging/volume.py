"""Volumes from single-frame slices: sorted by position, spacing measured, geometry checked.

Policy (what happens to each finding; never a silently wrong volume):

- Instances without pixel data or image plane attributes, and LOCALIZER images, are set aside.
- Several orientations or image sizes left after that: refused (``mixed-stacks``).
- Two different instances at the same position: when echo number, temporal position (or, in a multi-frame
  instance, stack and temporal position index) tell repeated acquisitions of the stack apart, the first is
  segmented and the others noted; otherwise refused (``duplicate-positions``).
- Fewer than ``min_slices`` slices: refused (``too-few-slices``).
- Gantry tilt (slices shifted within their plane from one to the next): refused (``gantry-tilt``);
  a SEG on a tilted grid validates yet fails in common viewers.
- Missing slices (steps that are whole multiples of the usual step): refused (``missing-slices``), since the
  series is most likely incomplete.
- Enhanced (multi-frame) CT and MR: one multi-frame instance per series is a volume; geometry and rescale come
  from its functional groups, and the same policy applies to its frames.
- An instance that cannot be read or whose attributes are malformed: refused (``malformed-instance``).
- Pixel data that no installed decoder can read: refused (``undecodable-pixels``); compressed pixel data is
  decoded in a child process with a memory ceiling, and a decoder crash or timeout refuses only its series
  (``decoder-failed``). A volume above ``max_voxels`` is refused before memory is taken for it (``too-large``).
- Other uneven spacing: ``resample`` (default): the model sees a regular grid interpolated along the true
  slice positions, and the result is mapped back onto every source slice; or ``refuse`` (``irregular-spacing``).

Slices are ordered by the projection of ImagePositionPatient on the slice normal (row x column direction),
never by InstanceNumber; spacing comes from those positions, never from SliceThickness. Pixel values are
rescaled to modality units (HU for CT) with each slice's own slope and intercept.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from edge_runtime.errors import VolumeError
from edge_runtime.imaging.decode import DecoderFailed, needs_isolation, shared_decoder
from edge_runtime.imaging.geometry import GeometryPolicy, SliceGeometry, plan_stack


@dataclass
class Volume:
    """A 3D array in modality units with its geometry; axes (slice, row, column)."""

    array: np.ndarray
    #: (slice, row, column) spacing in mm; the slice value is the median step
    spacing: tuple[float, float, float]
    #: position of each slice along the normal, relative to the first, in mm (ascending)
    positions: np.ndarray
    origin: np.ndarray
    row_direction: np.ndarray
    column_direction: np.ndarray
    #: the source instances, in the same order as ``array`` (one multi-frame instance: see ``frames``)
    datasets: list[Dataset]
    regular: bool
    notes: list[str] = field(default_factory=list)
    #: for a multi-frame source (``datasets`` holds just it): the 0-based frame of each slice of ``array``
    frames: list[int] | None = None

    @property
    def multiframe(self) -> bool:
        return self.frames is not None

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_direction, self.column_direction)

    @property
    def modality(self) -> str:
        return str(self.datasets[0].get("Modality", ""))

    def affine(self) -> np.ndarray:
        """4x4 matrix from (slice, row, column) indices to patient LPS millimetres (regular grids)."""
        a = np.eye(4)
        a[:3, 0] = self.normal * self.spacing[0]
        a[:3, 1] = self.column_direction * self.spacing[1]
        a[:3, 2] = self.row_direction * self.spacing[2]
        a[:3, 3] = self.origin
        return a


@dataclass
class _Slice:
    geometry: SliceGeometry
    ds: Dataset | None = None
    #: 0-based frame of a multi-frame ``ds``; None for a single-frame instance
    frame: int | None = None
    rescale: tuple[float, float] | None = None
    #: what tells repeated acquisitions of the same positions apart (echo, temporal position, stack)
    stack: tuple[str, ...] = ()
    #: pixels already decoded and rescaled (from a SliceCache)
    pixels: np.ndarray | None = None
    path: Path | None = None

    @property
    def iop(self) -> np.ndarray:
        return np.asarray(self.geometry.iop, dtype=np.float64)

    @property
    def ipp(self) -> np.ndarray:
        return np.asarray(self.geometry.ipp, dtype=np.float64)


def read_instances(paths: Sequence[Path]) -> list[tuple[Path, Dataset]]:
    """Spooled instances; pixel data stays encoded until a slice is used."""
    return [(Path(p), pydicom.dcmread(p)) for p in paths]


class SliceCache:
    """Slices decoded as they arrive, so a completed series is assembled without reading or decoding again.

    Holds, per spooled file, its header (pixel data dropped) and its pixels in modality units. Bounded in bytes;
    when full, new slices are simply not cached (the volume then reads those files). Thread-safe.
    """

    def __init__(self, max_bytes: int = 2 * 1024**3):
        self.max_bytes = max_bytes
        self._items: dict[Path, tuple[Dataset, np.ndarray]] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def add(self, path: Path) -> bool:
        """Read and decode one single-frame slice; False when it is not one or the cache is full."""
        if self._bytes >= self.max_bytes:
            return False
        try:
            ds = pydicom.dcmread(path)
            if int(ds.get("NumberOfFrames", 1) or 1) > 1 or "PixelData" not in ds:
                return False
            if int(ds.Rows) * int(ds.Columns) > 16384 * 16384:
                return False
            syntax = ds.file_meta.get("TransferSyntaxUID")
            raw = shared_decoder().pixels(path) if needs_isolation(syntax) else ds.pixel_array
            pixels = raw.astype(np.float32)
            slope = float(ds.get("RescaleSlope", 1) or 1)
            intercept = float(ds.get("RescaleIntercept", 0) or 0)
            if slope != 1:
                pixels *= slope
            if intercept:
                pixels += intercept
            del ds.PixelData
        except Exception:  # a slice that does not decode is found again, and reported, when the volume is built
            return False
        with self._lock:
            if path not in self._items:
                self._items[path] = (ds, pixels)
                self._bytes += pixels.nbytes
        return True

    def get(self, path: Path) -> tuple[Dataset, np.ndarray] | None:
        with self._lock:
            return self._items.get(path)

    def replace(self, path: Path, pixels: np.ndarray) -> None:
        """Hold ``pixels`` for ``path``: the same values, living elsewhere (a row of the series' slices laid
        side by side as they arrive, so that :func:`load_volume` needs no copy), in place of the cache's own."""
        with self._lock:
            item = self._items.get(path)
            if item is not None and item[1].shape == pixels.shape:
                self._items[path] = (item[0], pixels)

    def forget(self, paths: Sequence[Path]) -> None:
        with self._lock:
            for p in paths:
                item = self._items.pop(p, None)
                if item is not None:
                    self._bytes -= item[1].nbytes

    def __len__(self) -> int:
        return len(self._items)


def load_volume(
    paths: Sequence[Path | str], policy: GeometryPolicy | None = None, cache: SliceCache | None = None
) -> Volume:
    """Build a volume from the files of one series under ``policy`` (slices in ``cache`` are not read again)."""
    policy = policy or GeometryPolicy()
    try:
        return _load_volume([Path(p) for p in paths], policy, cache)
    except VolumeError:
        raise
    except Exception as exc:  # a spooled file is untrusted input: pydicom raises many types on malformed data
        raise VolumeError(
            "malformed-instance", f"an instance of the series cannot be read: {type(exc).__name__}"
        ) from exc


def _load_volume(paths: list[Path], policy: GeometryPolicy, cache: SliceCache | None) -> Volume:
    headers: list[tuple[Path, Dataset]] = []
    decoded: dict[int, np.ndarray] = {}
    for p in paths:
        hit = cache.get(p) if cache is not None else None
        if hit is None:
            headers.append((p, pydicom.dcmread(p)))
        else:
            headers.append((p, hit[0]))
            decoded[id(hit[0])] = hit[1]
    slices, notes = _image_slices(headers)
    for s in slices:
        if s.ds is not None and id(s.ds) in decoded:
            s.pixels = decoded[id(s.ds)]
    try:
        plan = plan_stack([s.geometry for s in slices], policy)
    except VolumeError as exc:
        stacks = _split_stacks(slices) if exc.code == "duplicate-positions" else []
        if len(stacks) < 2:
            raise
        try:
            slices, plan = stacks[0], plan_stack([s.geometry for s in stacks[0]], policy)
        except VolumeError:
            raise exc from None  # the repeats are not whole stacks: the duplicate positions are the finding
        notes.append(
            f"{len(stacks)} stacks at the same positions (echoes or temporal positions): "
            f"segmented the first ({len(slices)} slices)"
        )
    notes += plan.notes
    sorted_slices = [slices[i] for i in plan.order]
    array = _read_pixels(sorted_slices, policy.max_voxels)
    for s in sorted_slices:
        if s.ds is not None and "SpecificCharacterSet" in s.ds and not s.ds.SpecificCharacterSet:
            del s.ds.SpecificCharacterSet  # empty means the default repertoire; highdicom rejects the empty value
    multiframe = sorted_slices[0].frame is not None
    first = sorted_slices[0]
    row_spacing, col_spacing = first.geometry.pixel_spacing
    positions = plan.positions
    steps = np.diff(positions)
    return Volume(
        array=array,
        spacing=(float(np.median(steps)), row_spacing, col_spacing),
        positions=positions - positions[0],
        origin=first.ipp,
        row_direction=first.iop[:3],
        column_direction=first.iop[3:],
        datasets=[sorted_slices[0].ds] if multiframe else [s.ds for s in sorted_slices if s.ds is not None],
        regular=plan.regular,
        notes=notes,
        frames=[s.frame for s in sorted_slices] if multiframe else None,
    )


def _image_slices(headers: list[tuple[Path, Dataset]]) -> tuple[list[_Slice], list[str]]:
    slices: list[_Slice] = []
    set_aside: dict[str, int] = {}
    multiframe = [ds for _, ds in headers if int(ds.get("NumberOfFrames", 1) or 1) > 1]
    if multiframe:
        if len(headers) != 1:
            raise VolumeError(
                "mixed-stacks",
                f"{len(multiframe)} multi-frame and {len(headers) - len(multiframe)} other instance(s) in one "
                "series; a volume is built from exactly one multi-frame instance",
            )
        return _frames(multiframe[0], headers[0][0]), []
    for path, ds in headers:
        if "LOCALIZER" in [str(v).upper() for v in ds.get("ImageType", [])]:
            set_aside["localizer"] = set_aside.get("localizer", 0) + 1
            continue
        geometry = SliceGeometry.from_dataset(ds)
        if geometry is None:
            set_aside["no image plane attributes"] = set_aside.get("no image plane attributes", 0) + 1
            continue
        if len(geometry.iop) != 6 or not all(map(math.isfinite, geometry.iop + geometry.ipp)):
            raise VolumeError("bad-geometry", "ImageOrientationPatient/ImagePositionPatient are malformed")
        stack = tuple(str(ds.get(k, "")) for k in ("EchoNumbers", "TemporalPositionIdentifier", "AcquisitionNumber"))
        slices.append(_Slice(geometry, ds, stack=stack, path=path))
    notes = [f"set aside {n} instance(s): {why}" for why, n in sorted(set_aside.items())]
    if not slices:
        raise VolumeError("no-images", "no instance in the series has pixel data with image plane attributes")
    return slices, notes


def _split_stacks(slices: list[_Slice]) -> list[list[_Slice]]:
    """Repeated acquisitions of one stack, in echo / temporal order; [] when that is not what the repeats are."""
    groups: dict[tuple[str, ...], list[_Slice]] = {}
    for s in slices:
        groups.setdefault(s.stack, []).append(s)
    if len(groups) < 2:
        return []

    def order(key: tuple[str, ...]) -> tuple:
        return tuple((0, float(v)) if _is_float(v) else (1, v) for v in key)

    return [groups[k] for k in sorted(groups, key=order)]


def _is_float(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


def _frames(ds: Dataset, path: Path | None = None) -> list[_Slice]:
    """The frames of an Enhanced (multi-frame) image: geometry and rescale from its functional groups."""
    shared = ds.get("SharedFunctionalGroupsSequence", [None])[0]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    n = int(ds.NumberOfFrames)
    if per_frame is None or len(per_frame) != n:
        raise VolumeError("bad-geometry", "multi-frame instance without one functional group item per frame")

    def group(item: Dataset | None, name: str) -> Dataset | None:
        if item is not None and name in item and len(item[name].value):
            return item[name].value[0]
        return None

    def find(i: int, name: str) -> Dataset | None:
        return group(per_frame[i], name) or group(shared, name)

    slices = []
    for i in range(n):
        orientation, position, measures = (
            find(i, k) for k in ("PlaneOrientationSequence", "PlanePositionSequence", "PixelMeasuresSequence")
        )
        if orientation is None or position is None or measures is None:
            raise VolumeError("bad-geometry", f"frame {i + 1} lacks plane orientation, position or pixel measures")
        transform = find(i, "PixelValueTransformationSequence")
        slope = float(transform.get("RescaleSlope", 1) or 1) if transform is not None else 1.0
        intercept = float(transform.get("RescaleIntercept", 0) or 0) if transform is not None else 0.0
        try:
            geometry = SliceGeometry.from_plane(ds, orientation, position, measures)
        except (AttributeError, TypeError, ValueError) as exc:
            raise VolumeError("bad-geometry", f"frame {i + 1} has malformed plane attributes") from exc
        content = find(i, "FrameContentSequence")
        echo = find(i, "MREchoSequence")
        stack = (
            str(content.get("StackID", "")) if content is not None else "",
            str(content.get("TemporalPositionIndex", "")) if content is not None else "",
            str(echo.get("EffectiveEchoTime", "")) if echo is not None else "",
        )
        slices.append(_Slice(geometry, ds, frame=i, rescale=(slope, intercept), stack=stack, path=path))
    return slices


def _read_pixels(slices: list[_Slice], max_voxels: int) -> np.ndarray:
    first = slices[0].geometry
    voxels = len(slices) * first.rows * first.columns
    if voxels > max_voxels or first.rows > 16384 or first.columns > 16384:
        raise VolumeError(
            "too-large",
            f"{len(slices)} x {first.rows} x {first.columns} voxels; the limit is "
            f"{max_voxels} (and 16384 per image side)",
        )
    side_by_side = _side_by_side([s.pixels for s in slices], (first.rows, first.columns))
    if side_by_side is not None:
        return side_by_side
    array = np.empty((len(slices), first.rows, first.columns), dtype=np.float32)
    decoded: dict[int, np.ndarray] = {}  # a multi-frame instance is decoded once
    for k, s in enumerate(slices):
        if s.pixels is not None:
            if s.pixels.shape != array.shape[1:]:
                raise VolumeError(
                    "bad-pixels", f"pixel data of one slice is {s.pixels.shape}, expected {array.shape[1:]}"
                )
            array[k] = s.pixels
            continue
        ds = s.ds
        assert ds is not None
        if id(ds) not in decoded:
            decoded[id(ds)] = _decode(ds, s.path)
        pixels = decoded[id(ds)] if s.frame is None else decoded[id(ds)][s.frame]
        if pixels.shape != array.shape[1:]:
            raise VolumeError("bad-pixels", f"pixel data of one slice is {pixels.shape}, expected {array.shape[1:]}")
        if s.rescale is not None:
            slope, intercept = s.rescale
        else:
            slope = float(ds.get("RescaleSlope", 1) or 1)
            intercept = float(ds.get("RescaleIntercept", 0) or 0)
        np.multiply(pixels, slope, out=array[k], casting="unsafe")
        array[k] += intercept
    return array


def _side_by_side(pixels: list[np.ndarray | None], shape: tuple[int, int]) -> np.ndarray | None:
    """The decoded slices as one array without a copy, when they are consecutive rows of one array in this
    order (laid so as they arrived: :mod:`edge_runtime.inference.placement`); None otherwise."""
    first = pixels[0]
    base = first.base if first is not None else None
    if first is None or not isinstance(base, np.ndarray) or base.ndim != 3 or base.shape[1:] != shape:
        return None
    if base.dtype != np.float32 or not base.flags.c_contiguous:
        return None
    step = first.nbytes
    at = base.__array_interface__["data"][0]
    start, rest = divmod(first.__array_interface__["data"][0] - at, step)
    if rest or start + len(pixels) > len(base):
        return None
    for k, p in enumerate(pixels):
        if p is None or p.base is not base or p.__array_interface__["data"][0] != at + (start + k) * step:
            return None
    return base[start : start + len(pixels)]


def _decode(ds: Dataset, path: Path | None = None) -> np.ndarray:
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        if path is not None and needs_isolation(syntax):
            return shared_decoder().pixels(path)
        return ds.pixel_array
    except DecoderFailed as exc:
        raise VolumeError("decoder-failed", f"{exc} on a {syntax.name if syntax else ''} slice") from exc
    except Exception as exc:  # decoders raise RuntimeError, ValueError, NotImplementedError and their own
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = syntax.name if syntax is not None else "unknown transfer syntax"
        raise VolumeError(
            "undecodable-pixels", f"pixel data in {name} could not be decoded: {type(exc).__name__}"
        ) from exc
