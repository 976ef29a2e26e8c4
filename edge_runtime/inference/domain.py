"""Applicability: the domain a model was validated on, declared in its package, and the check of a series.

A model beside a scanner sees series it was never meant for: a head CT sent to a torso model, a 40 mm slab
to a model trained on whole trunks, a series whose rescale was lost on the way. It segments them anyway and
the result looks like any other. The package therefore declares its domain (the manifest's ``"domain"``
section) and the service checks each series against it before inference::

    "domain": {
      "modalities": ["CT"],
      "body_parts": ["CHEST", "ABDOMEN", "CHESTABDOMEN"],   # Body Part Examined values; [] = any
      "require_body_part": false,          # a series without Body Part Examined passes this check
      "anatomy": [{"value": "818981001", "scheme": "SCT", "meaning": "Abdomen"}],  # optional, coded
      "extent_mm": {"z": [240, 520], "y": [330, 500], "x": [330, 500]},           # [min, max]; null = open
      "spacing_mm": {"z": [1, 3], "y": [0.7, 1.5], "x": [0.7, 1.5]},
      "slice_thickness_mm": [1, 3],
      "image_type": {"exclude": ["LOCALIZER", "DERIVED"]},
      "contrast": "any",                   # "any", "with" or "without" (Contrast/Bolus Agent present)
      "intensity": {"air_hu": [-1100, -850], "body_median_hu": [-150, 150]}      # CT only
    }

Every key is optional; a manifest without ``"domain"`` declares none and every series passes. Extents are the
field of view covered (slice positions' span plus one slice spacing; rows or columns times pixel spacing),
so 20 slices 2 mm apart cover 40 mm.

The intensity check catches a mis-rescaled series (Rescale Slope/Intercept lost or doubled): on a sparse
sample of the volume, padding outside the reconstruction circle removed (a single value below -1100 HU),
the 5th percentile must be air and the median of what is denser than -300 HU (the body) must be soft tissue.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_runtime.imaging.volume import Volume

AXES = ("z", "y", "x")
CONTRAST = ("any", "with", "without")
#: what the service does with a series outside the domain (``out_of_domain`` in the configuration)
OUT_OF_DOMAIN_POLICIES = ("refuse", "mark")
#: percentile of the sampled intensities that must be air, and the HU above which a voxel counts as body
AIR_PERCENTILE = 5.0
BODY_HU = -300.0
#: the intensity sample: about this many voxels, whatever the volume's size
SAMPLE_VOXELS = 1 << 20


@dataclass(frozen=True)
class Bounds:
    """A closed interval; ``None`` leaves a side open."""

    lo: float | None = None
    hi: float | None = None

    def violation(self, what: str, value: float, unit: str) -> str | None:
        """``"z extent 40 mm < 240 mm"`` when ``value`` is outside, else None."""
        if self.lo is not None and value < self.lo:
            return f"{what} {value:g} {unit} < {self.lo:g} {unit}"
        if self.hi is not None and value > self.hi:
            return f"{what} {value:g} {unit} > {self.hi:g} {unit}"
        return None


OPEN = Bounds()


@dataclass(frozen=True)
class Domain:
    """What a package declares it was validated on (see the module docstring for the manifest shape)."""

    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()
    require_body_part: bool = False
    #: (scheme, value) of accepted Anatomic Region codes
    anatomy: tuple[tuple[str, str], ...] = ()
    extent_mm: tuple[Bounds, Bounds, Bounds] = (OPEN, OPEN, OPEN)
    spacing_mm: tuple[Bounds, Bounds, Bounds] = (OPEN, OPEN, OPEN)
    slice_thickness_mm: Bounds = OPEN
    exclude_image_types: tuple[str, ...] = ()
    contrast: str = "any"
    air_hu: Bounds | None = None
    body_median_hu: Bounds | None = None

    def check(self, volume: Volume) -> Applicability:
        """Every check that fails, each naming itself and the values found and allowed."""
        problems: list[tuple[str, str]] = []
        notes: list[str] = []
        first = volume.datasets[0]
        modality = volume.modality.upper()
        if self.modalities and modality not in self.modalities:
            problems.append(("modality", f"modality {modality or 'none'} not in {', '.join(self.modalities)}"))
        self._check_anatomy(first, problems, notes)
        for axis, (name, bounds) in enumerate(zip(AXES, self.extent_mm, strict=True)):
            if v := bounds.violation(f"{name} extent", round(_extent(volume, axis), 1), "mm"):
                problems.append((f"{name}-extent", v))
        for name, bounds, value in zip(AXES, self.spacing_mm, volume.spacing, strict=True):
            if v := bounds.violation(f"{name} spacing", round(float(value), 3), "mm"):
                problems.append((f"{name}-spacing", v))
        thickness = _slice_thickness(first)
        if thickness is not None:
            if v := self.slice_thickness_mm.violation("slice thickness", round(thickness, 3), "mm"):
                problems.append(("slice-thickness", v))
        if excluded := sorted(_image_types(volume) & set(self.exclude_image_types)):
            problems.append(("image-type", f"image type {'/'.join(excluded)} is excluded"))
        agent = str(first.get("ContrastBolusAgent", "") or "").strip()
        if self.contrast == "with" and not agent:
            problems.append(("contrast", "no contrast agent stated; the model needs contrast"))
        elif self.contrast == "without" and agent:
            problems.append(("contrast", "contrast agent stated; the model is for non-contrast series"))
        if modality == "CT" and (self.air_hu is not None or self.body_median_hu is not None):
            problems.extend(self._check_intensity(volume.array))
        return Applicability(tuple(problems), tuple(notes))

    def _check_anatomy(self, first: Any, problems: list[tuple[str, str]], notes: list[str]) -> None:
        part = str(first.get("BodyPartExamined", "") or "").strip().upper()
        if self.body_parts:
            if part and part not in self.body_parts:
                problems.append(("body-part", f"body part {part} not in {', '.join(self.body_parts)}"))
            elif not part and self.require_body_part:
                problems.append(("body-part", "no Body Part Examined; the model requires one"))
            elif not part:
                notes.append("no Body Part Examined: body part not checked")
        if self.anatomy:
            regions = {
                (str(c.get("CodingSchemeDesignator", "")), str(c.get("CodeValue", "")))
                for c in first.get("AnatomicRegionSequence", [])
            }
            if regions and not regions & set(self.anatomy):
                found = ", ".join(f"{s}:{v}" for s, v in sorted(regions))
                problems.append(("anatomy", f"anatomic region {found} not among the model's"))

    def _check_intensity(self, array: np.ndarray) -> list[tuple[str, str]]:
        sample = _sample(array)
        if sample.size == 0:
            return [("intensity", "no voxels besides padding")]
        out = []
        if self.air_hu is not None:
            air = float(np.percentile(sample, AIR_PERCENTILE))
            if v := self.air_hu.violation("air (5th percentile)", round(air), "HU"):
                out.append(("intensity-air", v))
        if self.body_median_hu is not None:
            body = sample[sample > BODY_HU]
            if body.size == 0:
                out.append(("intensity-body", f"no voxels denser than {BODY_HU:g} HU"))
            elif v := self.body_median_hu.violation("body median", round(float(np.median(body))), "HU"):
                out.append(("intensity-body", v))
        return out


@dataclass(frozen=True)
class Applicability:
    """The outcome of :meth:`Domain.check`: failed checks as ``(check, what was found)``, and notes on what
    could not be checked."""

    problems: tuple[tuple[str, str], ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def inside(self) -> bool:
        return not self.problems

    @property
    def checks_failed(self) -> list[str]:
        return [check for check, _ in self.problems]

    @property
    def summary(self) -> str:
        """One line for a refusal reason or a series description: ``z extent 40 mm < 240 mm; ...``."""
        return "; ".join(detail for _, detail in self.problems)

    @property
    def mark(self) -> str:
        """The Series Description of a result made outside the domain (64 characters at most: LO)."""
        return f"OUT OF DOMAIN: {self.summary}"[:64]

    def as_json(self) -> dict[str, Any]:
        return {
            "inside": self.inside,
            "failed": [{"check": c, "detail": d} for c, d in self.problems],
            "notes": list(self.notes),
        }


def _extent(volume: Volume, axis: int) -> float:
    """Field of view along ``axis`` in mm: the slices' span plus one spacing, or rows/columns x pixel spacing."""
    if axis == 0:
        span = float(volume.positions[-1] - volume.positions[0]) if len(volume.positions) else 0.0
        return span + float(volume.spacing[0])
    return float(volume.array.shape[axis] * volume.spacing[axis])


