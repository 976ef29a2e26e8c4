"""Reading a case's reference onto the grid of its series: a DICOM SEG, or a ``reference.npz`` label volume.

A ``reference.npz`` without ``names`` holds label values and nothing that says what they are. They are read
as the label values of the first configuration's model (configuration A): value *v* is named after A's label
of value *v*, in the form names are compared in (:func:`~edge_runtime.quality.matching.normalize_name`, so
``lung``), and matched by that name like any uncoded segment.

Why so: the phantom writes its label map in the bundled model's values (1 lung, 2 liver, 3 spleen, 4 kidney,
5 bone in both), so ``python -m phantom DIR --npz DIR/reference.npz`` still writes a usable reference, with the
same segment names, matching and metrics as when the names came from the phantom's own table; yet the runtime
does not import the phantom, nor keeps a copy of its table that could drift from it. The values are named once,
after A, rather than by each configuration's own values, so that one reference stays one reference: a
configuration B whose model numbers its labels differently is matched to it by name, not misread by value.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edge_runtime.apps.validate.discover import Case
from edge_runtime.quality.matching import RefSegment, normalize_name, segments_of

if TYPE_CHECKING:
    from edge_runtime.imaging.volume import Volume


@dataclass
class Reference:
    """A reference label map on the series' grid (values: segment numbers) and its segments."""

    labels: np.ndarray
    segments: dict[int, RefSegment]
    notes: list[str] = field(default_factory=list)


def load_reference(case: Case, volume: Volume, *, label_names: Mapping[int, str] | None = None) -> Reference:
    """The reference label map of ``case`` on the grid of ``volume`` (ValueError with the reason).

    ``label_names`` names the values of a ``reference.npz`` that has no ``names`` (the model's labels, see the
    module docstring); without it such a file is refused.
    """
    if case.reference_path is None:
        raise ValueError("the case has no reference")
    if case.reference_kind == "seg":
        return _load_seg_reference(case.reference_path, volume)
    if case.reference_kind == "npz":
        return _load_npz_reference(case.reference_path, volume, label_names)
    raise ValueError(f"unknown reference kind {case.reference_kind!r}")


def _load_seg_reference(path: Path, volume: Volume) -> Reference:
    import pydicom

    from edge_runtime.quality.reference import read_reference_seg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path)
        labels, names = read_reference_seg(ds, volume)
    segments = {number: s for number, s in segments_of(ds).items() if number in names}  # background dropped
    return Reference(labels=labels, segments=segments)


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """``labels``, ``spacing`` and ``names`` of a reference.npz (the last two None where absent)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = list(data.files)
            labels = np.asarray(data["labels"]) if "labels" in data else None
            spacing = np.asarray(data["spacing"], dtype=np.float64) if "spacing" in data else None
            names = np.asarray(data["names"]) if "names" in data else None
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"{path.name} cannot be read as .npz: {exc}") from exc
    if labels is None:
        raise ValueError(f"{path.name} has no 'labels' array (keys: {', '.join(keys)})")
    return labels, spacing, names


def _check_npz_labels(path: Path, labels: np.ndarray, spacing: np.ndarray | None, volume: Volume) -> np.ndarray:
    """``labels`` as an integer array, checked against the series' shape and spacing."""
    if labels.dtype == np.bool_:
        labels = labels.astype(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path.name}: 'labels' must be an integer array, got {labels.dtype}")
    if labels.shape != volume.array.shape:
        raise ValueError(f"{path.name}: 'labels' is shaped {labels.shape}; the series is {volume.array.shape}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"{path.name}: 'labels' has negative values")
    if spacing is not None:
        if spacing.shape != (3,) or not np.allclose(spacing, volume.spacing, rtol=1e-3, atol=1e-3):
            raise ValueError(
                f"{path.name}: spacing {spacing.tolist()} mm differs from the series' "
                f"{[round(s, 4) for s in volume.spacing]} mm"
            )
    return labels


def _npz_names(
    path: Path, names_arr: np.ndarray | None, label_names: Mapping[int, str] | None, notes: list[str]
) -> dict[int, str]:
    """Label value -> name: from the file's ``names``, else from ``label_names`` (the model's labels)."""
    if names_arr is None:
        if label_names is None:
            raise ValueError(f"{path.name} has no 'names' and no model labels were given to name its values")
        names = {value: normalize_name(name) for value, name in label_names.items()}
        notes.append(f"{path.name} has no 'names': label values taken as the model's {names}")
        return names
    if names_arr.ndim != 1 or names_arr.dtype.kind not in "US":
        raise ValueError(f"{path.name}: 'names' must be a 1-D string array (item v names value v)")
    return {i: str(n) for i, n in enumerate(names_arr.tolist()) if i > 0 and str(n).strip()}


def _load_npz_reference(path: Path, volume: Volume, label_names: Mapping[int, str] | None) -> Reference:
    labels, spacing, names_arr = _read_npz(path)
    labels = _check_npz_labels(path, labels, spacing, volume)
    notes: list[str] = []
    names = _npz_names(path, names_arr, label_names, notes)
    present = {int(v) for v in np.unique(labels)} - {0}
    unnamed = sorted(present - set(names))
    if unnamed:
        notes.append(f"{path.name}: values {unnamed} have no name and count as background")
        labels = np.where(np.isin(labels, unnamed), 0, labels)
    top = max(names, default=0)
    dtype = np.uint8 if top < 256 else np.uint16 if top < 65536 else np.uint32
    segments = {v: RefSegment(v, n) for v, n in sorted(names.items())}
    return Reference(labels=labels.astype(dtype, copy=False), segments=segments, notes=notes)
