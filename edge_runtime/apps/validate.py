"""``edge-runtime validate``: offline validation of one or two model configurations against references.

Usage::

    edge-runtime validate FOLDER --out REPORT_DIR [--model PKG [--model PKG2]]
                          [--backend B [--backend B2]] [--device D [--device D2]] [--threads N [--threads N2]]

Each of ``--model``, ``--backend``, ``--device``, ``--threads`` and ``--triton-url`` is given zero times
(default: the bundled package, ``onnxruntime``, ``cpu``, one thread per core), once (shared by every
configuration) or twice (one value per configuration). Two configurations, A and B, are compared case by
case: the report gives the paired difference B - A of every metric.

Input folder
------------
Every file under ``FOLDER`` (recursively) is read as DICOM, headers only; other files are ignored.

* **Image series** are grouped by Series Instance UID. A case is one image series; its name is the folder
  holding its files, relative to ``FOLDER`` (with the series number appended when a folder holds several).
* **Reference DICOM SEGs** (Segmentation Storage or Label Map Segmentation Storage) anywhere under
  ``FOLDER`` are matched to their image series by the Referenced Series Sequence, else by the source
  images their frames reference (Derivation Image Sequence -> Source Image Sequence). When several SEGs
  reference one series, those whose segments are all ``AUTOMATIC`` (model outputs) are set aside; if more
  than one is still left, the case is skipped as ambiguous.
* **Reference label volume** (when no SEG references the series): a file named ``reference.npz`` in the
  folder of the series (that folder must hold only that image series). Keys: ``labels``, an integer array
  shaped like the volume, axes (slice, row, column) with slices in ascending position along the slice
  normal (row direction x column direction), i.e. the order of :attr:`Volume.array` and of the phantom's
  ``labels``; optional ``spacing`` (z, y, x) in mm, checked against the series; optional ``names``, a 1-D
  string array whose item *v* names label value *v* (item 0, the background, is ignored; empty items are
  unnamed). Without ``names`` the values are the phantom's :data:`phantom.LABELS` (1 lung,
  2 liver, 3 spleen, 4 kidney, 5 bone), so ``python -m phantom DIR --npz DIR/reference.npz``
  writes a usable reference. NRRD is not read.

Series without a reference, series the model does not take (modality), volumes the geometry policy refuses
and unreadable references are listed as **skipped** with the reason; a case whose inference or metrics
fail is listed as **failed**.

Label matching
--------------
Per case and configuration, each model label (``manifest.json`` ``labels``) is matched to the reference
segments whose Segmented Property Type has the same code value and coding scheme (SNOMED CT ``SCT``);
labels left over are matched by name, case-insensitively (model label name or its type's meaning against
the segment label or its type's meaning), when exactly one unmatched reference structure fits. Reference
segments with the same type code (or, without a code, the same name) are one structure, and so are model
labels matched to the same structure. Voxels of unmatched model labels count as background; unmatched
labels and segments are reported. A structure is identified across cases and configurations by its
reference type code (``SCT:39607008``); a reference segment without a code (``reference.npz``) takes the
code of the model label matched to it by name, and is ``name:<lower-case name>`` when unmatched.

Metrics and statistics
----------------------
Every metric of :func:`edge_runtime.quality.metrics.compare_label_maps` per case and structure (see that module for
the definitions and the empty-mask conventions). Per structure and metric the report gives the number of
cases, mean, median, standard deviation, min, max and the percentile bootstrap confidence interval of the
mean (default 95 %, 2000 resamples, seed 0: reproducible). **Non-finite values** (NaN: an undefined ratio;
inf: a surface distance to an empty mask) are excluded from every statistic and counted (``n_nan``,
``n_inf``). With two configurations the same statistics are given for the paired differences B - A over
the cases where both configurations matched the structure (inf - inf is NaN and so excluded).

Outputs (in ``--out``)
----------------------
* ``report.json``: settings, configurations, every case (matching, metrics, timings), skipped and failed
  cases, the aggregates and paired differences. Strict JSON: non-finite per-case values are written as the
  strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` (``float()`` reads them back).
* ``report.md``: the same in tables.
* ``boxplot_<metric>.png`` for Dice, HD95, ASSD and the volume difference: one box per structure (two side
  by side with two configurations), with the cases as points. matplotlib is optional
  (``pip install 'edge-runtime[validate]'``); without it the reports are written without plots and say so.

Exit status: 0 when at least one case was evaluated and none failed, 1 when some case failed, 2 for bad
arguments (no package, unavailable backend, no DICOM series or no case with a reference).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from edge_runtime import extras
from edge_runtime.dicom import SEGMENTATION_CLASSES
from edge_runtime.errors import ValidationError

if TYPE_CHECKING:  # heavy imports stay lazy: the CLI imports this module for every command
    from pydicom.dataset import Dataset

    from edge_runtime.imaging.volume import GeometryPolicy, Volume
    from edge_runtime.inference.package import Label, ModelPackage
    from edge_runtime.inference.runner import Runner

__all__ = [
    "METRICS",
    "PLOT_METRICS",
    "Case",
    "Discovery",
    "ModelConfig",
    "RefSegment",
    "Reference",
    "ValidationError",
    "add_parser",
    "bootstrap_ci",
    "cmd_validate",
    "discover_cases",
    "load_reference",
    "match_labels",
    "run_validation",
    "summarize",
]

#: every metric of compare_label_maps that is aggregated, in report order
METRICS = (
    "dice",
    "jaccard",
    "sensitivity",
    "specificity",
    "precision",
    "f1",
    "accuracy",
    "hausdorff_mm",
    "hd95_mm",
    "assd_mm",
    "volume_pred_ml",
    "volume_ref_ml",
    "volume_difference_ml",
    "relative_volume_difference",
)
SURFACE_METRICS = ("hausdorff_mm", "hd95_mm", "assd_mm")
#: metrics shown in the Markdown headline tables and drawn as box plots
PLOT_METRICS = ("dice", "hd95_mm", "assd_mm", "volume_difference_ml")
HEADLINE = PLOT_METRICS

METRIC_TITLES = {
    "dice": "Dice",
    "jaccard": "Jaccard",
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
    "precision": "Precision",
    "f1": "F1",
    "accuracy": "Accuracy",
    "hausdorff_mm": "Hausdorff (mm)",
    "hd95_mm": "HD95 (mm)",
    "assd_mm": "ASSD (mm)",
    "volume_pred_ml": "Predicted volume (mL)",
    "volume_ref_ml": "Reference volume (mL)",
    "volume_difference_ml": "Volume difference pred - ref (mL)",
    "relative_volume_difference": "Relative volume difference",
}
SHORT_TITLES = {
    "dice": "Dice",
    "hd95_mm": "HD95 mm",
    "assd_mm": "ASSD mm",
    "volume_difference_ml": "ΔV mL",
}

REFERENCE_NPZ = "reference.npz"
CONFIG_IDS = ("A", "B")
REPORT_FORMAT = 1
_COLORS = ("#4C72B0", "#DD8452")


# ==================================================================================================
# statistics


def bootstrap_ci(
    values: Iterable[float] | np.ndarray,
    *,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float] | None:
    """Percentile bootstrap confidence interval of the mean of the finite ``values``.

    ``resamples`` resamples of size n drawn with replacement (numpy ``default_rng(seed)``, so the result
    is reproducible), their means, and the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2``
    percentiles of those (linear interpolation). Non-finite values are dropped first. ``None`` when no
    finite value is left; ``(x, x)`` for a single value.
    """
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    x = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    n = x.size
    if n == 0:
        return None
    if n == 1:
        return float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    means = np.empty(resamples, dtype=np.float64)
    chunk = max(1, (1 << 22) // n)  # bounds the index matrix to ~32 MB
    for start in range(0, resamples, chunk):
        m = min(chunk, resamples - start)
        means[start : start + m] = x[rng.integers(0, n, size=(m, n))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.percentile(means, [100.0 * alpha, 100.0 * (1.0 - alpha)])
    return float(low), float(high)


def summarize(
    values: Iterable[float] | np.ndarray, *, resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> dict[str, Any]:
    """n (finite values), n_nan, n_inf, mean, median, std, min, max, ci_low, ci_high of ``values``.

    Statistics are over the finite values only; they are ``None`` when there is none (``std`` also for a
    single value).
    """
    x = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64).ravel()
    finite = x[np.isfinite(x)]
    out: dict[str, Any] = {
        "n": int(finite.size),
        "n_nan": int(np.isnan(x).sum()),
        "n_inf": int(np.isinf(x).sum()),
        "mean": None,
        "median": None,
        "std": None,
        "min": None,
        "max": None,
        "ci_low": None,
        "ci_high": None,
    }
    if finite.size:
        out.update(
            mean=float(finite.mean()),
            median=float(np.median(finite)),
            std=float(finite.std(ddof=1)) if finite.size > 1 else None,
            min=float(finite.min()),
            max=float(finite.max()),
        )
        ci = bootstrap_ci(finite, resamples=resamples, confidence=confidence, seed=seed)
        if ci is not None:
            out["ci_low"], out["ci_high"] = ci
    return out


# ==================================================================================================
# discovery


@dataclass
class Case:
    """One image series to validate and where its reference is."""

    name: str
    series_uid: str
    folder: Path
    paths: list[Path]
    modality: str
    reference_kind: str | None = None  # "seg" or "npz"
    reference_path: Path | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Discovery:
    cases: list[Case]
    #: image series without a usable reference: ``{"case", "series_uid", "path", "reason"}``
    skipped: list[dict[str, Any]]
    #: files and SEGs that belong to no case, as sentences
    notes: list[str]
    series_found: int


@dataclass
class _SeriesFiles:
    paths: list[Path] = field(default_factory=list)
    sop_uids: set[str] = field(default_factory=set)
    modality: str = ""
    number: str = ""


def _read_header(path: Path) -> Dataset | None:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # untrusted files: pydicom warns about odd values
            return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError):
        return None
    except Exception:  # pydicom raises many types on malformed data
        return None


def _seg_source_uids(ds: Dataset) -> set[str]:
    """SOP Instance UIDs of the source images a SEG's frames (or its references) name."""
    uids: set[str] = set()
    groups = list(ds.get("PerFrameFunctionalGroupsSequence", []) or [])
    groups += list(ds.get("SharedFunctionalGroupsSequence", []) or [])
    for group in groups:
        for deriv in group.get("DerivationImageSequence", []) or []:
            for src in deriv.get("SourceImageSequence", []) or []:
                uid = src.get("ReferencedSOPInstanceUID")
                if uid:
                    uids.add(str(uid))
    for series in ds.get("ReferencedSeriesSequence", []) or []:
        for inst in series.get("ReferencedInstanceSequence", []) or []:
            uid = inst.get("ReferencedSOPInstanceUID")
            if uid:
                uids.add(str(uid))
    return uids