def _slice_thickness(ds: Any) -> float | None:
    """Slice Thickness, at the top level or in the shared Pixel Measures of an Enhanced object."""
    value = ds.get("SliceThickness")
    if value in (None, "") and "SharedFunctionalGroupsSequence" in ds:
        measures = ds.SharedFunctionalGroupsSequence[0].get("PixelMeasuresSequence", [])
        value = measures[0].get("SliceThickness") if measures else None
    try:
        return None if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return None


def _image_types(volume: Volume) -> set[str]:
    """Every Image Type value of the series' instances (a localizer hidden in an axial series counts)."""
    values: set[str] = set()
    for ds in volume.datasets:
        image_type = ds.get("ImageType") or []
        values.update(str(v).strip().upper() for v in ([image_type] if isinstance(image_type, str) else image_type))
    return values


def _sample(array: np.ndarray) -> np.ndarray:
    """About :data:`SAMPLE_VOXELS` voxels on a regular lattice, without the padding value (the minimum, when it
    is below any real tissue: scanners fill outside the reconstruction circle with one value)."""
    step = max(1, int(round((array.size / SAMPLE_VOXELS) ** (1 / 3))))
    sample = np.asarray(array[::step, ::step, ::step], dtype=np.float32).ravel()
    if sample.size == 0:
        return sample
    low = float(sample.min())
    if low < -1100:
        sample = sample[sample != low]
    return sample


