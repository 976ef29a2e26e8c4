"""ONNX Runtime against this machine's own float32 matrix-multiply ceiling, on the default model's windows.

Measured in one run, each engine configuration in a subprocess of its own (thread pools never share a process),
the configurations alternating round by round so that the machine's noise falls on all of them:

* **FLOPs per window** counted from the ONNX graph, not guessed: every ``Conv``, ``ConvTranspose``, ``MatMul``
  and ``Gemm`` at the package's patch size (ONNX shape inference), two FLOPs per multiply-add. Everything else in
  the graph (activations, pooling, the in-graph CT windows) counts as zero: it is work, but not matmul work.
* **The ceiling**: numpy float32 matmul (OpenBLAS sgemm, the same thread count as the engine) on 4096-square
  matrices, the machine's best case; and the **ceiling at the sizes that matter**: per convolution, the GEMM its
  im2col would be (M = output channels, K = input channels x kernel volume, N = output voxels, N capped so the
  operands stay in memory), FLOP-weighted over the network. A convolution with 8 output channels cannot run at
  4096-square speed in any engine; the second ceiling says what BLAS itself reaches on those shapes.
* **ONNX Runtime** through the runtime's own :class:`OnnxRuntimeRunner` and its default session options
  (:class:`SessionTuning`), on windows of normalised phantom CTs at the model's spacing; the share of each
  operator type from ORT's profiler.
* **PyTorch** eager forward of the same network (``export/models/phantom_unet.pt``, BatchNorm folded as for the
  export), when torch is installed.
* ``--variants``: what could raise the ratio, each against the default: one thread, spinning threads, graph levels
  ``extended`` (no NCHWc layout transform) and ``basic``, parallel execution mode, batch 1 and 4 windows per
  ``run``; ``--int8``: the QDQ INT8 model of ``export.quantize`` (a different model: its parity is printed).

Writes ``benchmarks/results/ort-ceiling.{json,md}`` and prints the Markdown::

    python -m benchmarks.ort_ceiling [--package edge_runtime/models/default] [--rounds 3] [--reps 2]
                                     [--windows 8] [--variants] [--int8] [--only NAMES]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.report import REPO, command, machine, write_results

DEFAULT_PACKAGE = REPO / "edge_runtime" / "models" / "default"
CHECKPOINT = REPO / "export" / "models" / "phantom_unet.pt"
#: the largest N of a shape-matched GEMM: K x N float32 operands stay well under 100 MB
MAX_GEMM_N = 32768
GEMM_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def median(values: list[float]) -> float:
    return float(np.median(values))


# -- FLOPs from the graph ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    """One matmul-like node: its FLOPs per window and the GEMM (M, K, N) it amounts to."""

    op: str
    name: str
    flops: int
    gemm: tuple[int, int, int]


def graph_layers(model_path: Path, input_shape: tuple[int, ...]) -> list[Layer]:
    """The matmul-like nodes of the graph at ``input_shape`` (batch included), by ONNX shape inference."""
    import onnx
    from onnx import shape_inference

    model = onnx.load(str(model_path))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for dim, value in zip(dims, input_shape, strict=True):
        dim.ClearField("dim_param")
        dim.dim_value = int(value)
    model = shape_inference.infer_shapes(model, data_prop=True)
    shapes = {
        vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
        for vi in [*model.graph.value_info, *model.graph.input, *model.graph.output]
    }
    weights = {init.name: list(init.dims) for init in model.graph.initializer}
    layers = []
    for node in model.graph.node:
        if node.op_type not in GEMM_OPS:
            continue
        groups = next((a.i for a in node.attribute if a.name == "group"), 1)
        out = shapes[node.output[0]]
        if node.op_type in ("Conv", "ConvTranspose"):
            w = weights[node.input[1]]
            kernel = int(np.prod(w[2:]))
            x = shapes[node.input[0]]
            if node.op_type == "Conv":  # w: (Cout, Cin/g, k...); each output voxel: Cin/g * k MACs per channel
                m, k, n = w[0] // groups, w[1] * kernel, int(np.prod(out[2:])) * out[0]
                macs = int(np.prod(out)) * w[1] * kernel
            else:  # w: (Cin, Cout/g, k...); each input voxel scatters into Cout/g * k outputs
                m, k, n = w[1] * kernel, w[0] // groups, int(np.prod(x[2:])) * x[0]
                macs = int(np.prod(x)) * w[1] * kernel
            layers.append(Layer(node.op_type, node.name, 2 * macs, (m, k, n)))
        else:
            a, b = shapes[node.input[0]], weights.get(node.input[1]) or shapes[node.input[1]]
            m, k, n = int(np.prod(a[:-1])), a[-1], b[-1]
            layers.append(Layer(node.op_type, node.name, 2 * m * k * n, (m, k, n)))
    return layers


# -- the ceiling ---------------------------------------------------------------------------------------------


CEILING = r"""
import json, sys, time
import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits
threads, shapes = json.loads(sys.argv[1])
rng = np.random.default_rng(0)
def best(m, k, n, reps):
    a = rng.standard_normal((m, k), dtype=np.float32); b = rng.standard_normal((k, n), dtype=np.float32)
    a @ b
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter(); a @ b; ts.append(time.perf_counter() - t0)
    return 2 * m * k * n / min(ts) / 1e9
