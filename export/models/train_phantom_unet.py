"""Train the phantom U-Net on the CPU within a wall-clock budget; export it; evaluate it on held-out phantoms.

``python -m export.models.train_phantom_unet --out DIR --minutes 20 --seed 0``

What it does, in order (everything up to the saved checkpoint counts against ``--minutes``):

1. **Data**: a pool of synthetic CT torso phantoms (``phantom.make_phantom``, ``variety=True``)
   with varied fields of view, held in memory at the model's target spacing. Most are drawn directly on the
   model grid; a fraction (``--fine-fraction``) are drawn at a finer, scanner-like spacing and brought to the
   model grid exactly as the runtime does (``edge_runtime.inference.pipeline.ModelGrid``: linear resampling of the HU,
   nearest label), so the model also sees resampled input. Pool, validation and held-out phantoms use
   disjoint seeds.
2. **Training**: random patches of the manifest's patch size (two thirds centred on a random labelled voxel,
   the label drawn uniformly, so the small organs are seen often), CT window normalisation, light noise
   augmentation, loss = cross entropy + soft Dice (batch Dice over the five labels), AdamW with linear warm-up
   and a polynomial decay over the *time* budget, ``torch.set_num_threads(--threads)``.
3. **Validation** every ``--val-every`` seconds and at the end: the model is exported to ONNX and run through
   the runtime's real path (``edge_runtime.inference.pipeline.segment`` with the ONNX Runtime runner) on validation
   phantoms at a scanner-like spacing; per-label Dice on the source grid. The best checkpoint (mean Dice) is
   kept.
4. **Held-out evaluation** (after the budget, timed separately): the package is built with ``edge-export``'s
   own code (ONNX export, parity check), then each held-out phantom at realistic CT geometry (512 x 512,
   0.7-0.9 mm pixels, 1-3 mm slices) is written as a DICOM series, read back with
   ``edge_runtime.imaging.volume.load_volume``, segmented with ``segment`` and scored with
   ``edge_runtime.quality.metrics.compare_label_maps(..., surface=False)``.

Outputs in ``--out``: ``phantom_unet.pt`` (state dict, architecture and recipe: what ``edge-export
default-model --checkpoint`` reads), ``recipe.json`` (hyperparameters, seeds, phantom settings, timings,
validation history and held-out Dice), ``package/`` (the model package, with ``parity.json`` and
``training.json``) and ``train.log``.

The phantoms, patches and the runtime-path scoring are in :mod:`export.models.phantom_cases`; this module holds the
command line, the recipe, the budget clock and the loop.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from export.models.phantom_cases import (
    HELDOUT_SEED_BASE,
    REALISTIC_HELDOUT,
    SMALL_HELDOUT,
    VAL_SEED_BASE,
    Case,
    Geometry,
    Pool,
    build_pool,
    evaluate_package,
    log,
    pool_seeds,
    sample_patch,
    summarise,
)
from phantom import LABELS

#: ``python -m`` this module: the command the recipe records
COMMAND = "export.models.train_phantom_unet"

NUM_CLASSES = len(LABELS) + 1


# ---------------------------------------------------------------------------------------------------


def _portable_args(argv: Sequence[str]) -> list[str]:
    """The command line as the recipe records it: the output folder is this machine's business (``DIR``)."""
    args = list(argv)
    for i, a in enumerate(args):
        if a == "--out" and i + 1 < len(args):
            args[i + 1] = "DIR"
        elif a.startswith("--out="):
            args[i] = "--out=DIR"
    return args


class BudgetClock:
    """Seconds charged against the training budget.

    ``wall``: elapsed wall-clock time, everything included.
    ``cpu``: for the training steps, the larger of the process CPU time divided by the number of threads and
    the CPU time of the main thread (which is never idle during a step on a dedicated machine), i.e. about the
    wall time the steps would have taken with the cores to themselves: a machine shared with other jobs
    slows the steps down but does not shrink the compute they get. Everything else (phantoms, validation) is
    charged at wall time. CPU time includes threads spinning while they wait for a descheduled peer and
    cache misses caused by other jobs, so under contention this overcharges rather than undercharges.
    """

    def __init__(self, kind: str, threads: int):
        self.kind = kind
        self.threads = max(1, threads)
        self.t0 = time.perf_counter()
        self.step_wall = 0.0
        self.step_cpu = 0.0

    def wall(self) -> float:
        return time.perf_counter() - self.t0

    def now(self) -> float:
        wall = self.wall()
        if self.kind == "wall":
            return wall
        return wall - self.step_wall + self.step_cpu

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        w, c, m = time.perf_counter(), time.process_time(), time.thread_time()
        try:
            yield
        finally:
            self.step_wall += time.perf_counter() - w
            self.step_cpu += max((time.process_time() - c) / self.threads, time.thread_time() - m)


