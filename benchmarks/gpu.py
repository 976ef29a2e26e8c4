"""GPU benchmark: the same measurements on whichever inference backends this machine has.

One script for any machine (an x86 GPU workstation, a Jetson, a CPU-only box): it detects what is there,
measures every backend it can, and says which it skipped and why. It never fails for a missing backend.

Backends looked for:

- ONNX Runtime through the project's runner (``load_runner(package, "onnxruntime", device)``): the
  ``CPUExecutionProvider`` (always; the reference), ``CUDAExecutionProvider`` (device ``cuda``) and
  ``TensorrtExecutionProvider`` (device ``tensorrt``) when ``onnxruntime.get_available_providers()`` lists
  them (the GPU build, ``onnxruntime-gpu``);
- the native TensorRT backend (``edge_runtime.inference.runner.tensorrt``, engine built for this GPU into a
  temporary folder, ``--trt-precision``) when ``tensorrt`` and ``pycuda`` import and the runner has the backend;
- PyTorch eager on CUDA (the anchor): the package's own PyTorch module (manifest ``source.factory`` +
  ``source.args``, ``weights.pt`` when the package has one; else ``model.ts`` as TorchScript), when torch
  imports and ``torch.cuda.is_available()``.

Measurements:

(a) per-window inference: the same ``--windows`` windows cut from the preprocessed 512x512x``--slices``
    phantom exactly as the service cuts them (resample, intensity window, patch size of the package), numpy
    in and logits out (host-device copies included), batch 1 and the package's batch; median ms per window
    and windows/s, the first call (engine builds, cuDNN autotuning) and the load time separately, and the
    output of window 0 compared with ONNX Runtime CPU (max abs difference, argmax agreement). Each backend
    runs in its own subprocess, so one that crashes or hangs is reported, not fatal. For the bundled
    package and every ``--model``.
(b) the service path: ``python -m edge_runtime serve --backend onnxruntime --device cpu|cuda|tensorrt``
    (and ``--backend tensorrt`` when the service has it) receives the series from DCMTK ``storescu`` and
    sends the SEG to DCMTK ``storescp`` (both ``TCP_NODELAY=1``); last instance acknowledged (the spool's
    ``last_received``) -> SEG received at storescp (file mtime). The first series of each service process is
    reported as cold (it includes lazy engine builds); then ``--service-runs`` warm series, new UIDs each.

Writes ``benchmarks/results/<tag>.md`` (printed) and ``<tag>.json`` (``--tag``, default ``gpu``) with the
device (``nvidia-smi``) and the versions. Needs only the standard library, numpy, onnxruntime,
pydicom/pynetdicom and the project (torch, tensorrt, pycuda when present). Examples::

    python -m benchmarks.gpu                                             # bundled model
    python -m benchmarks.gpu --model benchmarks/results/spleen-unet --slices 300
    python -m benchmarks.gpu --skip-service --windows 16 --reps 10
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

from benchmarks import harness
from benchmarks.harness import adopt, release, series_files
from benchmarks.report import REPO, command, cpu_model, fmt, median, pct, table_head, write_results
from tests.peers import SYSTEM_BIN, ServiceProcess, StoreSCP, storescu, wait_for_seg

PYTHON = sys.executable
ORT_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                 "tensorrt": "TensorrtExecutionProvider"}
_children: list[subprocess.Popen] = []


# -- helpers -------------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def tail(text: str, n: int = 1200) -> str:
    text = text.strip()
    return text if len(text) <= n else "…" + text[-n:]


def one_line(text: str, n: int = 300) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    line = lines[-1] if lines else ""
    return line if len(line) <= n else line[: n - 1] + "…"


def module_version(name: str) -> str | None:
    if importlib.util.find_spec(name) is None:
        return None
    try:
        mod = importlib.import_module(name)
        return str(getattr(mod, "__version__", getattr(mod, "VERSION", "?")))
    except Exception as exc:  # present but broken (missing shared libraries ...)
        return f"broken: {type(exc).__name__}: {one_line(str(exc), 160)}"


# -- detection -----------------------------------------------------------------------------------------


def nvidia_smi() -> dict:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return {"available": False, "why": "nvidia-smi not found (no NVIDIA driver)"}
    try:
        out = subprocess.run([exe, "--query-gpu=name,driver_version,memory.total,compute_cap",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return {"available": False, "why": f"nvidia-smi failed: {exc}"}
    if out.returncode != 0:
        # older drivers do not know compute_cap
        out = subprocess.run([exe, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60)
    if out.returncode != 0 or not out.stdout.strip():
        return {"available": False, "why": f"nvidia-smi: {one_line(out.stderr or out.stdout)}"}
    gpus = []
    for line in out.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        gpus.append(dict(zip(("name", "driver", "memory", "compute_cap"), parts, strict=False)))
    return {"available": True, "gpus": gpus}


TORCH_PROBE = r"""
import json
try:
    import torch
    d = {"version": torch.__version__, "cuda_build": torch.version.cuda, "cuda": torch.cuda.is_available()}
    if d["cuda"]:
        d["device"] = torch.cuda.get_device_name(0)
        d["cudnn"] = torch.backends.cudnn.version()
