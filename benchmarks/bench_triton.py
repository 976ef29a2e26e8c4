"""Benchmark the remote hop: TritonRunner (gRPC to Triton on loopback) vs the local ONNX Runtime runner.

Starts ``tests/triton_server.py`` (PyTriton's tritonserver, CPU, ONNX Runtime inside its Python backend) with
the bundled package, as the tests start it (``tests.peers.TritonServer``), then
times on the same machine, same model, same ONNX Runtime thread count (``--threads 1``, the default):

* one window (batch 1) and one sliding-window batch (the package's batch size) of the package's patch size:
  local ``OnnxRuntimeRunner.infer`` vs ``TritonRunner.infer`` with raw binary gRPC tensors and with system
  shared memory; the difference is the per-request cost of going through Triton;
* a series: ``--windows`` windows (default 60) in batches of the package's batch size, sent one request at a
  time (``infer``, what ``sliding_window`` does) and pipelined (``infer_many`` with ``--in-flight`` requests
  outstanding).

Every figure is the median of ``--repeats`` runs after a warm-up. On a CPU-only loopback this measures the
transport and serving overhead (serialisation, gRPC, Triton's scheduler, PyTriton's proxy to its Python
backend), not what a GPU server would save; with a GPU server the same table shows whether the hop pays.

Prints a Markdown table and writes it to ``benchmarks/results/triton.md``, with the raw figures in
``benchmarks/results/triton.json``. Usage::

    python -m benchmarks.bench_triton [--windows 60] [--repeats 5] [--threads 1] [--in-flight 2]
        [--triton-python ~/venv-triton/bin/python] [--url HOST:PORT --model-name NAME  (an existing server)]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.report import table_head, write_results
from edge_runtime.inference.package import DEFAULT_PACKAGE, ModelPackage
from edge_runtime.inference.runner.onnxruntime import OnnxRuntimeRunner
from edge_runtime.inference.runner.triton import TritonRunner

MODEL_NAME = "ct-bench"


def start_server(python: str, package_dir: Path, max_batch_size: int, threads: int) -> tuple[Any, float]:
    """The tests' Triton server (``tests.peers.TritonServer``) on free loopback ports, and the seconds
    it took to be ready (the interpreter check included)."""
    import pytest

    os.environ["EDGE_TRITON_PYTHON"] = python  # the interpreter the tests' server runs PyTriton with
    from tests.peers import TritonServer

    t0 = time.monotonic()
    try:
        server = TritonServer(
            Path(tempfile.mkdtemp(prefix="bench-triton-")),
            package_dir,
            model_name=MODEL_NAME,
            max_batch_size=max_batch_size,
            threads=threads,
        )
    except pytest.skip.Exception as exc:  # no PyTriton interpreter: the tests skip, the benchmark stops
        raise SystemExit(f"no Triton server: {exc}") from None
    return server, time.monotonic() - t0


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=1, help="ONNX Runtime intra-op threads, locally and in the loopback server"
    )
    parser.add_argument("--in-flight", type=int, default=2)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument(
        "--triton-python",
        default=os.environ.get("EDGE_TRITON_PYTHON") or str(Path.home() / "venv-triton/bin/python"),
    )
    parser.add_argument("--url", default=None, help="use a running server instead of starting one")
    parser.add_argument("--model-name", default=MODEL_NAME)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)

    package = ModelPackage.load(DEFAULT_PACKAGE)
    patch, bs = package.patch_size, package.batch_size
    rng = np.random.default_rng(0)
    pool = [
        (
            np.clip(
                rng.choice([-1000.0, -800.0, 40.0, 700.0], size=(bs, 1, *patch))
                + rng.normal(0, 60, (bs, 1, *patch)),
                -1024,
                1024,
            )
            / 1024
        ).astype(np.float32)
        for _ in range(4)
    ]
    one = np.ascontiguousarray(pool[0][:1])
    n_batches = -(-args.windows // bs)

    def series() -> Iterator[np.ndarray]:
        left = args.windows
        for i in range(n_batches):
            yield pool[i % len(pool)][: min(bs, left)]
            left -= bs

    server, startup_s = None, None
    url, model_name = args.url, args.model_name
    if url is None:
        print(f"starting the Triton server ({args.triton_python}) ...", file=sys.stderr)
        server, startup_s = start_server(args.triton_python, DEFAULT_PACKAGE, args.max_batch_size, args.threads)
        url, model_name = server.url, MODEL_NAME
    rows: list[dict[str, Any]] = []
    try:
        local = OnnxRuntimeRunner(package, threads=args.threads)
        remote = TritonRunner(package, url=url, model_name=model_name, max_in_flight=args.in_flight)
        remote_shm = TritonRunner(
            package, url=url, model_name=model_name, max_in_flight=args.in_flight, shared_memory="system"
        )
        np.testing.assert_allclose(remote.infer(pool[0]), local.infer(pool[0]), atol=1e-5, rtol=0)
        np.testing.assert_allclose(remote_shm.infer(pool[0]), local.infer(pool[0]), atol=1e-5, rtol=0)

        def add(what: str, runner_name: str, fn: Callable[[], Any], windows: int, repeats: int) -> None:
            med, times = median_time(fn, repeats)
            rows.append(
                {"what": what, "runner": runner_name, "windows": windows, "median_s": med, "runs_s": times}
            )
            print(f"  {what:<28} {runner_name:<34} {med * 1e3:9.1f} ms", file=sys.stderr)

        for what, batch in ((f"1 window {patch}", one), (f"1 batch of {bs} windows", pool[0])):
            n = batch.shape[0]
            add(what, "onnxruntime (local)", lambda b=batch: local.infer(b), n, args.repeats * 4)
            add(what, "triton grpc", lambda b=batch: remote.infer(b), n, args.repeats * 4)
            add(what, "triton grpc + system shm", lambda b=batch: remote_shm.infer(b), n, args.repeats * 4)

        what = f"series: {args.windows} windows"
        add(
            what,
            "onnxruntime (local)",
            lambda: [local.infer(b) for b in series()],
            args.windows,
            args.repeats,
        )
        add(
            what,
            "triton grpc, sequential",
            lambda: [remote.infer(b) for b in series()],
            args.windows,
            args.repeats,
        )
        add(
            what,
            f"triton grpc, {args.in_flight} in flight",
            lambda: list(remote.infer_many(series())),
            args.windows,
            args.repeats,
        )
        add(
            what,
            "triton shm, sequential",
            lambda: [remote_shm.infer(b) for b in series()],
            args.windows,
            args.repeats,
        )
        add(
            what,
            f"triton shm, {args.in_flight} in flight",
            lambda: list(remote_shm.infer_many(series())),
            args.windows,
            args.repeats,
        )
        describe = {
            "local": local.describe(),
            "triton": remote.describe(),
            "triton_shm": remote_shm.describe(),
        }
        remote.close()
        remote_shm.close()
    finally:
        if server is not None:
            server.stop()

    base = {r["what"]: r["median_s"] for r in rows if r["runner"] == "onnxruntime (local)"}
    in_mb = one.nbytes / 2**20
    out_mb = in_mb * package.num_classes
    threads = "on both sides" if server else "locally"
    lines = [
        f"Remote hop: TritonRunner vs local ONNX Runtime, model `{package.identity}` patch {list(patch)} "
        f"({in_mb:.1f} MiB in, {out_mb:.1f} MiB out per window), ONNX Runtime threads {args.threads} {threads}, "
        f"Triton {'on loopback (PyTriton, CPU)' if server else url}; median of {args.repeats} runs "
        f"({args.repeats * 4} for single requests).",
        "",
        *table_head("what", "runner", "median", "per window", "overhead vs local", "overhead per window", left=2),
    ]
    for r in rows:
        b = base[r["what"]]
        over = r["median_s"] - b
        r["overhead_s"] = over
        r["overhead_per_window_s"] = over / r["windows"]
        local_row = r["runner"].startswith("onnx")
        over_text = "—" if local_row else f"{over * 1e3:+.1f} ms ({over / b * 100:+.0f}%)"
        per_window_text = "—" if local_row else f"{over / r['windows'] * 1e3:+.1f} ms"
        lines.append(
            f"| {r['what']} | {r['runner']} | {r['median_s'] * 1e3:.1f} ms "
            f"| {r['median_s'] / r['windows'] * 1e3:.1f} ms | {over_text} | {per_window_text} |"
        )
    lines += [
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}"
        + (f"; server start-up {startup_s:.1f} s" if server else ""),
    ]
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        write_results(
            "triton",
            table,
            {
                "package": package.identity,
                "patch_size": list(patch),
                "batch_size": bs,
                "windows": args.windows,
                "threads": args.threads,
                "in_flight": args.in_flight,
                "repeats": args.repeats,
                "runners": describe,
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "server_startup_s": startup_s,
                "rows": rows,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
