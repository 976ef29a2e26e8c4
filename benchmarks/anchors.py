"""Anchors for the latency targets, measured in the same run on this machine.

(a) ``ingest``: the same 512x512xN series sent with DCMTK ``storescu`` (TCP_NODELAY=1, one association) to
    our service, to DCMTK ``storescp -od`` and to ``benchmarks.minimal_scp`` (pynetdicom, raw bytes to
    files); storescu wall time each, interleaved (the order rotates every repetition). The service gets a
    copy with new UIDs every time and is idle (previous result sent) before each send.
(b) ``windows``: per-window inference on the spleen UNet: ONNX Runtime through the project's runner
    (``load_runner(package)``, default settings) vs PyTorch eager (same module, same weights, same 96^3
    windows cut from the preprocessed phantom), each in its own subprocess, alternating; median ms per
    window at batch 1 and at the package's batch. FLOPs per window from ``torch.utils.flop_counter``.
    ``ceiling``: numpy float32 matmul (n=4096) GFLOP/s in a subprocess with OPENBLAS_CORETYPE and
    OPENBLAS_L2_SIZE unset (and, for contrast, with the environment as is), with threadpoolctl's report.
``overhead``: the inference stage without the network (``sliding_window`` with a runner that returns
    zeros) and the pre/post-processing steps, in-process on the same series.
(c) ``seg``: ``python -m benchmarks.bench_seg --no-write`` (another engineer's SEG encoder benchmark), verbatim.
(d) ``monai``: the MONAI Deploy App SDK spleen app (``benchmarks/monai_deploy/run.sh``) on the same series
    with the same weights (TorchScript), /usr/bin/time -v wall and peak RSS; compared with the latest
    ``benchmarks.latency`` result for the same package and slice count, if there is one.
    ``h2h``: the same, interleaved with warm runs of our service (pairs share the machine's noise).

Writes ``benchmarks/results/anchors.json`` and ``anchors.md`` and prints the Markdown::

    python -m benchmarks.anchors [--only ingest,windows,overhead,ceiling,seg,monai] [--slices 300] [--reps 5]
                                 [--model benchmarks/results/spleen-unet] [--md-runs 1]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import harness, latency
from benchmarks.report import REPO, RESULTS, command, fmt, machine, median, write_results
from tests.peers import StoreSCP

HERE = Path(__file__).resolve().parent
PYTHON = sys.executable
SPLEEN = RESULTS / "spleen-unet"
MDVENV = RESULTS / "mdvenv"


# -- (a) ingest ------------------------------------------------------------------------------------------


def fsync_floor(files: list[Path], folder: Path, mode: str = "spool") -> float:
    """What durability alone costs, on the spool's file system, without network or SQLite.

    ``spool``: write, fsync, rename, fsync the folder per file (what the spool does before answering);
    ``fdatasync``: write, fdatasync per file, no rename; ``none``: write only (page cache)."""
    folder.mkdir(parents=True, exist_ok=True)
    blobs = [f.read_bytes() for f in files]
    dfd = os.open(folder, os.O_RDONLY)
    t0 = time.perf_counter()
    try:
        for i, blob in enumerate(blobs):
            tmp, final = folder / f"{i}.tmp", folder / f"{i}.dcm"
            with open(tmp if mode == "spool" else final, "wb") as fh:
                fh.write(blob)
                fh.flush()
                if mode == "spool":
                    os.fsync(fh.fileno())
                elif mode == "fdatasync":
                    os.fdatasync(fh.fileno())
            if mode == "spool":
                os.replace(tmp, final)
                os.fsync(dfd)
    finally:
        os.close(dfd)
    dt = time.perf_counter() - t0
    shutil.rmtree(folder)
    return dt


def ingest(slices: int, reps: int, work: Path, variants: bool = True) -> dict:
    base = harness.base_series(slices)
    pacs = StoreSCP(work / "pacs", fork=False)
    service = harness.Service(work / "service", "--destination", pacs.address)
    nocache = (
        harness.Service(work / "service-nocache", "--destination", pacs.address, "--decode-cache-mb", "0")
        if variants
        else None
    )
    scp_dir, min_dir = work / "storescp", work / "minimal"
    dcmtk = StoreSCP(scp_dir, ae_title="STORESCP", fork=False)
    minimal = harness.MinimalSCP(min_dir)
    walls: dict[str, list[float]] = {"ours": [], "storescp": [], "minimal": []}
    if nocache is not None:
        walls["ours_no_decode_cache"] = []
        walls["fsync_floor"] = []
        walls["fdatasync_floor"] = []
        walls["write_floor"] = []
    nbytes = 0
    try:
        for rep in range(reps):
            copy = harness.fresh_copy(base, work / "send")
            nbytes = copy.nbytes
            order = [k for k in walls if not k.endswith("_floor")]
            order = order[rep % len(order) :] + order[: rep % len(order)]
            for who in order:
                for d in (scp_dir, min_dir):
                    for f in d.iterdir():
                        f.unlink()
                time.sleep(0.5)
                if who in ("ours", "ours_no_decode_cache"):
                    svc = service if who == "ours" else nocache
                    if who == "ours_no_decode_cache":
                        copy = harness.fresh_copy(base, work / "send")
                        time.sleep(0.5)
                    r = harness.timed_storescu(copy.files, svc.port, svc.ae_title)
                    svc.record(copy.series_uid, timeout=300)  # idle again before the next send
                elif who == "storescp":
                    r = harness.timed_storescu(copy.files, dcmtk.port, dcmtk.ae_title)
                else:
                    r = harness.timed_storescu(copy.files, minimal.port, minimal.ae_title)
                    n_min = len(list(min_dir.iterdir()))
                    if n_min != slices:
                        raise RuntimeError(f"minimal SCP wrote {n_min} files, expected {slices}")
                if r.returncode != 0:
                    raise RuntimeError(f"storescu to {who} failed: {r.output}")
                walls[who].append(r.wall)
                print(f"ingest rep {rep + 1} {who}: {r.wall:.3f} s", file=sys.stderr, flush=True)
            if "fsync_floor" in walls:
                for key, mode in (("fsync_floor", "spool"), ("fdatasync_floor", "fdatasync"), ("write_floor", "none")):
                    walls[key].append(fsync_floor(copy.files, service.spool / "fsync-probe", mode))
    finally:
        for p in (service, nocache, dcmtk, minimal, pacs):
            if p is not None:
                p.stop()
    med = {k: median(v) for k, v in walls.items()}
    per_rep_ratio = [o / m for o, m in zip(walls["ours"], walls["minimal"], strict=True)]
    return {
        "slices": slices,
        "bytes": nbytes,
        "reps": reps,
        "walls_s": walls,
        "median_s": med,
        "instances_per_s": {k: slices / v for k, v in med.items()},
        "mb_per_s": {k: nbytes / 1e6 / v for k, v in med.items()},
        # throughput ratios: ours / anchor (1.0 = as fast; the target is >= 0.9 of the minimal SCP)
        "throughput_ratio_ours_vs_minimal": med["minimal"] / med["ours"],
        "throughput_ratio_ours_vs_storescp": med["storescp"] / med["ours"],
        "throughput_ratio_ours_vs_minimal_per_rep_median": median([1 / x for x in per_rep_ratio]),
    }


# -- (b) per-window inference ------------------------------------------------------------------------------


def make_windows(package_dir: Path, slices: int, count: int, out: Path) -> Path:
    """``count`` real 96^3 windows of the preprocessed phantom, as the service would cut them."""
    import numpy as np

    from edge_runtime.imaging.geometry import GeometryPolicy
    from edge_runtime.imaging.volume import load_volume
    from edge_runtime.inference.package import ModelPackage
    from edge_runtime.inference.pipeline import ModelGrid, _windows, normalize

    package = ModelPackage.load(package_dir)
    volume = load_volume(harness.series_files(harness.base_series(slices)), GeometryPolicy())
    grid = ModelGrid.for_volume(volume, package)
    image = normalize(grid.resample(volume.array), package.normalization)
    where = list(_windows(image.shape, package.patch_size, package.overlap))
    pick = np.linspace(0, len(where) - 1, count).round().astype(int)
    batch = np.stack([image[where[i]] for i in pick])[:, None].astype(np.float32)
    np.save(out, batch)
    return out


def window_overhead(package_dir: Path, slices: int, reps: int = 3) -> dict:
    """The inference stage minus the network: ``edge_runtime.inference.pipeline.sliding_window`` on the real
    preprocessed phantom with a runner that returns zeros at once (window copies, padding, blending,
    normalisation by the weight sum), plus the pre- and post-processing steps of ``segment``."""
    import numpy as np

    from edge_runtime.imaging.geometry import GeometryPolicy
    from edge_runtime.imaging.volume import load_volume
    from edge_runtime.inference.package import ModelPackage
    from edge_runtime.inference.pipeline import ModelGrid, argmax_labels, normalize, sliding_window

    package = ModelPackage.load(package_dir)

    class NullRunner:
        def infer(self, batch: np.ndarray) -> np.ndarray:
            return np.zeros((batch.shape[0], package.num_classes, *batch.shape[2:]), dtype=np.float32)

    t0 = time.perf_counter()
    volume = load_volume(harness.series_files(harness.base_series(slices)), GeometryPolicy())
    t_load = time.perf_counter() - t0
    times: dict[str, list[float]] = {
        "sliding_window_without_network": [],
        "resample": [],
        "normalize": [],
        "argmax": [],
        "back_to_source": [],
    }
    windows = 0
    for _ in range(reps):
        t0 = time.perf_counter()
        grid = ModelGrid.for_volume(volume, package)
        image = grid.resample(volume.array)
        times["resample"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        image = normalize(image, package.normalization)
        times["normalize"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        logits, windows = sliding_window(image, package, NullRunner())  # type: ignore[arg-type]
        times["sliding_window_without_network"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        labels = argmax_labels(logits)
        times["argmax"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        grid.back_to_source(labels)
        times["back_to_source"].append(time.perf_counter() - t0)
        del logits, labels, image
    return {
        "windows": windows,
        "model_grid": list(grid.shape),
        "load_volume_from_disk_s": t_load,
        "median_s": {k: median(v) for k, v in times.items()},
        "all_s": times,
    }


WORKER = r"""
import json, os, sys, time
import numpy as np
kind, package_dir, windows_path, batch_size, reps, out_npy = sys.argv[1:7]
threads = int(sys.argv[7])  # 0: the engine's default (one per core)
batch_size, reps = int(batch_size), int(reps)
x = np.load(windows_path)
if kind == "ort":
    from edge_runtime.inference.package import ModelPackage
    from edge_runtime.inference.runner import load_runner
    runner = load_runner(ModelPackage.load(package_dir), threads=threads)
    run = runner.infer
    info = runner.describe()
