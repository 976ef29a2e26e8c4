"""Benchmark the remote hop: TritonRunner (gRPC to Triton on loopback) vs the local ONNX Runtime runner.

Starts ``tests/triton_server.py`` (PyTriton's tritonserver, CPU, ONNX Runtime inside its Python backend)
with the bundled package, then times on the same machine, same model, same ONNX Runtime thread count:

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

    python benchmarks/bench_triton.py [--windows 60] [--repeats 5] [--threads 1] [--in-flight 2]
        [--triton-python ~/venv-triton/bin/python] [--url HOST:PORT --model-name NAME  (an existing server)]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.inference.package import DEFAULT_PACKAGE, ModelPackage
from edge_runtime.inference.runner.onnxruntime import OnnxRuntimeRunner
from edge_runtime.inference.runner.triton import TritonRunner

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
SERVER_SCRIPT = REPO / "tests" / "triton_server.py"
MODEL_NAME = "ct-bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, python: str, package_dir: Path, threads: int, max_batch_size: int):
        import tritonclient.grpc as grpcclient

        self.workdir = Path(tempfile.mkdtemp(prefix="bench-triton-"))
        self.log_path = self.workdir / "triton.log"
        grpc_port = free_port()
        self.url = f"127.0.0.1:{grpc_port}"
        cmd = [
            python,
            str(SERVER_SCRIPT),
            "--package",
            str(package_dir),
            "--model-name",
            MODEL_NAME,
            "--grpc-port",
            str(grpc_port),
            "--http-port",
            str(free_port()),
            "--metrics-port",
            str(free_port()),
            "--threads",
            str(threads),
            "--max-batch-size",
            str(max_batch_size),
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        t0 = time.monotonic()
        with grpcclient.InferenceServerClient(self.url) as client:
            while True:
                if self.proc.poll() is not None:
                    raise SystemExit(f"the Triton server exited:\n{self.log_path.read_text()[-3000:]}")
                try:
                    if client.is_model_ready(MODEL_NAME, client_timeout=2.0):
                        break
                except Exception:
                    pass
                if time.monotonic() - t0 > 180:
                    self.stop()
                    raise SystemExit("the Triton server was not ready after 180 s")
                time.sleep(0.25)
        self.startup_s = time.monotonic() - t0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        self._log.close()


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
        "--threads", type=int, default=1, help="ONNX Runtime intra-op threads, local and server"
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

    server = None
    url, model_name = args.url, args.model_name
    if url is None:
        print(f"starting the Triton server ({args.triton_python}) ...", file=sys.stderr)
        server = Server(args.triton_python, DEFAULT_PACKAGE, args.threads, args.max_batch_size)
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
    lines = [
        f"Remote hop: TritonRunner vs local ONNX Runtime, model `{package.identity}` patch {list(patch)} "
        f"({in_mb:.1f} MiB in, {out_mb:.1f} MiB out per window), "
        f"ONNX Runtime threads {args.threads} on both sides, "
        f"Triton {'on loopback (PyTriton, CPU)' if server else url}; median of {args.repeats} runs "
        f"({args.repeats * 4} for single requests).",
        "",
        "| what | runner | median | per window | overhead vs local | overhead per window |",
        "|---|---|---:|---:|---:|---:|",
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
        + (f"; server start-up {server.startup_s:.1f} s" if server else ""),
    ]
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "triton.md").write_text(table + "\n", encoding="utf-8")
        (RESULTS / "triton.json").write_text(
            json.dumps(
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
                    "server_startup_s": server.startup_s if server else None,
                    "rows": rows,
                },
                indent=2,
            )
            + "\n",
            encoding="utf-8",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