def _all_automatic(ds: Dataset) -> bool:
    types = [str(item.get("SegmentAlgorithmType", "")).upper() for item in ds.get("SegmentSequence", []) or []]
    return bool(types) and all(t == "AUTOMATIC" for t in types)


def _rel(path: Path, root: Path) -> str:
    try:
        rel = path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.as_posix()
    return rel or "."


def discover_cases(folder: Path | str) -> Discovery:
    """Find the image series under ``folder`` and their references (see the module docstring)."""
    root = Path(folder)
    if not root.is_dir():
        raise ValidationError(f"{root} is not a folder")
    series: dict[str, _SeriesFiles] = {}
    segs: list[tuple[Path, Dataset]] = []
    notes: list[str] = []
    other = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        ds = _read_header(path)
        if ds is None:
            continue
        sop_class = str(ds.get("SOPClassUID", ""))
        if sop_class in SEGMENTATION_CLASSES:
            segs.append((path, ds))
            continue
        uid = ds.get("SeriesInstanceUID")
        if not uid or "Rows" not in ds:
            other += 1
            continue
        entry = series.setdefault(str(uid), _SeriesFiles())
        entry.paths.append(path)
        if ds.get("SOPInstanceUID"):
            entry.sop_uids.add(str(ds.SOPInstanceUID))
        entry.modality = entry.modality or str(ds.get("Modality", "") or "")
        entry.number = entry.number or str(ds.get("SeriesNumber", "") or "")
    if other:
        notes.append(f"{other} DICOM file(s) that are neither images nor SEGs were ignored")

    # reference SEGs -> series
    sop_to_series = {sop: uid for uid, entry in series.items() for sop in entry.sop_uids}
    seg_for: dict[str, list[tuple[Path, Dataset]]] = {}
    for path, ds in segs:
        referenced = [str(item.get("SeriesInstanceUID", "")) for item in ds.get("ReferencedSeriesSequence", []) or []]
        targets = [uid for uid in dict.fromkeys(referenced) if uid in series]
        if not targets:
            targets = sorted({sop_to_series[u] for u in _seg_source_uids(ds) if u in sop_to_series})
        if not targets:
            notes.append(f"SEG {_rel(path, root)} references no image series in the folder; ignored")
            continue
        if len(targets) > 1:
            notes.append(f"SEG {_rel(path, root)} references {len(targets)} series; used for the first")
        seg_for.setdefault(targets[0], []).append((path, ds))

    # case names: the series folder, relative to the root
    folders = {uid: Path(os.path.commonpath([str(p.parent) for p in e.paths])) for uid, e in series.items()}
    per_folder: dict[Path, list[str]] = {}
    for uid, f in folders.items():
        per_folder.setdefault(f, []).append(uid)

    cases: list[Case] = []
    skipped: list[dict[str, Any]] = []
    used: set[str] = set()
    for uid in sorted(series, key=lambda u: (_rel(folders[u], root), series[u].number, u)):
        entry = series[uid]
        name = _rel(folders[uid], root)
        if name == ".":
            name = root.resolve().name or "."
        if len(per_folder[folders[uid]]) > 1:
            name = f"{name} #{entry.number or '?'}"
        base, k = name, 2
        while name in used:
            name, k = f"{base} ({k})", k + 1
        used.add(name)
        case = Case(name, uid, folders[uid], sorted(entry.paths), entry.modality)
        found = seg_for.get(uid, [])
        if len(found) > 1:
            manual = [(p, d) for p, d in found if not _all_automatic(d)]
            if len(manual) < len(found) and manual:
                case.notes.append(
                    f"{len(found) - len(manual)} SEG(s) with only AUTOMATIC segments set aside as model outputs"
                )
                found = manual
        npz = folders[uid] / REFERENCE_NPZ
        if len(found) == 1:
            case.reference_kind, case.reference_path = "seg", found[0][0]
            if npz.is_file():
                case.notes.append(f"{REFERENCE_NPZ} ignored: a reference SEG was found")
        elif len(found) > 1:
            names = ", ".join(_rel(p, root) for p, _ in found)
            skipped.append(_skip(case, root, f"ambiguous reference: {len(found)} SEGs reference this series ({names})"))
            continue
        elif npz.is_file():
            if len(per_folder[folders[uid]]) > 1:
                skipped.append(
                    _skip(case, root, f"{REFERENCE_NPZ} is in a folder holding several image series: ambiguous")
                )
                continue
            case.reference_kind, case.reference_path = "npz", npz
        else:
            skipped.append(
                _skip(
                    case,
                    root,
                    f"no reference: no DICOM SEG references this series and its folder has no {REFERENCE_NPZ}",
                )
            )
            continue
        cases.append(case)
    return Discovery(cases=cases, skipped=skipped, notes=notes, series_found=len(series))


