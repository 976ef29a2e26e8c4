"""Which reference segment is which model label: one set of rules for every comparison with a reference.

The offline validation (``edge-runtime validate``) and the in-service comparison with a SEG pushed back
(:mod:`edge_runtime.quality.feedback`) both match here, so a reference means the same in both places.

1. **By code.** A model label (``manifest.json`` ``labels``) matches the reference segments whose Segmented
   Property Type has its code value and coding scheme (SNOMED CT ``SCT``; the scheme compared case-insensitively).
2. **By name.** A model label left over matches by name when exactly one reference structure not matched by
   code fits: the label's name or its type's code meaning against the segment's label or its type's code
   meaning, compared case-insensitively with runs of spaces, ``_`` and ``-`` read as one space. A name that
   fits several structures matches none (and says so in a note): a guess would put metrics under the wrong
   organ.

Reference segments with the same type code (or, without a code, the same name) are one **structure** (a left
and a right lung drawn as two segments of one type), and model labels matched to the same structure are one
structure too. A structure is identified by its reference type code (``SCT:39607008``); a reference segment
without a code takes the code of the model label matched to it by name, and is ``name:<normalised name>``
while unmatched.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pydicom stays lazy: the CLI imports the validate app, and so this module, for every command
    from pydicom.dataset import Dataset

    from edge_runtime.inference.package import Label

__all__ = ["Matching", "RefSegment", "Structure", "code_key", "match_labels", "segments_of", "structure_maps"]


def code_key(scheme: str, value: str) -> str:
    """``SCHEME:value``: how a coded concept is compared and named (``SCT:10200004``)."""
    return f"{scheme.strip().upper()}:{value.strip()}"


def normalize_name(name: str) -> str:
    """A name as it is compared: lower case, runs of spaces, ``_`` and ``-`` as one space."""
    return re.sub(r"[\s_\-]+", " ", name).strip().lower()


@dataclass(frozen=True)
class RefSegment:
    """A reference segment: its number (value in the reference label map), name and type code."""

    number: int
    name: str
    #: (coding scheme, code value, code meaning) of the Segmented Property Type; None without one
    code: tuple[str, str, str] | None = None

    @property
    def key(self) -> str:
        """The structure this segment belongs to: its type code, else its name."""
        return code_key(self.code[0], self.code[1]) if self.code else "name:" + normalize_name(self.name)

    def names(self) -> set[str]:
        """The normalised names a model label may match this segment by: its label and its type's meaning."""
        return {normalize_name(self.name), normalize_name(self.code[2]) if self.code else ""} - {""}


def segments_of(ds: Dataset) -> dict[int, RefSegment]:
    """Every segment a SEG's Segment Sequence describes, by Segment Number, in the order of the sequence."""
    segments: dict[int, RefSegment] = {}
    for item in ds.get("SegmentSequence", []) or []:
        number = int(item.SegmentNumber)
        types = item.get("SegmentedPropertyTypeCodeSequence") or []
        code = None
        if types and types[0].get("CodeValue") and types[0].get("CodingSchemeDesignator"):
            t = types[0]
            code = (str(t.CodingSchemeDesignator), str(t.CodeValue), str(t.get("CodeMeaning", "")))
        segments[number] = RefSegment(number, str(item.get("SegmentLabel", "")), code)
    return segments


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
    """The structures found, in the order of their lowest model label value, and what matched nothing."""

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


def _label_key(label: Label) -> str:
    return code_key(label.type.scheme, label.type.value)


def match_labels(model_labels: Sequence[Label], segments: Mapping[int, RefSegment]) -> Matching:
    """Match model labels to reference segments: by type code (value + scheme), then by name (module docstring)."""
    groups: dict[str, list[RefSegment]] = {}
    for number in sorted(segments):
        groups.setdefault(segments[number].key, []).append(segments[number])
    assigned: dict[str, list[Label]] = {}
    by: dict[str, str] = {}
    leftover: list[Label] = []
    for label in sorted(model_labels, key=lambda lab: lab.value):
        key = _label_key(label)
        if key in groups:
            assigned.setdefault(key, []).append(label)
            by[key] = "code"
        else:
            leftover.append(label)
    code_matched = set(assigned)
    notes: list[str] = []
    unmatched_model: list[str] = []
    for label in leftover:
        wanted = {normalize_name(label.name), normalize_name(label.type.meaning)} - {""}
        candidates = [
            key
            for key, segs in groups.items()
            if key not in code_matched and wanted & {n for s in segs for n in s.names()}
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
            coded = _label_key(labels[0])
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


def structure_maps(pred: np.ndarray, ref: np.ndarray, matching: Matching) -> tuple[np.ndarray, np.ndarray]:
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
