"""Box plots of the validation report: one PNG per headline metric, a box per structure and configuration.

matplotlib is optional (the ``validate`` extra); :func:`write_plots` raises ``MissingDependencyError`` without it
and the reports are written without plots.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime import extras
from edge_runtime.apps.validate.report import METRIC_TITLES, PLOT_METRICS, config_title, metric_values

#: configuration A, B
_COLORS = ("#4C72B0", "#DD8452")


def write_plots(report: dict[str, Any], out: Path) -> list[str]:
    """Draw ``boxplot_<metric>.png`` into ``out`` for each of :data:`PLOT_METRICS` in the report; their names."""
    extras.require("matplotlib", feature="validation plots", extra="validate")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    written = []
    for metric in PLOT_METRICS:
        if metric not in report["metrics"] or not report["labels"]:
            continue
        width = max(5.0, 1.1 * len(report["labels"]) * len(report["configs"]) + 1.5)
        fig = Figure(figsize=(width, 4.2), dpi=110, layout="constrained")
        FigureCanvasAgg(fig)
        _draw(fig, report, metric)
        name = f"boxplot_{metric}.png"
        fig.savefig(out / name)
        written.append(name)
    return written


def _draw(fig: Any, report: dict[str, Any], metric: str) -> None:
    """One box per structure and configuration, the cases as jittered dots, n and non-finite counts as ticks."""
    ids = [c["id"] for c in report["configs"]]
    labels = report["labels"]
    ax = fig.add_subplot()
    rng = np.random.default_rng(0)
    offsets = [0.0] if len(ids) == 1 else [-0.2, 0.2]
    box_width = 0.5 if len(ids) == 1 else 0.34
    ticks = []
    for i, info in enumerate(labels):
        lines = [info["name"]]
        for j, cid in enumerate(ids):
            data = np.asarray(metric_values(report["cases"], cid, info["key"], metric), dtype=np.float64)
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
    _annotate(fig, ax, report, metric)


def _annotate(fig: Any, ax: Any, report: dict[str, Any], metric: str) -> None:
    """Titles, the metric's natural range, and a legend of the configurations where there are two."""
    from matplotlib.patches import Patch

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
    if len(report["configs"]) > 1:
        handles = [
            Patch(facecolor=_COLORS[j], alpha=0.45, edgecolor=_COLORS[j], label=config_title(report, j))
            for j in range(len(report["configs"]))
        ]
        fig.legend(handles=handles, fontsize=7, loc="outside upper center", frameon=False)