def _skip(case: Case, root: Path, reason: str) -> dict[str, Any]:
    return {"case": case.name, "series_uid": case.series_uid, "path": _rel(case.folder, root), "reason": reason}


# ==================================================================================================
# references and label matching


@dataclass(frozen=True)
class RefSegment:
    """A reference segment: its number (value in the reference label map), name and type code."""

    number: int
    name: str
    #: (coding scheme, code value, code meaning) of the Segmented Property Type; None without one
    code: tuple[str, str, str] | None = None

    @property
    def key(self) -> str:
        return _code_key(self.code[0], self.code[1]) if self.code else "name:" + _norm(self.name)


@dataclass
class Reference:
    labels: np.ndarray
    segments: dict[int, RefSegment]
    notes: list[str] = field(default_factory=list)


def _code_key(scheme: str, value: str) -> str:
    return f"{scheme.strip().upper()}:{value.strip()}"


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name).strip().lower()


def load_reference(case: Case, volume: Volume) -> Reference:
    """The reference label map of ``case`` on the grid of ``volume`` (ValueError with the reason)."""
    if case.reference_path is None:
        raise ValueError("the case has no reference")
    if case.reference_kind == "seg":
        return _load_seg_reference(case.reference_path, volume)
    if case.reference_kind == "npz":
        return _load_npz_reference(case.reference_path, volume)
    raise ValueError(f"unknown reference kind {case.reference_kind!r}")


def _load_seg_reference(path: Path, volume: Volume) -> Reference:
    import pydicom

    from edge_runtime.quality.reference import read_reference_seg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path)
        labels, names = read_reference_seg(ds, volume)
    segments: dict[int, RefSegment] = {}
    for item in ds.get("SegmentSequence", []) or []:
        number = int(item.SegmentNumber)
        if number not in names:
            continue
        types = item.get("SegmentedPropertyTypeCodeSequence") or []
        code = None
        if types and types[0].get("CodeValue") and types[0].get("CodingSchemeDesignator"):
            t = types[0]
            code = (str(t.CodingSchemeDesignator), str(t.CodeValue), str(t.get("CodeMeaning", "")))
        segments[number] = RefSegment(number, names[number], code)
    return Reference(labels=labels, segments=segments)


def _load_npz_reference(path: Path, volume: Volume) -> Reference:
    from phantom import LABELS

    try:
        with np.load(path, allow_pickle=False) as data:
            if "labels" not in data:
                raise ValueError(f"{path.name} has no 'labels' array (keys: {', '.join(data.files)})")
            labels = np.asarray(data["labels"])
            spacing = np.asarray(data["spacing"], dtype=np.float64) if "spacing" in data else None
            names_arr = np.asarray(data["names"]) if "names" in data else None
    except (OSError, ValueError, EOFError) as exc:
        if isinstance(exc, ValueError) and "has no 'labels'" in str(exc):
            raise
        raise ValueError(f"{path.name} cannot be read as .npz: {exc}") from exc
    notes: list[str] = []
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
    if names_arr is None:
        names = dict(LABELS)
        notes.append(f"{path.name} has no 'names': label values taken as the phantom's {LABELS}")
    else:
        if names_arr.ndim != 1 or names_arr.dtype.kind not in "US":
            raise ValueError(f"{path.name}: 'names' must be a 1-D string array (item v names value v)")
        names = {i: str(n) for i, n in enumerate(names_arr.tolist()) if i > 0 and str(n).strip()}
    present = {int(v) for v in np.unique(labels)} - {0}
    unnamed = sorted(present - set(names))
    if unnamed:
        notes.append(f"{path.name}: values {unnamed} have no name and count as background")
        labels = np.where(np.isin(labels, unnamed), 0, labels)
    top = max(names, default=0)
    dtype = np.uint8 if top < 256 else np.uint16 if top < 65536 else np.uint32
    segments = {v: RefSegment(v, n) for v, n in sorted(names.items())}
    return Reference(labels=labels.astype(dtype, copy=False), segments=segments, notes=notes)