except Exception as exc:
    d = {"error": f"{type(exc).__name__}: {exc}"}
print(json.dumps(d))
"""


def torch_probe() -> dict:
    """torch in a subprocess (the main process stays free of torch and CUDA)."""
    if importlib.util.find_spec("torch") is None:
        return {"installed": False}
    try:
        out = subprocess.run([PYTHON, "-c", TORCH_PROBE], capture_output=True, text=True, timeout=300)
        data = json.loads(out.stdout.strip().splitlines()[-1])
    except Exception as exc:
        return {"installed": True, "error": f"probe failed: {exc}"}
    return {"installed": True, **data}


def detect(precision: str, torch_cpu: bool = False) -> tuple[dict, list[dict]]:
    """(machine and versions, backends: each {key, label, kind, device, available, why})."""
    import onnxruntime as ort

    import edge_runtime
    from edge_runtime.inference import runner as runners

    providers = list(ort.get_available_providers())
    smi = nvidia_smi()
    torch = torch_probe()
    trt_v, pycuda_v = module_version("tensorrt"), module_version("pycuda")
    info: dict = {
        "python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
        "numpy": np.__version__, "onnxruntime": ort.__version__, "onnxruntime_device": ort.get_device(),
        "onnxruntime_providers": providers, "tensorrt": trt_v, "pycuda": pycuda_v, "torch": torch,
        "edge_runtime": edge_runtime.__version__, "runner_backends": list(runners.BACKENDS), "nvidia_smi": smi,
    }
    for mod in ("pydicom", "pynetdicom", "highdicom"):
        info[mod] = module_version(mod)
    if cpu_model():
        info["cpu"] = cpu_model()

    backends: list[dict] = []
    for dev, prov in ORT_PROVIDERS.items():
        b = {"key": f"ort-{dev}", "label": f"onnxruntime {prov}", "kind": "ort", "device": dev,
             "service": ["--backend", "onnxruntime", "--device", dev]}
        if prov in providers:
            b.update(available=True, why="listed by onnxruntime.get_available_providers()")
        else:
            hint = (" (this is the CPU build of onnxruntime: the GPU providers need onnxruntime-gpu)"
                    if ort.get_device() == "CPU" else "")
            b.update(available=False, why=f"{prov} not in onnxruntime {ort.__version__}'s providers "
                                          f"({', '.join(providers)}){hint}")
        backends.append(b)

    b = {"key": "tensorrt", "label": f"TensorRT native ({precision}, pycuda)", "kind": "trt", "device": "cuda",
         "precision": precision, "service": ["--backend", "tensorrt"] if "tensorrt" in runners.BACKENDS else None}
    missing = []
    if trt_v is None or trt_v.startswith("broken"):
        missing.append(f"tensorrt {'not installed' if trt_v is None else trt_v}")
    if pycuda_v is None or pycuda_v.startswith("broken"):
        missing.append(f"pycuda {'not installed' if pycuda_v is None else pycuda_v}")
    has_module = importlib.util.find_spec("edge_runtime.inference.runner.tensorrt.runner") is not None
    if not has_module:
        missing.append("edge_runtime.inference.runner has no tensorrt backend yet")
    elif "tensorrt" not in runners.BACKENDS:
        b["note"] = ("edge_runtime.inference.runner.tensorrt.runner exists but load_runner does not offer it yet "
                     f"(backends: {', '.join(runners.BACKENDS)}): TensorRTRunner is used directly; no service run")
    if not smi["available"]:
        missing.append(smi["why"])
    b.update(available=not missing, why="; ".join(missing) if missing else
             f"tensorrt {trt_v}, pycuda {pycuda_v}" + (f"; {b['note']}" if b.get("note") else ""))
    backends.append(b)

    b = {"key": "torch-cuda", "label": "PyTorch eager CUDA (anchor)", "kind": "torch", "device": "cuda",
         "service": None}
    bcpu = {"key": "torch-cpu", "label": "PyTorch eager CPU (anchor, --torch-cpu)", "kind": "torch", "device": "cpu",
            "service": None}
    if not torch_cpu:
        bcpu.update(available=False, why="not asked for (--torch-cpu)")
    elif not torch.get("installed") or torch.get("error"):
        bcpu.update(available=False, why=torch.get("error") or "torch not installed")
    else:
        bcpu.update(available=True, why=f"torch {torch.get('version')}")
    if not torch.get("installed"):
        b.update(available=False, why="torch not installed")
    elif torch.get("error"):
        b.update(available=False, why=f"torch does not import: {torch['error']}")
    elif not torch.get("cuda"):
        b.update(available=False, why=f"torch {torch.get('version')}: CUDA not available "
                                      f"(build CUDA: {torch.get('cuda_build') or 'none, CPU build'})")
    else:
        b.update(available=True, why=f"torch {torch['version']} CUDA {torch['cuda_build']} on {torch['device']}")
    backends.append(b)
    backends.append(bcpu)
    return info, backends


# -- windows -------------------------------------------------------------------------------------------


def make_windows(package_dir: Path, series: Path, count: int, out: Path) -> dict:
    """``count`` windows of the preprocessed series, cut as the service cuts them, spread over the volume."""
    from edge_runtime.imaging.geometry import GeometryPolicy
    from edge_runtime.imaging.volume import load_volume
    from edge_runtime.inference.package import ModelPackage
    from edge_runtime.inference.pipeline import ModelGrid, normalize, window_starts

    package = ModelPackage.load(package_dir)
    volume = load_volume(series_files(series), GeometryPolicy())
    grid = ModelGrid.for_volume(volume, package)
    image = normalize(grid.resample(volume.array), package.normalization)
    patch = package.patch_size
    pad = [(0, max(0, p - s)) for p, s in zip(patch, image.shape, strict=True)]
    if any(a for _, a in pad):
        image = np.pad(image, pad, mode="constant", constant_values=float(image.min()))
    where = [(slice(z, z + patch[0]), slice(y, y + patch[1]), slice(x, x + patch[2]))
             for z in window_starts(image.shape[0], patch[0], package.overlap)
             for y in window_starts(image.shape[1], patch[1], package.overlap)
             for x in window_starts(image.shape[2], patch[2], package.overlap)]
    pick = np.linspace(0, len(where) - 1, min(count, len(where))).round().astype(int)
    batch = np.stack([image[where[i]] for i in pick])[:, None].astype(np.float32)
    np.save(out, batch)
    return {"path": str(out), "count": len(batch), "patch": list(patch), "series_windows": len(where),
            "model_grid": list(image.shape), "batch_size": package.batch_size, "name": package.name,
            "identity": package.identity, "mib_per_window": batch[0].nbytes / 2**20}


# -- the worker (one backend, one package, in its own process) -----------------------------------------


def torch_module(package_dir: Path):
    """The package's PyTorch module: manifest source.factory(**args) (+ weights.pt), else model.ts."""
    import torch

    manifest = json.loads((package_dir / "manifest.json").read_text())
    source = manifest.get("source") or {}
    factory = source.get("factory")
    if factory:  # the worker runs with the repository on PYTHONPATH: project factories import too
        mod_name, _, attr = factory.partition(":") if ":" in factory else factory.rpartition(".")
        fn = getattr(importlib.import_module(mod_name), attr)
        net = fn(**(source.get("args") or {}))
        weights = package_dir / "weights.pt"
        if weights.exists():
            net.load_state_dict(torch.load(weights, map_location="cpu"))
        return net.eval(), f"eager {factory}" + (" + weights.pt" if weights.exists() else "")
    if (package_dir / "model.ts").exists():
        return torch.jit.load(str(package_dir / "model.ts"), map_location="cpu").eval(), "TorchScript model.ts"
    raise RuntimeError("no PyTorch module for this package (no manifest source.factory, no model.ts)")


