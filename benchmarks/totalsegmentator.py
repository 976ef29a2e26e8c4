"""TotalSegmentator's way back, before and after it went slab by slab: peak memory and time of the whole pipeline.

Both sides run ``segment_totalsegmentator`` on the same phantom CT with the same package; they differ only in the
parts' way back (:func:`edge_runtime.inference.totalsegmentator.pipeline.parts_back`). "slabs" is the runtime's
(each part through :mod:`edge_runtime.inference.nnunet.labelmap`); "full size" is the way it went before, kept
here as the reference: every part's logits resampled at full size, then ``np.argmax`` over the classes, the chosen
softmax, the crop put back and the transpose undone, each as a pass over full-size arrays. Each side runs in its
own child process, so its peak memory (``ru_maxrss``) is its own; the label maps of the two are compared::

    .venv/bin/python -m benchmarks.totalsegmentator --make-package DIR    # the test fixture's random-weight parts
    .venv/bin/python -m benchmarks.totalsegmentator --package DIR/package [--shape 200 256 256] [--spacing 1.5 ...]

The default input is already on TotalSegmentator's 1.5 mm grid (a 300 x 512 x 512 CT at 1 x 0.75 x 0.75 mm comes
to 200 x 256 x 256), so TotalSegmentator's own resampling in, the same on both sides, does not hide the way back.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.report import command, fmt, machine, table_head, write_results
from edge_runtime.inference.nnunet.pipeline import chosen_probability
from edge_runtime.inference.nnunet.preprocessing import target_spacing
from edge_runtime.inference.nnunet.resampling import resample

SIDES = ("full size", "slabs")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--package", type=Path, help="a package from edge-export package --totalsegmentator")
    ap.add_argument("--make-package", type=Path, metavar="DIR",
                    help="write the tests' random-weight TotalSegmentator folder and its package under DIR")
    ap.add_argument("--shape", type=int, nargs=3, default=(200, 256, 256), metavar=("Z", "Y", "X"))
    ap.add_argument("--spacing", type=float, nargs=3, default=(1.5, 1.5, 1.5), metavar=("Z", "Y", "X"))
    ap.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--labels-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.make_package:
        return _make_package(args.make_package)
    if args.package is None:
        ap.error("--package is required (or --make-package DIR first)")
    if args.child:
        return _child(args)
    results: dict[str, dict[str, Any]] = {}
    info = machine()
    with tempfile.TemporaryDirectory() as tmp:
        for i, side in enumerate(SIDES):
            out = Path(tmp) / f"{i}.npz"
            child = [sys.executable, "-m", "benchmarks.totalsegmentator", "--child", side, "--labels-out", str(out),
                     "--package", str(args.package), "--shape", *map(str, args.shape),
                     "--spacing", *map(str, args.spacing)]
            proc = subprocess.run(child, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            results[side] = json.loads(proc.stdout.strip().splitlines()[-1])
            with np.load(out) as saved:
                results[side]["labels"], results[side]["confidence"] = saved["labels"], saved["confidence"]
    info["load_avg_end"] = os.getloadavg()
    text = _report(args, argv, results, info)
    print(text)
    write_results("totalsegmentator", text, {"machine": info, "args": {k: str(v) for k, v in vars(args).items()},
                                             "results": results})
    return 0


def _report(args: argparse.Namespace, argv: Sequence[str] | None, results: dict[str, dict[str, Any]],
            info: dict[str, Any]) -> str:
    before, after = (results[side] for side in SIDES)
    differ = int(np.count_nonzero(before.pop("labels") != after.pop("labels")))
    confidence = float(np.abs(before.pop("confidence") - after.pop("confidence")).max())
    load = f"load average {info['load_avg_start'][0]:.1f} at the start, {info['load_avg_end'][0]:.1f} at the end"
    lines = [
        f"TotalSegmentator's pipeline, way back at full size against slab by slab: {'x'.join(map(str, args.shape))} "
        f"CT at {'x'.join(f'{s:g}' for s in args.spacing)} mm, {after['parts']} parts, {after['classes']} output "
        f"channels, {after['windows']} windows, CPU ({info.get('cpus')} cores, {load}).",
        "",
        *table_head("way back", "pipeline wall s", "pipeline CPU s", "peak RSS MiB", "peak RSS before the way back MiB",
                    "way back wall s", "way back CPU s", "way back peak allocation MiB", "of it, its outputs MiB"),
    ]
    for side in SIDES:
        r, w = results[side], results[side]["way_back"]
        lines.append(f"| {side} | {fmt(r['wall_s'])} | {fmt(r['cpu_s'])} | {fmt(r['peak_rss_mib'], 0)} | "
                     f"{fmt(w['rss_before_mib'], 0)} | {fmt(w['wall_s'])} | {fmt(w['cpu_s'])} | "
                     f"{fmt(w['peak_alloc_mib'], 0)} | {fmt(w['held_mib'], 0)} |")
    lines += ["", f"Label maps: {differ} voxels differ; chosen probability: largest difference {confidence:.2e}.",
              "", f"`{command('totalsegmentator', argv)}`"]
    return "\n".join(lines)


def _child(args: argparse.Namespace) -> int:
    from edge_runtime.imaging.volume import Volume
    from edge_runtime.inference.package import ModelPackage
    from edge_runtime.inference.runner.onnxruntime import OnnxRuntimeRunner
    from edge_runtime.inference.totalsegmentator import pipeline
    from phantom import make_phantom

    package = ModelPackage.load(args.package)
    runner = OnnxRuntimeRunner(package)
    assert package.totalsegmentator is not None
    z, y, x = (float(s) for s in args.spacing)
    spacing = (z, y, x)
    hu = make_phantom(tuple(args.shape), spacing, rng=3).hu.astype(np.float32)
    volume = Volume(array=hu, spacing=spacing, positions=np.arange(hu.shape[0]) * spacing[0],
                    origin=np.zeros(3), row_direction=np.array([1.0, 0.0, 0.0]),
                    column_direction=np.array([0.0, 1.0, 0.0]), datasets=[], regular=True)
    way_back = pipeline.parts_back if args.child == "slabs" else _full_size_way_back
    stage: dict[str, float] = {}

    def timed(*a: Any) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The way back's wall and CPU time, the process's peak RSS before it, and what it allocated (numpy's
        buffers are traced by tracemalloc): at its peak, and still held at its end (its outputs)."""
        stage["rss_before_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        tracemalloc.start()
        cpu, t0 = _cpu_seconds(), time.perf_counter()
        out = way_back(*a)
        stage["wall_s"], stage["cpu_s"] = time.perf_counter() - t0, _cpu_seconds() - cpu
        held, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        stage["peak_alloc_mib"], stage["held_mib"] = peak / 2**20, held / 2**20
        return out

    pipeline.parts_back = timed  # type: ignore[assignment]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    seg = pipeline.segment_totalsegmentator(volume, package, runner)
    assert seg.confidence is not None
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    np.savez(args.labels_out, labels=seg.labels, confidence=seg.confidence)
    ts = package.totalsegmentator
    print(json.dumps({"wall_s": wall, "cpu_s": cpu, "way_back": stage, "peak_rss_mib": peak / 1024,
                      "input_rss_mib": base / 1024, "windows": seg.windows, "timings": seg.timings,
                      "parts": len(ts.parts), "classes": ts.output_channels}))
    return 0


def _full_size_way_back(logits: np.ndarray, case: Any, settings: Any, parts: Sequence[Any]
                        ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The way back before the slabs (the runtime's until acc2d6f), kept as the reference to measure against."""
    logits = resample(logits, case.shape_after_cropping, target_spacing(settings, case.spacing), case.spacing,
                      settings.resampling_probabilities, settings.anisotropy_threshold)
    where = tuple(slice(lo, hi) for lo, hi in case.bbox)
    backward = list(settings.transpose_backward)
    labels, confidence, start = [], [], 0
    for part in parts:
        own = logits[start:start + part.classes]
        start += part.classes
        full = np.zeros(case.shape_before_cropping, dtype=np.uint8 if part.classes < 256 else np.uint16)
        full[where] = np.argmax(own, axis=0)
        sure = np.ones(case.shape_before_cropping, dtype=np.float32)
        sure[where] = chosen_probability(own)
        labels.append(np.ascontiguousarray(full.transpose(backward)))
        confidence.append(np.ascontiguousarray(sure.transpose(backward)))
    return labels, confidence


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _make_package(root: Path) -> int:
    """The folder and package of ``tests/export/test_totalsegmentator.py``'s fixture (small random-weight nnU-Net
    networks for the five ``total`` parts: their outputs are noise, their shapes and the merge are real)."""
    from export.cli import main as export
    from tests.export.test_totalsegmentator import _write_weights

    weights = _write_weights(root / "weights")
    return export(["package", "--totalsegmentator", str(weights), "--task", "total", "--out", str(root / "package"),
                   "--parity-shape", "24", "32", "32"])


if __name__ == "__main__":
    sys.exit(main())
