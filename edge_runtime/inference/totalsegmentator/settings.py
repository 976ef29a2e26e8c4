"""The manifest's ``"totalsegmentator"`` section: how TotalSegmentator wraps nnU-Net, and the parts it merges.

TotalSegmentator does not hand the image to nnU-Net as it is. ``totalsegmentator.nnunet.nnUNet_predict_image``
reorients it to the closest canonical (RAS) orientation, resamples it to an isotropic grid itself (1.5 mm for
``total``, 3 mm for ``--fast``; ``scipy.ndimage.zoom`` of ``order`` 1 and a cast to int32), runs one nnU-Net
model per part (``total``: datasets 291-295) without test-time mirroring at tile step 0.8, maps each part's
label indices into the combined class map and lets a later part overwrite an earlier one wherever it found
something, resamples the merged map back with ``order`` 0 and undoes the reorientation. Each of those choices is
a key here, so a package says what it reproduces. Shape::

    "totalsegmentator": {
      "task": "total", "totalsegmentator_version": "2.18.0",
      "orientation": "ras_canonical",             # nibabel's as_closest_canonical, then nnU-Net's reader order
      "resample_mm": 1.5, "resample_order": 1, "resample_dtype": "int32", "resample_back_order": 0,
      "merge": "later_part_overwrites",
      "parts": [{"task_id": 291, "part": "class_map_part_organs", "dataset": "Dataset291_...", "classes": 25,
                 "labels": [0, 1, 2, ...]}],      # part class index -> package label value (0: background)
      "not_reproduced": ["..."]
    }

Every part's network is in the one ONNX model: input channel ``p`` is the image normalised with part ``p``'s
fingerprint (the manifest's ``"nnunet"`` section lists one normalisation per channel), and the output holds the
parts' logits one after the other (``classes`` channels each, background first), so one sliding window serves
every part. The parts must therefore share their spacing, patch size and axis order; the exporter refuses
weights where they do not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ORIENTATIONS = ("ras_canonical", "as_stored")
MERGES = ("later_part_overwrites",)


@dataclass(frozen=True)
class Part:
    """One nnU-Net model of the task."""

    task_id: int
    name: str
    dataset: str
    #: the part's output channels, background included
    classes: int
    #: part class index -> package label value (index 0 -> 0)
    labels: tuple[int, ...]


@dataclass(frozen=True)
class TotalSegmentatorSettings:
    task: str
    parts: tuple[Part, ...]
    orientation: str = "ras_canonical"
    #: TotalSegmentator's own isotropic grid; None: it does not resample
    resample_mm: float | None = 1.5
    resample_order: int = 1
    resample_dtype: str = "int32"
    resample_back_order: int = 0
    merge: str = "later_part_overwrites"

    @property
    def output_channels(self) -> int:
        """The model's output: every part's classes, background included."""
        return sum(p.classes for p in self.parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "orientation": self.orientation,
            "resample_mm": self.resample_mm,
            "resample_order": self.resample_order,
            "resample_dtype": self.resample_dtype,
            "resample_back_order": self.resample_back_order,
            "merge": self.merge,
            "parts": [{"task_id": p.task_id, "part": p.name, "dataset": p.dataset, "classes": p.classes,
                       "labels": list(p.labels)} for p in self.parts],
        }


def parse_totalsegmentator(node: Any, problems: list[str]) -> TotalSegmentatorSettings | None:
    """The section as settings, or None when the manifest has none; each problem is appended to ``problems``."""
    if node is None:
        return None
    if not isinstance(node, dict):
        problems.append(f"'totalsegmentator' must be an object, got {type(node).__name__}")
        return None
    before = len(problems)

    def want(key: str, ok: bool, what: str) -> None:
        if not ok:
            problems.append(f"'totalsegmentator.{key}' must be {what}, got {node.get(key)!r}")

    task = node.get("task")
    want("task", isinstance(task, str), "a string")
    orientation = node.get("orientation", "ras_canonical")
    want("orientation", orientation in ORIENTATIONS, " or ".join(ORIENTATIONS))
    resample = node.get("resample_mm", 1.5)
    want("resample_mm", resample is None or (_is_number(resample) and resample > 0), "a positive number or null")
    orders = {k: node.get(k, d) for k, d in (("resample_order", 1), ("resample_back_order", 0))}
    for key, value in orders.items():
        want(key, isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 5, "an integer 0-5")
    dtype = node.get("resample_dtype", "int32")
    want("resample_dtype", dtype in ("int32", "float32"), "int32 or float32")
    merge = node.get("merge", "later_part_overwrites")
    want("merge", merge in MERGES, " or ".join(MERGES))
    raw_parts = node.get("parts")
    want("parts", isinstance(raw_parts, list) and bool(raw_parts), "a non-empty list")
    parts = [_part(p, i, problems) for i, p in enumerate(raw_parts if isinstance(raw_parts, list) else [])]
    if len(problems) > before:
        return None
    return TotalSegmentatorSettings(
        task=str(task), parts=tuple(p for p in parts if p is not None), orientation=orientation,
        resample_mm=None if resample is None else float(resample), resample_order=orders["resample_order"],
        resample_dtype=dtype, resample_back_order=orders["resample_back_order"], merge=merge,
    )


def _part(node: Any, index: int, problems: list[str]) -> Part | None:
    where = f"'totalsegmentator.parts[{index}]'"
    if not isinstance(node, dict):
        problems.append(f"{where} must be an object")
        return None
    labels, classes = node.get("labels"), node.get("classes")
    if not (isinstance(classes, int) and classes >= 2 and isinstance(labels, list) and len(labels) == classes
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in labels) and labels[0] == 0):
        problems.append(f"{where} needs 'classes' >= 2 and 'labels': that many label values starting with 0, got "
                        f"classes={classes!r}, labels={labels!r}")
        return None
    task_id, name, dataset = node.get("task_id"), node.get("part"), node.get("dataset", "")
    if not isinstance(task_id, int) or not isinstance(name, str) or not isinstance(dataset, str):
        problems.append(f"{where} needs an integer 'task_id' and the strings 'part' and 'dataset'")
        return None
    return Part(task_id, name, dataset, classes, tuple(labels))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
