"""The package's confidence thresholds (the manifest's ``"confidence"`` section) and per-segment summaries.

The pipeline gives each voxel the softmax probability of the label it took (:mod:`edge_runtime.inference.pipeline`).
Per segment two numbers summarise it: the mean over the segment's voxels, and the share of its voxels below
``low``. A segment whose mean is below ``flag_below`` is flagged in the SR, so that a reader sees which
outlines the model itself was unsure of::

    "confidence": {"low": 0.5, "flag_below": 0.7}

Both default to these values when the section is absent. Softmax probabilities are not calibrated
probabilities of being right; they are the model's own certainty, useful to rank and to flag.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ConfidencePolicy:
    #: a voxel whose chosen-label probability is below this is a low-confidence voxel
    low: float = 0.5
    #: a segment whose mean confidence is below this is flagged
    flag_below: float = 0.7


@dataclass(frozen=True)
class SegmentConfidence:
    mean: float
    low_fraction: float
    flagged: bool


def summarise(values: np.ndarray, policy: ConfidencePolicy) -> SegmentConfidence | None:
    """Mean and low-confidence share of one segment's voxel confidences (None for an empty segment)."""
    if values.size == 0:
        return None
    mean = float(values.mean(dtype=np.float64))
    low = float(np.count_nonzero(values < policy.low)) / values.size
    return SegmentConfidence(round(mean, 4), round(low, 4), mean < policy.flag_below)


def parse_confidence(node: Any, problems: list[str]) -> ConfidencePolicy:
    """The manifest's ``"confidence"`` (defaults when absent); appends problems found to ``problems``."""
    if node is None:
        return ConfidencePolicy()
    if not isinstance(node, dict) or set(node) - {"low", "flag_below"}:
        problems.append(f"'confidence' must be an object with low and/or flag_below, got {node!r}")
        return ConfidencePolicy()
    values = {}
    for key in ("low", "flag_below"):
        v = node.get(key, getattr(ConfidencePolicy, key))
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
            problems.append(f"'confidence.{key}' must be a number in [0, 1], got {v!r}")
            v = getattr(ConfidencePolicy, key)
        values[key] = float(v)
    return ConfidencePolicy(**values)
