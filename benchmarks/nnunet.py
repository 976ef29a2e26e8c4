"""nnU-Net's own predictor against the runtime's nnU-Net pipeline, side by side, on the CPU, same settings.

Both segment the same phantom CT (``--shape`` voxels at ``--spacing`` mm, default 300 x 512 x 512) with the same
model, folds, mirroring and tile step: ``nnUNetPredictor.predict_single_npy_array`` (preprocessing, sliding
window, export to the input's grid; no probabilities asked for, as ``nnUNetv2_predict`` without
``--save_probabilities``) and the runtime's ``predict_case`` on the package's ONNX model in ONNX Runtime. Each
runs in its own child process, so that its peak memory (``ru_maxrss``) is its own; the parent reports wall time,
peak memory, Dice per label between the two label maps and where each side's time went, stage by stage::

    .venv/bin/edge-export package --nnunet tests/export/nnunet_model/trained --folds 0 1 --labels-json L --out P
    .venv/bin/python -m benchmarks.nnunet --package P [--shape 300 512 512] [--threads 2]

The stages are timed by wrapping each side's own functions for the run (:class:`StageClock`); a stage's time
excludes the wrapped stages it calls, and "other" is the wall time no stage accounts for.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.report import command, fmt, machine, table_head, write_results

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "tests" / "export" / "nnunet_model" / "trained"

#: the runtime's way back in one pass per slab (the three stages before it, and the confidence)
FUSED = "resample back + argmax + uncrop + confidence, fused per slab"
#: the stages both sides are broken into, in pipeline order
STAGES = ("crop and transpose", "normalise", "resample in", "sliding window: tiles, flips, blending",
          "network (every mirrored copy)", "resample back", "argmax, uncrop, transpose back",
          "confidence (runtime only)", FUSED, "postprocessing", "other")


class StageClock:
    """Wall time per stage, taken by wrapping the functions that do each stage. Wrapped calls nest: a stage's
    time excludes the wrapped stages it calls, so the stages add up to the wall time of the outermost."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self._children: list[float] = []

    def wrap(self, fn: Callable[..., Any], stage: str) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._children.append(0.0)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                total = time.perf_counter() - t0
                self.seconds[stage] += total - self._children.pop()
                if self._children:
                    self._children[-1] += total

        return timed

    def patch(self, owner: Any, name: str, stage: str) -> None:
        setattr(owner, name, self.wrap(getattr(owner, name), stage))

    def patch_property(self, cls: type, name: str, stage: str) -> None:
        """A property that returns a function (nnU-Net's ``resampling_fn_*``): the function it returns is timed."""
        getter = getattr(cls, name).fget
        setattr(cls, name, property(lambda obj: self.wrap(getter(obj), stage)))

    def breakdown(self, wall: float) -> dict[str, float]:
        out = dict(self.seconds)
        out["other"] = max(0.0, wall - sum(v for k, v in out.items() if k != "other"))
        return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--package", type=Path, required=True, help="a package from edge-export package --nnunet --folds")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="the nnU-Net results folder it was made from")
    ap.add_argument("--shape", type=int, nargs=3, default=(300, 512, 512), metavar=("Z", "Y", "X"))
    ap.add_argument("--spacing", type=float, nargs=3, default=(1.0, 0.75, 0.75), metavar=("Z", "Y", "X"))
    ap.add_argument("--threads", type=int, default=2, help="torch threads and ONNX Runtime intra-op threads")
    ap.add_argument("--sides", nargs="+", choices=("nnunet", "runtime"), default=("nnunet", "runtime"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--child", choices=("nnunet", "runtime"), help=argparse.SUPPRESS)
    ap.add_argument("--labels-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return _child(args)

    results: dict[str, dict[str, Any]] = {}
    info = machine()
    with tempfile.TemporaryDirectory() as tmp:
        for side in args.sides:
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
    info["load_avg_end"] = os.getloadavg()
    if len(results) < 2:
        for side, r in results.items():
            r.pop("labels")
            print(side, json.dumps(r, indent=1))
        return 0
    text, dice = _report(args, argv, results, info)
    print(text)
    write_results("nnunet", text, {"machine": info, "results": results, "dice": [d.__dict__ for d in dice],
                                   "args": vars(args)})
    return 0


def _report(args: argparse.Namespace, argv: Sequence[str] | None, results: dict[str, dict[str, Any]],
            info: dict[str, Any]) -> tuple[str, list[Any]]:
    from edge_runtime.inference.package import ModelPackage
    from export.parity import label_dice

    package = ModelPackage.load(args.package)
    names = {lab.value: lab.name for lab in package.labels}
    dice = label_dice("ct", results["nnunet"].pop("labels"), results["runtime"].pop("labels"), names,
                      package.num_classes)
    settings = package.nnunet
    assert settings is not None
    load = f"load average {info['load_avg_start'][0]:.1f} at the start, {info['load_avg_end'][0]:.1f} at the end"
    lines = [
        f"nnU-Net's predictor against the runtime: {'x'.join(map(str, args.shape))} CT at "
        f"{'x'.join(f'{s:g}' for s in args.spacing)} mm, folds {', '.join(settings.folds)}, mirroring "
        f"{'on' if settings.use_mirroring and settings.mirror_axes else 'off'}, tile step {settings.tile_step_size}, "
        f"{args.threads} threads each, CPU ({info.get('cpus')} cores, {load}).",
        "",
        *table_head("side", "wall s", "CPU s (all threads)", "peak RSS MiB"),
    ]
    for side, r in results.items():
        lines.append(f"| {side} | {fmt(r['wall_s'])} | {fmt(r['cpu_s'])} | {fmt(r['peak_rss_mib'], 0)} |")
    lines += ["", *table_head("stage", "nnU-Net s", "runtime s")]
    for stage in STAGES:
        theirs, ours = (results[side]["stages"][stage] for side in ("nnunet", "runtime"))
        if theirs or ours:
            lines.append(f"| {stage} | {fmt(theirs)} | {fmt(ours)} |")
    lines += ["", *table_head("label", "Dice (runtime vs nnU-Net)", "nnU-Net voxels")]
    lines += [f"| {d.label} {d.name} | {d.dice:.4f} | {d.reference_voxels} |" for d in dice]
    speed = results["nnunet"]["wall_s"] / results["runtime"]["wall_s"]
    cpu = results["nnunet"]["cpu_s"] / results["runtime"]["cpu_s"]
    memory = results["runtime"]["peak_rss_mib"] / results["nnunet"]["peak_rss_mib"]
    lines += ["", f"Runtime: {speed:.2f}x nnU-Net's speed in wall time ({cpu:.2f}x in CPU time), {memory:.2f}x its "
              "peak memory.", "",
              f"`{command('nnunet', argv)}`"]
    return "\n".join(lines), dice


def _child(args: argparse.Namespace) -> int:
    from phantom import make_phantom

    image = make_phantom(tuple(args.shape), tuple(args.spacing), rng=3).hu[None].astype(np.float32)
    spacing = tuple(float(s) for s in args.spacing)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    clock = StageClock()
    run = _nnunet_side(args, clock) if args.child == "nnunet" else _runtime_side(args, clock)
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    labels = run(image, spacing)
    wall = time.perf_counter() - t0
    cpu = _cpu_seconds() - cpu0
    np.save(args.labels_out, labels)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"wall_s": wall, "cpu_s": cpu, "peak_rss_mib": peak / 1024, "input_rss_mib": base / 1024,
                      "stages": clock.breakdown(wall)}))
    return 0