else:
    import torch
    from benchmarks.make_spleen_package import build_unet
    meta = json.load(open(os.path.join(package_dir, "unet.json")))
    net = build_unet(meta["norm"], meta["seed"])
    net.load_state_dict(torch.load(os.path.join(package_dir, "weights.pt")))
    net.eval()
    torch.set_num_threads(threads or os.cpu_count())
    def run(b):
        with torch.inference_mode():
            return net(torch.from_numpy(b)).numpy()
    info = f"torch {torch.__version__} eager threads={torch.get_num_threads()}"
    flops = None
    if batch_size == 1:
        from torch.utils.flop_counter import FlopCounterMode
        with torch.inference_mode(), FlopCounterMode(display=False) as fc:
            net(torch.from_numpy(x[:1]))
        flops = fc.get_total_flops()
batches = [x[i:i + batch_size] for i in range(0, len(x) - batch_size + 1, batch_size)]
run(batches[0])  # warm-up
# the output to compare: a window with anatomy (a constant window, e.g. air clipped by the CT window, makes
# instance norm divide ~0 by sqrt(eps), where any two implementations legitimately disagree)
mid = int(np.argmax([float(w.std()) for w in x]))
np.save(out_npy, run(x[mid:mid + 1]))
times = []
for r in range(reps):
    for b in batches:
        t0 = time.perf_counter(); run(b); times.append((time.perf_counter() - t0) / len(b))
