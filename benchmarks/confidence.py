"""What the confidence outputs of contract A cost after inference: ``python -m benchmarks.confidence``.

Blended logits of the bundled package's classes on its model grid for a CT of ``--shape`` at ``--spacing``
(random values: the cost does not depend on them), then, timed separately (median of ``--repeats``):

- labels: argmax and the label map back on the source grid (what the pipeline did before confidence);
- confidence: the chosen label's softmax probability, on the model grid and back on the source grid;
- probabilities: every class's softmax probability as uint8 on the source grid (only for a FRACTIONAL SEG).

Memory is what each output holds on the source grid.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from benchmarks.report import command, fmt, machine, median, table_head, write_results
from edge_runtime.imaging.volume import Volume
from edge_runtime.inference.package import DEFAULT_PACKAGE, ModelPackage
from edge_runtime.inference.pipeline import ModelGrid, chosen_probability, softmax_uint8
from edge_runtime.inference.postprocess import argmax_and_max

MiB = 1024 * 1024


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float | None, Any]:
    seconds, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        seconds.append(time.perf_counter() - t0)
    return median(seconds), out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=[300, 512, 512], metavar=("Z", "Y", "X"))
    ap.add_argument("--spacing", type=float, nargs=3, default=[1.0, 0.8, 0.8], metavar=("Z", "Y", "X"))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    package = ModelPackage.load(DEFAULT_PACKAGE, verify_hashes=False)
    shape = tuple(args.shape)
    volume = Volume(
        array=np.broadcast_to(np.float32(0), shape),  # the grid needs the source geometry only
        spacing=tuple(args.spacing),  # type: ignore[arg-type]
        positions=np.arange(shape[0]) * args.spacing[0],
        origin=np.zeros(3),
        row_direction=np.array([1.0, 0, 0]),
        column_direction=np.array([0, 1.0, 0]),
        datasets=[],
        regular=True,
    )
    grid = ModelGrid.for_volume(volume, package)
    logits = np.random.default_rng(0).normal(size=(package.num_classes, *grid.shape)).astype(np.float32)

    t_argmax, (labels_model, best) = timed(lambda: argmax_and_max(logits), args.repeats)
    t_labels, labels = timed(lambda: grid.back_to_source(labels_model), args.repeats)
    t_conf_model, conf_model = timed(lambda: chosen_probability(logits, best), args.repeats)
    t_conf_back, confidence = timed(lambda: grid.back_to_source(conf_model), args.repeats)
    t_probs, probs = timed(lambda: softmax_uint8(logits, best, grid), args.repeats)
    rows = [
        ("labels (argmax + back to source)", (t_argmax or 0) + (t_labels or 0), labels.nbytes),
        ("confidence (model grid + back to source)", (t_conf_model or 0) + (t_conf_back or 0), confidence.nbytes),
        ("probabilities, uint8 per class", t_probs, probs.nbytes),
    ]
    lines = [
        f"# Confidence outputs: {'x'.join(map(str, shape))} CT at {args.spacing} mm, model grid "
        f"{'x'.join(map(str, grid.shape))}, {package.num_classes} classes",
        "",
        f"`{command('confidence', argv)}`; median of {args.repeats}",
        "",
        *table_head("output", "seconds", "MiB on the source grid"),
        *(f"| {name} | {fmt(s)} | {fmt(b / MiB, 0)} |" for name, s, b in rows),
    ]
    markdown = "\n".join(lines)
    print(markdown)
    data = {
        "machine": machine(),
        "shape": shape,
        "spacing": args.spacing,
        "model_grid": grid.shape,
        "rows": [{"output": n, "seconds": s, "bytes": b} for n, s, b in rows],
    }
    write_results("confidence", markdown, data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
