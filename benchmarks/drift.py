"""When does the drift alarm fire? A reference population of phantom CTs, then shifted populations.

Every series is a phantom CT written as DICOM, read by the runtime's loader and segmented by the bundled model
through ONNX Runtime, exactly as in the service; :func:`edge_runtime.quality.drift.series_features` takes its
features and a :class:`~edge_runtime.quality.drift.DriftMonitor` compares its window with the reference.

1. The reference: ``--reference`` phantoms (``export.drift_reference.COMPACT_GEOMETRY``: 160 x 160 slices at
   1.4-1.6 mm, 2-3 mm slices, 210-230 mm along z, scanners "Model A" / "Model B"), as ``edge-export
   drift-reference --compact`` records it.
2. A null stream: ``--null`` more phantoms from the same population (other seeds) fill the window; any level
   other than ``ok`` here is a false alarm.
3. Each shift: starting from the window the null stream left, ``--shifted`` phantoms (the same seeds for every
   shift, so that only the shift differs) altered before they are written:

   - ``rescale +50 HU``: a calibration or rescale-intercept error of 50 HU;
   - ``rescale x0.85``: a wrong rescale slope (values scaled around -1000 HU, air stays air);
   - ``smooth kernel``: a soft reconstruction kernel (Gaussian, sigma 1.2 voxels in-plane);
   - ``sharp kernel``: a sharp kernel (unsharp masking, noise and edges amplified 2x);
   - ``MR as CT``: MR-like intensities (a T1-like map of the tissues) in a series the model takes for CT: the
     service refuses modality MR outright, so this is the case of an MR series relabelled on the way;
   - ``new scanner``: a third scanner model, images unchanged (only the scanner mix moves).

Prints a Markdown table (series after the shift until the first ``watch`` and ``alarm``, features in alarm at
the end, largest PSI) and writes ``benchmarks/results/NAME.md`` / ``.json`` and ``benchmarks/figures/NAME.png``
(``--name``, default ``drift``). Each series' features are kept in ``benchmarks/results/drift-features``, so a
second run with another window segments nothing again. Usage::

    python -m benchmarks.drift [--reference 20] [--null 20] [--shifted 10] [--window 20] [--min-series 10]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.report import RESULTS, command, write_results
from edge_runtime.inference.package import DEFAULT_PACKAGE, ModelPackage
from edge_runtime.inference.runner import load_runner
from edge_runtime.quality.drift import LEVELS, DriftMonitor, build_reference, parse_drift_reference
from export.drift_reference import COMPACT_GEOMETRY, PHANTOM_SCANNERS, Transform, features_of, phantom_volumes

FIGURES = Path(__file__).resolve().parent / "figures"
SEEDS = {"reference": 6_100_000, "null": 6_200_000, "shifted": 6_300_000}


def _gauss(hu: np.ndarray, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return np.asarray(gaussian_filter(hu, sigma=(0.0, sigma, sigma)))


def _mr_like(hu: np.ndarray, _spacing: Sequence[float]) -> np.ndarray:
    """A T1-like grey scale: air dark, fat bright, soft tissue mid-grey, bone dark."""
    return np.interp(hu, [-1000, -100, 0, 60, 300, 1500], [0, 900, 480, 420, 200, 100]).astype(np.float32)


SHIFTS: dict[str, tuple[Transform | None, tuple[tuple[str, str], ...]]] = {
    "rescale +50 HU": (lambda hu, _: hu + 50.0, PHANTOM_SCANNERS),
    "rescale x0.85": (lambda hu, _: (hu + 1000.0) * 0.85 - 1000.0, PHANTOM_SCANNERS),
    "smooth kernel": (lambda hu, _: _gauss(hu, 1.2), PHANTOM_SCANNERS),
    "sharp kernel": (lambda hu, _: hu + 2.0 * (hu - _gauss(hu, 1.0)), PHANTOM_SCANNERS),
    "MR as CT": (_mr_like, PHANTOM_SCANNERS),
    "new scanner": (None, (("Phantom", "Model C"),)),
}


def _features(
    name: str, count: int, seed: int, package: ModelPackage, runner: Any, **kwargs: Any
) -> list[dict[str, Any]]:
    """The features of ``count`` phantoms from ``seed``, each kept in ``benchmarks/results/drift-features`` so
    that another run (another window, more series) segments only what it has not seen."""
    folder = RESULTS / "drift-features" / package.model_sha256[:12] / name.replace(" ", "_")
    folder.mkdir(parents=True, exist_ok=True)
    out, t0, made = [], time.perf_counter(), 0
    for s in range(seed, seed + count):
        cache = folder / f"{s}.json"
        if not cache.exists():
            volumes = phantom_volumes(1, seed=s, geometry=COMPACT_GEOMETRY, **kwargs)
            cache.write_text(json.dumps(features_of(volumes, package, runner)[0]))
            made += 1
        out.append(json.loads(cache.read_text()))
    print(f"  {count} series ({made} segmented now) in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def _feed(monitor: DriftMonitor, stream: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Observe each series; per step the highest level, the feature with the largest PSI, and every PSI."""
    steps = []
    for features in stream:
        results = monitor.observe(features)
        top = max(results, key=lambda r: r.psi)
        steps.append(
            {
                "level": max((r.level for r in results), key=LEVELS.index),
                "top": top.feature,
                "psi": {r.feature: r.psi for r in results},
                "p": {r.feature: r.p_value for r in results},
                "alarm": sorted(r.feature for r in results if r.level == "alarm"),
            }
        )
    return steps


