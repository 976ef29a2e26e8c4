"""Quality over time for the status page, from what the service already keeps; nothing is computed here.

- Agreement: every comparison with a reference SEG is a line of ``<output>/validation.jsonl``
  (:mod:`edge_runtime.quality.agreement`); the page plots each label's Dice against time.
- Latency: seconds from a series' last instance to its result sent, p50 and p95 over the last day.
- Confidence: when the pipeline reports it, each segment of ``measurements.json`` carries its
  ``mean_confidence`` (and ``low_confidence`` when it is below the package's threshold); shown for the newest
  results.
- Drift: any gauge in the service's registry whose name says ``drift``.

Whatever the service does not have (no references yet, a pipeline without confidence) is simply absent.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

#: the newest part of validation.jsonl that is read (a line is a few hundred bytes)
HISTORY_TAIL_BYTES = 2 * 1024 * 1024


@dataclass(frozen=True)
class DicePoint:
    time: float
    dice: float
    series: str


def dice_history(path: Path) -> dict[str, list[DicePoint]]:
    """Dice per label, oldest first, from the newest :data:`HISTORY_TAIL_BYTES` of ``validation.jsonl``."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - HISTORY_TAIL_BYTES))
            tail = f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return {}
    lines = tail.splitlines()[1:] if size > HISTORY_TAIL_BYTES else tail.splitlines()  # the first may be cut
    history: dict[str, list[DicePoint]] = {}
    for line in lines:
        try:
            record = json.loads(line)
            when = datetime.strptime(record["time"], "%Y-%m-%dT%H:%M:%S%z").timestamp()
            labels = record["labels"].items()
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # a line being appended, or one from a format this version does not know
        for name, values in labels:
            dice = values.get("dice") if isinstance(values, dict) else None
            if isinstance(dice, (int, float)) and math.isfinite(dice):
                history.setdefault(str(name), []).append(DicePoint(when, float(dice), str(record.get("series", ""))))
    return history


def percentile(values: Iterable[float], q: float) -> float | None:
    """The ``q`` (0-100) percentile by linear interpolation between order statistics; None without values."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = (len(ordered) - 1) * q / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def confidence(result_directory: Path) -> dict[str, tuple[float, bool]]:
    """(mean confidence, flagged as low) per segment from a result's ``measurements.json``, where the pipeline
    reported it."""
    try:
        data = json.loads((result_directory / "measurements.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    found: dict[str, tuple[float, bool]] = {}
    for segment in data.get("segments", []) if isinstance(data, dict) else []:
        value: Any = segment.get("mean_confidence") if isinstance(segment, dict) else None
        if isinstance(value, (int, float)) and math.isfinite(value):
            found[str(segment.get("name", "?"))] = (float(value), segment.get("low_confidence") is True)
    return found


def drift_gauges(registry: CollectorRegistry) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every gauge whose name mentions drift."""
    return [
        (sample.name, dict(sample.labels), float(sample.value))
        for family in registry.collect()
        if family.type == "gauge" and "drift" in family.name
        for sample in family.samples
    ]
