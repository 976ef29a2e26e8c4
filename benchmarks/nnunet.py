"""nnU-Net's own predictor against the runtime's nnU-Net pipeline, side by side, on the CPU, same settings.

Both segment the same phantom CT (``--shape`` voxels at ``--spacing`` mm, default 300 x 512 x 512) with the same
model, folds, mirroring and tile step: ``nnUNetPredictor.predict_single_npy_array`` (preprocessing, sliding
window, export to the input's grid) and the runtime's ``predict_case`` on the package's ONNX model in ONNX
Runtime. Each runs in its own child process, so that its peak memory (``ru_maxrss``) is its own; the parent
reports wall time, peak memory and Dice per label between the two label maps::

    .venv/bin/edge-export package --nnunet tests/export/nnunet_model/trained --folds 0 1 --labels-json L --out P
    .venv/bin/python -m benchmarks.nnunet --package P [--shape 300 512 512] [--threads 2]
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
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from benchmarks.report import command, fmt, machine, table_head, write_results

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "tests" / "export" / "nnunet_model" / "trained"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--package", type=Path, required=True, help="a package from edge-export package --nnunet --folds")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="the nnU-Net results folder it was made from")
    ap.add_argument("--shape", type=int, nargs=3, default=(300, 512, 512), metavar=("Z", "Y", "X"))
    ap.add_argument("--spacing", type=float, nargs=3, default=(1.0, 0.75, 0.75), metavar=("Z", "Y", "X"))
    ap.add_argument("--threads", type=int, default=2, help="torch threads and ONNX Runtime intra-op threads")
    ap.add_argument("--child", choices=("nnunet", "runtime"), help=argparse.SUPPRESS)
    ap.add_argument("--labels-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return _child(args)

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for side in ("nnunet", "runtime"):
            out = Path(tmp) / f"{side}.npy"
            child = [sys.executable, "-m", "benchmarks.nnunet", "--child", side, "--labels-out", str(out),
                     "--package", str(args.package), "--model", str(args.model), "--threads", str(args.threads),
                     "--shape", *map(str, args.shape), "--spacing", *map(str, args.spacing)]
            proc = subprocess.run(child, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            results[side] = json.loads(proc.stdout.strip().splitlines()[-1])
            results[side]["labels"] = np.load(out)
    from edge_runtime.inference.package import ModelPackage
    from export.parity import label_dice

    package = ModelPackage.load(args.package)
    names = {lab.value: lab.name for lab in package.labels}
    dice = label_dice("ct", results["nnunet"].pop("labels"), results["runtime"].pop("labels"), names,
                      package.num_classes)
    settings = package.nnunet
    assert settings is not None
    lines = [
        f"nnU-Net's predictor against the runtime: {'x'.join(map(str, args.shape))} CT at "
        f"{'x'.join(f'{s:g}' for s in args.spacing)} mm, folds {', '.join(settings.folds)}, mirroring "
        f"{'on' if settings.use_mirroring and settings.mirror_axes else 'off'}, tile step {settings.tile_step_size}, "
        f"{args.threads} threads each, CPU.",
        "",
        *table_head("side", "wall s", "peak RSS MiB"),
    ]
    for side, r in results.items():
        lines.append(f"| {side} | {fmt(r['wall_s'])} | {fmt(r['peak_rss_mib'], 0)} |")
    lines += ["", *table_head("label", "Dice (runtime vs nnU-Net)", "nnU-Net voxels")]
    lines += [f"| {d.label} {d.name} | {d.dice:.4f} | {d.reference_voxels} |" for d in dice]
    speed = results["nnunet"]["wall_s"] / results["runtime"]["wall_s"]
    memory = results["runtime"]["peak_rss_mib"] / results["nnunet"]["peak_rss_mib"]
    lines += ["", f"Runtime: {speed:.2f}x nnU-Net's speed, {memory:.2f}x its peak memory.", "",
              f"`{command('nnunet', argv)}`"]
    text = "\n".join(lines)
    print(text)
    write_results("nnunet", text, {"machine": machine(), "results": results,
                                   "dice": [d.__dict__ for d in dice], "args": vars(args)})
    return 0


def _child(args: argparse.Namespace) -> int:
    from phantom import make_phantom

    image = make_phantom(tuple(args.shape), tuple(args.spacing), rng=3).hu[None].astype(np.float32)
    spacing = tuple(float(s) for s in args.spacing)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if args.child == "nnunet":
        import torch

        from edge_runtime.inference.package import ModelPackage
        from export.nnunet_parity import NnunetReference
        from export.nnunet_source import load_nnunet_source

        torch.set_num_threads(args.threads)
        os.environ["nnUNet_def_n_proc"] = str(args.threads)
        settings = ModelPackage.load(args.package).nnunet
        assert settings is not None
        source = load_nnunet_source(args.model, list(settings.folds), use_mirroring=settings.use_mirroring,
                                    tile_step_size=settings.tile_step_size)
        t0 = time.perf_counter()
        labels, _ = NnunetReference(source, use_mirroring=settings.use_mirroring,
                                    tile_step_size=settings.tile_step_size).predict(image, spacing)
    else:
        from edge_runtime.inference.nnunet.pipeline import predict_case
        from edge_runtime.inference.package import ModelPackage
        from edge_runtime.inference.runner.onnxruntime import OnnxRuntimeRunner

        package = ModelPackage.load(args.package)
        assert package.nnunet is not None
        with OnnxRuntimeRunner(package, threads=args.threads) as runner:
            t0 = time.perf_counter()
            labels = predict_case(image, spacing, package.nnunet, runner, package.num_classes,
                                  package.batch_size).labels
    wall = time.perf_counter() - t0
    np.save(args.labels_out, labels)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"wall_s": wall, "peak_rss_mib": peak / 1024, "input_rss_mib": base / 1024}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