@dataclass
class Structure:
    """A reference structure matched by one or more model labels."""

    key: str
    model_values: list[int]
    model_names: list[str]
    segment_numbers: list[int]
    segment_names: list[str]
    matched_by: str  # "code" or "name"


@dataclass
class Matching:
    structures: list[Structure]
    unmatched_model_labels: list[str]
    unmatched_reference_segments: list[str]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "structures": [
                {
                    "key": s.key,
                    "model_labels": s.model_names,
                    "model_values": s.model_values,
                    "reference_segments": s.segment_names,
                    "segment_numbers": s.segment_numbers,
                    "matched_by": s.matched_by,
                }
                for s in self.structures
            ],
            "unmatched_model_labels": self.unmatched_model_labels,
            "unmatched_reference_segments": self.unmatched_reference_segments,
            "notes": self.notes,
        }


def match_labels(model_labels: Sequence[Label], segments: Mapping[int, RefSegment]) -> Matching:
    """Match model labels to reference segments: by type code (value + scheme), then by name."""
    groups: dict[str, list[RefSegment]] = {}
    for number in sorted(segments):
        groups.setdefault(segments[number].key, []).append(segments[number])
    assigned: dict[str, list[Label]] = {}
    by: dict[str, str] = {}
    leftover: list[Label] = []
    for label in sorted(model_labels, key=lambda lab: lab.value):
        key = _code_key(label.type.scheme, label.type.value)
        if key in groups:
            assigned.setdefault(key, []).append(label)
            by[key] = "code"
        else:
            leftover.append(label)
    code_matched = set(assigned)
    notes: list[str] = []
    unmatched_model: list[str] = []
    for label in leftover:
        wanted = {_norm(label.name), _norm(label.type.meaning)} - {""}
        candidates = [
            key
            for key, segs in groups.items()
            if key not in code_matched
            and wanted & {n for s in segs for n in (_norm(s.name), _norm(s.code[2]) if s.code else "")}
        ]
        if len(candidates) == 1:
            assigned.setdefault(candidates[0], []).append(label)
            by.setdefault(candidates[0], "name")
        else:
            unmatched_model.append(label.name)
            if len(candidates) > 1:
                notes.append(f"model label {label.name!r} fits {len(candidates)} reference structures by name")
    structures: list[Structure] = []
    for key, labels in sorted(assigned.items(), key=lambda kv: min(lab.value for lab in kv[1])):
        segs = groups[key]
        ident = key
        if key.startswith("name:"):  # an uncoded reference segment takes the matched model label's code
            coded = _code_key(labels[0].type.scheme, labels[0].type.value)
            if coded not in groups and coded not in (s.key for s in structures):
                ident = coded
        structures.append(
            Structure(
                key=ident,
                model_values=[lab.value for lab in labels],
                model_names=[lab.name for lab in labels],
                segment_numbers=[s.number for s in segs],
                segment_names=[s.name for s in segs],
                matched_by=by[key],
            )
        )
    unmatched_ref = [s.name for key, segs in groups.items() if key not in assigned for s in segs]
    return Matching(structures, unmatched_model, unmatched_ref, notes)


def _structure_maps(pred: np.ndarray, ref: np.ndarray, matching: Matching) -> tuple[np.ndarray, np.ndarray]:
    """Both label maps re-labelled to structure indices 1..S (everything else 0)."""
    dtype = np.uint8 if len(matching.structures) < 255 else np.uint16
    pred_lut = np.zeros(int(pred.max(initial=0)) + 1, dtype=dtype)
    ref_lut = np.zeros(int(ref.max(initial=0)) + 1, dtype=dtype)
    for index, s in enumerate(matching.structures, start=1):
        for v in s.model_values:
            if v < pred_lut.size:
                pred_lut[v] = index
        for n in s.segment_numbers:
            if n < ref_lut.size:
                ref_lut[n] = index
    return pred_lut[pred], ref_lut[ref]


# ==================================================================================================
# model configurations


@dataclass(frozen=True)
class ModelConfig:
    """One model package on one backend and device."""

    package: Path | None = None  # None: the bundled package
    backend: str = "onnxruntime"
    device: str = "cpu"
    threads: int = 0
    triton_url: str | None = None

    def runner_options(self) -> dict[str, Any]:
        if self.backend == "onnxruntime":
            return {"device": self.device, "threads": self.threads}
        if self.backend == "triton":
            return {"url": self.triton_url} if self.triton_url else {}
        return {"device": self.device}


@dataclass
class _Loaded:
    id: str
    config: ModelConfig
    package: ModelPackage
    runner: Runner

    def describe(self) -> str:
        return f"{self.package.identity} on {self.runner.describe()}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "package": {
                "name": self.package.name,
                "version": self.package.version,
                "path": str(self.package.root),
                "model_sha256": self.package.model_sha256,
                "labels": [
                    {"value": lab.value, "name": lab.name, "type": f"{lab.type.scheme}:{lab.type.value}"}
                    for lab in self.package.labels
                ],
            },
            "backend": self.config.backend,
            "device": self.config.device,
            "threads": self.config.threads or None,
            "runner": self.runner.describe(),
        }


def configs_from_lists(
    models: Sequence[Path | None] | None = None,
    backends: Sequence[str] | None = None,
    devices: Sequence[str] | None = None,
    threads: Sequence[int] | None = None,
    triton_urls: Sequence[str] | None = None,
) -> list[ModelConfig]:
    """One or two configurations from options each given 0, 1 or n times (n = 1 or 2)."""
    lists: dict[str, list[Any]] = {
        "--model": list(models or []),
        "--backend": list(backends or []),
        "--device": list(devices or []),
        "--threads": list(threads or []),
        "--triton-url": list(triton_urls or []),
    }
    n = max([1, *(len(v) for v in lists.values())])
    if n > 2:
        raise ValidationError("at most two configurations: give --model, --backend, --device, --threads at most twice")
    for option, values in lists.items():
        if len(values) not in (0, 1, n):
            raise ValidationError(f"{option} is given {len(values)} times; give it once or {n} times")

    def pick(option: str, i: int, default: Any) -> Any:
        values = lists[option]
        return default if not values else values[i if len(values) > 1 else 0]

    return [
        ModelConfig(
            package=pick("--model", i, None),
            backend=pick("--backend", i, "onnxruntime"),
            device=pick("--device", i, "cpu"),
            threads=int(pick("--threads", i, 0)),
            triton_url=pick("--triton-url", i, None),
        )
        for i in range(n)
    ]