def _cpu_seconds() -> float:
    """User and system CPU time of this process, every thread: on a shared machine, steadier than wall time."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


Predict = Callable[[np.ndarray, tuple[float, ...]], np.ndarray]


def _nnunet_side(args: argparse.Namespace, clock: StageClock) -> Predict:
    """nnUNetPredictor with the package's folds, mirroring and tile step, its stages wrapped."""
    import warnings

    import nnunetv2.inference.predict_from_raw_data as raw
    import nnunetv2.preprocessing.preprocessors.default_preprocessor as default
    import torch
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

    from edge_runtime.inference.package import ModelPackage
    from export.nnunet_parity import NnunetReference
    from export.nnunet_source import load_nnunet_source

    torch.set_num_threads(args.threads)
    os.environ["nnUNet_def_n_proc"] = str(args.threads)
    settings = ModelPackage.load(args.package).nnunet
    assert settings is not None
    source = load_nnunet_source(args.model, list(settings.folds), use_mirroring=settings.use_mirroring,
                                tile_step_size=settings.tile_step_size)
    reference = NnunetReference(source, use_mirroring=settings.use_mirroring, tile_step_size=settings.tile_step_size)
    clock.patch(default, "crop_to_nonzero", "crop and transpose")
    clock.patch(default.DefaultPreprocessor, "run_case_npy", "crop and transpose")
    clock.patch(default.DefaultPreprocessor, "_normalize", "normalise")
    clock.patch_property(ConfigurationManager, "resampling_fn_data", "resample in")
    clock.patch(raw.nnUNetPredictor, "predict_logits_from_preprocessed_data", "sliding window: tiles, flips, blending")
    clock.patch(raw.nnUNetPredictor, "_internal_maybe_mirror_and_predict", "network (every mirrored copy)")
    clock.patch_property(ConfigurationManager, "resampling_fn_probabilities", "resample back")
    clock.patch(raw, "convert_predicted_logits_to_segmentation_with_correct_shape", "argmax, uncrop, transpose back")
    assert not reference.postprocessing[0], "the benchmark's model has no postprocessing.pkl"

    def predict(image: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nnunetv2 and its helpers warn about their own dependencies
            return np.asarray(reference.predictor.predict_single_npy_array(image, {"spacing": list(spacing)}))

    return predict


def _runtime_side(args: argparse.Namespace, clock: StageClock) -> Predict:
    """``predict_case`` on the package's ONNX model, its stages wrapped."""
    import edge_runtime.inference.nnunet.pipeline as pipeline
    import edge_runtime.inference.nnunet.preprocessing as preprocessing
    from edge_runtime.inference.package import ModelPackage
    from edge_runtime.inference.runner.onnxruntime import OnnxRuntimeRunner

    package = ModelPackage.load(args.package)
    settings = package.nnunet
    assert settings is not None
    runner = OnnxRuntimeRunner(package, threads=args.threads)
    runner.infer = clock.wrap(runner.infer, "network (every mirrored copy)")  # type: ignore[method-assign]
    for name in ("preprocess", "nonzero_mask", "bounding_box"):
        clock.patch(preprocessing, name, "crop and transpose")
    clock.patch(pipeline, "preprocess", "crop and transpose")  # the name predict_case calls
    clock.patch(preprocessing, "normalize", "normalise")
    clock.patch(preprocessing, "resample", "resample in")
    clock.patch(pipeline, "predict_logits", "sliding window: tiles, flips, blending")
    clock.patch(pipeline, "resample", "resample back")
    clock.patch(pipeline, "chosen_probability", "confidence (runtime only)")
    clock.patch(pipeline, "labels_and_confidence", FUSED)
    clock.patch(pipeline, "apply_postprocessing", "postprocessing")
    case = clock.wrap(pipeline.predict_case, "argmax, uncrop, transpose back")

    def predict(image: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
        return case(image, spacing, settings, runner, package.num_classes, package.batch_size).labels

    return predict


if __name__ == "__main__":
    raise SystemExit(main())
