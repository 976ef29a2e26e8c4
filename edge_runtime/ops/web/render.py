"""The status page as HTML, rendered on the server from plain values: no template engine, no front-end build.

Everything the page shows is escaped here (:func:`html.escape`); the only markup that does not come from these
functions is the inline style and the small script (auto refresh, the larger view on click). The script swaps in
the same page fetched again, so the page also works, without refresh, with scripts off.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from html import escape

from edge_runtime.ops.web.index import SeriesView
from edge_runtime.ops.web.quality import DicePoint, percentile

REFRESH_SECONDS = 5
STATES = ("receiving", "queued", "processing", "done", "failed")
STAGE_COLOURS = {
    "receive": "#8da0cb",
    "wait": "#c7c7c7",
    "load": "#66c2a5",
    "preprocess": "#a6d854",
    "inference": "#fc8d62",
    "postprocess": "#ffd92f",
    "seg": "#e78ac3",
    "measurements": "#e5c494",
    "send": "#7f7f7f",
}
STAGE_NAMES = {"receive": "receive", "wait": "completion wait", "seg": "SEG", "send": "send"}


@dataclass(frozen=True)
class SeriesEntry:
    """One row of the series table: the index's view, the header's description and the pictures' URLs."""

    view: SeriesView
    description: dict[str, str]
    #: (plane, thumbnail URL, large view URL)
    pictures: Sequence[tuple[str, str, str]]


@dataclass(frozen=True)
class QualityView:
    dice: dict[str, list[DicePoint]]
    colours: dict[str, tuple[int, int, int]]
    #: seconds from the last instance to the result written, and to it sent to every destination
    latency_written: list[float]
    latency_sent: list[float]
    #: per result, newest first: segment name -> (mean confidence, flagged low)
    confidence: list[tuple[str, dict[str, tuple[float, bool]]]]
    drift: list[tuple[str, dict[str, str], float]]


def page(
    title: str, now: Sequence[tuple[str, str]], entries: Sequence[SeriesEntry], quality: QualityView, state: str | None
) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>"
        f"<header><h1>{escape(title)}</h1></header>"
        f"{_now(now)}{_series(entries, state)}{_quality(quality)}"
        '<dialog id="viewer"><img alt="larger view"><p class="muted">click to close</p></dialog>'
        f"<script>{_SCRIPT}</script></body></html>\n"
    )


# -- sections ----------------------------------------------------------------------------------------------


def _now(items: Sequence[tuple[str, str]]) -> str:
    rows = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in items)
    stamp = f"updated {_clock(time.time())}, every {REFRESH_SECONDS} s"
    return f'<section id="now"><h2>Now</h2><dl>{rows}</dl><p class="muted">{escape(stamp)}</p></section>'


def _series(entries: Sequence[SeriesEntry], state: str | None) -> str:
    options = "".join(
        f'<option value="{s}"{" selected" if s == (state or "") else ""}>{s or "all states"}</option>'
        for s in ("", *STATES)
    )
    head = "".join(
        f"<th>{h}</th>"
        for h in ("series", "date", "modality", "description", "state", "slices", "timeline", "pictures")
    )
    body = "".join(_series_row(e) for e in entries) or '<tr><td colspan="8" class="muted">no series yet</td></tr>'
    return (
        '<section id="series"><h2>Series</h2>'
        '<form method="get" action="/"><label>show <select name="state" onchange="this.form.submit()">'
        f"{options}</select></label><noscript><button>filter</button></noscript></form>"
        f'<table><thead><tr>{head}</tr></thead><tbody id="series-body">{body}</tbody></table>'
        f'<p class="muted">{_legend()}</p></section>'
    )


def _series_row(entry: SeriesEntry) -> str:
    v, d = entry.view, entry.description
    date = _dicom_date(d.get("SeriesDate") or d.get("StudyDate") or "")
    state = f'<span class="state {escape(v.state)}">{escape(v.state)}</span>'
    if v.reason:
        kind = "reason" if v.state == "failed" else "muted"
        state += f'<div class="{kind}">{escape(v.reason)}</div>'
    pictures = "".join(
        f'<a class="pic" href="{escape(large)}" title="{escape(plane)}">'
        f'<img src="{escape(small)}" alt="{escape(plane)}" data-plane="{escape(plane)}"></a>'
        for plane, small, large in entry.pictures
    )
    cells = (
        f'<code>{escape(v.key_hash)}</code><div class="muted">{escape(_clock(v.last_received))}</div>',
        escape(date),
        escape(d.get("Modality") or v.modality),
        escape(d.get("SeriesDescription", "")),
        state,
        str(v.instances),
        _timeline(v.timeline()),
        pictures,
    )
    tds = "".join(f"<td>{c}</td>" for c in cells)
    return f'<tr class="series" data-series="{escape(v.key_hash)}" data-state="{escape(v.state)}">{tds}</tr>'


