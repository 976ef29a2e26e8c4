"""Benchmark edge_runtime.quality.metrics.compare_label_maps on a CT-sized label volume.

Builds a synthetic 512 x 512 x 500 (z, y, x) label map with 100 labels (axis-aligned ellipsoids, radii
log-uniform from 8 to 120 voxels in-plane, about 15 % of the volume labelled) and a perturbed copy
(shifted by (1, 2, -1) voxels; of every three labels one eroded by two voxels, one dilated by one), then
times, median of ``--repeats`` runs:

* ``compare_label_maps(..., surface=False)``: overlap metrics of all labels;
* ``compare_label_maps(...)``: overlap + surface metrics of all labels, in one thread and with
  ``workers=os.cpu_count()``;
* ``surface_distances`` + HD / HD95 / ASSD per label from full-volume masks, on three anchor labels
  (the smallest, the median and the largest by volume): the same work the references do;

and, once each, the independent reference implementations as anchors in the same run:

* SimpleITK ``LabelOverlapMeasuresImageFilter`` over all labels (vs our overlap-only time);
* SimpleITK surface metrics on the anchor labels (``LabelContour`` + ``HausdorffDistanceImageFilter``
  + two ``SignedMaurerDistanceMap`` on the whole volume, the way one calls them; same definition as ours);
* DeepMind ``surface-distance`` on the anchor labels (crops to the union box itself), if installed.

Prints a Markdown table and writes it to ``benchmarks/results/metrics.md``, with the raw figures in
``benchmarks/results/metrics.json``. Usage::

    python -m benchmarks.bench_metrics [--shape 500 512 512] [--labels 100] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import scipy
from scipy import ndimage

from benchmarks.harness import paint_ellipsoid
from benchmarks.report import RESULTS, table_head, write_results
from edge_runtime.quality.metrics import compare_label_maps, surface_distances

SPACING = (1.25, 0.78, 0.78)  # (z, y, x) mm, a typical abdominal CT


def make_volumes(shape: tuple[int, int, int], n_labels: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Reference label map of ellipsoids and a perturbed "prediction" of it."""
    rng = np.random.default_rng(seed)
    ref = np.zeros(shape, np.uint8)
    # radii from a few voxels (lesions) to ~60 voxels (liver-sized), log-uniform
    radii_all = np.exp(rng.uniform(np.log(8), np.log(120), (n_labels, 3)))
    radii_all[:, 0] *= 0.6  # fewer voxels along z (thicker slices)
    for label, radii in enumerate(radii_all, start=1):
        paint_ellipsoid(ref, label, radii, rng)
    pred = np.roll(ref, (1, 2, -1), axis=(0, 1, 2))
    boxes = ndimage.find_objects(pred)
    for label, box in enumerate(boxes, start=1):
        if box is None or label % 3 == 0:
            continue
        box = tuple(slice(max(s.start - 2, 0), s.stop + 2) for s in box)
        sub = pred[box]
        mask = sub == label
        if label % 3 == 1:  # under-segmented
            sub[mask & ~ndimage.binary_erosion(mask, iterations=2)] = 0
        else:  # over-segmented into background
            sub[ndimage.binary_dilation(mask, iterations=1) & (sub == 0)] = label
    return pred, ref