# -- the manifest's "domain" section ---------------------------------------------------------------------------


def parse_domain(node: Any, problems: list[str]) -> Domain | None:
    """The manifest's ``"domain"`` (None when absent); appends every problem found to ``problems``."""
    if node is None:
        return None
    if not isinstance(node, dict):
        problems.append("'domain' must be an object")
        return None
    before = len(problems)
    unknown = sorted(set(node) - _KEYS)
    if unknown:
        problems.append(f"'domain' has unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_KEYS))}")
    contrast = node.get("contrast", "any")
    if contrast not in CONTRAST:
        problems.append(f"'domain.contrast' is {contrast!r}; allowed: {', '.join(CONTRAST)}")
    intensity = node.get("intensity", {})
    if not isinstance(intensity, dict) or set(intensity) - {"air_hu", "body_median_hu"}:
        problems.append("'domain.intensity' must be an object with air_hu and/or body_median_hu")
        intensity = {}
    require = node.get("require_body_part", False)
    if not isinstance(require, bool):
        problems.append("'domain.require_body_part' must be true or false")
    image_type = node.get("image_type", {})
    if not isinstance(image_type, dict):
        problems.append('\'domain.image_type\' must be an object such as {"exclude": ["LOCALIZER"]}')
        image_type = {}
    domain = Domain(
        modalities=_strings(node, "modalities", problems),
        body_parts=_strings(node, "body_parts", problems),
        require_body_part=require is True,
        anatomy=_codes(node.get("anatomy", []), problems),
        extent_mm=_per_axis(node, "extent_mm", problems),
        spacing_mm=_per_axis(node, "spacing_mm", problems),
        slice_thickness_mm=_bounds(node.get("slice_thickness_mm"), "domain.slice_thickness_mm", problems),
        exclude_image_types=_strings(image_type, "exclude", problems, where="domain.image_type"),
        contrast=contrast if contrast in CONTRAST else "any",
        air_hu=_bounds(intensity["air_hu"], "domain.intensity.air_hu", problems) if "air_hu" in intensity else None,
        body_median_hu=(
            _bounds(intensity["body_median_hu"], "domain.intensity.body_median_hu", problems)
            if "body_median_hu" in intensity
            else None
        ),
    )
    return domain if len(problems) == before else None


_KEYS = {
    "modalities",
    "body_parts",
    "require_body_part",
    "anatomy",
    "extent_mm",
    "spacing_mm",
    "slice_thickness_mm",
    "image_type",
    "contrast",
    "intensity",
    "notes",
}


def _strings(node: dict[str, Any], key: str, problems: list[str], *, where: str = "domain") -> tuple[str, ...]:
    values = node.get(key, [])
    if not isinstance(values, list) or not all(isinstance(v, str) and v.strip() for v in values):
        problems.append(f"'{where}.{key}' must be a list of strings, got {values!r}")
        return ()
    return tuple(v.strip().upper() for v in values)


def _codes(items: Any, problems: list[str]) -> tuple[tuple[str, str], ...]:
    if not isinstance(items, list) or not all(
        isinstance(c, dict) and isinstance(c.get("value"), str) and isinstance(c.get("scheme"), str) for c in items
    ):
        problems.append("'domain.anatomy' must be a list of codes with value and scheme (and meaning)")
        return ()
    return tuple((c["scheme"], c["value"]) for c in items)


def _per_axis(node: dict[str, Any], key: str, problems: list[str]) -> tuple[Bounds, Bounds, Bounds]:
    axes = node.get(key, {})
    if not isinstance(axes, dict) or set(axes) - set(AXES):
        problems.append(f"'domain.{key}' must be an object with keys z, y, x, got {axes!r}")
        return (OPEN, OPEN, OPEN)
    z, y, x = (_bounds(axes.get(a), f"domain.{key}.{a}", problems) for a in AXES)
    return (z, y, x)


def _bounds(value: Any, where: str, problems: list[str]) -> Bounds:
    if value is None:
        return OPEN
    if not (isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2) or not all(
        v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in value
    ):
        problems.append(f"'{where}' must be [min, max] (numbers or null), got {value!r}")
        return OPEN
    lo, hi = (None if v is None else float(v) for v in value)
    if lo is not None and hi is not None and lo > hi:
        problems.append(f"'{where}' has min {lo:g} > max {hi:g}")
    return Bounds(lo, hi)