def _timeline(steps: Sequence[tuple[str, float]]) -> str:
    total = sum(s for _, s in steps)
    if total <= 0:
        return ""
    parts = "".join(
        f'<span style="flex-grow:{seconds / total:.4f};background:{STAGE_COLOURS.get(name, "#999")}" '
        f'title="{escape(STAGE_NAMES.get(name, name))} {seconds:.2f} s" data-stage="{escape(name)}"></span>'
        for name, seconds in steps
        if seconds > 0
    )
    return f'<div class="bar">{parts}</div><div class="muted">{total:.1f} s</div>'


def _legend() -> str:
    return " ".join(
        f'<span class="key" style="background:{colour}"></span>{escape(STAGE_NAMES.get(name, name))}'
        for name, colour in STAGE_COLOURS.items()
    )


def _quality(q: QualityView) -> str:
    parts = [
        "<h3>Latency over the last 24 h, from the last instance received</h3>"
        f'<p id="latency">to the result written: {escape(_percentiles(q.latency_written))}<br>'
        f"to the result sent to every destination: {escape(_percentiles(q.latency_sent))}</p>"
    ]
    parts.append("<h3>Agreement with reference segmentations (Dice)</h3>")
    if q.dice:
        parts.append(
            '<div class="charts">'
            + "".join(
                _dice_chart(name, points, q.colours.get(name, (80, 80, 80))) for name, points in sorted(q.dice.items())
            )
            + "</div>"
        )
    else:
        parts.append('<p class="muted">no reference segmentation compared yet</p>')
    if q.confidence:
        names = sorted({n for _, values in q.confidence for n in values})
        head = "".join(f"<th>{escape(n)}</th>" for n in names)
        rows = "".join(
            f"<tr><td><code>{escape(key)}</code></td>"
            + "".join(_confidence_cell(values.get(n)) for n in names)
            + "</tr>"
            for key, values in q.confidence
        )
        parts.append(
            f"<h3>Confidence (mean per segment, newest results)</h3><table><tr><th>series</th>{head}</tr>{rows}</table>"
        )
    if q.drift:
        parts.append(f"<h3>Drift against the package's reference</h3>{_drift(q.drift)}")
    return f'<section id="quality"><h2>Quality over time</h2>{"".join(parts)}</section>'


def _drift(samples: Sequence[tuple[str, dict[str, str], float]]) -> str:
    """One row per label set (model and feature), one column per gauge (PSI, p-value, level ...)."""
    columns = sorted({name for name, _, _ in samples})
    rows: dict[str, dict[str, float]] = {}
    for name, labels, value in samples:
        rows.setdefault(_labels(labels), {})[name] = value
    head = "".join(f"<th>{escape(c.removeprefix('edge_drift_'))}</th>" for c in columns)
    body = "".join(
        f"<tr><td>{escape(key)}</td>"
        + "".join(f"<td>{values[c]:.4g}</td>" if c in values else "<td></td>" for c in columns)
        + "</tr>"
        for key, values in rows.items()
    )
    return f'<table id="drift"><tr><th></th>{head}</tr>{body}</table>'


def _confidence_cell(value: tuple[float, bool] | None) -> str:
    if value is None:
        return "<td></td>"
    mean, low = value
    return f'<td class="low" title="below the package\'s threshold">{mean:.3f}</td>' if low else f"<td>{mean:.3f}</td>"