def _first(steps: list[dict[str, Any]], level: str) -> int | None:
    return next((i + 1 for i, s in enumerate(steps) if LEVELS.index(s["level"]) >= LEVELS.index(level)), None)


def _plot(null: list[dict[str, Any]], shifted: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Top: the largest PSI over the features; bottom: the smallest test p-value times the number of features
    (the Bonferroni-adjusted p a level is judged by). A level needs both past their lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def psi(s: dict[str, Any]) -> float:
        return max(s["psi"].values())

    def adjusted_p(s: dict[str, Any]) -> float:
        return max(1e-12, min(1.0, min(s["p"].values()) * len(s["p"])))

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    n0 = len(null)
    for ax, value in ((top, psi), (bottom, adjusted_p)):
        ax.plot(range(1, n0 + 1), [value(s) for s in null], color="grey", label="reference population")
        for name, steps in shifted.items():
            line = ax.plot(range(n0 + 1, n0 + len(steps) + 1), [value(s) for s in steps], label=name)[0]
            if (k := _first(steps, "alarm")) is not None:
                ax.plot([n0 + k], [value(steps[k - 1])], "o", color=line.get_color())
        ax.axvline(n0 + 0.5, color="black", lw=0.6)
        ax.set_yscale("log")
    marks = ((top, 1.15, ((0.1, "PSI watch"), (0.25, "PSI alarm"))), (bottom, 0.6, ((0.05, "watch"), (0.01, "alarm"))))
    for ax, above, lines in marks:  # the bottom axis is inverted: "above the line" is a smaller value
        for y, what in lines:
            ax.axhline(y, color="black", lw=0.6, ls="--")
            ax.text(1, y * above, f"{what} {y}", fontsize=8)
    top.set_ylabel("largest PSI over the features")
    bottom.set_ylabel("smallest p x features (Bonferroni)")
    bottom.invert_yaxis()
    bottom.set_xlabel("series fed to the monitor (the shifted population starts after the vertical line)")
    top.set_title("Drift monitor: reference phantoms, then shifted ones (dot: first alarm)")
    top.legend(fontsize=8, loc="upper left", ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", type=int, default=20, help="phantoms in the reference (default 20)")
    ap.add_argument("--null", type=int, default=20, help="phantoms of the same population fed first (default 20)")
    ap.add_argument("--shifted", type=int, default=10, help="phantoms per shifted population (default 10)")
    ap.add_argument("--window", type=int, default=20, help="drift window (default 20)")
    ap.add_argument("--min-series", type=int, default=10, help="series the window needs before a level (default 10)")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads (default 1)")
    ap.add_argument("--only", action="append", choices=sorted(SHIFTS), help="run only these shifts")
    ap.add_argument("--name", default="drift", help="results/NAME.md, .json and figures/NAME.png (default drift)")
    args = ap.parse_args(argv)

    package = ModelPackage.load(DEFAULT_PACKAGE)
    runner = load_runner(package, "onnxruntime", "cpu", threads=args.threads)
    print(f"reference: {args.reference} phantoms", flush=True)
    samples = _features("reference", args.reference, SEEDS["reference"], package, runner)
    section = build_reference(samples, "benchmark phantoms")
    problems: list[str] = []
    reference = parse_drift_reference(section, problems)
    assert reference is not None and not problems, problems
    state = RESULTS / "drift-window.json"
    state.parent.mkdir(parents=True, exist_ok=True)
    state.unlink(missing_ok=True)
    print(f"null stream: {args.null} phantoms", flush=True)
    base = DriftMonitor(reference, state, window=args.window, min_series=args.min_series)
    null = _feed(base, _features("null", args.null, SEEDS["null"], package, runner))
    shifted: dict[str, list[dict[str, Any]]] = {}
    for name in args.only or list(SHIFTS):
        transform, scanners = SHIFTS[name]
        print(f"{name}: {args.shifted} phantoms", flush=True)
        monitor = copy.copy(base)
        monitor.series, monitor.levels = list(base.series), dict(base.levels)
        seed = SEEDS["shifted"]
        stream = _features(name, args.shifted, seed, package, runner, transform=transform, scanners=scanners)
        shifted[name] = _feed(monitor, stream)
    runner.close()

    false_alarms = sum(1 for s in null if s["level"] != "ok")
    lines = [
        f"Window {args.window} series (a level needs {args.min_series}); reference {args.reference} phantoms; "
        f"null stream {args.null} phantoms of the same population: {false_alarms} step(s) not ok "
        f"(largest PSI {max(max(s['psi'].values()) for s in null):.3f}).",
        "",
        "| population fed after the null stream | series to watch | series to alarm | in alarm at the end | "
        "largest PSI at the end |",
        "|---|---:|---:|---|---:|",
    ]
    for name, steps in shifted.items():
        end = steps[-1]
        top = max(end["psi"], key=lambda f: end["psi"][f])
        lines.append(
            f"| {name} | {_first(steps, 'watch') or '-'} | {_first(steps, 'alarm') or 'no alarm'} | "
            f"{', '.join(end['alarm']) or '-'} | {end['psi'][top]:.2f} ({top}) |"
        )
    lines += ["", f"Command: `{command('drift', argv)}`"]
    markdown = "\n".join(lines)
    print(markdown)
    figure = FIGURES / f"{args.name}.png"
    _plot(null, shifted, figure)
    data = {"args": vars(args), "reference": section, "null": null, "shifted": shifted}
    print(f"wrote {write_results(args.name, markdown, data)} and {figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