with threadpool_limits(limits=threads):
    square = best(4096, 4096, 4096, 5)
    per_shape = [best(m, k, n, 3) for m, k, n in shapes]
    pools = [{k: d.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
             for d in threadpool_info()]
print(json.dumps({"threads": threads, "square_gflops": square, "shape_gflops": per_shape, "threadpools": pools}))
"""


def ceiling(layers: list[Layer], threads: int) -> dict[str, Any]:
    """numpy sgemm GFLOP/s with ``threads`` threads: 4096-square, and FLOP-weighted over ``layers``' GEMMs."""
    gemms = sorted({(m, k, min(n, MAX_GEMM_N)) for m, k, n in (layer.gemm for layer in layers)})
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    p = subprocess.run(
        [sys.executable, "-c", CEILING, json.dumps([threads, gemms])],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    if p.returncode != 0:
        raise RuntimeError(f"the ceiling worker failed: {p.stderr[-2000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    rate = dict(zip(gemms, res.pop("shape_gflops"), strict=True))
    # time the whole network would take at BLAS speed on each layer's own GEMM = sum(flops / rate)
    seconds = sum(
        layer.flops / 1e9 / rate[(layer.gemm[0], layer.gemm[1], min(layer.gemm[2], MAX_GEMM_N))] for layer in layers
    )
    res["shapes_gflops"] = sum(layer.flops for layer in layers) / 1e9 / seconds
    res["per_gemm"] = [{"m": m, "k": k, "n": n, "gflops": g} for (m, k, n), g in rate.items()]
    return res


# -- windows and engines ---------------------------------------------------------------------------------------


def make_windows(package_dir: Path, count: int, out: Path) -> Path:
    """``count`` windows of normalised phantom CTs on the model grid, spread over the sliding-window positions
    that hold the body (the parity gate's phantoms; two volumes, so that no window repeats)."""
    from edge_runtime.inference.package import ModelPackage
    from edge_runtime.inference.tiling import window_starts
    from export.parity import phantom_volumes

    package = ModelPackage.load(package_dir)
    patch = package.patch_size
    windows = []
    for image in phantom_volumes(package, [11, 12]).values():
        starts = [window_starts(n, p, package.overlap) for n, p in zip(image.shape[1:], patch, strict=True)]
        for z in starts[0]:
            for y in starts[1]:
                for x in starts[2]:
                    w = image[:, z : z + patch[0], y : y + patch[1], x : x + patch[2]]
                    if float(w.std()) > 0.05:  # anatomy, not air only
                        windows.append(w)
    pick = np.linspace(0, len(windows) - 1, count).round().astype(int)
    np.save(out, np.stack([windows[i] for i in pick]).astype(np.float32))
    return out


WORKER = r"""
import json, os, sys, time
import numpy as np
cfg = json.loads(sys.argv[1])
x = np.load(cfg["windows"])
batch, threads = cfg["batch"], cfg["threads"]
profile = None
if cfg["engine"] == "ort":
    from edge_runtime.inference.package import ModelPackage
    from edge_runtime.inference.runner.onnxruntime import OnnxRuntimeRunner, SessionTuning
    tuning = SessionTuning(threads=threads, **cfg.get("tuning", {}))
    runner = OnnxRuntimeRunner(ModelPackage.load(cfg["package"]), tuning=tuning, model_path=cfg.get("model"))
    run, info = runner.infer, runner.describe()
else:
    import torch
    from export.models.unet import load_checkpoint
    torch.set_num_threads(threads or os.cpu_count())
    net = load_checkpoint(cfg["checkpoint"])[0].fused().eval()
    def run(b):
        with torch.inference_mode():
            return net(torch.from_numpy(b)).numpy()
    info = f"torch {torch.__version__} eager threads={torch.get_num_threads()} (BatchNorm folded)"
batches = [x[i:i + batch] for i in range(0, len(x) - batch + 1, batch)]
run(batches[0])
np.save(cfg["out"], np.concatenate([run(b) for b in batches]))
times = []
for _ in range(cfg["reps"]):
    for b in batches:
        t0 = time.perf_counter(); run(b); times.append((time.perf_counter() - t0) / len(b))
if cfg.get("profile") and cfg["engine"] == "ort":
    from edge_runtime.inference.runner.onnxruntime import OnnxRuntimeRunner
    opts = tuning.session_options()
    opts.enable_profiling = True
    opts.profile_file_prefix = cfg["out"] + "-profile"
    import onnxruntime as ort
    sess = ort.InferenceSession(cfg.get("model") or str(runner.package.model_path), opts,
                                providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    for b in batches:
        sess.run(None, {name: b})
    path = sess.end_profiling()
    events = json.load(open(path))
    os.unlink(path)
    profile = {}  # node name -> [op type, seconds per window]
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            slot = profile.setdefault(e["name"][: -len("_kernel_time")], [e["args"].get("op_name", "?"), 0.0])
            slot[1] += e["dur"] / 1e6 / (len(batches) * batch)
print(json.dumps({"info": info, "per_window_s": times, "profile": profile}))
"""


@dataclass(frozen=True)
class Config:
    """One engine configuration: a name for the table, and what the worker gets."""

    name: str
    engine: str = "ort"
    batch: int = 2
    threads: int = 0
    tuning: tuple[tuple[str, Any], ...] = ()
    model: str | None = None
    profile: bool = False


def configs(package_batch: int, variants: bool, int8: Path | None, torch: bool) -> list[Config]:
    out = [Config("runtime default", batch=package_batch, profile=True)]
    if torch:
        out.append(Config("PyTorch eager", engine="torch", batch=package_batch))
    if variants:
        out += [
            Config("1 thread", batch=package_batch, threads=1),
            Config("spinning on", batch=package_batch, tuning=(("spinning", True),)),
            Config(
                "optimization extended (no layout transforms)",
                batch=package_batch,
                tuning=(("optimization", "extended"),),
            ),
            Config("optimization basic", batch=package_batch, tuning=(("optimization", "basic"),)),
            Config("parallel execution mode", batch=package_batch, tuning=(("parallel", True),)),
            Config(
                "dynamic block base 4",
                batch=package_batch,
                tuning=(("entries", (("session.dynamic_block_base", "4"),)),),
            ),
            Config(
                "denormals as zero",
                batch=package_batch,
                tuning=(("entries", (("session.set_denormal_as_zero", "1"),)),),
            ),
            Config("batch 1", batch=1),
            Config("batch 4", batch=4),
        ]
    if int8 is not None:
        out.append(Config("INT8 QDQ (another model)", batch=package_batch, model=str(int8)))
    return out


def run_config(cfg: Config, package_dir: Path, windows: Path, reps: int, out: Path) -> dict[str, Any]:
    payload = {
        "engine": cfg.engine,
        "batch": cfg.batch,
        "threads": cfg.threads,
        "tuning": dict(cfg.tuning),
        "model": cfg.model,
        "profile": cfg.profile,
        "package": str(package_dir),
        "checkpoint": str(CHECKPOINT),
        "windows": str(windows),
        "reps": reps,
        "out": str(out),
    }
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    p = subprocess.run(
        [sys.executable, "-c", WORKER, json.dumps(payload)], capture_output=True, text=True, env=env, timeout=1800
    )
    if p.returncode != 0:
        raise RuntimeError(f"window worker {cfg.name!r} failed: {p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return CHECKPOINT.is_file()


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from edge_runtime.inference.package import ModelPackage

    package = ModelPackage.load(args.package)
    layers = graph_layers(package.model_path, (1, package.input_channels, *package.patch_size))
    flops = sum(layer.flops for layer in layers)
    work = Path(tempfile.mkdtemp(prefix="ort-ceiling-"))
    windows = make_windows(args.package, args.windows, work / "windows.npy")
    int8 = None
    if args.int8:
        from export.quantize import quantize_model

        int8 = quantize_model(package, work / "model.int8.onnx")
    cfgs = configs(package.batch_size, args.variants, int8, torch_available())
    if args.only:
        wanted = {name.strip() for name in args.only.split(",")}
        cfgs = [c for i, c in enumerate(cfgs) if i == 0 or c.name in wanted]  # the default is the reference
    threads_used = sorted({c.threads or (os.cpu_count() or 1) for c in cfgs})
    ceilings = {t: ceiling(layers, t) for t in threads_used}
    samples: dict[str, list[float]] = defaultdict(list)
    rounds: dict[str, list[float]] = defaultdict(list)
    info: dict[str, Any] = {}
    for rnd in range(args.rounds):
        order = cfgs[rnd % len(cfgs) :] + cfgs[: rnd % len(cfgs)]
        for cfg in order:
            res = run_config(cfg, args.package, windows, args.reps, work / f"out-{cfgs.index(cfg)}.npy")
            samples[cfg.name] += res["per_window_s"]
            rounds[cfg.name].append(median(res["per_window_s"]))
            info[cfg.name] = {
                "describe": res["info"],
                "profile": res["profile"] or info.get(cfg.name, {}).get("profile"),
            }
            print(
                f"round {rnd + 1} {cfg.name}: {1000 * rounds[cfg.name][-1]:.1f} ms/window", file=sys.stderr, flush=True
            )
    reference = np.load(work / "out-0.npy")
    outputs = [np.load(work / f"out-{i}.npy") for i in range(len(cfgs))]
    shutil.rmtree(work, ignore_errors=True)
    rows = []
    for i, cfg in enumerate(cfgs):
        t = median(samples[cfg.name])
        c = ceilings[cfg.threads or (os.cpu_count() or 1)]
        out = outputs[i]
        n = min(len(out), len(reference))
        rows.append(
            {
                **asdict(cfg),
                "describe": info[cfg.name]["describe"],
                "profile_s": info[cfg.name]["profile"],
                "median_ms": 1000 * t,
                "best_ms": 1000 * min(samples[cfg.name]),
                "round_medians_ms": [1000 * v for v in rounds[cfg.name]],
                "gflops": flops / t / 1e9,
                "of_square_ceiling": flops / t / 1e9 / c["square_gflops"],
                "of_shape_ceiling": flops / t / 1e9 / c["shapes_gflops"],
                "speedup_vs_default": median(samples[cfgs[0].name]) / t,
                "max_abs_diff_vs_default": float(np.abs(out[:n] - reference[:n]).max()),
                "argmax_agreement_vs_default": float((out[:n].argmax(1) == reference[:n].argmax(1)).mean()),
            }
        )
    return {
        "package": package.identity,
        "patch": list(package.patch_size),
        "windows": args.windows,
        "rounds": args.rounds,
        "reps": args.reps,
        "gflop_per_window": flops / 1e9,
        "layers": [asdict(layer) for layer in layers],
        "ceilings": {str(t): c for t, c in ceilings.items()},
        "rows": rows,
    }


# -- report ------------------------------------------------------------------------------------------------------


def markdown(res: dict[str, Any]) -> str:
    rows = res["rows"]
    default = rows[0]
    cores = os.cpu_count() or 1
    two = res["ceilings"][str(cores)]
    pools = ", ".join(f"{p['internal_api']} {p['version']} {p['architecture']}" for p in two["threadpools"])
    L = [
        "### ONNX Runtime against the machine's matmul ceiling (same run)",
        "",
        f"Package `{res['package']}`, window {'x'.join(map(str, res['patch']))}: **{res['gflop_per_window']:.2f} GFLOP "
        f"per window** counted from the ONNX graph ({len(res['layers'])} Conv/ConvTranspose/MatMul nodes). "
        f"{res['windows']} phantom windows, {res['rounds']} alternating rounds x {res['reps']} passes, one subprocess "
        "per configuration and round.",
        "",
        "| threads | sgemm 4096² GFLOP/s (the ceiling) | sgemm on the network's own im2col GEMM shapes, FLOP-weighted, "
        "GFLOP/s |",
        "|---:|---:|---:|",
    ]
    for t, c in sorted(res["ceilings"].items()):
        L.append(f"| {t} | {c['square_gflops']:.0f} | {c['shapes_gflops']:.0f} |")
    L += [
        "",
        f"BLAS: {pools} (OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE unset). The second column multiplies, per "
        f"convolution, (output channels) x (input channels x kernel) by (that x N voxels, N capped at {MAX_GEMM_N}): "
        "what BLAS itself reaches on GEMMs this skinny. Above 100% in the table below: ONNX Runtime beats BLAS on "
        "the same shapes.",
        "",
        "| configuration | batch | threads | median ms / window | best | GFLOP/s | of the 4096² ceiling | of BLAS "
        "at the network's shapes | speed vs default | max abs diff vs default | argmax agreement |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        L.append(
            f"| {r['name']} | {r['batch']} | {r['threads'] or cores} | {r['median_ms']:.1f} | {r['best_ms']:.1f} | "
            f"{r['gflops']:.1f} | {100 * r['of_square_ceiling']:.0f}% | {100 * r['of_shape_ceiling']:.0f}% | "
            f"{r['speedup_vs_default']:.2f}x | {r['max_abs_diff_vs_default']:.2g} | "
            f"{r['argmax_agreement_vs_default']:.6f} |"
        )
    L += ["", *profile_lines(res, default)]
    return "\n".join(L)


def profile_lines(res: dict[str, Any], default: dict[str, Any]) -> list[str]:
    """Where the default configuration's time goes, from ORT's profiler: per operator type, and the matmul-like
    nodes' own rate (their FLOPs over their kernel time) against the ceiling."""
    nodes: dict[str, list[Any]] = default.get("profile_s") or {}
    if not nodes:
        return []
    total = sum(t for _op, t in nodes.values())
    by_op: dict[str, float] = defaultdict(float)
    for op, t in nodes.values():
        by_op[op] += t
    flops = {layer["name"]: layer["flops"] for layer in res["layers"]}
    matmul_t = sum(t for name, (_op, t) in nodes.items() if name in flops)
    matmul_f = sum(flops[name] for name in nodes if name in flops)
    square = res["ceilings"][str(default["threads"] or os.cpu_count() or 1)]["square_gflops"]
    lines = [
        f"Runtime default: `{default['describe']}`. Kernel time per window (ORT profiler, a separate pass): "
        f"{1000 * total:.0f} ms; by operator: "
        + ", ".join(f"{op} {100 * t / total:.0f}%" for op, t in sorted(by_op.items(), key=lambda kv: -kv[1])[:9])
        + ".",
        "",
        f"The matmul-like nodes alone ({len([n for n in nodes if n in flops])} of {len(nodes)} nodes, "
        f"{100 * matmul_t / total:.0f}% of the kernel time) run at {matmul_f / matmul_t / 1e9:.1f} GFLOP/s = "
        f"{100 * matmul_f / matmul_t / 1e9 / square:.0f}% of the 4096² ceiling; per node:",
        "",
        "| node | op | GEMM M x K x N (per window) | GFLOP | ms | GFLOP/s | of the ceiling |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for layer in res["layers"]:
        if layer["name"] not in nodes:
            continue
        op, t = nodes[layer["name"]]
        m, k, n = layer["gemm"]
        rate = layer["flops"] / t / 1e9
        lines.append(
            f"| {layer['name']} | {op} | {m} x {k} x {n} | {layer['flops'] / 1e9:.2f} | {1000 * t:.1f} | "
            f"{rate:.1f} | {100 * rate / square:.0f}% |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--package", type=Path, default=DEFAULT_PACKAGE)
    ap.add_argument("--windows", type=int, default=8, help="phantom windows timed per pass (at least 4)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (one subprocess per config each)")
    ap.add_argument("--reps", type=int, default=2, help="passes over the windows per subprocess")
    ap.add_argument("--variants", action="store_true", help="also time the session options that might win")
    ap.add_argument("--int8", action="store_true", help="also time the QDQ INT8 model (export.quantize)")
    ap.add_argument("--out", default="ort-ceiling", help="output name in benchmarks/results")
    ap.add_argument("--only", default="", help="comma-separated configuration names to time (default: all)")
    args = ap.parse_args(argv)
    if args.windows < 4:
        ap.error("--windows must be at least 4 (the batch-4 variant needs one whole batch)")
    args.package = args.package.resolve()
    t0 = time.time()
    res = {"machine": machine(), "command": command("ort_ceiling", argv), **measure(args)}
    res["wall_s"] = time.time() - t0
    res["load_avg_end"] = os.getloadavg()
    md = markdown(res)
    write_results(args.out, md, res)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