res = {"kind": kind, "info": info, "batch": batch_size, "per_window_s": times}
if kind == "torch" and batch_size == 1:
    res["flops_per_window"] = flops
print(json.dumps(res))
"""

CEILING = r"""
import json, time, numpy as np
from threadpoolctl import threadpool_info
n = 4096
a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
a @ b
ts = []
for _ in range(5):
    t0 = time.perf_counter(); a @ b; ts.append(time.perf_counter() - t0)
info = [{k: d.get(k) for k in ("internal_api", "version", "architecture", "num_threads", "filepath")}
        for d in threadpool_info()]
print(json.dumps({"n": n, "times_s": ts, "gflops_best": 2 * n**3 / min(ts) / 1e9,
                  "gflops_median": 2 * n**3 / sorted(ts)[len(ts) // 2] / 1e9, "threadpools": info}))
"""


def windows(package_dir: Path, slices: int, work: Path, rounds: int, reps: int, threads: int = 0) -> dict:
    import numpy as np

    package = json.loads((package_dir / "manifest.json").read_text())
    pkg_batch = int(package["inference"]["batch_size"])
    wpath = make_windows(package_dir, slices, 8, work / "windows.npy")
    script = work / "window_worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    results: dict[str, dict] = {}
    outputs: dict[str, Path] = {}
    paired: dict[int, list[float]] = {1: [], pkg_batch: []}  # torch/ort ratio of medians, per round
    for rnd in range(rounds):
        for batch in (1, pkg_batch):
            this_round: dict[str, float] = {}
            for kind in ("ort", "torch") if rnd % 2 == 0 else ("torch", "ort"):
                out_npy = work / f"out-{kind}-{batch}.npy"
                cmd = [
                    PYTHON,
                    str(script),
                    kind,
                    str(package_dir),
                    str(wpath),
                    str(batch),
                    str(reps),
                    str(out_npy),
                    str(threads),
                ]
                p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
                if p.returncode != 0:
                    raise RuntimeError(f"window worker {kind} failed: {p.stderr[-3000:]}")
                data = json.loads(p.stdout.strip().splitlines()[-1])
                key = f"{kind}-b{batch}"
                slot = results.setdefault(key, {"info": data["info"], "per_window_s": []})
                slot["per_window_s"] += data["per_window_s"]
                if "flops_per_window" in data:
                    results["flops_per_window"] = data["flops_per_window"]
                outputs[kind] = out_npy
                this_round[kind] = median(data["per_window_s"])
                print(
                    f"windows round {rnd + 1} {key}: median {1000 * median(data['per_window_s']):.1f} ms/window",
                    file=sys.stderr,
                    flush=True,
                )
            paired[batch].append(this_round["torch"] / this_round["ort"])
    a, b = np.load(outputs["ort"]), np.load(outputs["torch"])
    summary = {
        k: {**v, "median_ms": 1000 * median(v["per_window_s"]), "best_ms": 1000 * min(v["per_window_s"])}
        for k, v in results.items()
        if isinstance(v, dict)
    }
    flops = results.get("flops_per_window")
    out = {
        "windows": summary,
        "flops_per_window": flops,
        "package_batch": pkg_batch,
        "threads": threads,
        "package": str(package_dir),
        "ort_vs_torch_max_abs_diff": float(np.abs(a - b).max()),
    }
    for batch in (1, pkg_batch):
        o, t = summary[f"ort-b{batch}"]["median_ms"], summary[f"torch-b{batch}"]["median_ms"]
        out[f"speedup_ort_over_torch_b{batch}"] = t / o
        out[f"speedup_ort_over_torch_b{batch}_paired_rounds"] = paired[batch]
        out[f"speedup_ort_over_torch_b{batch}_paired_median"] = median(paired[batch])
        out[f"speedup_ort_over_torch_b{batch}_best"] = (
            summary[f"torch-b{batch}"]["best_ms"] / summary[f"ort-b{batch}"]["best_ms"]
        )
        if flops:
            out[f"ort_gflops_b{batch}"] = flops / (o / 1000) / 1e9
            out[f"torch_gflops_b{batch}"] = flops / (t / 1000) / 1e9
    return out


def ceiling() -> dict:
    res = {}
    clean = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    for name, env in (("unset", clean), ("as_is", dict(os.environ))):
        p = subprocess.run([PYTHON, "-c", CEILING], capture_output=True, text=True, env=env, timeout=600)
        if p.returncode != 0:
            raise RuntimeError(p.stderr[-2000:])
        res[name] = json.loads(p.stdout.strip().splitlines()[-1])
        res[name]["env"] = (
            {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
            if name == "as_is"
            else "OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset"
        )
        print(f"matmul ceiling ({name}): best {res[name]['gflops_best']:.0f} GFLOP/s", file=sys.stderr, flush=True)
    return res


# -- (c) SEG -----------------------------------------------------------------------------------------------


def seg_bench() -> dict:
    if not (HERE / "bench_seg.py").exists():
        return {"skipped": "benchmarks/bench_seg.py not present"}
    t0 = time.perf_counter()
    p = subprocess.run(
        [PYTHON, "-m", "benchmarks.bench_seg", "--no-write"], capture_output=True, text=True, timeout=1800, cwd=REPO
    )
    return {
        "returncode": p.returncode,
        "stdout": p.stdout.strip(),
        "stderr_tail": p.stderr[-1500:],
        "wall_s": time.perf_counter() - t0,
        "command": f"{PYTHON} -m benchmarks.bench_seg --no-write",
    }


# -- (d) MONAI Deploy --------------------------------------------------------------------------------------


def parse_time_v(path: Path) -> dict:
    text = path.read_text()
    out: dict[str, float] = {}
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", text)
    if m:
        parts = [float(x) for x in m.group(1).split(":")]
        out["wall_s"] = sum(v * 60**i for i, v in enumerate(reversed(parts)))
    for key, pat in (
        ("peak_rss_mib", r"Maximum resident set size \(kbytes\): (\d+)"),
        ("user_s", r"User time \(seconds\): ([\d.]+)"),
        ("sys_s", r"System time \(seconds\): ([\d.]+)"),
    ):
        m = re.search(pat, text)
        if m:
            out[key] = float(m.group(1)) / (1024 if key == "peak_rss_mib" else 1)
    m = re.search(r"Exit status: (\d+)", text)
    out["exit_status"] = int(m.group(1)) if m else -1
    return out


def monai_deploy(package_dir: Path, slices: int, runs: int, work: Path) -> dict:
    if not (MDVENV / "bin" / "python").exists():
        return {"skipped": f"no MONAI Deploy venv at {MDVENV}: run benchmarks/monai_deploy/setup.sh"}
    model = package_dir / "model.ts"
    series = harness.base_series(slices)
    out: dict[str, object] = {"runs": [], "series": str(series), "model": str(model)}
    for i in range(runs):
        run_dir = work / f"md-run{i + 1}"
        cpu0 = harness.cpu_snapshot(os.getpid())
        p = subprocess.run(
            ["bash", str(HERE / "monai_deploy" / "run.sh"), str(series), str(model), str(run_dir), str(MDVENV)],
            capture_output=True,
            text=True,
            timeout=3600,
        )
        cpu1 = harness.cpu_snapshot(os.getpid())
        r: dict[str, object] = {"returncode": p.returncode}
        if (run_dir / "time_v.txt").exists():
            r.update(parse_time_v(run_dir / "time_v.txt"))
            if "user_s" in r and "sys_s" in r:
                busy = cpu1[1] - cpu0[1] - (r["user_s"] + r["sys_s"])  # type: ignore[operator]
                r["foreign_cores"] = round(max(0.0, busy / (cpu1[0] - cpu0[0])), 2)
        if (run_dir / "timings.json").exists():
            r["timings"] = json.loads((run_dir / "timings.json").read_text())
        segs = list((run_dir / "output").rglob("*.dcm"))
        r["seg_files"] = [str(s) for s in segs]
        r["seg_bytes"] = sum(s.stat().st_size for s in segs)
        if p.returncode != 0 or not segs:
            r["log_tail"] = (
                (run_dir / "app.log").read_text(errors="replace")[-3000:]
                if (run_dir / "app.log").exists()
                else p.stderr[-3000:]
            )
        out["runs"].append(r)  # type: ignore[union-attr]
        print(
            f"MONAI Deploy run {i + 1}: wall {r.get('wall_s')} s, peak {r.get('peak_rss_mib')} MiB, rc {p.returncode}",
            file=sys.stderr,
            flush=True,
        )
    ok = [r for r in out["runs"] if r.get("exit_status") == 0 and r.get("seg_bytes")]  # type: ignore[union-attr]
    out["median_wall_s"] = median([r["wall_s"] for r in ok])
    out["median_peak_rss_mib"] = median([r["peak_rss_mib"] for r in ok])
    return out


def head_to_head(package_dir: Path, slices: int, pairs: int, work: Path) -> dict:
    """MONAI Deploy and our service, alternating, so each pair shares the machine's noise.

    One service process (the spleen package, a DCMTK PACS) is started and warmed with one series; then each
    pair is one MONAI Deploy run (``run.sh``, /usr/bin/time -v) and one warm ``latency.py`` run (new UIDs),
    in alternating order. Ratios are per pair; the summary is their median.
    """
    if not (MDVENV / "bin" / "python").exists():
        return {"skipped": f"no MONAI Deploy venv at {MDVENV}: run benchmarks/monai_deploy/setup.sh"}
    base = harness.base_series(slices)
    pacs = StoreSCP(work / "pacs", fork=False)
    service = harness.Service(work / "service", "--model", str(package_dir), "--destination", pacs.address)
    out: dict[str, object] = {"pairs": []}
    try:
        latency.one_run(service, pacs, base, work, "cold", 0, 0.0, 900)  # warm the process up
        for i in range(pairs):
            pair: dict[str, object] = {}
            for who in ("md", "ours") if i % 2 == 0 else ("ours", "md"):
                if who == "md":
                    md = monai_deploy(package_dir, slices, 1, work / f"h2h-md{i}")
                    r = md["runs"][0]  # type: ignore[index]
                    pair["md"] = {k: r.get(k) for k in ("wall_s", "peak_rss_mib", "foreign_cores", "exit_status")}
                    pair["md"]["network_forward_s"] = (r.get("timings") or {}).get("network_forward_s")
                else:
                    r = latency.one_run(service, pacs, base, work, "warm", i, 0.0, 900)
                    pair["ours"] = {
                        "first_sent_to_seg_stored": r["derived"]["first_sent_to_seg_stored"],
                        "last_ack_to_seg_stored": r["derived"]["last_ack_to_seg_stored"],
                        "inference": r["durations"]["inference"],
                        "peak_rss_mib": r["memory_mib"].get("VmHWM"),
                        "foreign_cores": r["foreign_cores"],
                        "durations": r["durations"],
                    }
            md_wall = pair["md"]["wall_s"]  # type: ignore[index]
            if md_wall:
                pair["ratio_first_sent_to_seg"] = pair["ours"]["first_sent_to_seg_stored"] / md_wall  # type: ignore[index]
                pair["ratio_last_ack_to_seg"] = pair["ours"]["last_ack_to_seg_stored"] / md_wall  # type: ignore[index]
                pair["ratio_inference_vs_md_forward"] = (
                    pair["ours"]["inference"] / pair["md"]["network_forward_s"]  # type: ignore[index]
                    if pair["md"].get("network_forward_s")
                    else None
                )  # type: ignore[union-attr]
                pair["ratio_peak_rss"] = pair["ours"]["peak_rss_mib"] / pair["md"]["peak_rss_mib"]  # type: ignore[index]
            out["pairs"].append(pair)  # type: ignore[union-attr]
            print(f"head-to-head pair {i + 1}: {json.dumps(pair)}", file=sys.stderr, flush=True)
    finally:
        service.stop()
        pacs.stop()
    ps = [p for p in out["pairs"] if "ratio_first_sent_to_seg" in p]  # type: ignore[union-attr]
    quiet = [
        p for p in ps if (p["md"].get("foreign_cores") or 0) < QUIET and (p["ours"].get("foreign_cores") or 0) < QUIET
    ]
    for k in ("ratio_first_sent_to_seg", "ratio_last_ack_to_seg", "ratio_inference_vs_md_forward", "ratio_peak_rss"):
        out[k] = median([p[k] for p in ps if p.get(k) is not None])
        out[f"quiet_{k}"] = median([p[k] for p in quiet if p.get(k) is not None])
    out["quiet_pairs"] = len(quiet)
    return out


#: a run is "quiet" when other processes kept less than this many cores busy on average
QUIET = 0.3


def compare_with_latency(md: dict, package_dir: Path, slices: int) -> dict | None:
    from edge_runtime.inference.package import ModelPackage

    name = ModelPackage.load(package_dir).name
    path = RESULTS / f"latency-{name}-{slices}.json"
    if not path.exists() or not md.get("median_wall_s"):
        return None
    lat = json.loads(path.read_text())
    s = lat["summary"]
    res: dict[str, object] = {"latency_file": str(path)}
    for group in ("cold", "warm"):
        if group not in s:
            continue
        g = s[group]
        res[group] = {
            "first_sent_to_seg_stored_s": g["first_sent_to_seg_stored"]["p50"],
            "last_ack_to_seg_stored_s": g["last_ack_to_seg_stored"]["p50"],
            "job_total_s": g["job_total"]["p50"],
            "peak_rss_mib": g["peak_rss_mib"]["p50"],
            "wall_ratio_first_sent_to_seg": g["first_sent_to_seg_stored"]["p50"] / md["median_wall_s"],
            "wall_ratio_last_ack_to_seg": g["last_ack_to_seg_stored"]["p50"] / md["median_wall_s"],
            "memory_ratio": g["peak_rss_mib"]["p50"] / md["median_peak_rss_mib"],
        }
    return res


# -- report ------------------------------------------------------------------------------------------------


def markdown(res: dict) -> str:
    L: list[str] = ["### Anchors (same run)", ""]
    if "ingest" in res:
        g = res["ingest"]
        L += [
            f"**(a) Ingest**: {g['slices']} slices, {g['bytes'] / 1e6:.0f} MB, DCMTK storescu (TCP_NODELAY=1), "
            f"one association, {g['reps']} interleaved repetitions; storescu wall time.",
            "",
            "| receiver | median s | instances/s | MB/s | all runs (s) |",
            "|---|---:|---:|---:|---|",
        ]
        names = {
            "ours": "edge-runtime serve (fsync + index + decode-ahead)",
            "ours_no_decode_cache": "edge-runtime serve --decode-cache-mb 0 (diagnostic)",
            "storescp": "DCMTK storescp -od (TCP_NODELAY=1)",
            "minimal": "minimal pynetdicom SCP (raw bytes to files)",
            "fsync_floor": "(no network) write + fsync + rename + fsync dir per file, spool's disk",
            "fdatasync_floor": "(no network) write + fdatasync per file",
            "write_floor": "(no network) write only (page cache)",
        }
        for k, label in names.items():
            if k not in g["median_s"]:
                continue
            L.append(
                f"| {label} | {g['median_s'][k]:.3f} | {g['instances_per_s'][k]:.0f} | {g['mb_per_s'][k]:.0f} | "
                + ", ".join(f"{v:.2f}" for v in g["walls_s"][k])
                + " |"
            )
        L += [
            "",
            f"Throughput ours / minimal pynetdicom SCP: **{g['throughput_ratio_ours_vs_minimal']:.2f}x** "
            f"(per-repetition median {g['throughput_ratio_ours_vs_minimal_per_rep_median']:.2f}x); "
            f"ours / storescp: **{g['throughput_ratio_ours_vs_storescp']:.2f}x**.",
            "",
        ]
    for wkey in ("windows", "windows1"):
        if wkey not in res:
            continue
        w = res[wkey]
        threads_note = "default threads (one per core)" if not w.get("threads") else f"{w['threads']} thread(s) each"
        L += [
            f"**(b) Per-window inference, {threads_note}**, spleen UNet (`{Path(w.get('package', '')).name}`), "
            "96³ windows cut from the preprocessed phantom "
            f"(8 windows; {w.get('flops_per_window', 0) / 1e9:.2f} GFLOP per window by "
            "`torch.utils.flop_counter`, convolutions only).",
            "",
            "| engine | batch | median ms / window | best ms / window | GFLOP/s at median | samples |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for key, v in sorted(w["windows"].items()):
            kind, b = key.split("-b")
            gf = w.get(f"{kind}_gflops_b{b}")
            L.append(
                f"| {v['info']} | {b} | {v['median_ms']:.1f} | {v['best_ms']:.1f} | {fmt(gf, 1)} | "
                f"{len(v['per_window_s'])} |"
            )
        L.append("")
        for b in (1, w["package_batch"]):
            rounds = ", ".join(f"{x:.2f}" for x in w[f"speedup_ort_over_torch_b{b}_paired_rounds"])
            L.append(
                f"ONNX Runtime speed-up over PyTorch eager, batch {b}: **{w[f'speedup_ort_over_torch_b{b}']:.2f}x** "
                f"(ratio of medians); per alternating round {rounds}; best-vs-best "
                f"{w[f'speedup_ort_over_torch_b{b}_best']:.2f}x."
            )
        L += [f"Outputs agree to {w['ort_vs_torch_max_abs_diff']:.2g} (max abs, on the window with the most anatomy)."]
        if "ceiling" in res:
            c = res["ceiling"]
            best = c["unset"]["gflops_best"] * ((w["threads"] / (os.cpu_count() or 1)) if w.get("threads") else 1)
            apis = ", ".join(
                f"{t['internal_api']} {t['version']} {t['architecture']} x{t['num_threads']}"
                for t in c["unset"]["threadpools"]
            )
            L += [
                "",
                f"Machine ceiling (numpy float32 matmul 4096³, OPENBLAS_CORETYPE/L2_SIZE unset; {apis}): "
                f"**{c['unset']['gflops_best']:.0f} GFLOP/s** best of 5 (median {c['unset']['gflops_median']:.0f}); "
                f"with the environment as is: {c['as_is']['gflops_best']:.0f} GFLOP/s"
                + (f"; pro rata for {w['threads']} thread(s): {best:.0f} GFLOP/s." if w.get("threads") else "."),
            ]
            flops = w.get("flops_per_window")
            for b in (1, w["package_batch"]):
                gf = w.get(f"ort_gflops_b{b}")
                if gf and flops:
                    gf_best = flops / (w["windows"][f"ort-b{b}"]["best_ms"] / 1000) / 1e9
                    L.append(
                        f"ORT batch {b}: {gf:.1f} GFLOP/s at the median = **{100 * gf / best:.0f}%** of the "
                        f"ceiling; {gf_best:.1f} GFLOP/s = {100 * gf_best / best:.0f}% at its best window."
                    )
        L.append("")
    if "overhead" in res:
        o = res["overhead"]
        m = o["median_s"]
        L += [
            f"**Inference stage without the network** (`sliding_window` with a runner that returns zeros; "
            f"{o['windows']} windows on the {'x'.join(map(str, o['model_grid']))} model grid; median of 3, "
            "in-process, seconds):",
            "",
            "| step | s |",
            "|---|---:|",
        ]
        for k, label in (
            ("resample", "resample to the model grid (preprocess)"),
            ("normalize", "intensity window (preprocess)"),
            (
                "sliding_window_without_network",
                "sliding window without the network: window copies + blending + normalisation",
            ),
            ("argmax", "argmax (postprocess)"),
            ("back_to_source", "back to the source grid (postprocess)"),
        ):
            L.append(f"| {label} | {m[k]:.3f} |")
        L.append("")
    if "seg" in res:
        s = res["seg"]
        L += [
            "**(c) SEG encoding**: `python -m benchmarks.bench_seg --no-write` (another engineer's benchmark), "
            "verbatim:",
            "",
        ]
        L += [s.get("stdout") or s.get("skipped") or f"failed: {s.get('stderr_tail')}", ""]
    if "monai" in res:
        m = res["monai"]
        L += [
            "**(d) MONAI Deploy App SDK 4.0 spleen app** (same series, same weights as TorchScript; "
            "`/usr/bin/time -v`).",
            "",
        ]
        if m.get("skipped"):
            L += [m["skipped"], ""]
        else:
            L += [
                "| run | wall s | peak RSS MiB | imports s | load+select+volume s | bundle pre-processing s | "
                "sliding window s (network forward) | bundle post-processing s | SEG writer s | noise: other "
                "cores busy | exit |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for i, r in enumerate(m["runs"], 1):
                t = r.get("timings") or {}
                ops = t.get("operators", {})
                pre = sum(ops.get(k, 0) for k in ("study_loader_op", "series_selector_op", "series_to_vol_op"))
                L.append(
                    f"| {i} | {fmt(r.get('wall_s'))} | {fmt(r.get('peak_rss_mib'), 0)} | "
                    f"{fmt(t.get('imports_s'))} | {fmt(pre)} | {fmt(t.get('bundle_pre_process_s'))} | "
                    f"{fmt(t.get('sliding_window_s'))} ({fmt(t.get('network_forward_s'))}, "
                    f"{t.get('network_patches')} patches) | {fmt(t.get('bundle_post_process_s'))} | "
                    f"{fmt(ops.get('dicom_seg_writer'))} | {fmt(r.get('foreign_cores'))} | "
                    f"{r.get('exit_status')} |"
                )
            L += [
                "",
                f"Median wall {fmt(m.get('median_wall_s'))} s, peak RSS {fmt(m.get('median_peak_rss_mib'), 0)} MiB.",
                "",
            ]
            cmp_ = res.get("monai_vs_ours")
            if cmp_:
                L += [
                    "| ours (latency.py, p50) | first sent → SEG at PACS | ratio to MD wall | last ack → SEG | "
                    "ratio | peak RSS MiB | ratio to MD peak |",
                    "|---|---:|---:|---:|---:|---:|---:|",
                ]
                for group in ("cold", "warm"):
                    if group in cmp_:
                        c = cmp_[group]
                        L.append(
                            f"| {group} | {c['first_sent_to_seg_stored_s']:.2f} | "
                            f"{c['wall_ratio_first_sent_to_seg']:.2f}x | {c['last_ack_to_seg_stored_s']:.2f} | "
                            f"{c['wall_ratio_last_ack_to_seg']:.2f}x | {c['peak_rss_mib']:.0f} | "
                            f"{c['memory_ratio']:.2f}x |"
                        )
                L.append("")
    if "h2h" in res and not res["h2h"].get("skipped"):
        h = res["h2h"]
        L += [
            "**Head to head, interleaved** (one MONAI Deploy run and one warm run of our service per pair, "
            "alternating order; same series, same weights; the noise column is the average number of cores "
            "other processes kept busy):",
            "",
            "| pair | MD wall s | MD peak MiB | MD network forward s | MD noise | ours first sent → SEG at PACS s | "
            "ours last ack → SEG s | ours inference s | ours peak MiB | ours noise | wall ratio (first sent) | "
            "memory ratio |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for i, p in enumerate(h["pairs"], 1):
            md, us = p.get("md", {}), p.get("ours", {})
            L.append(
                f"| {i} | {fmt(md.get('wall_s'))} | {fmt(md.get('peak_rss_mib'), 0)} | "
                f"{fmt(md.get('network_forward_s'))} | {fmt(md.get('foreign_cores'))} | "
                f"{fmt(us.get('first_sent_to_seg_stored'))} | {fmt(us.get('last_ack_to_seg_stored'))} | "
                f"{fmt(us.get('inference'))} | {fmt(us.get('peak_rss_mib'), 0)} | {fmt(us.get('foreign_cores'))} | "
                f"{fmt(p.get('ratio_first_sent_to_seg'))}x | {fmt(p.get('ratio_peak_rss'))}x |"
            )
        L += [
            "",
            f"Median per-pair ratios: wall (ours first sent → SEG at PACS / MD process wall) "
            f"**{fmt(h.get('ratio_first_sent_to_seg'))}x**, (ours last ack → SEG) "
            f"{fmt(h.get('ratio_last_ack_to_seg'))}x; peak memory **{fmt(h.get('ratio_peak_rss'))}x**; our "
            f"inference stage / MD network forward {fmt(h.get('ratio_inference_vs_md_forward'))}x. "
            f"Pairs where both runs were quiet (noise < {QUIET} cores): {h.get('quiet_pairs')}; their median "
            f"ratios: wall **{fmt(h.get('quiet_ratio_first_sent_to_seg'))}x** (last ack "
            f"{fmt(h.get('quiet_ratio_last_ack_to_seg'))}x), memory {fmt(h.get('quiet_ratio_peak_rss'))}x, "
            f"inference / MD forward {fmt(h.get('quiet_ratio_inference_vs_md_forward'))}x.",
            "",
        ]
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="ingest,windows,overhead,ceiling,seg,monai")
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--reps", type=int, default=5, help="ingest repetitions")
    ap.add_argument("--model", type=Path, default=SPLEEN, help="package for (b) and (d) (with model.ts, weights.pt)")
    ap.add_argument("--window-rounds", type=int, default=2, help="alternating ORT/PyTorch subprocess rounds")
    ap.add_argument("--window-reps", type=int, default=3, help="passes over the 8 windows per subprocess")
    ap.add_argument("--md-runs", type=int, default=1, help="MONAI Deploy runs")
    ap.add_argument("--pairs", type=int, default=3, help="head-to-head pairs (MONAI Deploy run + our warm run)")
    ap.add_argument("--out", default="anchors", help="output name in benchmarks/results")
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
    package_dir = args.model.resolve()
    work = RESULTS / "work" / args.out
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    res: dict[str, object] = {
        "machine": machine(),
        "command": command("anchors", argv),
    }
    path = RESULTS / f"{args.out}.json"
    if path.exists():  # keep parts measured by an earlier invocation with another --only
        old = json.loads(path.read_text())
        res.update({k: v for k, v in old.items() if k not in ("machine", "command")})
    if "ingest" in only:
        res["ingest"] = ingest(args.slices, args.reps, work / "ingest")
    if "windows" in only:
        res["windows"] = windows(package_dir, args.slices, work, args.window_rounds, args.window_reps)
    if "windows1" in only:  # one thread each: robust to other processes on the machine (no barrier stalls)
        res["windows1"] = windows(package_dir, args.slices, work, args.window_rounds, args.window_reps, threads=1)
    if "overhead" in only:
        res["overhead"] = window_overhead(package_dir, args.slices)
    if "ceiling" in only:
        res["ceiling"] = ceiling()
    if "seg" in only:
        res["seg"] = seg_bench()
    if "monai" in only:
        res["monai"] = monai_deploy(package_dir, args.slices, args.md_runs, work)
    if "h2h" in only:
        res["h2h"] = head_to_head(package_dir, args.slices, args.pairs, work / "h2h")
    if isinstance(res.get("monai"), dict) and not res["monai"].get("skipped"):  # type: ignore[union-attr]
        res["monai_vs_ours"] = compare_with_latency(res["monai"], package_dir, args.slices)  # type: ignore[arg-type]
    res["load_avg_end"] = os.getloadavg()
    md = markdown(res)
    write_results(args.out, md, res)
    print(md)
    shutil.rmtree(work / "ingest", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
