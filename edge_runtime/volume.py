"""Volumes from single-frame slices: sorted by position, spacing measured, geometry checked.

Policy (what happens to each finding; never a silently wrong volume):

- Instances without pixel data or image plane attributes, and LOCALIZER images, are set aside.
- Several orientations or image sizes left after that: refused (``mixed-stacks``).
- Two different instances at the same position: refused (``duplicate-positions``).
- Fewer than ``min_slices`` slices: refused (``too-few-slices``).
- Gantry tilt (slices shifted within their plane from one to the next): refused (``gantry-tilt``);
  a SEG on a tilted grid validates yet fails in common viewers.
- Missing slices (steps that are whole multiples of the usual step): refused (``missing-slices``), since the
  series is most likely incomplete.
- Pixel data that no installed decoder can read: refused (``undecodable-pixels``).
- Other uneven spacing: ``resample`` (default): the model sees a regular grid interpolated along the true
  slice positions, and the result is mapped back onto every source slice; or ``refuse`` (``irregular-spacing``).

Slices are ordered by the projection of ImagePositionPatient on the slice normal (row x column direction),
never by InstanceNumber; spacing comes from those positions, never from SliceThickness. Pixel values are
rescaled to modality units (HU for CT) with each slice's own slope and intercept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

IRREGULAR_POLICIES = ("resample", "refuse")


class VolumeError(ValueError):
    """The slices do not make a volume under the stated policy."""

    def __init__(self, code: str, detail: str):
        self.code = code
        self.detail = detail
        super().__init__(f"{code}: {detail}")


@dataclass(frozen=True)
class GeometryPolicy:
    irregular_spacing: str = "resample"
    min_slices: int = 3
    max_tilt_deg: float = 0.5
    position_tolerance_mm: float = 0.01
    #: relative deviation of a step from the median step still counted as regular
    spacing_rtol: float = 0.02

    def __post_init__(self) -> None:
        if self.irregular_spacing not in IRREGULAR_POLICIES:
            raise ValueError(
                f"irregular_spacing is {self.irregular_spacing!r}; allowed: {', '.join(IRREGULAR_POLICIES)}"
            )


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
    #: the source instances, in the same order as ``array``
    datasets: list[Dataset]
    regular: bool
    notes: list[str] = field(default_factory=list)

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
    ds: Dataset
    path: Path | None
    iop: np.ndarray
    ipp: np.ndarray


def read_instances(paths: Sequence[Path]) -> list[tuple[Path, Dataset]]:
    """Spooled instances; pixel data stays encoded until a slice is used."""
    return [(Path(p), pydicom.dcmread(p)) for p in paths]


def load_volume(paths: Sequence[Path | str], policy: GeometryPolicy | None = None) -> Volume:
    """Build a volume from the files of one series under ``policy``."""
    policy = policy or GeometryPolicy()
    headers = read_instances([Path(p) for p in paths])
    slices, notes = _image_slices(headers)
    slices, order, positions, regular, step_notes = _plan(slices, policy)
    notes += step_notes
    array = _read_pixels([slices[i] for i in order])
    sorted_slices = [slices[i] for i in order]
    first = sorted_slices[0]
    row_spacing, col_spacing = (float(v) for v in first.ds.PixelSpacing)
    steps = np.diff(positions)
    return Volume(
        array=array,
        spacing=(float(np.median(steps)), row_spacing, col_spacing),
        positions=positions - positions[0],
        origin=first.ipp,
        row_direction=first.iop[:3],
        column_direction=first.iop[3:],
        datasets=[s.ds for s in sorted_slices],
        regular=regular,
        notes=notes,
    )


def _image_slices(headers: list[tuple[Path, Dataset]]) -> tuple[list[_Slice], list[str]]:
    slices: list[_Slice] = []
    set_aside: dict[str, int] = {}
    for path, ds in headers:
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise VolumeError(
                "multiframe", "multi-frame (Enhanced) instances are not assembled into volumes by this version"
            )
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds or "PixelSpacing" not in ds:
            set_aside["no image plane attributes"] = set_aside.get("no image plane attributes", 0) + 1
            continue
        image_type = [str(v).upper() for v in ds.get("ImageType", [])]
        if "LOCALIZER" in image_type:
            set_aside["localizer"] = set_aside.get("localizer", 0) + 1
            continue
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
        ipp = np.asarray([float(v) for v in ds.ImagePositionPatient], dtype=np.float64)
        if iop.shape != (6,) or ipp.shape != (3,) or not np.all(np.isfinite(iop)) or not np.all(np.isfinite(ipp)):
            raise VolumeError("bad-geometry", "ImageOrientationPatient/ImagePositionPatient are malformed")
        slices.append(_Slice(ds, path, iop, ipp))
    notes = [f"set aside {n} instance(s): {why}" for why, n in sorted(set_aside.items())]
    if not slices:
        raise VolumeError("no-images", "no instance in the series has pixel data with image plane attributes")
    return slices, notes


def _plan(slices: list[_Slice], policy: GeometryPolicy) -> tuple[list[_Slice], np.ndarray, np.ndarray, bool, list[str]]:
    """Check one stack; return the spatial order, positions along the normal and whether it is regular."""
    def stack_key(s: _Slice) -> tuple:
        ps = tuple(round(float(v), 4) for v in s.ds.PixelSpacing)
        return (tuple(np.round(s.iop, 3)), int(s.ds.Rows), int(s.ds.Columns), ps)

    keys = {stack_key(s) for s in slices}
    if len(keys) > 1:
        raise VolumeError(
            "mixed-stacks",
            f"{len(keys)} different orientations or image sizes in one series; refusing to guess which stack",
        )
    if len(slices) < policy.min_slices:
        raise VolumeError("too-few-slices", f"{len(slices)} slice(s); at least {policy.min_slices} needed")
    iop = slices[0].iop
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    norm = np.linalg.norm(normal)
    if not (0.99 < np.linalg.norm(row) < 1.01 and 0.99 < np.linalg.norm(col) < 1.01 and norm > 0.99):
        raise VolumeError("bad-geometry", "ImageOrientationPatient is not two orthonormal directions")
    normal = normal / norm
    ipps = np.stack([s.ipp for s in slices])
    dist = ipps @ normal
    order = np.argsort(dist, kind="stable")
    dist = dist[order]
    steps = np.diff(dist)
    if np.any(steps < policy.position_tolerance_mm):
        n = int(np.sum(steps < policy.position_tolerance_mm))
        raise VolumeError("duplicate-positions", f"{n} pair(s) of different instances share a slice position")
    # Tilt: consecutive origins move within the image plane as well as along the normal.
    deltas = np.diff(ipps[order], axis=0)
    along = deltas @ normal
    across = np.linalg.norm(deltas - np.outer(along, normal), axis=1)
    tilt = float(np.degrees(np.max(np.arctan2(across, along))))
    if tilt > policy.max_tilt_deg:
        raise VolumeError("gantry-tilt", f"slices are sheared by {tilt:.1f} degrees (gantry tilt)")
    median = float(np.median(steps))
    deviation = np.abs(steps - median) > max(policy.spacing_rtol * median, policy.position_tolerance_mm)
    notes: list[str] = []
    if not np.any(deviation):
        return slices, order, dist, True, notes
    multiples = steps[deviation] / median
    if np.all(np.abs(multiples - np.round(multiples)) < policy.spacing_rtol * 2) and np.all(multiples > 1.5):
        missing = int(np.sum(np.round(multiples) - 1))
        raise VolumeError(
            "missing-slices", f"{missing} slice(s) missing from a regular {median:.3g} mm stack; series incomplete?"
        )
    detail = f"slice steps range {steps.min():.3g}-{steps.max():.3g} mm (median {median:.3g} mm)"
    if policy.irregular_spacing == "refuse":
        raise VolumeError("irregular-spacing", detail)
    notes.append(f"irregular spacing resampled: {detail}")
    return slices, order, dist, False, notes


def _read_pixels(slices: list[_Slice]) -> np.ndarray:
    first = slices[0].ds
    array = np.empty((len(slices), int(first.Rows), int(first.Columns)), dtype=np.float32)
    for k, s in enumerate(slices):
        ds = s.ds
        try:
            pixels = ds.pixel_array
        except Exception as exc:  # decoders raise RuntimeError, ValueError, NotImplementedError and their own
            syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
            name = syntax.name if syntax is not None else "unknown transfer syntax"
            raise VolumeError("undecodable-pixels", f"pixel data in {name} could not be decoded: "
                              f"{type(exc).__name__}") from exc
        if pixels.shape != array.shape[1:]:
            raise VolumeError("bad-pixels", f"pixel data of one slice is {pixels.shape}, expected {array.shape[1:]}")
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        np.multiply(pixels, slope, out=array[k], casting="unsafe")
        array[k] += intercept
    return array
