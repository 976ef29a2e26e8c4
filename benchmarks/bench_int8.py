"""INT8 (QDQ, ``edge-export quantize``) against FP32 in ONNX Runtime on the CPU: speed per window and Dice.

Model: by default the MONAI spleen UNet shape (``benchmarks.models``: ``UNet(3, 1, 2, (16, 32, 64, 128, 256),
(2, 2, 2, 2), num_res_units=2)``, seeded random weights) exported through ``export.onnx.export_onnx`` with the
spleen bundle's manifest (patch 96^3, 2.0 x 1.5 x 1.5 mm, ct_window -57..164); or any FP32 package with
``--package DIR`` (e.g. the trained phantom U-Net, whose labels the phantom's ground truth also has).

Steps: quantise with ``export.quantize.quantize_package`` (phantom calibration, per-channel INT8 weights,
symmetric INT8 activations); time both models with the runtime's ``OnnxRuntimeRunner`` on the same
normalised phantom windows (batch 1; ``--repeats`` passes over ``--windows`` windows, the two models
interleaved window by window, after a warm-up; medians); run both through the runtime's sliding window over
one phantom volume and compare label maps (Dice INT8 against FP32 per label; against the phantom's truth too
where the package's label names are phantom labels). Prints a Markdown table and writes
``benchmarks/results/int8.md`` and ``int8.json``.

INT8 QDQ on a CPU is not automatically faster: ONNX Runtime runs quantised convolutions with integer kernels
only where it has them (and they pay off with VNNI / AMX); elsewhere Q/DQ pairs add work. The table reports
what this machine does. Usage::

    python -m benchmarks.bench_int8 [--package DIR] [--windows 8] [--repeats 5] [--volume-shape 96 192 192]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.make_spleen_package import spleen_manifest
from benchmarks.report import cpu_model, write_results

SPLEEN_MANIFEST = spleen_manifest(
    "Benchmark model: the MONAI spleen_ct_segmentation UNet shape with seeded random weights.", batch_size=1
)


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]


def cpu_name() -> str:
    return cpu_model() or platform.processor() or "unknown CPU"


def build_spleen_package(out: Path, seed: int) -> Any:
    from benchmarks.models import spleen_unet
    from export.onnx import export_onnx
    from export.package import write_package

    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(spleen_unet(seed), Path(tmp) / "model.onnx", example_shape=(1, 1, 96, 96, 96))
        return write_package(out, path, SPLEEN_MANIFEST)


def time_pairs(runners: dict[str, Any], windows: list[np.ndarray], repeats: int) -> dict[str, list[float]]:
    """Seconds per window for each runner, the runners interleaved window by window (alternating which goes
    first) so that the load of a shared machine hits both alike; one warm-up pass first."""
    for runner in runners.values():
        for w in windows:
            runner.infer(w)
    times: dict[str, list[float]] = {name: [] for name in runners}
    order = list(runners)
    for r in range(repeats):
        for w in windows:
            for name in order if r % 2 == 0 else order[::-1]:
                t0 = time.perf_counter()
                runners[name].infer(w)
                times[name].append(time.perf_counter() - t0)
    return times


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum() + b.sum())
    return 1.0 if total == 0 else 2.0 * float(np.logical_and(a, b).sum()) / total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--package", type=Path, default=None, help="FP32 package (default: the spleen UNet shape)")
    ap.add_argument("--work", type=Path, default=None, help="folder for the packages (default: a temporary one)")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: all cores)")
    ap.add_argument("--volume-shape", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                    help="phantom volume on the model grid for the Dice check (default 96 x 192 x 192 or 1 patch)")
    ap.add_argument("--calibration-volumes", type=int, default=4)
    ap.add_argument("--windows-per-volume", type=int, default=8)
    ap.add_argument("--method", choices=("minmax", "percentile", "entropy"), default="minmax")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)

    import onnxruntime as ort

    from edge_runtime.inference.package import ModelPackage
    from edge_runtime.inference.pipeline import argmax_labels, normalize, sliding_window, window_starts
    from edge_runtime.inference.runner.onnxruntime import OnnxRuntimeRunner
    from export.engine import count_qdq_nodes
    from export.parity import model_spacing
    from export.quantize import QuantizeOptions, quantize_package
    from phantom import LABELS, make_phantom

    tmp = tempfile.TemporaryDirectory()
    work = args.work or Path(tmp.name)
    t0 = time.perf_counter()
    fp32 = ModelPackage.load(args.package) if args.package else build_spleen_package(work / "fp32", args.seed)
    export_s = time.perf_counter() - t0
    patch = fp32.patch_size
    shape = tuple(args.volume_shape) if args.volume_shape else tuple(
        max(p, n) for p, n in zip(patch, (96, 192, 192), strict=True)
    )

    t0 = time.perf_counter()
    options = QuantizeOptions(calibration_volumes=args.calibration_volumes, windows_per_volume=args.windows_per_volume,
                              method=args.method, volume_shape=shape)  # type: ignore[arg-type]
    int8, gate = quantize_package(fp32.root, work / "int8", options)
    quantize_s = time.perf_counter() - t0

    # the same windows for both: normalised phantom patches at the sliding window's positions
    spacing = model_spacing(fp32)
    phantom = make_phantom(shape, spacing, rng=7000 + args.seed)  # type: ignore[arg-type]
    image = normalize(phantom.hu.astype(np.float32, copy=True), fp32.normalization)
    starts = [window_starts(n, p, fp32.overlap) for n, p in zip(image.shape, patch, strict=True)]
    positions = [(z, y, x) for z in starts[0] for y in starts[1] for x in starts[2]]
    rng = np.random.default_rng(args.seed)
    picks = sorted(rng.choice(len(positions), size=min(args.windows, len(positions)), replace=False))
    windows = []
    for i in picks:
        z, y, x = positions[i]
        w = image[z : z + patch[0], y : y + patch[1], x : x + patch[2]]
        windows.append(np.ascontiguousarray(np.repeat(w[None, None], fp32.input_channels, axis=1)))

    rows, maps = {}, {}
    packages = {"fp32": fp32, "int8": int8}
    runners = {name: OnnxRuntimeRunner(p, threads=args.threads) for name, p in packages.items()}
    try:
        times = time_pairs(runners, windows, args.repeats)
        for name, package in packages.items():
            logits, n_windows = sliding_window(image, package, runners[name])
            maps[name] = argmax_labels(logits)
            rows[name] = {
                "median_s": statistics.median(times[name]),
                "min_s": min(times[name]),
                "timed_windows": len(times[name]),
                "model_mb": package.model_path.stat().st_size / 1e6,
                "qdq_nodes": count_qdq_nodes(package.model_path),
                "runner": runners[name].describe(),
                "volume_windows": n_windows,
            }
        pair_ratios = [a / b for a, b in zip(times["fp32"], times["int8"], strict=True)]
    finally:
        for runner in runners.values():
            runner.close()
    truth_of = {name.lower(): value for value, name in LABELS.items()}
    labels = []
    for lab in fp32.labels:
        entry = {
            "value": lab.value,
            "name": lab.name,
            "dice_int8_vs_fp32": dice(maps["fp32"] == lab.value, maps["int8"] == lab.value),
            "fp32_voxels": int((maps["fp32"] == lab.value).sum()),
            "int8_voxels": int((maps["int8"] == lab.value).sum()),
        }
        truth = truth_of.get(lab.name.lower())
        if truth is not None:
            entry["dice_fp32_vs_truth"] = dice(maps["fp32"] == lab.value, phantom.labels == truth)
            entry["dice_int8_vs_truth"] = dice(maps["int8"] == lab.value, phantom.labels == truth)
        labels.append(entry)

    ratio = rows["fp32"]["median_s"] / rows["int8"]["median_s"]
    pair_ratio = statistics.median(pair_ratios)
    flags = cpu_flags()
    header = (
        f"FP32 vs INT8 (QDQ) in ONNX Runtime {ort.__version__}, CPU: {fp32.identity}, patch "
        f"{'x'.join(map(str, patch))}, batch 1; {cpu_name()}, {os.cpu_count()} CPU(s), "
        f"flags: {', '.join(flags) or 'none of avx2/avx512/vnni/amx'}; Python {platform.python_version()}."
    )
    table = [
        header,
        "",
        "| model | median s / window | min s / window | speed vs FP32 | model MB | Q/DQ nodes |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in ("fp32", "int8"):
        r = rows[name]
        speed = 1.0 if name == "fp32" else ratio
        table.append(
            f"| {name.upper()} | {r['median_s']:.3f} | {r['min_s']:.3f} | {speed:.2f}x | {r['model_mb']:.1f} "
            f"| {r['qdq_nodes']} |"
        )
    table += [
        "",
        f"Timed on {len(windows)} phantom windows x {args.repeats} passes, FP32 and INT8 interleaved window by "
        f"window (after a warm-up pass); median of the per-window FP32/INT8 ratios: {pair_ratio:.2f}x. "
        f"Label maps through the sliding window over one phantom volume {'x'.join(map(str, shape))} "
        f"({rows['fp32']['volume_windows']} windows); calibration: {args.calibration_volumes} other phantom "
        f"volumes x {args.windows_per_volume} windows ({args.method}).",
        "",
        "| label | Dice INT8 vs FP32 | FP32 voxels | INT8 voxels | Dice FP32 vs truth | Dice INT8 vs truth |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for e in labels:
        t32 = f"{e['dice_fp32_vs_truth']:.4f}" if "dice_fp32_vs_truth" in e else "-"
        t8 = f"{e['dice_int8_vs_truth']:.4f}" if "dice_int8_vs_truth" in e else "-"
        table.append(f"| {e['value']} {e['name']} | {e['dice_int8_vs_fp32']:.4f} | {e['fp32_voxels']} "
                     f"| {e['int8_voxels']} | {t32} | {t8} |")
    if not args.package:
        table += ["", "Random weights: the spleen UNet here does not segment the spleen, so Dice against FP32 "
                      "measures how much INT8 moves near-tied logits, not clinical accuracy."]
    verdict = "faster than" if ratio > 1.05 else "slower than" if ratio < 0.95 else "about as fast as"
    table += ["", f"INT8 is {verdict} FP32 here ({ratio:.2f}x). Quantisation gate "
                  f"({'passed' if gate.passed else 'FAILED'}, min Dice {options.min_dice}): lowest Dice "
                  f"{gate.needed_min_dice:.4f}."]
    text = "\n".join(table) + "\n"
    print(text)
    if not args.no_write:
        write_results("int8", text, {
            "package": fp32.identity, "patch": list(patch), "windows": len(windows), "repeats": args.repeats,
            "volume_shape": list(shape), "threads": args.threads, "speed_ratio_fp32_over_int8": ratio,
            "median_pair_ratio": pair_ratio, "times_s": times,
            "rows": rows, "labels": labels, "gate": gate.to_dict(), "export_s": export_s,
            "quantize_s": quantize_s, "calibration": {"volumes": args.calibration_volumes,
                                                      "windows_per_volume": args.windows_per_volume,
                                                      "method": args.method},
            "cpu": cpu_name(), "cpu_flags": flags, "cpus": os.cpu_count(), "onnxruntime": ort.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
        })
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
