"""nnU-Net's post-processing (``postprocessing.pkl``), as declarative steps the runtime applies to the label map.

nnU-Net decides after cross-validation whether keeping only the largest connected component of the foreground,
of a label or of a region improves Dice, and pickles the chosen functions with their arguments
(``nnunetv2.postprocessing.remove_connected_components``; ``nnUNetv2_apply_postprocessing`` runs them on the
predicted label maps in order). The exporter reads that pickle without executing it and writes each step into the
manifest; the runtime never unpickles anything. A step here is ``remove_all_but_largest_component_from_segmentation``:
the voxels of the given labels and regions (a region: several labels together) form one mask, every connected
component of it but the largest (all of them when several tie) is set to ``background_label``. Components are
connected through faces, edges and corners (full connectivity: ``skimage.measure.label`` with
``connectivity=None``, which nnU-Net's ``acvl_utils`` calls), here with ``scipy.ndimage.label``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

#: the one post-processing function nnU-Net writes into postprocessing.pkl
KEEP_LARGEST = "remove_all_but_largest_component_from_segmentation"

LabelOrRegion = int | tuple[int, ...]


@dataclass(frozen=True)
class KeepLargestComponent:
    """One step: keep the largest connected component of the union of ``labels_or_regions``."""

    labels_or_regions: tuple[LabelOrRegion, ...]
    background_label: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"function": KEEP_LARGEST, "background_label": self.background_label,
                "labels_or_regions": [list(r) if isinstance(r, tuple) else r for r in self.labels_or_regions]}

    def apply(self, labels: np.ndarray) -> np.ndarray:
        """A new label map with the step applied (``labels`` is not changed, as nnU-Net's function copies)."""
        mask = np.isin(labels, [v for r in self.labels_or_regions for v in (r if isinstance(r, tuple) else (r,))])
        keep = largest_components(mask)
        out = labels.copy()
        out[mask & ~keep] = self.background_label
        return out


def largest_components(mask: np.ndarray) -> np.ndarray:
    """True on the largest connected component(s) of a boolean mask (full connectivity; ties all kept)."""
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    components, count = ndimage.label(mask, structure=structure)
    if count == 0:
        return np.zeros(mask.shape, dtype=bool)
    sizes = np.bincount(components.ravel())[1:]
    keep = np.flatnonzero(sizes == sizes.max()) + 1
    return np.isin(components, keep)


def apply_postprocessing(labels: np.ndarray, steps: Sequence[KeepLargestComponent]) -> np.ndarray:
    """Every step in order, as ``nnunetv2.postprocessing.remove_connected_components.apply_postprocessing``."""
    for step in steps:
        labels = step.apply(labels)
    return labels


def parse_postprocessing(node: Any, problems: list[str]) -> tuple[KeepLargestComponent, ...]:
    """The manifest's ``nnunet.postprocessing`` list; each problem is appended to ``problems``."""
    if node is None:
        return ()
    if not isinstance(node, list):
        problems.append(f"'nnunet.postprocessing' must be a list of steps, got {type(node).__name__}")
        return ()
    steps = []
    for i, entry in enumerate(node):
        where = f"'nnunet.postprocessing[{i}]'"
        if not isinstance(entry, dict) or entry.get("function") != KEEP_LARGEST:
            function = entry.get("function") if isinstance(entry, dict) else entry
            problems.append(f"{where} function is {function!r}; reproduced: {KEEP_LARGEST}")
            continue
        targets = entry.get("labels_or_regions")
        background = entry.get("background_label", 0)
        if isinstance(targets, int) and not isinstance(targets, bool):
            targets = [targets]
        parsed = [_label_or_region(t) for t in targets] if isinstance(targets, list) and targets else [None]
        if None in parsed or not _label(background):
            problems.append(f"{where} needs labels_or_regions (labels >= 0 or lists of them) and an integer "
                            f"background_label, got {targets!r} and {background!r}")
            continue
        steps.append(KeepLargestComponent(tuple(parsed), int(background)))  # type: ignore[arg-type]
    return tuple(steps)


def _label(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _label_or_region(v: Any) -> LabelOrRegion | None:
    if _label(v):
        return int(v)
    if isinstance(v, list) and v and all(_label(i) for i in v):
        return tuple(int(i) for i in v)
    return None
