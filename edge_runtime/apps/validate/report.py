"""report.json: the settings, the configurations, every case, and the statistics per structure and metric.

Structures are keyed by their reference type code (see :mod:`edge_runtime.quality.matching`) and ordered by
the first configuration's label values. Per configuration, structure and metric: :func:`summarize` over the
cases that matched the structure; with two configurations, the same over the paired differences B - A.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_runtime.apps.validate.discover import Discovery
from edge_runtime.apps.validate.stats import summarize

if TYPE_CHECKING:
    from edge_runtime.apps.validate.configs import LoadedConfig

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

REPORT_FORMAT = 1


@dataclass
class Outcome:
    """What became of the cases of one run: evaluated (report records), skipped and failed."""

    cases: list[dict[str, Any]]
    skipped: list[dict[str, Any]]
    failed: list[dict[str, Any]]


def config_title(report: dict[str, Any], index: int) -> str:
    """``A: name version (runner)``: how the Markdown report and the plots name a configuration."""
    c = report["configs"][index]
    return f"{c['id']}: {c['package']['name']} {c['package']['version']} ({c['runner']})"


def metric_values(cases: Sequence[dict[str, Any]], cid: str, key: str, metric: str) -> list[float]:
    """One configuration's values of a metric for a structure, over the cases that matched it."""
    out = []
    for r in cases:
        m = r["results"][cid]["metrics"].get(key)
        if m is not None and m.get(metric) is not None:
            out.append(float(m[metric]))
    return out


def build_report(
    root: Path,
    loaded: Sequence[LoadedConfig],
    discovery: Discovery,
    outcome: Outcome,
    *,
    resamples: int,
    confidence: float,
    seed: int,
    surface: bool,
) -> dict[str, Any]:
    """report.json's dict, without the plots (``plots`` and ``plots_note`` are added once they are drawn)."""
    from edge_runtime import __version__

    ids = [item.id for item in loaded]
    metrics = [m for m in METRICS if surface or m not in SURFACE_METRICS]
    cases = outcome.cases
    labels, unmatched = _structures(cases, ids)
    stats: dict[str, Any] = {"resamples": resamples, "confidence": confidence, "seed": seed}
    aggregate = {
        cid: {
            info["key"]: {m: summarize(metric_values(cases, cid, info["key"], m), **stats) for m in metrics}
            for info in labels
            if info["cases"][cid]
        }
        for cid in ids
    }
    keys = [info["key"] for info in labels]
    paired = _paired(cases, ids, keys, metrics, stats) if len(ids) == 2 else None
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
            "skipped": len(outcome.skipped),
            "failed": len(outcome.failed),
        },
        "labels": labels,
        "unmatched": unmatched,
        "discovery_notes": discovery.notes,
        "cases": cases,
        "skipped": outcome.skipped,
        "failed": outcome.failed,
        "aggregate": aggregate,
        "paired_difference": paired,
    }


def _structures(
    cases: Sequence[dict[str, Any]], ids: Sequence[str]
) -> tuple[list[dict[str, Any]], dict[str, dict[str, dict[str, int]]]]:
    """Every structure matched in some case, in the order of the first configuration's label values, and the
    unmatched model labels and reference segments of each configuration with their number of cases."""
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
    return [labels[k] for k in keys], unmatched


def _paired(
    cases: Sequence[dict[str, Any]],
    ids: Sequence[str],
    keys: Sequence[str],
    metrics: Sequence[str],
    stats: dict[str, Any],
) -> dict[str, dict[str, Any]]:
    """Per structure and metric, :func:`summarize` of B - A over the cases where both matched the structure."""
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
    return paired


def json_safe(obj: Any) -> Any:
    """``obj`` for strict JSON: non-finite floats as the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``."""
    if isinstance(obj, float):
        if math.isnan(obj):
            return "NaN"
        if math.isinf(obj):
            return "Infinity" if obj > 0 else "-Infinity"
        return obj
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    return obj