def worker(spec: dict) -> dict:
    x = np.load(spec["windows"])
    kind = spec["kind"]
    from edge_runtime.inference.package import ModelPackage

    package = ModelPackage.load(spec["package"])
    t0 = time.perf_counter()
    close = None
    if kind == "ort":
        from edge_runtime.inference.runner import load_runner

        runner = load_runner(package, "onnxruntime", spec["device"])
        run, info, close = runner.infer, runner.describe(), runner.close
    elif kind == "trt":
        from edge_runtime.inference import runner as runners

        engine = Path(spec["scratch"]) / f"{package.name}.{spec['precision']}.engine"
        opts = {"precision": spec["precision"], "engine": engine, "rebuild": True}
        if "tensorrt" in runners.BACKENDS:
            runner = runners.load_runner(package, "tensorrt", **opts)
            how = "load_runner"
        else:
            from edge_runtime.inference.runner.tensorrt.runner import TensorRTRunner

            runner = TensorRTRunner(package, **opts)
            how = "TensorRTRunner (direct)"
        run, info, close = runner.infer, f"{runner.describe()} via {how}", runner.close
    elif kind == "torch":
        import torch

        dev = spec["device"]
        net, what = torch_module(Path(spec["package"]))
        net = net.to(dev)
        if dev == "cuda":
            torch.backends.cudnn.benchmark = True
            where = torch.cuda.get_device_name(0)
        else:
            torch.set_num_threads(os.cpu_count() or 1)
            where = f"CPU, {torch.get_num_threads()} threads"

        def run(b: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                out = net(torch.from_numpy(b).to(dev))
                return out.float().cpu().numpy()  # .cpu() synchronises

        info = f"torch {torch.__version__} {what} on {where}"
    else:
        raise ValueError(kind)
    load_s = time.perf_counter() - t0
    # every window once at batch 1: the very first call (engine builds, autotuning) and the outputs to compare
    t = time.perf_counter()
    outs = [run(x[:1])]
    first_call = {1: time.perf_counter() - t}
    outs += [run(x[i:i + 1]) for i in range(1, len(x))]
    np.save(spec["out"], np.concatenate(outs))
    del outs
    results = []
    for batch in spec["batches"]:
        batches = [x[i:i + batch] for i in range(0, len(x) - batch + 1, batch)]
        if not batches:
            continue
        if batch not in first_call:  # a new shape: first call at this batch (TensorRT may build a profile)
            t = time.perf_counter()
            run(batches[0])
            first_call[batch] = time.perf_counter() - t
        first_s = first_call[batch]
        for b in batches[:2]:  # warm-up calls (autotuners, lazy allocations)
            run(b)
        times = []
        for _ in range(spec["reps"]):
            for b in batches:
                t = time.perf_counter()
                run(b)
                times.append((time.perf_counter() - t) / len(b))
        med = median(times)
        results.append({"batch": batch, "first_call_s": first_s, "per_window_s": times,
                        "median_ms": 1000 * med, "windows_per_s": 1.0 / med})
    if close is not None:
        close()
    extra = {}
    if kind == "torch" and spec["device"] == "cuda":
        import torch

        extra["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return {"info": info, "load_s": load_s, "results": results, **extra}


def run_worker(spec: dict, timeout: float) -> dict:
    """This module in ``--worker`` mode; any failure comes back as {"error": ...}."""
    cmd = [PYTHON, "-m", "benchmarks.gpu", "--worker", json.dumps(spec)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    try:
        proc = adopt(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                      start_new_session=True))
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            return {"error": f"timed out after {timeout:.0f} s", "stderr": tail(err)}
        finally:
            release(proc)
    except OSError as exc:
        return {"error": f"could not start the worker: {exc}"}
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                break
    why = one_line(err) or f"exit status {proc.returncode}"
    if proc.returncode and proc.returncode < 0:
        why = f"killed by signal {-proc.returncode}; {why}"
    return {"error": why, "stderr": tail(err)}


# -- (b) the service path ------------------------------------------------------------------------------


def service_path(package_dir: Path, serve_args: list[str], series: Path, runs: int, work: Path,
                 timeout: float) -> dict:
    """Cold + ``runs`` warm series through one service process; last ack -> SEG at storescp."""
    work.mkdir(parents=True, exist_ok=True)
    pacs = StoreSCP(work / "pacs", fork=False)
    adopt(pacs.proc)
    svc = None
    out: dict = {"serve_args": serve_args, "runs": []}
    try:
        try:
            svc = ServiceProcess(work, "--model", str(package_dir), "--destination", pacs.address, *serve_args,
                                 http_port=0, start_timeout=timeout)
        except Exception as exc:
            text = (work / "service.log").read_text(errors="replace")
            raise RuntimeError(f"service did not start: {one_line(text) or exc}") from exc
        adopt(svc.proc)
        out["startup_s"] = svc.t_listening - svc.t_launch
        seen: set[str] = set()
        for i in range(runs + 1):
            copy = harness.fresh_copy(series, work / "send")
            time.sleep(0.5)
            t0 = time.time()
            if (SYSTEM_BIN / "storescu").exists():
                send = storescu(svc.port, copy.files, svc.ae_title, check=False, timeout=timeout)
                sender = "DCMTK storescu"
            else:
                send = subprocess.run([PYTHON, "-m", "edge_runtime", "push", str(work / "send"),
                                       f"{svc.ae_title}@127.0.0.1:{svc.port}"], capture_output=True, text=True,
                                      timeout=timeout)
                sender = "edge-runtime push"
            if send.returncode != 0:
                raise RuntimeError(f"{sender} failed: {one_line(send.stderr + send.stdout)}")
            _, _, stored = wait_for_seg(pacs.folder, seen, copy.series_uid, timeout)
            rec = svc.record(copy.series_uid, 60)
            stages = rec["timings"]["stages"]
            ack = rec["last_received"]
            run = {"kind": "cold" if i == 0 else "warm", "sender": sender, "receive_s": ack - t0,
                   "last_ack_to_seg_s": stored - ack, "completion_wait_s": rec["timings"]["started"] - ack,
                   "inference_s": stages.get("inference"), "job_total_s": stages.get("total"), "stages": stages}
            out["runs"].append(run)
            log(f"  service {' '.join(serve_args)} {run['kind']}: last ack -> SEG {run['last_ack_to_seg_s']:.2f} s "
                f"(inference {run['inference_s']:.2f} s)")
            shutil.rmtree(work / "send", ignore_errors=True)
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        if (work / "service.log").exists():
            out["service_log_tail"] = tail((work / "service.log").read_text(errors="replace"), 2000)
    finally:
        if svc is not None:
            release(svc.proc, 60)
            svc.stop()
        release(pacs.proc, 10)
        pacs.stop()
    warm = [r for r in out["runs"] if r["kind"] == "warm"]
    cold = [r for r in out["runs"] if r["kind"] == "cold"]
    out["cold_last_ack_to_seg_s"] = cold[0]["last_ack_to_seg_s"] if cold else None
    for key in ("last_ack_to_seg_s", "inference_s", "job_total_s", "completion_wait_s", "receive_s"):
        vals = [r[key] for r in warm]
        out[f"warm_{key}"] = {"p50": pct(vals, 50), "p95": pct(vals, 95), "values": vals}
    return out


# -- report --------------------------------------------------------------------------------------------


def markdown(meta: dict, backends: list[dict], windows: list[dict], service: list[dict]) -> str:
    smi = meta["machine"]["nvidia_smi"]
    m = meta["machine"]
    gpu_names = ", ".join(g["name"] for g in smi.get("gpus", []))
    ok = {w["backend"] for w in windows if not w.get("error")}
    ok |= {s["backend"] for s in service if s.get("runs")}
    only_cpu = not smi["available"] or not ok - {"ort-cpu", "torch-cpu"}
    title = f"CPU only: CPUExecutionProvider ({m.get('cpu', '?')}, {m['cpus']} cores)" if only_cpu else \
        f"GPU: {gpu_names or 'no NVIDIA GPU'}"
    L = [f"### {meta['title']}: {title}", ""]
    if smi["available"]:
        L.append("Device: " + "; ".join(f"{g['name']} (driver {g.get('driver')}, {g.get('memory')}, compute "
                                         f"capability {g.get('compute_cap', '?')})" for g in smi["gpus"]) + ".")
    else:
        L.append(f"Device: no NVIDIA GPU ({smi['why']}); CPU {m.get('cpu', '?')}, {m['cpus']} cores.")
    torch = m["torch"]
    L += ["", f"Versions: edge-runtime {m['edge_runtime']}, onnxruntime {m['onnxruntime']} ({m['onnxruntime_device']} "
              f"build; providers {', '.join(m['onnxruntime_providers'])}), tensorrt {m['tensorrt'] or '–'}, pycuda "
              f"{m['pycuda'] or '–'}, torch {torch.get('version', '–')} (CUDA {torch.get('cuda_build') or '–'}"
              f"{', cuDNN ' + str(torch['cudnn']) if torch.get('cudnn') else ''}), numpy {m['numpy']}, Python "
              f"{m['python']}; runner backends: {', '.join(m['runner_backends'])}.",
          "", *table_head("backend", "status", "detail", left=3)]
    for b in backends:
        status = ("tried anyway" if b["why"].startswith("tried anyway") else "measured") if b["available"] \
            else "**skipped**"
        L.append(f"| {b['label']} | {status} | {b['why']} |")
    L += ["", f"#### (a) Per-window inference: the same windows of the 512x512x{meta['slices']} phantom, "
              "preprocessed as the service does; numpy in, logits out (host-device copies included); "
              f"median of {meta['reps']} passes over the windows, after a warm-up call", "",
          *table_head("package (window)", "backend", "batch", "median ms/window", "windows/s", "first call s",
                      "load s", "max abs diff vs CPU", "argmax agreement", left=2)]
    for w in windows:
        name = f"{w['package']} ({'x'.join(map(str, w['patch']))}, {w['count']} windows)"
        if w.get("error"):
            L.append(f"| {name} | {w['label']} | – | failed: {w['error']} | | | | | |")
            continue
        for r in w["results"]:
            diff = "reference" if w.get("reference") else fmt(w.get("max_abs_diff"), 3)
            agree = "reference" if w.get("reference") else fmt(w.get("argmax_agreement"), 4)
            L.append(f"| {name} | {w['label']} | {r['batch']} | {r['median_ms']:.1f} | {r['windows_per_s']:.1f} | "
                     f"{r['first_call_s']:.2f} | {w['load_s']:.2f} | {diff} | {agree} |")
    for w in windows:
        if w.get("constant_windows"):
            L.append("")
            L.append(f"- {w['package']} on {w['label']}: the comparison with ONNX Runtime CPU covers the windows "
                     f"with content; {w['constant_windows']} of {w['count']} windows are constant (air after the "
                     f"intensity window), where it differs by up to {w['max_abs_diff_constant_windows']:.3g} "
                     f"(argmax agreement {w['argmax_agreement_constant_windows']:.4f}): instance norm over a "
                     f"constant input divides rounding noise by sqrt(eps), so backends disagree there.")
    if meta.get("skip_service"):
        L += ["", "(b) service path: skipped (--skip-service)."]
    else:
        L += ["", f"#### (b) Service path: 512x512x{meta['slices']} CT, DCMTK storescu → service → DCMTK storescp "
                  "(TCP_NODELAY=1); last instance acknowledged → SEG received at storescp. Cold = first series of "
                  f"the service process, warm = {meta['service_runs']} more series (new UIDs). Seconds", "",
              *table_head("package", "service backend", "cold", "warm p50", "warm p95", "completion wait p50",
                          "inference p50", "job total p50", "series windows", "start-up s", left=2)]
        for s in service:
            if s.get("skipped"):
                L.append(f"| {s['package']} | {s['label']} | skipped: {s['skipped']} | | | | | | | |")
                continue
            if s.get("error") and not s["runs"]:
                L.append(f"| {s['package']} | {s['label']} | failed: {one_line(s['error'], 200)} | | | | | | | |")
                continue
            w = s["warm_last_ack_to_seg_s"]
            L.append(f"| {s['package']} | {s['label']} | {fmt(s['cold_last_ack_to_seg_s'])} | {fmt(w['p50'])} | "
                     f"{fmt(w['p95'])} | {fmt(s['warm_completion_wait_s']['p50'])} | "
                     f"{fmt(s['warm_inference_s']['p50'])} | {fmt(s['warm_job_total_s']['p50'])} | "
                     f"{s.get('series_windows', '–')} | {fmt(s.get('startup_s'))} |"
                     + (f" (then failed: {one_line(s['error'], 120)})" if s.get("error") else ""))
    if meta.get("notes"):
        L += ["", *[f"- {n}" for n in meta["notes"]]]
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, action="append", default=[],
                    help="another model package (repeatable), e.g. benchmarks/results/spleen-unet")
    ap.add_argument("--no-bundled", action="store_true", help="leave out the bundled package")
    ap.add_argument("--slices", type=int, default=100, help="series length for the windows and the service path")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--windows", type=int, default=8, help="windows per package for (a)")
    ap.add_argument("--reps", type=int, default=5, help="passes over the windows per backend and batch")
    ap.add_argument("--trt-precision", default="fp16", choices=("fp32", "fp16", "int8"))
    ap.add_argument("--service-runs", type=int, default=2, help="warm series per service backend (after a cold one)")
    ap.add_argument("--skip-service", action="store_true", help="only (a)")
    ap.add_argument("--skip-windows", action="store_true", help="only (b)")
    ap.add_argument("--worker-timeout", type=float, default=1800.0, help="per backend and package, seconds")
    ap.add_argument("--timeout", type=float, default=1800.0, help="service start and each series, seconds")
    ap.add_argument("--tag", default="gpu", help="output name in benchmarks/results")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--torch-cpu", action="store_true", help="also PyTorch eager on the CPU (anchor)")
    ap.add_argument("--try-anyway", action="append", default=[], metavar="KEY",
                    help="measure this backend even if detection says it is not there (ort-cuda, ort-tensorrt, "
                         "tensorrt, torch-cuda): its error is reported")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0

    harness.stop_children_on_exit()
    from edge_runtime.inference.package import DEFAULT_PACKAGE, ModelPackage, PackageError

    info, backends = detect(args.trt_precision, args.torch_cpu)
    for b in backends:
        if b["key"] in args.try_anyway and not b["available"]:
            b.update(available=True, why=f"tried anyway (--try-anyway); detection said: {b['why']}")
    for b in backends:
        log(f"{b['label']}: {'available' if b['available'] else 'skipped'} ({b['why']})")
    notes: list[str] = []
    packages: list[Path] = ([] if args.no_bundled else [Path(DEFAULT_PACKAGE)]) + list(args.model)
    good: list[Path] = []
    for p in packages:
        try:
            ModelPackage.load(p)
            good.append(p.resolve())
        except PackageError as exc:
            notes.append(f"package {p} skipped: {one_line(str(exc))}")
            log(notes[-1])
    work = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    windows: list[dict] = []
    service: list[dict] = []
    try:
        series = harness.base_series(args.slices, args.size, args.seed, work / "series", purpose="gpu bench")
        win_info = {}
        win_content = {}
        for p in good:
            win_info[p] = make_windows(p, series, args.windows, work / f"windows-{len(win_info)}.npy")
            x = np.load(win_info[p]["path"])
            win_content[p] = x.reshape(len(x), -1).std(axis=1) > 0
            win_info[p]["constant_windows"] = int((~win_content[p]).sum())
            del x
        if not args.skip_windows:
            for p in good:
                wi = win_info[p]
                ref = None
                for b in [b for b in backends if b["available"]]:
                    out_npy = work / f"out-{b['key']}-{wi['name']}.npy"
                    spec = {"kind": b["kind"], "device": b["device"], "package": str(p), "windows": wi["path"],
                            "batches": sorted({1, wi["batch_size"]}), "reps": args.reps, "out": str(out_npy),
                            "precision": b.get("precision", "fp32"), "scratch": str(work)}
                    log(f"(a) {wi['identity']} on {b['label']} ...")
                    res = run_worker(spec, args.worker_timeout)
                    row = {"package": wi["identity"], "patch": wi["patch"], "count": wi["count"],
                           "series_windows": wi["series_windows"], "backend": b["key"], "label": b["label"],
                           **res}
                    if not res.get("error") and out_npy.exists():
                        out = np.load(out_npy)
                        if b["key"] == "ort-cpu":
                            ref = out
                            row["reference"] = True
                        elif ref is not None and ref.shape == out.shape:
                            # windows with content only: on a constant window (pure air after the intensity
                            # window) instance norm divides rounding noise by sqrt(eps), and backends disagree
                            keep = win_content[p]
                            if keep.any():
                                row["max_abs_diff"] = float(np.abs(out[keep] - ref[keep]).max())
                                row["argmax_agreement"] = float((out[keep].argmax(1) == ref[keep].argmax(1)).mean())
                            if (~keep).any():
                                row["constant_windows"] = int((~keep).sum())
                                row["max_abs_diff_constant_windows"] = float(np.abs(out[~keep] - ref[~keep]).max())
                                row["argmax_agreement_constant_windows"] = float(
                                    (out[~keep].argmax(1) == ref[~keep].argmax(1)).mean())
                        del out
                    if res.get("error"):
                        log(f"    failed: {res['error']}")
                    else:
                        log("    " + ", ".join(f"batch {r['batch']}: {r['median_ms']:.1f} ms/window"
                                               for r in res["results"]))
                    windows.append(row)
        if not args.skip_service:
            if not (SYSTEM_BIN / "storescp").exists():
                notes.append(f"(b) skipped: {SYSTEM_BIN / 'storescp'} missing (apt-get install dcmtk)")
            else:
                for p in good:
                    wi = win_info[p]
                    for b in backends:
                        label = " ".join(b["service"]) if b.get("service") else b["label"]
                        entry = {"package": wi["identity"], "backend": b["key"], "label": label,
                                 "series_windows": wi["series_windows"], "runs": []}
                        if not b.get("service"):
                            if b["kind"] == "trt" and b["available"]:
                                entry["skipped"] = "the service has no --backend tensorrt yet"
                            else:
                                continue  # PyTorch has no service backend
                        elif not b["available"]:
                            entry["skipped"] = "backend not available (above)"
                        else:
                            log(f"(b) {wi['identity']}: serve {label} ...")
                            entry.update(service_path(p, b["service"], series, args.service_runs,
                                                      work / f"svc-{b['key']}-{wi['name']}", args.timeout))
                            if entry.get("error"):
                                log(f"    failed: {entry['error']}")
                        service.append(entry)
    except Exception:
        notes.append(f"the benchmark stopped early: {one_line(traceback.format_exc())}")
        traceback.print_exc()
    finally:
        harness.stop_children()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    meta = {"title": "Inference backends on this machine", "tag": args.tag, "slices": args.slices,
            "windows": args.windows, "reps": args.reps, "service_runs": args.service_runs,
            "skip_service": args.skip_service, "trt_precision": args.trt_precision,
            "packages": [str(p) for p in good], "machine": info, "notes": notes,
            "command": command("gpu", argv)}
    md = markdown(meta, backends, windows, service)
    path = write_results(args.tag, md, {"meta": meta, "backends": backends, "windows": windows, "service": service})
    print(md)
    log(f"\nwrote {path} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