def timed(fn: Callable[[], Any], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def sitk_overlap(sitk: Any, pred: np.ndarray, ref: np.ndarray) -> None:
    f = sitk.LabelOverlapMeasuresImageFilter()
    f.Execute(sitk.GetImageFromArray(pred), sitk.GetImageFromArray(ref))
    for label in range(1, int(ref.max()) + 1):
        f.GetDiceCoefficient(label)


def sitk_surface(sitk: Any, pred: np.ndarray, ref: np.ndarray, labels: list[int]) -> dict[int, float]:
    """HD, HD95 and ASSD per label with ITK filters on the whole volume."""
    out = {}
    for label in labels:
        contours = []
        for arr in (pred, ref):
            img = sitk.GetImageFromArray(np.pad(arr == label, 1).astype(np.uint8))
            img.SetSpacing(SPACING[::-1])
            contours.append(sitk.LabelContour(img, fullyConnected=False, backgroundValue=0))
        hd = sitk.HausdorffDistanceImageFilter()
        hd.Execute(contours[0], contours[1])
        on = [sitk.GetArrayFromImage(c).astype(bool) for c in contours]
        maps = [
            sitk.SignedMaurerDistanceMap(
                c, insideIsPositive=False, squaredDistance=False, useImageSpacing=True
            )
            for c in contours
        ]
        dmaps = [sitk.GetArrayViewFromImage(m) for m in maps]  # views: `maps` keeps the images alive
        d_pr, d_rp = np.abs(dmaps[1][on[0]]), np.abs(dmaps[0][on[1]])
        hd95 = max(np.percentile(d_pr, 95), np.percentile(d_rp, 95))
        out[label] = hd.GetHausdorffDistance() + hd95 + float(np.concatenate([d_pr, d_rp]).mean())
    return out


def ours_surface(pred: np.ndarray, ref: np.ndarray, labels: list[int]) -> None:
    """Like-for-like with the references: per label, full-volume masks in, HD / HD95 / ASSD out."""
    for label in labels:
        d = surface_distances(pred == label, ref == label, SPACING)
        d.hausdorff()
        d.percentile(95)
        d.average_symmetric()


def deepmind_surface(sd: Any, pred: np.ndarray, ref: np.ndarray, labels: list[int]) -> None:
    for label in labels:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            d = sd.compute_surface_distances(ref == label, pred == label, SPACING)
            sd.compute_robust_hausdorff(d, 100)
            sd.compute_robust_hausdorff(d, 95)
            sd.compute_average_surface_distance(d)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(500, 512, 512), metavar=("Z", "Y", "X"))
    parser.add_argument("--labels", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    shape = tuple(args.shape)

    t0 = time.perf_counter()
    pred, ref = make_volumes(shape, args.labels)
    build_s = time.perf_counter() - t0
    counts = np.bincount(ref.ravel(), minlength=args.labels + 1)[1:]
    present = np.flatnonzero(counts) + 1
    # anchor subset: the smallest, the median and the largest label by reference volume
    order = present[np.argsort(counts[present - 1])]
    subset = list(dict.fromkeys([int(order[0]), int(order[len(order) // 2]), int(order[-1])]))
    print(
        f"built {shape} volume, {len(present)} labels, in {build_s:.1f} s; anchor labels {subset}",
        file=sys.stderr,
    )

    rows: list[dict[str, Any]] = []

    def row(what: str, impl: str, labels: int, runs: list[float], ours: float | None = None) -> float:
        """Record a timing; for a reference, ``ours`` is edge_runtime's time for the same work."""
        median = statistics.median(runs)
        rows.append(
            {
                "what": what,
                "implementation": impl,
                "labels": labels,
                "median_s": median,
                "runs_s": runs,
                "per_label_s": median / labels,
                "edge_runtime_speedup": None if ours is None else median / ours,
            }
        )
        print(f"{what:<30} {impl:<32} {median:8.3f} s", file=sys.stderr)
        return median

    n = len(present)
    ours_overlap = row(
        "overlap, all labels",
        "edge_runtime.quality.metrics",
        n,
        timed(lambda: compare_label_maps(pred, ref, SPACING, surface=False), args.repeats),
    )
    row(
        "overlap + surface, all labels",
        "edge_runtime.quality.metrics",
        n,
        timed(lambda: compare_label_maps(pred, ref, SPACING), args.repeats),
    )
    cpus = os.cpu_count() or 1
    if cpus > 1:
        row(
            "overlap + surface, all labels",
            f"edge_runtime.quality.metrics, workers={cpus}",
            n,
            timed(lambda: compare_label_maps(pred, ref, SPACING, workers=cpus), args.repeats),
        )
    ours_subset = row(
        "surface, anchor labels",
        "edge_runtime.quality.metrics",
        len(subset),
        timed(lambda: ours_surface(pred, ref, subset), args.repeats),
    )
    try:
        import SimpleITK as sitk
    except ImportError:
        print("SimpleITK not installed: no SimpleITK anchor", file=sys.stderr)
    else:
        version = f"SimpleITK {sitk.Version.VersionString()}"
        row("overlap, all labels", version, n, timed(lambda: sitk_overlap(sitk, pred, ref), 1), ours_overlap)
        row(
            "surface, anchor labels",
            version,
            len(subset),
            timed(lambda: sitk_surface(sitk, pred, ref, subset), 1),
            ours_subset,
        )
    try:
        import surface_distance as sd
    except ImportError:
        print("surface-distance not installed: no DeepMind anchor", file=sys.stderr)
    else:
        row(
            "surface, anchor labels",
            f"surface-distance (DeepMind) {sd.__version__}",
            len(subset),
            timed(lambda: deepmind_surface(sd, pred, ref, subset), 1),
            ours_subset,
        )

    env = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "shape": list(shape),
        "spacing_mm": list(SPACING),
        "labels": n,
        "anchor_labels": subset,
        "anchor_label_voxels": [int(counts[lab - 1]) for lab in subset],
        "repeats": args.repeats,
    }
    md = [
        "# edge_runtime.quality.metrics benchmark\n",
        f"Volume {shape[0]}x{shape[1]}x{shape[2]} (z, y, x), spacing {SPACING} mm, {n} labels; "
        f"python {env['python']}, numpy {env['numpy']}, scipy {env['scipy']}, {env['cpus']} CPUs. "
        f"Median of {args.repeats} runs for edge_runtime, one run for references. "
        f"Anchor labels {subset} (smallest, median, largest by volume: "
        f"{env['anchor_label_voxels']} voxels).\n",
        *table_head("what", "implementation", "labels", "median s", "s / label", "edge_runtime speedup", left=2),
    ]
    for r in rows:
        speed = "" if r["edge_runtime_speedup"] is None else f"{r['edge_runtime_speedup']:.1f}x"
        md.append(
            f"| {r['what']} | {r['implementation']} | {r['labels']} | {r['median_s']:.3f} | "
            f"{r['per_label_s']:.4f} | {speed} |"
        )
    md.append(
        "\nSpeedup = reference time / edge_runtime time for the same work (overlap: all labels; surface: "
        "the anchor labels, full-volume masks in, HD / HD95 / ASSD out). SimpleITK's surface pipeline runs "
        "on the whole volume per label; surface-distance crops to the union bounding box itself, as we do."
    )
    text = "\n".join(md) + "\n"
    print(text)
    write_results("metrics", text, {"environment": env, "results": rows}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