def soft_dice_loss(logits: Any, target: Any, smooth: float = 1e-5) -> Any:
    """1 - mean over the labels (background excluded) of the batch soft Dice."""
    import torch

    probs = torch.softmax(logits, dim=1)[:, 1:]
    onehot = torch.zeros_like(logits).scatter_(1, target.unsqueeze(1), 1.0)[:, 1:]
    dims = (0, 2, 3, 4)
    tp = (probs * onehot).sum(dims)
    fp = (probs * (1 - onehot)).sum(dims)
    fn = ((1 - probs) * onehot).sum(dims)
    dice = (2 * tp + smooth) / (2 * tp + fp + fn + smooth)
    return 1 - dice.mean()


def save_checkpoint(path: Path, model: Any, recipe: dict[str, Any]) -> None:
    import torch

    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    torch.save({"format": 1, "model": model.config(), "state_dict": state, "recipe": recipe}, path)


def build_package(checkpoint: Path, out: Path) -> Any:
    """The model package of ``checkpoint`` in ``out``, as ``edge-export default-model`` builds it."""
    from export.models.default_package import build_unet_package

    return build_unet_package(out, checkpoint)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=f"python -m {COMMAND}", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    ap.add_argument("--minutes", type=float, default=20.0, help="wall-clock budget: data, training, validation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads")
    ap.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="what --minutes measures: wall-clock time (default), or for the training steps the process CPU "
        "time / threads (the same compute on a machine shared with other jobs)",
    )
    ap.add_argument("--target-spacing", type=float, nargs=3, default=[1.5, 1.5, 1.5], metavar=("Z", "Y", "X"))
    ap.add_argument("--patch", type=int, nargs=3, default=[64, 96, 96], metavar=("Z", "Y", "X"))
    ap.add_argument("--batch", type=int, default=2, help="training batch size")
    ap.add_argument("--channels", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    ap.add_argument("--deep-supervision", type=int, default=2, help="auxiliary heads below full resolution")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--warmup-steps", type=int, default=30)
    ap.add_argument("--fg-prob", type=float, default=0.8, help="share of patches centred on a labelled voxel")
    ap.add_argument(
        "--label-weights",
        type=float,
        nargs=len(LABELS),
        default=[1.0, 1.0, 4.0, 4.0, 1.0],
        metavar="W",
        help="relative odds of centring a patch on each label (lung liver spleen kidney bone)",
    )
    ap.add_argument(
        "--precision",
        choices=("bf16", "fp32"),
        default="bf16",
        help="forward/backward in bfloat16 autocast (fp32 weights and optimiser) or plain fp32",
    )
    ap.add_argument("--pool", type=int, default=40, help="training phantoms held in memory")
    ap.add_argument("--fine-fraction", type=float, default=0.2, help="share of the pool drawn at scanner spacing")
    ap.add_argument("--fov-z", type=float, nargs=2, default=[240.0, 520.0], metavar=("MIN", "MAX"))
    ap.add_argument("--fov-xy", type=float, nargs=2, default=[330.0, 500.0], metavar=("MIN", "MAX"))
    ap.add_argument("--val", type=int, default=2, help="validation phantoms")
    ap.add_argument("--val-every", type=float, default=400.0, help="seconds between validations")
    ap.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap (manifest)")
    ap.add_argument("--infer-batch", type=int, default=2, help="sliding-window batch size (manifest)")
    ap.add_argument(
        "--heldout",
        choices=("realistic", "small", "none"),
        default="realistic",
        help="held-out evaluation after the budget: realistic CT geometry, a small smoke check, or none",
    )
    ap.add_argument("--no-dicom", action="store_true", help="held-out volumes from arrays, not DICOM files")
    ap.add_argument("--small", action="store_true", help="tiny phantoms and validation (smoke tests)")
    return ap.parse_args(argv)


# ---------------------------------------------------------------------------------------------------
# The run: data, model, recipe, the loop on the budget clock, held-out evaluation
# ---------------------------------------------------------------------------------------------------


def data_settings(args: argparse.Namespace) -> tuple[dict[str, Any], Geometry]:
    """The data section of the recipe (model grid, patch, normalisation, phantom fields of view) and the geometry
    of the validation phantoms (shape, spacing)."""
    target = tuple(float(v) for v in args.target_spacing)
    patch = tuple(int(v) for v in args.patch)
    divisor = 2 ** (len(args.channels) - 1)
    if any(p % divisor for p in patch):
        raise SystemExit(f"patch {patch} must be a multiple of {divisor} for {len(args.channels)} levels")
    data_cfg: dict[str, Any] = {
        "target_spacing": list(target),
        "patch_size": list(patch),
        "normalization": {"kind": "ct_window", "lower": -1024.0, "upper": 1024.0, "mean": 0.0, "std": 512.0},
        "fov_z_mm": list(args.fov_z),
        "fov_xy_mm": list(args.fov_xy),
        "fine_slice_mm": [1.0, 3.0],
        "fine_pixel_mm": [0.7, 1.0],
    }
    val_geometry: Geometry = ((100, 300, 300), (3.0, 1.2, 1.2))
    if args.small:
        data_cfg["fine_pixel_mm"] = [2.5, 3.5]
        data_cfg["fine_slice_mm"] = [3.0, 5.0]
        val_geometry = ((32, 80, 80), (8.0, 4.0, 4.0))
    return data_cfg, val_geometry


def training_recipe(
    args: argparse.Namespace,
    argv: Sequence[str] | None,
    model: Any,
    data_cfg: dict[str, Any],
    pool: Pool,
    val_geometry: Geometry,
    val_cases: Sequence[tuple[tuple[int, int, int], tuple[float, float, float], int]],
) -> dict[str, Any]:
    """How the model is trained, as ``recipe.json`` and the package's ``training.json`` record it; the loop and the
    held-out evaluation add their results."""
    import torch

    from export.models.unet import count_parameters

    seeds = pool_seeds(args.seed, args.pool)
    return {
        "what": (
            "Phantom-trained demonstration model: a compact 3D U-Net trained on the CPU only on synthetic CT "
            "phantoms from the phantom package. Not a clinical model; never trained or tested on patient data."
        ),
        "command": f"python -m {COMMAND} " + " ".join(_portable_args(sys.argv[1:] if argv is None else argv)),
        "seed": args.seed,
        "model": {
            "class": "export.models.unet:UNet3D",
            "config": model.config(),
            "parameters": count_parameters(model),
            "normalization_layers": "BatchNorm3d (folded into the convolutions at export)",
        },
        "data": {
            **data_cfg,
            "generator": "phantom.make_phantom(variety=True)",
            "labels": {str(k): v for k, v in LABELS.items()},
            "pool_size": args.pool,
            "pool_seeds": f"{seeds[0]}..{seeds[-1]}",
            "fine_fraction": args.fine_fraction,
            "fine_resampling": "edge_runtime.inference.pipeline.ModelGrid: HU rounded, linear; labels nearest",
            "crop": "body bounding box (HU > -500) plus half a patch",
            "pool_gigabytes": round(pool.nbytes / 1e9, 3),
        },
        "training": {
            "patch_size": list(data_cfg["patch_size"]),
            "batch_size": args.batch,
            "foreground_patch_probability": args.fg_prob,
            "foreground_label_weights": {LABELS[v]: float(w) for v, w in zip(LABELS, args.label_weights, strict=False)},
            "precision": (
                "bfloat16 autocast for forward and backward, float32 weights, optimiser and loss"
                if args.precision == "bf16"
                else "float32"
            ),
            "patch_jitter": "uniform +-patch/4 around the labelled centre voxel",
            "augmentation": "Gaussian noise, std uniform 0-20 HU, on half the patches; no flips (laterality)",
            "loss": (
                "cross entropy + soft Dice (batch Dice, labels 1-5, smooth 1e-5), deep supervision on the "
                "decoder outputs at full, 1/2 and 1/4 resolution, weights 4:2:1 (labels subsampled)"
            ),
            "optimizer": {"name": "AdamW", "lr": args.lr, "weight_decay": args.weight_decay, "betas": [0.9, 0.999]},
            "schedule": (
                f"linear warm-up over {args.warmup_steps} steps, then lr * (1 - t/T)^0.9 over the "
                "budget T on the budget clock (time-based polynomial decay)"
            ),
            "threads": args.threads,
            "memory_format": "channels_last_3d",
            "budget_minutes": args.minutes,
        },
        "validation": {
            "phantoms": args.val,
            "geometry": {"shape": list(val_geometry[0]), "spacing_mm": list(val_geometry[1])},
            "seeds": [c[2] for c in val_cases],
            "every_seconds": args.val_every,
            "path": "ONNX export + edge_runtime.inference.pipeline.segment (ONNX Runtime CPU) on a Volume; "
            "Dice on the source grid",
            "selection": "best mean Dice over labels",
        },
        "inference": {"overlap": args.overlap, "batch_size": args.infer_batch, "blending": "gaussian"},
        "environment": {
            "torch": str(torch.__version__),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
        },
    }


@dataclass
class TrainingLoop:
    """Optimisation steps until the budget clock reaches the deadline, less the time the final validation will
    take; validation through the runtime's path every ``--val-every`` seconds and at the end; the best weights
    (mean Dice over the labels) are kept in ``best_path`` and loaded back at the end."""

    args: argparse.Namespace
    model: Any
    recipe: dict[str, Any]
    val_cases: Sequence[tuple[tuple[int, int, int], tuple[float, float, float], int]]
    clock: BudgetClock
    best_path: Path
    logf: Any
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=lambda: {"score": -1.0, "step": 0})
    step: int = 0
    step_seconds: list[float] = field(default_factory=list)
    validation_seconds: float = 0.0
    last_validation_cost: float = 0.0

    def validate(self, tag: str) -> None:
        """Export the current weights, segment the validation phantoms with the package, keep the best weights."""
        import torch

        tv = time.perf_counter()
        self.model.eval()
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(Path(tmp) / "ck.pt", self.model, self.recipe)
            with contextlib.redirect_stdout(io.StringIO()):
                build_package(Path(tmp) / "ck.pt", Path(tmp) / "pkg")
            results = evaluate_package(
                Path(tmp) / "pkg", self.val_cases, threads=self.args.threads, dicom=False, logf=self.logf
            )
        self.model.train()
        summary = summarise(results)
        elapsed = self.clock.now()
        entry = {
            "step": self.step,
            "budget_s": round(elapsed, 1),
            "wall_s": round(self.clock.wall(), 1),
            "tag": tag,
            **summary,
        }
        self.history.append(entry)
        if summary["mean_of_labels"] >= self.best["score"]:
            self.best.update(score=summary["mean_of_labels"], step=self.step)
            torch.save({k: v.detach().clone() for k, v in self.model.state_dict().items()}, self.best_path)
        self.last_validation_cost = time.perf_counter() - tv
        self.validation_seconds += self.last_validation_cost
        log(
            f"val @ step {self.step} ({elapsed:.0f} s): mean Dice "
            + " ".join(f"{k} {v:.3f}" for k, v in summary["mean_dice"].items())
            + f" | {self.last_validation_cost:.0f} s",
            self.logf,
        )

    def run(self, pool: Sequence[Case], rng: np.random.Generator, deadline: float) -> None:
        """Train until ``deadline`` (budget clock seconds), validate a last time and load the best weights."""
        import torch
        import torch.nn.functional as F

        args, model, clock = self.args, self.model, self.clock
        pz, py, px = (int(v) for v in args.patch)
        patch = (pz, py, px)
        std = float(self.recipe["data"]["normalization"]["std"])
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        t_train_start = clock.now()
        train_span = max(1.0, deadline - t_train_start)
        next_val = t_train_start + args.val_every
        loss_ema = None
        ce_ema = None
        label_weights = {value: float(w) for value, w in zip(LABELS, args.label_weights, strict=False)}
        # deep supervision: weights 1, 1/2, 1/4 ... normalised to sum 1 (nnU-Net)
        ds_raw = [0.5**k for k in range(1 + len(model.aux_heads))]
        ds_weights = [w / sum(ds_raw) for w in ds_raw]
        model.train()
        while True:
            now = clock.now()
            # keep time for the final validation (estimated from the last one) and saving
            reserve = (self.last_validation_cost or (3.0 if args.small else 12.0) * args.val) + 5.0
            if now + reserve >= deadline and self.step > 0:
                break
            frac = min(1.0, (now - t_train_start) / max(1.0, train_span - reserve))
            lr = args.lr * min(1.0, (self.step + 1) / args.warmup_steps) * (1.0 - frac) ** 0.9
            for group in optimizer.param_groups:
                group["lr"] = max(lr, args.lr * 1e-3)
            ts = time.perf_counter()
            with clock.step():
                xs, ys = [], []
                for _ in range(args.batch):
                    case = pool[int(rng.integers(len(pool)))]
                    img, lab = sample_patch(case, rng, patch, args.fg_prob, label_weights)
                    if rng.random() < 0.5:
                        img = img + rng.normal(0.0, rng.uniform(0, 20.0) / std, img.shape).astype(np.float32)
                    xs.append(img)
                    ys.append(lab)
                x = torch.from_numpy(np.stack(xs)[:, None]).contiguous(memory_format=torch.channels_last_3d)
                y = torch.from_numpy(np.stack(ys).astype(np.int64))
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                    outputs = model.forward_train(x)
                loss = torch.zeros(())
                for k, (weight, logits) in enumerate(zip(ds_weights, outputs, strict=False)):
                    labels = y[:, :: 2**k, :: 2**k, :: 2**k] if k else y
                    logits = logits.float()
                    term_ce = F.cross_entropy(logits, labels)
                    loss = loss + weight * (term_ce + soft_dice_loss(logits, labels))
                    if k == 0:
                        ce = term_ce
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            self.step += 1
            self.step_seconds.append(time.perf_counter() - ts)
            loss_value = loss.item()
            loss_ema = loss_value if loss_ema is None else 0.95 * loss_ema + 0.05 * loss_value
            ce_value = ce.item()
            ce_ema = ce_value if ce_ema is None else 0.95 * ce_ema + 0.05 * ce_value
            if self.step % 25 == 0:
                log(
                    f"step {self.step} loss {loss_ema:.4f} (ce {ce_ema:.4f}) lr {lr:.2e} "
                    f"{np.mean(self.step_seconds[-25:]):.2f} s/step "
                    f"(budget {clock.now():.0f} s, wall {clock.wall():.0f} s)",
                    self.logf,
                )
            if clock.now() >= next_val and clock.now() + 2 * reserve < deadline:
                self.validate("periodic")
                next_val = clock.now() + args.val_every
        self.validate("final")
        model.load_state_dict(torch.load(self.best_path, weights_only=True))
        self.best_path.unlink(missing_ok=True)

    def results(self, t_train: float, t_data: float) -> dict[str, Any]:
        """What the loop did, for the recipe's ``training`` section."""
        args, clock, times = self.args, self.clock, self.step_seconds
        return {
            "budget_clock": args.clock,
            "budget_seconds_charged": round(clock.now(), 1),
            "step_seconds_charged_cpu": round(clock.step_cpu, 1),
            "step_wall_seconds": round(clock.step_wall, 1),
            "steps": self.step,
            "patches_seen": self.step * args.batch,
            "voxels_seen": self.step * args.batch * int(np.prod(args.patch)),
            "mean_step_seconds": round(float(np.mean(times)), 3) if times else None,
            "best_step": self.best["step"],
            "wall_seconds": {
                "total": round(t_train, 1),
                "data": round(t_data, 1),
                "validation": round(self.validation_seconds, 1),
                "optimisation": round(t_train - t_data - self.validation_seconds, 1),
            },
        }