def _dice_chart(name: str, points: Sequence[DicePoint], colour: tuple[int, int, int]) -> str:
    """A small SVG line of Dice (0 to 1) against time, one dot per comparison."""
    width, height, pad = 220, 80, 6
    t0, t1 = points[0].time, points[-1].time
    span = max(t1 - t0, 1e-9)

    def xy(p: DicePoint) -> tuple[float, float]:
        x = pad + (width - 2 * pad) * ((p.time - t0) / span if len(points) > 1 else 0.5)
        return x, pad + (height - 2 * pad) * (1.0 - p.dice)

    stroke = "#{:02x}{:02x}{:02x}".format(*colour)
    line = " ".join(f"{x:.1f},{y:.1f}" for x, y in map(xy, points))
    dots = "".join(
        f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{stroke}"><title>{escape(_clock(p.time))} '
        f"{escape(p.series)} Dice {p.dice:.3f}</title></circle>"
        for p, (x, y) in zip(points, map(xy, points), strict=True)
    )
    latest = points[-1].dice
    return (
        f'<figure class="dice" data-label="{escape(name)}">'
        f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img">'
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fafafa"/>'
        f'<line x1="{pad}" x2="{width - pad}" y1="{pad}" y2="{pad}" stroke="#ddd"/>'
        f'<line x1="{pad}" x2="{width - pad}" y1="{height - pad}" y2="{height - pad}" stroke="#ddd"/>'
        f'<text x="{width - pad}" y="{pad + 10}" text-anchor="end" font-size="9" fill="#999">1</text>'
        f'<text x="{width - pad}" y="{height - pad - 2}" text-anchor="end" font-size="9" fill="#999">0</text>'
        f'<polyline points="{line}" fill="none" stroke="{stroke}" stroke-width="1.5"/>{dots}</svg>'
        f"<figcaption>{escape(name)}: latest {latest:.3f}, {len(points)} comparison{'s' if len(points) > 1 else ''}"
        "</figcaption></figure>"
    )


def _percentiles(seconds: Sequence[float]) -> str:
    p50, p95 = percentile(seconds, 50), percentile(seconds, 95)
    if p50 is None or p95 is None:
        return "no result"
    return f"p50 {p50:.1f} s, p95 {p95:.1f} s ({len(seconds)} result{'s' if len(seconds) > 1 else ''})"


# -- small formats -----------------------------------------------------------------------------------------


def _clock(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def _dicom_date(value: str) -> str:
    return f"{value[:4]}-{value[4:6]}-{value[6:8]}" if len(value) == 8 and value.isdigit() else value


def _labels(labels: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(labels.items()))


def duration(seconds: float) -> str:
    """``3 d 4 h``, ``2 h 05 min``, ``4 min 09 s`` or ``12 s``."""
    s = int(seconds)
    if s >= 86400:
        return f"{s // 86400} d {s % 86400 // 3600} h"
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s} s"


def joined(items: Iterable[str], empty: str = "none") -> str:
    text = ", ".join(items)
    return text or empty


_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0 1.5em 2em;color:#222;background:#fff}
header{display:flex;align-items:baseline;gap:1em;border-bottom:1px solid #ddd}
h1{font-size:1.3em}h2{font-size:1.1em;margin-top:1.5em}h3{font-size:1em;margin-bottom:.3em}
.muted{color:#777;font-size:.9em}
dl{display:grid;grid-template-columns:max-content 1fr;gap:.2em 1.5em;margin:0}dt{font-weight:600}dd{margin:0}
table{border-collapse:collapse}th,td{padding:.35em .6em;border-bottom:1px solid #eee;text-align:left;vertical-align:top}
.state{font-weight:600}.state.done{color:#1a7f37}.state.failed{color:#c62828}.state.processing{color:#b26a00}
.low{color:#c62828;font-weight:600}
.reason{color:#c62828;font-size:.9em;max-width:22em}
.bar{display:flex;width:220px;height:12px;border-radius:2px;overflow:hidden;background:#f3f3f3}
.key{display:inline-block;width:.8em;height:.8em;margin:0 .25em 0 .8em;vertical-align:middle}
tbody td:last-child,tbody td:nth-child(2){white-space:nowrap}
a.pic img{width:88px;height:88px;margin-right:4px;background:#000;border:1px solid #ccc;image-rendering:auto}
.charts{display:flex;flex-wrap:wrap;gap:1em}figure{margin:0}figcaption{font-size:.9em}
dialog{padding:.5em;border:1px solid #999}dialog img{max-width:90vw;max-height:85vh;display:block}
form{margin:.3em 0 .6em}
"""

_SCRIPT = """
(function(){
  const viewer=document.getElementById("viewer");
  document.addEventListener("click",function(ev){
    const a=ev.target.closest("a.pic");
    if(!a)return;
    ev.preventDefault();
    viewer.querySelector("img").src=a.href;
    viewer.showModal();
  });
  viewer.addEventListener("click",function(){viewer.close();});
  setInterval(async function(){
    if(viewer.open)return;
    try{
      const r=await fetch(location.href,{credentials:"same-origin"});
      if(!r.ok)return;
      const doc=new DOMParser().parseFromString(await r.text(),"text/html");
      for(const id of ["now","series-body","quality"]){
        const old=document.getElementById(id),fresh=doc.getElementById(id);
        if(old&&fresh)old.replaceWith(fresh);
      }
    }catch(e){}
  },REFRESH_MS);
})();
""".replace("REFRESH_MS", str(REFRESH_SECONDS * 1000))
