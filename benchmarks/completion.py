"""What a streamed series leaves for completion, besides the network: the pipeline's own work after the last slice.

The latency benchmark (``benchmarks.latency``) measures the whole path with the bundled network, whose speed on a
shared CPU swamps everything else. This one takes the network out: a runner of our interface that returns its
input as logits (no arithmetic to speak of), so what is timed is placement, resampling, blending, argmax,
confidence and the way back to the source slices. For each series length it decodes the phantom CT slice by
slice into the decode-ahead cache, streams it as the service's worker would (every piece of work as soon as it is
ready), then times completion (the volume from the cache, then ``Streams.segment``), and, on the same volume,
batch inference. The two label maps and confidence maps are compared voxel for voxel. Examples::

    python -m benchmarks.completion --slices 100 300 600
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

import numpy as np

from benchmarks import harness
from benchmarks.report import command, fmt, machine, table_head, write_results
from edge_runtime.imaging.geometry import GeometryPolicy
from edge_runtime.imaging.volume import SliceCache, load_volume
from edge_runtime.inference.package import DEFAULT_PACKAGE, ModelPackage
from edge_runtime.inference.pipeline import segment
from edge_runtime.inference.runner import Runner
from edge_runtime.inference.streaming import Streams


class EchoRunner(Runner):
    """Class 1's logit is the input, the others zero: the network's cost taken out (our interface)."""

    name = "echo"

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        out = np.zeros((batch.shape[0], self.package.num_classes, *batch.shape[2:]), dtype=np.float32)
        out[:, 1] = batch[:, 0]
        return out


def one_series(slices: int, package: ModelPackage) -> dict:
    paths = harness.series_files(harness.base_series(slices))
    runner, policy = EchoRunner(package), GeometryPolicy()
    cache, streams = SliceCache(), Streams(package, policy)
    worker = 0.0
    for path in paths:
        cache.add(path)
        if streams.arrived(1, path, cache):
            t0 = time.perf_counter()
            while streams.step(runner):
                pass
            worker += time.perf_counter() - t0
    t0 = time.perf_counter()
    volume = load_volume(paths, policy, cache)
    t1 = time.perf_counter()
    streamed, timeline = streams.segment(1, volume, runner, lambda: segment(volume, package, runner))
    t2 = time.perf_counter()
    batch = segment(volume, package, runner)
    t3 = time.perf_counter()
    return {
        "slices": slices,
        "windows": batch.windows,
        "worker_while_arriving_s": worker,
        "load_s": t1 - t0,
        "streamed_completion_s": t2 - t1,
        "streamed_stages": streamed.timings,
        "batch_s": t3 - t2,
        "batch_stages": batch.timings,
        "timeline": timeline.as_dict(),
        "same_labels": bool(np.array_equal(streamed.labels, batch.labels)),
        "same_confidence": streamed.confidence is not None
        and batch.confidence is not None
        and bool(np.array_equal(streamed.confidence, batch.confidence)),
        "load_avg": os.getloadavg()[0],
    }


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        "### Work left at completion without the network (`benchmarks.completion`)",
        "",
        f"Phantom CT 512x512, bundled package's grid and tiling, a runner that echoes its input; {meta['cpus']} CPUs. "
        "Seconds after the last slice was placed.",
        "",
        *table_head(
            "slices",
            "streamed: load",
            "streamed: pre / blend / post",
            "streamed: load + completion",
            "batch (same volume)",
            "slabs streamed",
            "same labels, confidence",
            "load avg",
        ),
    ]
    for r in rows:
        st = r["streamed_stages"]
        tl = r["timeline"]
        parts = " / ".join(fmt(st.get(k)) for k in ("preprocess", "inference", "postprocess"))
        lines.append(
            f"| {r['slices']} | {fmt(r['load_s'])} | {parts} | {fmt(r['load_s'] + r['streamed_completion_s'])} "
            f"| {fmt(r['batch_s'])} | {tl['slabs_streamed']}/{tl['slabs_streamed'] + tl['slabs_at_completion']} "
            f"| {r['same_labels']}, {r['same_confidence']} | {r['load_avg']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slices", type=int, nargs="+", default=[100, 300, 600])
    ap.add_argument("--tag", default="completion")
    args = ap.parse_args(argv)
    package = ModelPackage.load(DEFAULT_PACKAGE)
    rows = []
    for n in args.slices:
        rows.append(one_series(n, package))
        r = rows[-1]
        print(
            f"{n} slices: load + completion {r['load_s'] + r['streamed_completion_s']:.2f} s, batch "
            f"{r['batch_s']:.2f} s",
            file=sys.stderr,
            flush=True,
        )
    meta = {"cpus": os.cpu_count(), "command": command("completion", argv), "machine": machine()}
    md = markdown(meta, rows)
    write_results(args.tag, md, {"meta": meta, "rows": rows})
    print(md)
    return 0 if all(r["same_labels"] and r["same_confidence"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