def heldout_evaluation(
    args: argparse.Namespace, model: Any, recipe: dict[str, Any], ckpt_path: Path, package_dir: Path, logf: Any
) -> int:
    """Build the package from the checkpoint and, unless ``--heldout none``, score it on the held-out phantoms
    (outside the budget); the results go into the recipe, the checkpoint and the package's ``training.json``.
    Returns the exit status: 1 when the package fails its parity gate."""
    if package_dir.exists():
        shutil.rmtree(package_dir)
    if args.heldout == "none":
        _pkg, report = build_package(ckpt_path, package_dir)
        return 0 if report.passed else 1
    te = time.perf_counter()
    geoms = REALISTIC_HELDOUT if args.heldout == "realistic" else SMALL_HELDOUT
    cases = [(shape, spacing, HELDOUT_SEED_BASE + i) for i, (shape, spacing) in enumerate(geoms)]
    _pkg, report = build_package(ckpt_path, package_dir)
    log("parity:\n" + report.table(), logf)
    log(f"held-out evaluation ({args.heldout}, {'DICOM series' if not args.no_dicom else 'arrays'}):", logf)
    results = evaluate_package(package_dir, cases, threads=args.threads, dicom=not args.no_dicom, logf=logf)
    summary = summarise(results)
    recipe["heldout"] = {
        "geometry": args.heldout,
        "seeds": [c[2] for c in cases],
        "path": (
            "phantom -> DICOM series (write_series) -> edge_runtime.imaging.volume.load_volume -> "
            "edge_runtime.inference.pipeline.segment (ONNX Runtime CPU, package manifest) -> "
            "edge_runtime.quality.metrics.compare_label_maps(surface=False) on the source grid"
        )
        if not args.no_dicom
        else "phantom array -> Volume -> segment -> compare_label_maps(surface=False)",
        "onnxruntime_threads": args.threads,
        "cases": results,
        **summary,
        "all_labels_at_least_0.90": bool(min(summary["min_dice"].values()) >= 0.90),
        "seconds": round(time.perf_counter() - te, 1),
    }
    recipe["parity_passed"] = bool(report.passed)
    save_checkpoint(ckpt_path, model, recipe)
    # the package's training.json must carry the held-out results: rebuild from the final checkpoint
    _pkg, report = build_package(ckpt_path, package_dir)
    log(
        "held-out mean Dice "
        + " ".join(f"{k} {v:.4f}" for k, v in summary["mean_dice"].items())
        + " | min "
        + " ".join(f"{k} {v:.4f}" for k, v in summary["min_dice"].items()),
        logf,
    )
    return 0 if report.passed else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from export.models.unet import UNet3D, count_parameters

    clock = BudgetClock(args.clock, args.threads)
    t_start = time.perf_counter()
    deadline = args.minutes * 60.0  # on the budget clock
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.log", "w", encoding="utf-8") as logf:
        torch.set_num_threads(args.threads)
        torch.manual_seed(args.seed)
        rng = np.random.default_rng(args.seed)
        data_cfg, val_geometry = data_settings(args)
        pool = build_pool(args.pool, args.fine_fraction, args.seed, rng, data_cfg, logf)
        val_shape, val_spacing = val_geometry
        val_cases = [(val_shape, val_spacing, VAL_SEED_BASE + 10_000 * args.seed + i) for i in range(args.val)]

        norm = data_cfg["normalization"]
        model = UNet3D(
            in_channels=1,
            num_classes=NUM_CLASSES,
            channels=args.channels,
            input_mean=norm["mean"],
            input_std=norm["std"],
            deep_supervision=args.deep_supervision,
        )
        log(f"model: UNet3D {model.config()} ({count_parameters(model):,} parameters)", logf)
        # nn.Module.to takes memory_format at run time; torch's type stubs leave it out
        model = model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
        recipe = training_recipe(args, argv, model, data_cfg, pool, val_geometry, val_cases)

        ckpt_path = out / "phantom_unet.pt"
        loop = TrainingLoop(args, model, recipe, val_cases, clock, out / "best_state.pt", logf)
        loop.run(pool.cases, rng, deadline)
        t_train = time.perf_counter() - t_start
        recipe["training"].update(loop.results(t_train, pool.seconds))
        recipe["validation"]["history"] = loop.history
        save_checkpoint(ckpt_path, model.to(memory_format=torch.contiguous_format), recipe)
        log(
            f"training done in {t_train:.0f} s wall, {clock.now():.0f} s on the {args.clock} budget clock "
            f"({loop.step} steps); best step {loop.best['step']} (val mean Dice {loop.best['score']:.4f}); "
            f"checkpoint {ckpt_path} ({ckpt_path.stat().st_size / 1e6:.2f} MB)",
            logf,
        )

        package_dir = out / "package"
        code = heldout_evaluation(args, model, recipe, ckpt_path, package_dir, logf)
        (out / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n", encoding="utf-8")
        log(f"wrote {ckpt_path}, {out / 'recipe.json'} and {package_dir}", logf)
    return code


if __name__ == "__main__":
    sys.exit(main())
