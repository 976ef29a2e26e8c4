"""The ``"domain"`` section of an exported package: what the exporter knows about the data a model was trained
and validated on, and the user's own statement over it.

Sources, each used only for what it says:

- the phantom training recipe (``training.json`` of ``edge-export default-model``): fields of view, slice and
  pixel spacings of the training pool and of the held-out phantoms;
- an nnU-Net trained-model folder's ``dataset_fingerprint.json``: per-case spacing and size after cropping
  (numpy order, which is the runtime's (slice, row, column) for axial series read with SimpleITK), so the
  spacing and extent ranges of the training set; cropping to the non-zero region makes those extents a
  lower bound;
- a MONAI bundle: its metadata names the modality only, which the manifest's series filter already holds;
- for CT models, a physical sanity check of intensities (air near -1000 HU, body near soft tissue) that
  catches a lost or doubled rescale whatever the training data.

``edge-export package --domain FILE.json`` replaces, key by key, what was filled (``{"body_parts": [...]}``
changes only the body parts). The manifest's file hashes cover the model and its reports, not the manifest
itself: editing ``"domain"`` in ``manifest.json`` by hand needs no re-hash, and the runtime validates it when
it loads the package (``edge-runtime serve`` names every problem at start).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from edge_runtime.inference.domain import parse_domain

#: the CT intensity sanity check of :mod:`edge_runtime.inference.domain` (air, and the median of the body)
CT_INTENSITY = {"air_hu": [-1100.0, -850.0], "body_median_hu": [-150.0, 150.0]}
#: original acquisitions only: no reformats, projections or other derived images
EXCLUDED_IMAGE_TYPES = ["LOCALIZER", "DERIVED"]


class DomainError(ValueError):
    """The domain cannot be built or is not valid; the message lists every problem."""


def base_domain(modalities: Sequence[str]) -> dict[str, Any]:
    """What holds for any model of these modalities: the modalities, original images, CT intensity sanity."""
    domain: dict[str, Any] = {"modalities": [m.upper() for m in modalities]}
    domain["image_type"] = {"exclude": list(EXCLUDED_IMAGE_TYPES)}
    if [m.upper() for m in modalities] == ["CT"]:
        domain["intensity"] = {k: list(v) for k, v in CT_INTENSITY.items()}
    return domain


def phantom_domain(recipe: dict[str, Any], body_parts: Sequence[str]) -> dict[str, Any]:
    """The domain of a model trained by ``export.models.train_phantom_unet``: its recipe's fields of view and the
    spacings it was trained (pool, resampled and direct) and held-out tested on."""
    data = recipe["data"]
    fov_z, fov_xy = (float(v) for v in data["fov_z_mm"]), (float(v) for v in data["fov_xy_mm"])
    target = [float(v) for v in data["target_spacing"]]
    heldout = [case["spacing_mm"] for case in recipe.get("heldout", {}).get("cases", [])]
    z = _span([*data["fine_slice_mm"], target[0], *(s[0] for s in heldout)])
    xy = _span([*data["fine_pixel_mm"], target[1], target[2], *(v for s in heldout for v in s[1:])])
    lo_z, hi_z = fov_z
    lo_xy, hi_xy = fov_xy
    return {
        **base_domain(["CT"]),
        "body_parts": list(body_parts),
        "extent_mm": {"z": [lo_z, hi_z], "y": [lo_xy, hi_xy], "x": [lo_xy, hi_xy]},
        "spacing_mm": {"z": z, "y": xy, "x": xy},
        "slice_thickness_mm": z,
        "contrast": "any",
    }


def nnunet_domain(folder: Path, modalities: Sequence[str]) -> dict[str, Any]:
    """Spacing and extent ranges from an nnU-Net folder's ``dataset_fingerprint.json`` (absent: the base)."""
    domain = base_domain(modalities)
    path = folder / "dataset_fingerprint.json"
    if not path.is_file():
        return domain
    try:
        fingerprint = json.loads(path.read_text(encoding="utf-8"))
        spacings = [[float(v) for v in s] for s in fingerprint["spacings"]]
        shapes = [[int(v) for v in s] for s in fingerprint["shapes_after_crop"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DomainError(f"{path.name} cannot be read: {exc}") from exc
    if not spacings or len(spacings) != len(shapes) or {len(s) for s in spacings} | {len(s) for s in shapes} != {3}:
        raise DomainError(f"{path.name}: spacings and shapes_after_crop must be one (z, y, x) triple per case")
    axes = ("z", "y", "x")
    domain["spacing_mm"] = {a: _span(s[i] for s in spacings) for i, a in enumerate(axes)}
    pairs = zip(shapes, spacings, strict=True)
    extents = [[n * s for n, s in zip(shape, spacing, strict=True)] for shape, spacing in pairs]
    # after cropping to the body: the smallest is a lower bound of what was seen; no upper bound is claimed
    domain["extent_mm"] = {a: [round(min(e[i] for e in extents), 1), None] for i, a in enumerate(axes)}
    domain["slice_thickness_mm"] = domain["spacing_mm"]["z"]
    return domain


def apply_override(domain: dict[str, Any], path: Path | None) -> dict[str, Any]:
    """``domain`` with the keys of the JSON object in ``path`` replacing its own; validated as the runtime
    will read it."""
    if path is not None:
        try:
            override = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise DomainError(f"cannot read --domain {path}: {exc}") from exc
        if not isinstance(override, dict):
            raise DomainError(f"--domain {path} must hold a JSON object (the manifest's 'domain' section)")
        domain = {**domain, **override.get("domain", override)}
    problems: list[str] = []
    parse_domain(domain, problems)
    if problems:
        raise DomainError("the domain is not valid:\n" + "\n".join(f"  - {p}" for p in problems))
    return domain


def _span(values: Iterable[float]) -> list[float]:
    numbers = [float(v) for v in values]
    return [round(min(numbers), 3), round(max(numbers), 3)]
