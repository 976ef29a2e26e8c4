"""report.md: report.json in tables, one section after another, for people."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from edge_runtime.apps.validate.report import HEADLINE, METRIC_TITLES, SHORT_TITLES, config_title

Rows = list[list[str]]


def render_markdown(report: dict[str, Any]) -> str:
    """report.md from report.json's dict."""
    md = _header(report) + _label_matching(report)
    for index in range(len(report["configs"])):
        md += _summary(report, index)
    if report["paired_difference"] is not None:
        md += _paired_difference(report)
    md += _per_case(report) + _not_evaluated(report) + _plots(report)
    return "\n".join(md).rstrip() + "\n"


# -- cells -------------------------------------------------------------------------------------------------


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


def _names(report: dict[str, Any]) -> dict[str, str]:
    """Structure key -> the name the tables give it (the first configuration's model label)."""
    return {info["key"]: info["name"] for info in report["labels"]}


def _pct(report: dict[str, Any]) -> str:
    return f"{100 * report['settings']['confidence']:g}%"


def _headline(report: dict[str, Any]) -> list[str]:
    return [m for m in HEADLINE if m in report["metrics"]]


def _statistics_rows(report: dict[str, Any], per_structure: Mapping[str, Any], *, sd: bool) -> Rows:
    """A row per structure and metric: n, mean, CI, median, (SD,) non-finite count."""
    names = _names(report)
    rows = []
    for key, per in per_structure.items():
        for m in report["metrics"]:
            s = per[m]
            row = [names[key], METRIC_TITLES[m], str(s["n"]), _fmt(s["mean"], m), _ci(s, m), _fmt(s["median"], m)]
            rows.append([*row, _fmt(s["std"], m), _nonfinite(s)] if sd else [*row, _nonfinite(s)])
    return rows


# -- sections ----------------------------------------------------------------------------------------------


def _header(report: dict[str, Any]) -> list[str]:
    st = report["settings"]
    counts = report["counts"]
    md = [
        "# Validation report",
        "",
        f"- Folder: `{report['folder']}`",
        f"- Created: {report['created']} (edge-runtime {report['version']})",
        f"- Cases: {counts['evaluated']} evaluated, {counts['skipped']} skipped, {counts['failed']} failed "
        f"({counts['series']} image series found)",
    ]
    md += [f"- Configuration {config_title(report, i)}" for i in range(len(report["configs"]))]
    md.append(
        f"- Statistics: mean, median and {_pct(report)} percentile bootstrap CI of the mean ({st['resamples']} "
        f"resamples, seed {st['seed']}); NaN and inf values are excluded from the statistics and counted "
        "under *non-finite*.",
    )
    if not st["surface_metrics"]:
        md.append("- Surface metrics (Hausdorff, HD95, ASSD) were not computed (`--no-surface`).")
    return [*md, ""]


def _label_matching(report: dict[str, Any]) -> list[str]:
    ids = [c["id"] for c in report["configs"]]
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
    md = ["## Label matching", ""]
    md += _table(["Label", "Key", "Reference segment(s)", *(f"Model label {cid}" for cid in ids)], rows)
    md.append("")
    unmatched = []
    for cid in ids:
        for kind, title in (("model_labels", "model labels"), ("reference_segments", "reference segments")):
            found = report["unmatched"][cid][kind]
            if found:
                items = ", ".join(f"{n} ({c} case{'s' if c > 1 else ''})" for n, c in found.items())
                unmatched.append(f"- Unmatched {title} ({cid}): {items}")
    return md + (unmatched + [""] if unmatched else [])


def _summary(report: dict[str, Any], index: int) -> list[str]:
    """The headline metrics per structure (mean, CI, median), then every metric, for one configuration."""
    cid = report["configs"][index]["id"]
    agg = report["aggregate"][cid]
    names = _names(report)
    headline = _headline(report)
    pct = _pct(report)
    rows = []
    for key, per in agg.items():
        first = per[headline[0]]
        row = [names[key], str(first["n"] + first["n_nan"] + first["n_inf"])]
        for m in headline:
            row += [f"{_fmt(per[m]['mean'], m)} {_ci(per[m], m)}", _fmt(per[m]["median"], m)]
        rows.append(row)
    header = ["Label", "Cases"]
    for m in headline:
        header += [f"{SHORT_TITLES.get(m, m)} mean [{pct} CI]", "median"]
    md = [f"## Summary per label — {config_title(report, index)}", "", *_table(header, rows)]
    md += ["", f"### All metrics — {cid}", ""]
    md += _table(
        ["Label", "Metric", "n", "Mean", f"{pct} CI", "Median", "SD", "Non-finite"],
        _statistics_rows(report, agg, sd=True),
    )
    return [*md, ""]


def _paired_difference(report: dict[str, Any]) -> list[str]:
    md = [
        "## Paired difference B − A",
        "",
        "Per case and label, the metric of B minus that of A; statistics over the cases where both matched the label.",
        "",
    ]
    md += _table(
        ["Label", "Metric", "Pairs", "Mean B−A", f"{_pct(report)} CI", "Median B−A", "Non-finite"],
        _statistics_rows(report, report["paired_difference"], sd=False),
    )
    return [*md, ""]


def _per_case(report: dict[str, Any]) -> list[str]:
    ids = [c["id"] for c in report["configs"]]
    names = _names(report)
    headline = _headline(report)
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
                row += [_fmt(r["results"][cid]["metrics"].get(key, {}).get(m), m) for cid in ids]
            row += [f"{r['results'][cid]['seconds']:.2f}" if n == 0 else "" for cid in ids]
            rows.append(row)
    md = ["## Per case", "", *(_table(header, rows) if rows else ["No case was evaluated."]), ""]
    notes = [(r["case"], note) for r in report["cases"] for note in r["notes"]]
    if notes:
        md += ["Notes:", ""] + [f"- {case}: {note}" for case, note in notes] + [""]
    return md


def _not_evaluated(report: dict[str, Any]) -> list[str]:
    """The skipped and failed cases, and what the folder held that belongs to no case."""
    md: list[str] = []
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
    return md


def _plots(report: dict[str, Any]) -> list[str]:
    md = ["## Plots", ""]
    for name in report["plots"]:
        metric = name.removeprefix("boxplot_").removesuffix(".png")
        md += [f"![{METRIC_TITLES.get(metric, metric)}]({name})", ""]
    if report.get("plots_note"):
        md += [f"_{report['plots_note']}_", ""]
    return md
