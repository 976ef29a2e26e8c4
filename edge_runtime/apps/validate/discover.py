"""Finding the cases of a validation: image series under a folder, and the reference of each.

Every file is read as DICOM, headers only. Image series are grouped by Series Instance UID; reference SEGs
are matched to a series by their Referenced Series Sequence, else by the source images their frames name; a
``reference.npz`` counts where no SEG references the series (the package docstring has the rules).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_runtime.dicom import SEGMENTATION_CLASSES
from edge_runtime.errors import ValidationError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

REFERENCE_NPZ = "reference.npz"


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


_SegFile = tuple[Path, "Dataset"]


def rel(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` as the reports show it (``.`` for the root itself)."""
    try:
        relative = path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.as_posix()
    return relative or "."


def case_record(case: Case, root: Path) -> dict[str, Any]:
    """The fields every report entry of a case starts with: its name, series and folder."""
    return {"case": case.name, "series_uid": case.series_uid, "path": rel(case.folder, root)}


def discover_cases(folder: Path | str) -> Discovery:
    """Find the image series under ``folder`` and their references (see the package docstring)."""
    root = Path(folder)
    if not root.is_dir():
        raise ValidationError(f"{root} is not a folder")
    series, segs, notes = _scan(root)
    seg_for = _segs_by_series(segs, series, root, notes)
    folders = {uid: Path(os.path.commonpath([str(p.parent) for p in e.paths])) for uid, e in series.items()}
    per_folder: dict[Path, list[str]] = {}
    for uid, f in folders.items():
        per_folder.setdefault(f, []).append(uid)

    cases: list[Case] = []
    skipped: list[dict[str, Any]] = []
    used: set[str] = set()
    for uid in sorted(series, key=lambda u: (rel(folders[u], root), series[u].number, u)):
        entry = series[uid]
        shared_folder = len(per_folder[folders[uid]]) > 1
        name = _case_name(folders[uid], root, entry.number if shared_folder else None, used)
        case = Case(name, uid, folders[uid], sorted(entry.paths), entry.modality)
        reason = _choose_reference(case, seg_for.get(uid, []), shared_folder, root)
        if reason is None:
            cases.append(case)
        else:
            skipped.append({**case_record(case, root), "reason": reason})
    return Discovery(cases=cases, skipped=skipped, notes=notes, series_found=len(series))


def _scan(root: Path) -> tuple[dict[str, _SeriesFiles], list[_SegFile], list[str]]:
    """Image series by Series Instance UID, the SEGs, and a note on other DICOM files."""
    series: dict[str, _SeriesFiles] = {}
    segs: list[_SegFile] = []
    notes: list[str] = []
    other = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        ds = _read_header(path)
        if ds is None:
            continue
        if str(ds.get("SOPClassUID", "")) in SEGMENTATION_CLASSES:
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
    return series, segs, notes


def _segs_by_series(
    segs: list[_SegFile], series: dict[str, _SeriesFiles], root: Path, notes: list[str]
) -> dict[str, list[_SegFile]]:
    """The reference SEGs of each series; SEGs that reference none of them become notes."""
    sop_to_series = {sop: uid for uid, entry in series.items() for sop in entry.sop_uids}
    seg_for: dict[str, list[_SegFile]] = {}
    for path, ds in segs:
        referenced = [str(item.get("SeriesInstanceUID", "")) for item in ds.get("ReferencedSeriesSequence", []) or []]
        targets = [uid for uid in dict.fromkeys(referenced) if uid in series]
        if not targets:
            targets = sorted({sop_to_series[u] for u in _seg_source_uids(ds) if u in sop_to_series})
        if not targets:
            notes.append(f"SEG {rel(path, root)} references no image series in the folder; ignored")
            continue
        if len(targets) > 1:
            notes.append(f"SEG {rel(path, root)} references {len(targets)} series; used for the first")
        seg_for.setdefault(targets[0], []).append((path, ds))
    return seg_for


def _case_name(folder: Path, root: Path, series_number: str | None, used: set[str]) -> str:
    """The series folder relative to the root, with the series number where a folder holds several; unique."""
    name = rel(folder, root)
    if name == ".":
        name = root.resolve().name or "."
    if series_number is not None:
        name = f"{name} #{series_number or '?'}"
    base, k = name, 2
    while name in used:
        name, k = f"{base} ({k})", k + 1
    used.add(name)
    return name


def _choose_reference(case: Case, found: list[_SegFile], shared_folder: bool, root: Path) -> str | None:
    """Set the reference of ``case``: a SEG, else ``reference.npz``; the reason to skip the case when none fits."""
    if len(found) > 1:
        manual = [(p, d) for p, d in found if not _all_automatic(d)]
        if len(manual) < len(found) and manual:
            case.notes.append(
                f"{len(found) - len(manual)} SEG(s) with only AUTOMATIC segments set aside as model outputs"
            )
            found = manual
    npz = case.folder / REFERENCE_NPZ
    if len(found) == 1:
        case.reference_kind, case.reference_path = "seg", found[0][0]
        if npz.is_file():
            case.notes.append(f"{REFERENCE_NPZ} ignored: a reference SEG was found")
        return None
    if len(found) > 1:
        names = ", ".join(rel(p, root) for p, _ in found)
        return f"ambiguous reference: {len(found)} SEGs reference this series ({names})"
    if not npz.is_file():
        return f"no reference: no DICOM SEG references this series and its folder has no {REFERENCE_NPZ}"
    if shared_folder:
        return f"{REFERENCE_NPZ} is in a folder holding several image series: ambiguous"
    case.reference_kind, case.reference_path = "npz", npz
    return None


def _read_header(path: Path) -> Dataset | None:
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # untrusted files: pydicom warns about odd values
            return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # not DICOM, unreadable, or one of the many errors pydicom raises on malformed data
        return None


def _referenced_uids(items: Iterable[Dataset], inner: str) -> set[str]:
    """Referenced SOP Instance UIDs of the items of the ``inner`` sequence of each of ``items``."""
    return {
        str(ref.ReferencedSOPInstanceUID)
        for item in items
        for ref in item.get(inner, []) or []
        if ref.get("ReferencedSOPInstanceUID")
    }


def _seg_source_uids(ds: Dataset) -> set[str]:
    """SOP Instance UIDs of the source images a SEG's frames (or its references) name."""
    groups = list(ds.get("PerFrameFunctionalGroupsSequence", []) or [])
    groups += list(ds.get("SharedFunctionalGroupsSequence", []) or [])
    derivations = [deriv for group in groups for deriv in group.get("DerivationImageSequence", []) or []]
    uids = _referenced_uids(derivations, "SourceImageSequence")
    return uids | _referenced_uids(ds.get("ReferencedSeriesSequence", []) or [], "ReferencedInstanceSequence")


def _all_automatic(ds: Dataset) -> bool:
    types = [str(item.get("SegmentAlgorithmType", "")).upper() for item in ds.get("SegmentSequence", []) or []]
    return bool(types) and all(t == "AUTOMATIC" for t in types)