def _open(configs: Sequence[ModelConfig]) -> list[_Loaded]:
    from edge_runtime.inference.package import DEFAULT_PACKAGE, ModelPackage
    from edge_runtime.inference.runner import load_runner

    loaded: list[_Loaded] = []
    try:
        for cid, config in zip(CONFIG_IDS, configs, strict=False):
            package = ModelPackage.load(config.package or DEFAULT_PACKAGE)
            runner = load_runner(package, config.backend, **config.runner_options())
            loaded.append(_Loaded(cid, config, package, runner))
    except BaseException:
        for item in loaded:
            item.runner.close()
        raise
    return loaded


# ==================================================================================================
# progress


class Progress:
    """``\\r[####    ] 3/8 cases  12.3 s`` on a terminal; one line per case otherwise."""

    def __init__(self, total: int, stream: IO[str] | None = None, *, width: int = 24):
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.t0 = time.perf_counter()
        try:
            self.tty = bool(self.stream.isatty())
        except (AttributeError, ValueError):
            self.tty = False
        self._last = 0

    def start(self, done: int, name: str) -> None:
        if self.tty:
            self._bar(done, f"  {name}")

    def done(self, done: int, name: str, outcome: str) -> None:
        elapsed = time.perf_counter() - self.t0
        if self.tty:
            self._bar(done, "")
        else:
            self.stream.write(f"[{done}/{self.total}] {name}: {outcome} ({elapsed:.1f} s)\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def _bar(self, done: int, tail: str) -> None:
        filled = int(round(self.width * done / self.total)) if self.total else self.width
        text = (
            f"[{'#' * filled}{' ' * (self.width - filled)}] {done}/{self.total} cases  "
            f"{time.perf_counter() - self.t0:.1f} s{tail}"
        )
        pad = max(0, self._last - len(text))
        self._last = len(text)
        self.stream.write("\r" + text + " " * pad)
        self.stream.flush()


# ==================================================================================================
# the run


def run_validation(
    folder: Path | str,
    configs: Sequence[ModelConfig],
    out_dir: Path | str,
    *,
    policy: GeometryPolicy | None = None,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    surface: bool = True,
    workers: int = 1,
    plots: bool = True,
    progress: IO[str] | None = None,
) -> dict[str, Any]:
    """Validate the configurations on every case under ``folder``; write the reports; return report.json's dict.

    Raises :class:`ValidationError` when there is nothing to validate, ``PackageError`` / ``RunnerError``
    when a configuration cannot be loaded.
    """
    from edge_runtime.imaging.volume import GeometryPolicy, VolumeError, load_volume
    from edge_runtime.inference.pipeline import segment
    from edge_runtime.quality.metrics import compare_label_maps

    if not 1 <= len(configs) <= 2:
        raise ValidationError(f"one or two configurations, got {len(configs)}")
    root = Path(folder)
    out = Path(out_dir)
    policy = policy or GeometryPolicy()
    discovery = discover_cases(root)
    if discovery.series_found == 0:
        raise ValidationError(f"no DICOM image series under {root}")
    loaded = _open(configs)
    try:
        cases: list[dict[str, Any]] = []
        skipped = list(discovery.skipped)
        failed: list[dict[str, Any]] = []
        bar = Progress(len(discovery.cases), progress)
        for i, case in enumerate(discovery.cases):
            bar.start(i, case.name)
            base = _skip(case, root, "")
            del base["reason"]
            outcome = "ok"
            try:
                refused = [
                    f"{item.id} ({item.package.identity}) takes {'/'.join(item.package.modalities)}"
                    for item in loaded
                    if item.package.modalities and case.modality.upper() not in item.package.modalities
                ]
                if refused:
                    raise _Skip(f"modality {case.modality or '(none)'}: model {'; '.join(refused)}")
                try:
                    volume = load_volume(case.paths, policy)
                except VolumeError as exc:
                    raise _Skip(f"volume refused: {exc}") from exc
                try:
                    reference = load_reference(case, volume)
                except (ValueError, OSError) as exc:
                    where = _rel(case.reference_path, root) if case.reference_path else "?"
                    raise _Skip(f"reference unusable ({where}): {exc}") from exc
                record = {
                    **base,
                    "modality": case.modality,
                    "shape": list(volume.array.shape),
                    "spacing_mm": [round(float(s), 6) for s in volume.spacing],
                    "reference": {
                        "kind": case.reference_kind,
                        "path": _rel(case.reference_path, root) if case.reference_path else None,
                        "segments": {str(n): s.name for n, s in reference.segments.items()},
                    },
                    "notes": case.notes + volume.notes + reference.notes,
                    "results": {},
                }
                for item in loaded:
                    t0 = time.perf_counter()
                    seg = segment(volume, item.package, item.runner)
                    seconds = time.perf_counter() - t0
                    matching = match_labels(item.package.labels, reference.segments)
                    result: dict[str, Any] = {
                        "seconds": round(seconds, 4),
                        "matching": matching.to_dict(),
                        "metrics": {},
                    }
                    if matching.structures:
                        pred_s, ref_s = _structure_maps(seg.labels, reference.labels, matching)
                        metrics = compare_label_maps(
                            pred_s,
                            ref_s,
                            volume.spacing,
                            labels=range(1, len(matching.structures) + 1),
                            surface=surface,
                            workers=workers,
                        )
                        for index, s in enumerate(matching.structures, start=1):
                            values = metrics[index].to_dict()
                            del values["label"]
                            result["metrics"][s.key] = values
                    record["results"][item.id] = result
                cases.append(record)
            except _Skip as exc:
                skipped.append({**base, "reason": str(exc)})
                outcome = f"skipped: {exc}"
            except Exception as exc:  # one bad case must not end the run
                failed.append({**base, "error": f"{type(exc).__name__}: {exc}"})
                outcome = f"FAILED: {type(exc).__name__}: {exc}"
            bar.done(i + 1, case.name, outcome)
        bar.close()
        report = _build_report(
            root,
            loaded,
            discovery,
            cases,
            skipped,
            failed,
            resamples=resamples,
            confidence=confidence,
            seed=seed,
            surface=surface,
        )
    finally:
        for item in loaded:
            item.runner.close()

    out.mkdir(parents=True, exist_ok=True)
    report["plots"], report["plots_note"] = [], None
    if plots and cases:
        try:
            report["plots"] = _write_plots(report, out)
        except extras.MissingDependencyError as exc:
            report["plots_note"] = f"no plots: {exc}"
    elif not cases:
        report["plots_note"] = "no plots: no case was evaluated"
    else:
        report["plots_note"] = "plots not requested"
    (out / "report.json").write_text(json.dumps(_json_safe(report), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    (out / "report.md").write_text(render_markdown(report), encoding="utf-8")
    return report


class _Skip(Exception):
    pass


def _build_report(
    root: Path,
    loaded: Sequence[_Loaded],
    discovery: Discovery,
    cases: list[dict[str, Any]],
    skipped: list[dict[str, Any]],
    failed: list[dict[str, Any]],
    *,
    resamples: int,
    confidence: float,
    seed: int,
    surface: bool,
) -> dict[str, Any]:
    from edge_runtime import __version__

    ids = [item.id for item in loaded]
    metrics = [m for m in METRICS if surface or m not in SURFACE_METRICS]

    # structures, in the order of the first configuration's label values
    labels: dict[str, dict[str, Any]] = {}
    order: dict[str, tuple[int, int]] = {}
    unmatched: dict[str, dict[str, dict[str, int]]] = {
        cid: {"model_labels": {}, "reference_segments": {}} for cid in ids
    }
    for record in cases:
        for rank, cid in enumerate(ids):
            m = record["results"][cid]["matching"]
            for s in m["structures"]:
                info = labels.setdefault(
                    s["key"], {"key": s["key"], "name": s["model_labels"][0], "reference_names": [], "by": {}}
                )
                for n in s["reference_segments"]:
                    if n not in info["reference_names"]:
                        info["reference_names"].append(n)
                by = info["by"].setdefault(cid, {"model_labels": s["model_labels"], "code": 0, "name": 0})
                by[s["matched_by"]] += 1
                order[s["key"]] = min(order.get(s["key"], (9, 0)), (rank, min(s["model_values"])))
            for kind in ("model_labels", "reference_segments"):
                for name in m[f"unmatched_{kind}"]:
                    unmatched[cid][kind][name] = unmatched[cid][kind].get(name, 0) + 1
    keys = sorted(labels, key=lambda k: (*order[k], k))
    for key in keys:
        labels[key]["cases"] = {cid: sum(key in r["results"][cid]["metrics"] for r in cases) for cid in ids}

    stats: dict[str, Any] = {"resamples": resamples, "confidence": confidence, "seed": seed}

    def values(cid: str, key: str, metric: str) -> list[float]:
        return [
            float(r["results"][cid]["metrics"][key][metric])
            for r in cases
            if key in r["results"][cid]["metrics"] and r["results"][cid]["metrics"][key][metric] is not None
        ]

    aggregate = {
        cid: {
            key: {metric: summarize(values(cid, key, metric), **stats) for metric in metrics}
            for key in keys
            if labels[key]["cases"][cid]
        }
        for cid in ids
    }
    paired = None
    if len(ids) == 2:
        a, b = ids
        paired = {}
        for key in keys:
            both = [r for r in cases if key in r["results"][a]["metrics"] and key in r["results"][b]["metrics"]]
            if not both:
                continue
            per_metric = {}
            for metric in metrics:
                diffs = []
                for r in both:
                    va, vb = r["results"][a]["metrics"][key][metric], r["results"][b]["metrics"][key][metric]
                    if va is not None and vb is not None:
                        with np.errstate(invalid="ignore"):
                            diffs.append(float(np.float64(vb) - np.float64(va)))
                per_metric[metric] = summarize(diffs, **stats)
            paired[key] = per_metric
    return {
        "format": REPORT_FORMAT,
        "tool": "edge-runtime validate",
        "version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "folder": str(root.resolve()),
        "settings": {
            **stats,
            "surface_metrics": surface,
            "statistic": "mean; percentile bootstrap CI of the mean",
            "non_finite": "NaN and inf values are excluded from every statistic and counted in n_nan / n_inf",
        },
        "configs": [item.to_dict() for item in loaded],
        "metrics": metrics,
        "counts": {
            "series": discovery.series_found,
            "evaluated": len(cases),
            "skipped": len(skipped),
            "failed": len(failed),
        },
        "labels": [labels[k] for k in keys],
        "unmatched": unmatched,
        "discovery_notes": discovery.notes,
        "cases": cases,
        "skipped": skipped,
        "failed": failed,
        "aggregate": aggregate,
        "paired_difference": paired,
    }


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        if math.isnan(obj):
            return "NaN"
        if math.isinf(obj):
            return "Infinity" if obj > 0 else "-Infinity"
        return obj
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return _json_safe(obj.item())
    return obj


# ==================================================================================================
# plots


def _plot_values(report: dict[str, Any], cid: str, key: str, metric: str) -> list[float]:
    out = []
    for r in report["cases"]:
        m = r["results"][cid]["metrics"].get(key)
        if m is not None and m.get(metric) is not None:
            out.append(float(m[metric]))
    return out


def _write_plots(report: dict[str, Any], out: Path) -> list[str]:
    extras.require("matplotlib", feature="validation plots", extra="validate")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    ids = [c["id"] for c in report["configs"]]
    labels = report["labels"]
    written = []
    for metric in PLOT_METRICS:
        if metric not in report["metrics"] or not labels:
            continue
        width = max(5.0, 1.1 * len(labels) * len(ids) + 1.5)
        fig = Figure(figsize=(width, 4.2), dpi=110, layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        rng = np.random.default_rng(0)
        offsets = [0.0] if len(ids) == 1 else [-0.2, 0.2]
        box_width = 0.5 if len(ids) == 1 else 0.34
        ticks = []
        for i, info in enumerate(labels):
            lines = [info["name"]]
            for j, cid in enumerate(ids):
                data = np.asarray(_plot_values(report, cid, info["key"], metric), dtype=np.float64)
                finite = data[np.isfinite(data)]
                pos = i + offsets[j]
                bad = int(data.size - finite.size)
                tag = f"{cid}: " if len(ids) > 1 else ""
                lines.append(f"{tag}n={finite.size}" + (f", {bad} non-finite" if bad else ""))
                if finite.size == 0:
                    continue
                ax.boxplot(
                    finite,
                    positions=[pos],
                    widths=box_width,
                    patch_artist=True,
                    showfliers=False,
                    whis=(0, 100),
                    boxprops={"facecolor": _COLORS[j], "alpha": 0.45, "edgecolor": _COLORS[j]},
                    medianprops={"color": "black", "linewidth": 1.5},
                    whiskerprops={"color": _COLORS[j]},
                    capprops={"color": _COLORS[j]},
                )
                jitter = rng.uniform(-box_width / 4, box_width / 4, finite.size)
                ax.scatter(pos + jitter, finite, s=14, color=_COLORS[j], edgecolors="black", linewidths=0.4, zorder=3)
            ticks.append("\n".join(lines))
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(ticks, fontsize=8)
        ax.set_xlim(-0.6, len(labels) - 0.4)
        ax.set_ylabel(METRIC_TITLES[metric])
        ax.set_title(f"{METRIC_TITLES[metric]}, {len(report['cases'])} cases", fontsize=10)
        ax.set_xlabel("box: quartiles and median; whiskers: min to max; dots: cases", fontsize=7, color="dimgrey")
        ax.grid(axis="y", alpha=0.3)
        if metric == "dice":
            ax.set_ylim(-0.03, 1.03)
        elif metric.endswith("_mm"):
            ax.set_ylim(bottom=0.0)
        if metric == "volume_difference_ml":
            ax.axhline(0.0, color="grey", linewidth=0.8)
        if len(ids) > 1:
            handles = [
                Patch(facecolor=_COLORS[j], alpha=0.45, edgecolor=_COLORS[j], label=_config_title(report, j))
                for j in range(len(ids))
            ]
            fig.legend(handles=handles, fontsize=7, loc="outside upper center", frameon=False)
        name = f"boxplot_{metric}.png"
        fig.savefig(out / name)
        written.append(name)
    return written


# ==================================================================================================
# Markdown


def _config_title(report: dict[str, Any], index: int) -> str:
    c = report["configs"][index]
    return f"{c['id']}: {c['package']['name']} {c['package']['version']} ({c['runner']})"


def _fmt(value: Any, metric: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        value = float(value)
    v = float(value)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if metric.endswith("_mm"):
        return f"{v:.2f}"
    if metric.endswith("_ml"):
        return f"{v:.1f}"
    return f"{v:.3f}"


def _ci(s: Mapping[str, Any], metric: str) -> str:
    if s.get("ci_low") is None:
        return "–"
    return f"[{_fmt(s['ci_low'], metric)}, {_fmt(s['ci_high'], metric)}]"


def _nonfinite(s: Mapping[str, Any]) -> str:
    parts = []
    if s["n_nan"]:
        parts.append(f"{s['n_nan']} NaN")
    if s["n_inf"]:
        parts.append(f"{s['n_inf']} inf")
    return ", ".join(parts) or "0"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    def esc(cell: str) -> str:
        return str(cell).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    """report.md from report.json's dict."""
    ids = [c["id"] for c in report["configs"]]
    names = {info["key"]: info["name"] for info in report["labels"]}
    metrics = report["metrics"]
    headline = [m for m in HEADLINE if m in metrics]
    st = report["settings"]
    pct = f"{100 * st['confidence']:g}%"
    counts = report["counts"]
    md = [
        "# Validation report",
        "",
        f"- Folder: `{report['folder']}`",
        f"- Created: {report['created']} (edge-runtime {report['version']})",
        f"- Cases: {counts['evaluated']} evaluated, {counts['skipped']} skipped, {counts['failed']} failed "
        f"({counts['series']} image series found)",
    ]
    for i in range(len(ids)):
        md.append(f"- Configuration {_config_title(report, i)}")
    md += [
        f"- Statistics: mean, median and {pct} percentile bootstrap CI of the mean ({st['resamples']} "
        f"resamples, seed {st['seed']}); NaN and inf values are excluded from the statistics and counted "
        "under *non-finite*.",
    ]
    if not st["surface_metrics"]:
        md.append("- Surface metrics (Hausdorff, HD95, ASSD) were not computed (`--no-surface`).")
    md.append("")

    md += ["## Label matching", ""]
    rows = []
    for info in report["labels"]:
        row = [info["name"], f"`{info['key']}`", ", ".join(info["reference_names"])]
        for cid in ids:
            by = info["by"].get(cid)
            if by is None:
                row.append("not matched")
            else:
                how = "; ".join(f"{k} ×{by[k]}" for k in ("code", "name") if by[k])
                row.append(f"{', '.join(by['model_labels'])} ({how})")
        rows.append(row)
    md += _table(["Label", "Key", "Reference segment(s)", *(f"Model label {cid}" for cid in ids)], rows)
    md.append("")
    for cid in ids:
        for kind, title in (("model_labels", "model labels"), ("reference_segments", "reference segments")):
            found = report["unmatched"][cid][kind]
            if found:
                items = ", ".join(f"{n} ({c} case{'s' if c > 1 else ''})" for n, c in found.items())
                md.append(f"- Unmatched {title} ({cid}): {items}")
    if any(report["unmatched"][cid][k] for cid in ids for k in ("model_labels", "reference_segments")):
        md.append("")

    for i, cid in enumerate(ids):
        agg = report["aggregate"][cid]
        md += [f"## Summary per label — {_config_title(report, i)}", ""]
        rows = []
        for key, per in agg.items():
            row = [names[key], str(per[headline[0]]["n"] + per[headline[0]]["n_nan"] + per[headline[0]]["n_inf"])]
            for m in headline:
                s = per[m]
                row += [f"{_fmt(s['mean'], m)} {_ci(s, m)}", _fmt(s["median"], m)]
            rows.append(row)
        header = ["Label", "Cases"]
        for m in headline:
            header += [f"{SHORT_TITLES.get(m, m)} mean [{pct} CI]", "median"]
        md += _table(header, rows)
        md += ["", f"### All metrics — {cid}", ""]
        rows = []
        for key, per in agg.items():
            for m in metrics:
                s = per[m]
                rows.append(
                    [
                        names[key],
                        METRIC_TITLES[m],
                        str(s["n"]),
                        _fmt(s["mean"], m),
                        _ci(s, m),
                        _fmt(s["median"], m),
                        _fmt(s["std"], m),
                        _nonfinite(s),
                    ]
                )
        md += _table(["Label", "Metric", "n", "Mean", f"{pct} CI", "Median", "SD", "Non-finite"], rows)
        md.append("")

    if report["paired_difference"] is not None:
        md += [
            "## Paired difference B − A",
            "",
            "Per case and label, the metric of B minus that of A; statistics over the cases where both matched the "
            "label.",
            "",
        ]
        rows = []
        for key, per in report["paired_difference"].items():
            for m in metrics:
                s = per[m]
                rows.append(
                    [
                        names[key],
                        METRIC_TITLES[m],
                        str(s["n"]),
                        _fmt(s["mean"], m),
                        _ci(s, m),
                        _fmt(s["median"], m),
                        _nonfinite(s),
                    ]
                )
        md += _table(["Label", "Metric", "Pairs", "Mean B−A", f"{pct} CI", "Median B−A", "Non-finite"], rows)
        md.append("")

    md += ["## Per case", ""]
    header = ["Case", "Label"]
    for m in headline:
        header += [f"{SHORT_TITLES.get(m, m)} {cid}" if len(ids) > 1 else SHORT_TITLES.get(m, m) for cid in ids]
    header += [f"Time {cid} (s)" if len(ids) > 1 else "Time (s)" for cid in ids]
    rows = []
    for r in report["cases"]:
        keys = [k for k in names if any(k in r["results"][cid]["metrics"] for cid in ids)]
        for n, key in enumerate(keys):
            row = [r["case"] if n == 0 else "", names[key]]
            for m in headline:
                for cid in ids:
                    v = r["results"][cid]["metrics"].get(key, {}).get(m)
                    row.append(_fmt(v, m))
            row += [f"{r['results'][cid]['seconds']:.2f}" if n == 0 else "" for cid in ids]
            rows.append(row)
    md += _table(header, rows) if rows else ["No case was evaluated."]
    md.append("")
    notes = [(r["case"], note) for r in report["cases"] for note in r["notes"]]
    if notes:
        md += ["Notes:", ""] + [f"- {case}: {note}" for case, note in notes] + [""]

    if report["skipped"]:
        md += ["## Skipped", ""]
        md += _table(["Case", "Folder", "Reason"], [[s["case"], s["path"], s["reason"]] for s in report["skipped"]])
        md.append("")
    if report["failed"]:
        md += ["## Failed", ""]
        md += _table(["Case", "Folder", "Error"], [[s["case"], s["path"], s["error"]] for s in report["failed"]])
        md.append("")
    if report["discovery_notes"]:
        md += ["## Folder notes", ""] + [f"- {n}" for n in report["discovery_notes"]] + [""]

    md += ["## Plots", ""]
    if report["plots"]:
        for name in report["plots"]:
            metric = name.removeprefix("boxplot_").removesuffix(".png")
            md += [f"![{METRIC_TITLES.get(metric, metric)}]({name})", ""]
    if report.get("plots_note"):
        md += [f"_{report['plots_note']}_", ""]
    return "\n".join(md).rstrip() + "\n"


# ==================================================================================================
# CLI


def add_parser(subparsers: Any) -> None:
    """Add the ``validate`` subcommand to ``edge-runtime``'s subparsers."""
    p = subparsers.add_parser(
        "validate",
        help="offline validation against reference SEGs or label volumes",
        description="Segment every series under FOLDER that has a reference (DICOM SEG, or reference.npz in "
        "the series folder) with one or two model configurations and write report.json, report.md and box "
        "plots to --out. --model, --backend, --device, --threads and --triton-url may each be given once "
        "(shared) or twice (configurations A and B).",
    )
    p.add_argument("folder", type=Path, help="folder of DICOM series and references (searched recursively)")
    p.add_argument("--out", type=Path, required=True, help="folder for report.json, report.md and the plots")
    p.add_argument("--model", type=Path, action="append", help="model package directory (default: bundled)")
    p.add_argument("--backend", action="append", help="inference backend (default onnxruntime)")
    p.add_argument("--device", action="append", help="cpu, cuda or tensorrt (default cpu)")
    p.add_argument("--threads", type=int, action="append", help="inference threads (default: one per core)")
    p.add_argument("--triton-url", action="append", help="Triton gRPC endpoint for --backend triton")
    p.add_argument("--irregular-spacing", choices=("resample", "refuse"), default="resample", help="geometry policy")
    p.add_argument("--bootstrap", type=int, default=2000, metavar="N", help="bootstrap resamples (default 2000)")
    p.add_argument("--confidence", type=float, default=0.95, help="confidence level (default 0.95)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--workers", type=int, default=0, help="threads for the metrics (default: up to 4 cores)")
    p.add_argument("--no-surface", action="store_true", help="skip Hausdorff, HD95 and ASSD (faster)")
    p.add_argument("--no-plots", action="store_true", help="write no PNG box plots")
    p.set_defaults(func=cmd_validate)


def cmd_validate(args: argparse.Namespace) -> int:
    """Run ``edge-runtime validate``; 0 ok, 1 some case failed, 2 bad arguments or nothing to validate."""
    from edge_runtime.imaging.volume import GeometryPolicy
    from edge_runtime.inference.package import PackageError
    from edge_runtime.inference.runner import RunnerError

    def fail(message: str) -> int:
        print(f"edge-runtime validate: {message}", file=sys.stderr)
        return 2

    if args.bootstrap < 1:
        return fail(f"--bootstrap must be >= 1, got {args.bootstrap}")
    if not 0 < args.confidence < 1:
        return fail(f"--confidence must be in (0, 1), got {args.confidence}")
    if args.workers < 0:
        return fail(f"--workers must be >= 0, got {args.workers}")
    if not Path(args.folder).is_dir():
        return fail(f"{args.folder} is not a folder")
    try:
        configs = configs_from_lists(args.model, args.backend, args.device, args.threads, args.triton_url)
    except ValidationError as exc:
        return fail(str(exc))
    workers = args.workers or max(1, min(4, os.cpu_count() or 1))
    try:
        report = run_validation(
            args.folder,
            configs,
            args.out,
            policy=GeometryPolicy(irregular_spacing=args.irregular_spacing),
            resamples=args.bootstrap,
            confidence=args.confidence,
            seed=args.seed,
            surface=not args.no_surface,
            workers=workers,
            plots=not args.no_plots,
        )
    except ValidationError as exc:
        return fail(str(exc))
    except (PackageError, RunnerError, extras.MissingDependencyError) as exc:
        return fail(f"cannot load the model: {exc}")
    counts = report["counts"]
    out = Path(args.out)
    print(
        f"{counts['evaluated']} case(s) evaluated, {counts['skipped']} skipped, {counts['failed']} failed; "
        f"reports in {out / 'report.md'} and {out / 'report.json'}",
        file=sys.stderr,
    )
    if report.get("plots_note") and counts["evaluated"]:
        print(f"edge-runtime validate: {report['plots_note']}", file=sys.stderr)
    for s in report["skipped"]:
        print(f"  skipped {s['case']}: {s['reason']}", file=sys.stderr)
    for s in report["failed"]:
        print(f"  failed {s['case']}: {s['error']}", file=sys.stderr)
    if counts["evaluated"] == 0:
        if counts["failed"]:
            return 1
        return fail("no case could be evaluated (see the skipped cases above and in the report)")
    return 1 if counts["failed"] else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m edge_runtime.apps.validate ...``: the subcommand on its own."""
    parser = argparse.ArgumentParser(prog="edge-runtime")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["validate", *(sys.argv[1:] if argv is None else argv)])
    return cmd_validate(args)


if __name__ == "__main__":
    sys.exit(main())
