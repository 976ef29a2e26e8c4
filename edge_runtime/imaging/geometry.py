"""Slice geometry and the policy that judges a stack of slices, before any pixel is read.

What one instance contributes (:class:`SliceGeometry`: orientation, position, size, spacing) is small enough
to keep in the spool's index, so the series tracker can judge a stack while it arrives
(:func:`stack_evidence`) and the volume loader applies the same checks (:func:`plan_stack`) when it builds the
volume. Slices are ordered by the projection of ImagePositionPatient on the slice normal, never by
InstanceNumber; spacing comes from those positions, never from SliceThickness.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import cast

import numpy as np
from pydicom.dataset import Dataset

from edge_runtime.errors import VolumeError

IRREGULAR_POLICIES = ("resample", "refuse")


@dataclass(frozen=True)
class GeometryPolicy:
    irregular_spacing: str = "resample"
    min_slices: int = 3
    max_tilt_deg: float = 0.5
    position_tolerance_mm: float = 0.01
    #: relative deviation of a step from the median step still counted as regular
    spacing_rtol: float = 0.02
    #: a bigger volume is refused before any memory is taken for it (600 M voxels = 2.4 GB as float32)
    max_voxels: int = 600_000_000

    def __post_init__(self) -> None:
        if self.irregular_spacing not in IRREGULAR_POLICIES:
            raise ValueError(
                f"irregular_spacing is {self.irregular_spacing!r}; allowed: {', '.join(IRREGULAR_POLICIES)}"
            )


@dataclass(frozen=True)
class SliceGeometry:
    """What the geometry policy needs of one instance; small enough to keep in the spool index."""

    iop: tuple[float, ...]
    ipp: tuple[float, float, float]
    rows: int
    columns: int
    pixel_spacing: tuple[float, float]
    thickness: float | None = None
    #: instances in the acquisition, when the sender says (ImagesInAcquisition)
    expected: int | None = None

    @classmethod
    def from_dataset(cls, ds: Dataset) -> SliceGeometry | None:
        """The geometry of a single-frame image slice; None for anything that cannot be one."""
        try:
            if int(ds.get("NumberOfFrames", 1) or 1) > 1:
                return None
            if any(k not in ds for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")):
                return None
            if "LOCALIZER" in [str(v).upper() for v in ds.get("ImageType", [])]:
                return None
            expected = ds.get("ImagesInAcquisition")
            return cls.from_plane(ds, ds, ds, ds, expected=int(expected) if expected not in (None, "") else None)
        except (TypeError, ValueError, AttributeError):
            return None

    @classmethod
    def from_plane(
        cls, image: Dataset, orientation: Dataset, position: Dataset, measures: Dataset, *, expected: int | None = None
    ) -> SliceGeometry:
        """From the Image Plane attributes, wherever they sit: all in one single-frame data set, or in the Plane
        Orientation, Plane Position and Pixel Measures functional groups of one frame. Raises ``TypeError``,
        ``ValueError`` or ``AttributeError`` for missing or non-numeric values."""
        thickness = measures.get("SliceThickness")
        # the counts of values are not checked here: the volume loader refuses a malformed plane as bad-geometry
        return cls(
            iop=tuple(float(v) for v in orientation.ImageOrientationPatient),
            ipp=cast("tuple[float, float, float]", tuple(float(v) for v in position.ImagePositionPatient)),
            rows=int(image.Rows),
            columns=int(image.Columns),
            pixel_spacing=cast("tuple[float, float]", tuple(float(v) for v in measures.PixelSpacing)),
            thickness=float(thickness) if thickness not in (None, "") else None,
            expected=expected,
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> SliceGeometry:
        d = json.loads(text)
        return cls(
            **{
                **d,
                "iop": tuple(d["iop"]),
                "ipp": tuple(d["ipp"]),
                "pixel_spacing": tuple(d["pixel_spacing"]),
            }
        )


@dataclass(frozen=True)
class StackPlan:
    """One stack checked by the geometry policy: the spatial order of its slices, their positions along the
    slice normal (mm, in that order) and whether the spacing is regular; ``notes`` say what was tolerated."""

    order: np.ndarray
    positions: np.ndarray
    regular: bool
    notes: list[str]


def plan_stack(slices: Sequence[SliceGeometry], policy: GeometryPolicy) -> StackPlan:
    """Check one stack against ``policy``; raises :class:`VolumeError` naming the first finding that refuses it."""

    def stack_key(g: SliceGeometry) -> tuple:
        return (tuple(np.round(g.iop, 3)), g.rows, g.columns, tuple(round(v, 4) for v in g.pixel_spacing))

    keys = {stack_key(s) for s in slices}
    if len(keys) > 1:
        raise VolumeError(
            "mixed-stacks",
            f"{len(keys)} different orientations or image sizes in one series; refusing to guess which stack",
        )
    if len(slices) < policy.min_slices:
        raise VolumeError("too-few-slices", f"{len(slices)} slice(s); at least {policy.min_slices} needed")
    iop = np.asarray(slices[0].iop, dtype=np.float64)
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    norm = np.linalg.norm(normal)
    if not (0.99 < np.linalg.norm(row) < 1.01 and 0.99 < np.linalg.norm(col) < 1.01 and norm > 0.99):
        raise VolumeError("bad-geometry", "ImageOrientationPatient is not two orthonormal directions")
    normal = normal / norm
    ipps = np.array([s.ipp for s in slices], dtype=np.float64)
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
        return StackPlan(order, dist, True, notes)
    multiples = steps[deviation] / median
    if np.all(np.abs(multiples - np.round(multiples)) < policy.spacing_rtol * 2) and np.all(multiples > 1.5):
        missing = int(np.sum(np.round(multiples) - 1))
        raise VolumeError(
            "missing-slices",
            f"{missing} slice(s) missing from a regular {median:.3g} mm stack; series incomplete?",
        )
    detail = f"slice steps range {steps.min():.3g}-{steps.max():.3g} mm (median {median:.3g} mm)"
    if policy.irregular_spacing == "refuse":
        raise VolumeError("irregular-spacing", detail)
    notes.append(f"irregular spacing resampled: {detail}")
    return StackPlan(order, dist, False, notes)


@dataclass(frozen=True)
class Evidence:
    """Whether the slices received so far make a complete stack, and why (or why not)."""

    complete: bool
    reason: str


def stack_evidence(geometries: Sequence[SliceGeometry], policy: GeometryPolicy | None = None) -> Evidence:
    """Is this a geometrically complete stack: regular spacing, no gaps, the expected count when tags carry one?

    It never claims completeness on a guess: a stack spaced wider than its slice thickness may be every other
    slice of a series still arriving, so it does not count as evidence.
    """
    policy = policy or GeometryPolicy()
    try:
        plan = plan_stack(geometries, policy)
    except VolumeError as exc:
        return Evidence(False, exc.code)
    if not plan.regular:
        return Evidence(False, "irregular-spacing")
    step = float(np.median(np.diff(plan.positions)))
    thickness = [g.thickness for g in geometries if g.thickness]
    if not thickness:
        return Evidence(False, "no slice thickness to compare the spacing with")
    if step > 1.05 * float(np.median(thickness)):
        return Evidence(False, f"spacing {step:.3g} mm exceeds slice thickness {np.median(thickness):.3g} mm")
    expected = {g.expected for g in geometries if g.expected}
    if expected and expected != {len(geometries)}:
        return Evidence(False, f"{len(geometries)} of {max(expected)} expected instances")
    return Evidence(
        True, f"{len(geometries)} slices, regular {step:.3g} mm" + (", count as expected" if expected else "")
    )
