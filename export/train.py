"""Train the phantom U-Net on the CPU within a wall-clock budget; export it; evaluate it on held-out phantoms.

``python -m export.train --out DIR --minutes 20 --seed 0``

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
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from phantom import LABELS, make_phantom

NUM_CLASSES = len(LABELS) + 1

# Seeds: training pool, validation and held-out phantoms never share one.
POOL_SEED_BASE = 1_000_000  # + 10_000 * seed + i
VAL_SEED_BASE = 2_000_000  # + 10_000 * seed + i
HELDOUT_SEED_BASE = 9_000_000  # + i, independent of --seed

#: held-out geometries: (slices, rows, columns), spacing (z, y, x) mm. Realistic CT: 512 x 512 at
#: 0.7-0.9 mm, 1-3 mm slices, 150-300 slices (280-450 mm along z).
REALISTIC_HELDOUT: list[tuple[tuple[int, int, int], tuple[float, float, float]]] = [
    ((200, 512, 512), (2.0, 0.8, 0.8)),
    ((280, 512, 512), (1.0, 0.75, 0.75)),
    ((150, 512, 512), (3.0, 0.9, 0.9)),
    ((300, 512, 512), (1.25, 0.7, 0.7)),
    ((160, 512, 512), (2.5, 0.85, 0.85)),
    ((240, 512, 512), (1.5, 0.78, 0.78)),
]
#: a quick check for smoke tests
SMALL_HELDOUT: list[tuple[tuple[int, int, int], tuple[float, float, float]]] = [((40, 96, 96), (8.0, 4.0, 4.0))]


def log(msg: str, file: Any = None) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    if file is not None:
        file.write(line + "\n")
        file.flush()


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One phantom on the model grid: normalised image (float16) and labels, with labelled voxel samples."""

    image: np.ndarray
    labels: np.ndarray
    fg: dict[int, np.ndarray]  # label -> (n, 3) voxel indices (a random subset)
    seed: int
    source: str


def normalise(hu: np.ndarray, norm: dict[str, float]) -> np.ndarray:
    out = np.clip(hu, norm["lower"], norm["upper"]).astype(np.float32)
    out -= norm["mean"]
    out /= norm["std"]
    return out


def _model_grid(hu: np.ndarray, spacing: Sequence[float], target: Sequence[float]) -> Any:
    """The runtime's model grid for a regular volume ``hu`` with ``spacing``."""
    from edge_runtime.inference.pipeline import ModelGrid

    volume = _volume_from_array(hu, spacing)
    return ModelGrid.for_volume(volume, SimpleNamespace(target_spacing=tuple(target)))  # type: ignore[arg-type]


def make_case(
    seed: int,
    rng: np.random.Generator,
    cfg: dict[str, Any],
    fine: bool,
) -> Case:
    target = tuple(cfg["target_spacing"])
    patch = tuple(cfg["patch_size"])
    fz = rng.uniform(*cfg["fov_z_mm"])
    fxy = rng.uniform(*cfg["fov_xy_mm"])
    fy, fx = fxy * rng.uniform(0.92, 1.0), fxy
    fov = (fz, fy, fx)
    if fine:
        sz = rng.uniform(*cfg["fine_slice_mm"])
        sxy = rng.uniform(*cfg["fine_pixel_mm"])
        spacing = (sz, sxy, sxy)
        shape = tuple(int(round(f / s)) for f, s in zip(fov, spacing, strict=False))
        ph = make_phantom(shape, spacing, rng=seed, variety=True)
        grid = _model_grid(ph.hu, spacing, target)
        hu = grid.resample(np.rint(ph.hu))  # rounded as stored in DICOM
        idx = [np.clip(np.rint(c).astype(np.intp), 0, n - 1) for c, n in zip(grid.coords, shape, strict=False)]
        labels = ph.labels[np.ix_(*idx)]
        source = f"fine {shape} @ {tuple(round(s, 3) for s in spacing)} -> model grid"
    else:
        shape = tuple(max(p, int(round(f / s))) for p, f, s in zip(patch, fov, target, strict=False))
        ph = make_phantom(shape, target, rng=seed, variety=True)
        hu, labels = ph.hu, ph.labels
        source = f"direct {shape} @ {target}"
    # crop to the body (plus half a patch of air), where the voxels worth learning from are
    body = hu > -500
    keep = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        nz = np.flatnonzero(body.any(axis=other))
        lo, hi = (int(nz[0]), int(nz[-1]) + 1) if nz.size else (0, hu.shape[axis])
        half = patch[axis] // 2
        lo, hi = max(0, lo - half), min(hu.shape[axis], hi + half)
        if hi - lo < patch[axis]:
            lo = max(0, min(lo, hu.shape[axis] - patch[axis]))
            hi = min(hu.shape[axis], lo + patch[axis])
        keep.append(slice(lo, hi))
    hu, labels = hu[tuple(keep)], np.ascontiguousarray(labels[tuple(keep)])
    image = normalise(hu, cfg["normalization"]).astype(np.float16)
    fg: dict[int, np.ndarray] = {}
    sub = labels[::2, ::2, ::2]
    for value in LABELS:
        pts = np.argwhere(sub == value)
        if len(pts):
            if len(pts) > 4000:
                pts = pts[rng.choice(len(pts), 4000, replace=False)]
            fg[value] = (pts * 2).astype(np.int32)
    return Case(image=image, labels=labels, fg=fg, seed=seed, source=source)


def sample_patch(
    case: Case,
    rng: np.random.Generator,
    patch: tuple[int, int, int],
    fg_prob: float,
    label_weights: dict[int, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    shape = case.image.shape
    present = [v for v in case.fg if len(case.fg[v])]
    if present and rng.random() < fg_prob:
        w = np.array([(label_weights or {}).get(v, 1.0) for v in present], dtype=np.float64)
        value = present[int(rng.choice(len(present), p=w / w.sum()))]
        pts = case.fg[value]
        centre = pts[int(rng.integers(len(pts)))]
        jitter = [int(rng.integers(-(p // 4), p // 4 + 1)) for p in patch]
        start = [int(c) + j - p // 2 for c, j, p in zip(centre, jitter, patch, strict=False)]
    else:
        start = [int(rng.integers(0, max(1, n - p + 1))) for n, p in zip(shape, patch, strict=False)]
    start = [min(max(0, s), max(0, n - p)) for s, n, p in zip(start, shape, patch, strict=False)]
    where = tuple(slice(s, s + p) for s, p in zip(start, patch, strict=False))
    img = case.image[where].astype(np.float32)
    lab = case.labels[where]
    if img.shape != patch:  # volume smaller than the patch: pad like the runtime (image minimum, background)
        pad = [(0, p - n) for p, n in zip(patch, img.shape, strict=False)]
        img = np.pad(img, pad, constant_values=float(case.image.min()))
        lab = np.pad(lab, pad, constant_values=0)
    return img, lab


# ---------------------------------------------------------------------------------------------------
# Runtime-path evaluation
# ---------------------------------------------------------------------------------------------------


def _volume_from_array(hu: np.ndarray, spacing: Sequence[float]) -> Any:
    from edge_runtime.imaging.volume import Volume

    return Volume(
        array=np.rint(hu).astype(np.float32),  # HU as a CT series stores them
        spacing=tuple(float(s) for s in spacing),  # type: ignore[arg-type]
        positions=np.arange(hu.shape[0], dtype=np.float64) * float(spacing[0]),
        origin=np.zeros(3),
        row_direction=np.array([1.0, 0.0, 0.0]),
        column_direction=np.array([0.0, 1.0, 0.0]),
        datasets=[],
        regular=True,
    )


def evaluate_package(
    package_dir: Path,
    cases: Sequence[tuple[tuple[int, int, int], tuple[float, float, float], int]],
    *,
    threads: int,
    dicom: bool,
    logf: Any = None,
) -> list[dict[str, Any]]:
    """Segment each (shape, spacing, seed) phantom through the runtime and score it against its ground truth.

    ``dicom=True``: the phantom is written as a DICOM series and read back with ``load_volume`` (the path a
    series takes in the service); otherwise the ``Volume`` is built from the array directly.
    """
    from edge_runtime.inference.package import ModelPackage
    from edge_runtime.inference.pipeline import segment
    from edge_runtime.inference.runner import load_runner
    from edge_runtime.quality.metrics import compare_label_maps

    package = ModelPackage.load(package_dir)
    runner = load_runner(package, threads=threads)
    results = []
    for shape, spacing, seed in cases:
        t0 = time.perf_counter()
        ph = make_phantom(shape, spacing, rng=seed, variety=True)
        if dicom:
            from edge_runtime.imaging.volume import load_volume
            from phantom import write_series

            with tempfile.TemporaryDirectory() as tmp:
                info = write_series(ph.hu, ph.spacing, Path(tmp) / "ct", rng=seed)
                volume = load_volume(info.paths)
            volume.datasets = []
        else:
            volume = _volume_from_array(ph.hu, spacing)
        t_load = time.perf_counter() - t0
        t0 = time.perf_counter()
        seg = segment(volume, package, runner)
        t_seg = time.perf_counter() - t0
        metrics = compare_label_maps(seg.labels, ph.labels, spacing, labels=list(LABELS), surface=False)
        dice = {LABELS[k]: round(float(m.dice), 4) for k, m in metrics.items()}
        result = {
            "seed": int(seed),
            "shape": [int(v) for v in shape],
            "spacing_mm": [float(v) for v in spacing],
            "dice": dice,
            "windows": int(seg.windows),
            "segment_seconds": round(t_seg, 2),
            "segment_timings": {k: round(v, 2) for k, v in seg.timings.items()},
            "phantom_and_io_seconds": round(t_load, 2),
        }
        results.append(result)
        log(
            f"  {'x'.join(map(str, shape))} @ {spacing} seed {seed}: "
            + " ".join(f"{k} {v:.4f}" for k, v in dice.items())
            + f" | segment {t_seg:.1f} s ({seg.windows} windows)",
            logf,
        )
    return results


def summarise(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    names = list(LABELS.values())
    mean = {n: round(float(np.mean([r["dice"][n] for r in results])), 4) for n in names}
    worst = {n: round(float(np.min([r["dice"][n] for r in results])), 4) for n in names}
    return {"mean_dice": mean, "min_dice": worst, "mean_of_labels": round(float(np.mean(list(mean.values()))), 4)}


# ---------------------------------------------------------------------------------------------------
# Training
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
    def step(self) -> Any:
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
    from export.cli import build_unet_package

    return build_unet_package(out, checkpoint)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m export.train", description=__doc__.splitlines()[0])
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


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    import torch.nn.functional as F

    from export.models.unet import UNet3D, count_parameters

    clock = BudgetClock(args.clock, args.threads)
    t_start = time.perf_counter()
    deadline = args.minutes * 60.0  # on the budget clock
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / "train.log", "w", encoding="utf-8")  # noqa: SIM115
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    target = tuple(float(v) for v in args.target_spacing)
    patch = tuple(int(v) for v in args.patch)
    divisor = 2 ** (len(args.channels) - 1)
    if any(p % divisor for p in patch):
        raise SystemExit(f"patch {patch} must be a multiple of {divisor} for {len(args.channels)} levels")
    norm = {"kind": "ct_window", "lower": -1024.0, "upper": 1024.0, "mean": 0.0, "std": 512.0}
    data_cfg: dict[str, Any] = {
        "target_spacing": list(target),
        "patch_size": list(patch),
        "normalization": norm,
        "fov_z_mm": list(args.fov_z),
        "fov_xy_mm": list(args.fov_xy),
        "fine_slice_mm": [1.0, 3.0],
        "fine_pixel_mm": [0.7, 1.0],
    }
    val_geometry = ((100, 300, 300), (3.0, 1.2, 1.2))
    if args.small:
        data_cfg["fine_pixel_mm"] = [2.5, 3.5]
        data_cfg["fine_slice_mm"] = [3.0, 5.0]
        val_geometry = ((32, 80, 80), (8.0, 4.0, 4.0))

    # -- data -------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    n_fine = int(round(args.pool * args.fine_fraction))
    fine_slots = set(rng.choice(args.pool, n_fine, replace=False).tolist()) if n_fine else set()
    pool: list[Case] = []
    for i in range(args.pool):
        seed = POOL_SEED_BASE + 10_000 * args.seed + i
        pool.append(make_case(seed, rng, data_cfg, fine=i in fine_slots))
    pool_bytes = sum(c.image.nbytes + c.labels.nbytes for c in pool)
    t_data = time.perf_counter() - t0
    log(f"pool: {len(pool)} phantoms ({n_fine} resampled from scanner spacing), "
        f"{pool_bytes / 1e9:.2f} GB, {t_data:.1f} s", logf)
    val_cases = [(val_geometry[0], val_geometry[1], VAL_SEED_BASE + 10_000 * args.seed + i) for i in range(args.val)]

    # -- model ------------------------------------------------------------------------------------------
    model = UNet3D(
        in_channels=1,
        num_classes=NUM_CLASSES,
        channels=args.channels,
        input_mean=norm["mean"],
        input_std=norm["std"],
        deep_supervision=args.deep_supervision,
    )
    n_params = count_parameters(model)
    log(f"model: UNet3D {model.config()} ({n_params:,} parameters)", logf)
    model = model.to(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)

    pool_first = POOL_SEED_BASE + 10_000 * args.seed
    recipe: dict[str, Any] = {
        "what": (
            "Phantom-trained demonstration model: a compact 3D U-Net trained on the CPU only on synthetic CT "
            "phantoms from phantom. Not a clinical model; never trained or tested on patient data."
        ),
        "command": "python -m export.train " + " ".join(_portable_args(sys.argv[1:] if argv is None else argv)),
        "seed": args.seed,
        "model": {"class": "export.models.unet:UNet3D", "config": model.config(), "parameters": n_params,
                  "normalization_layers": "BatchNorm3d (folded into the convolutions at export)"},
        "data": {
            **data_cfg,
            "generator": "phantom.make_phantom(variety=True)",
            "labels": {str(k): v for k, v in LABELS.items()},
            "pool_size": args.pool,
            "pool_seeds": f"{pool_first}..{pool_first + args.pool - 1}",
            "fine_fraction": args.fine_fraction,
            "fine_resampling": "edge_runtime.inference.pipeline.ModelGrid: HU rounded, linear; labels nearest",
            "crop": "body bounding box (HU > -500) plus half a patch",
            "pool_gigabytes": round(pool_bytes / 1e9, 3),
        },
        "training": {
            "patch_size": list(patch),
            "batch_size": args.batch,
            "foreground_patch_probability": args.fg_prob,
            "foreground_label_weights": {LABELS[v]: float(w) for v, w in zip(LABELS, args.label_weights, strict=False)},
            "precision": ("bfloat16 autocast for forward and backward, float32 weights, optimiser and loss"
                          if args.precision == "bf16" else "float32"),
            "patch_jitter": "uniform +-patch/4 around the labelled centre voxel",
            "augmentation": "Gaussian noise, std uniform 0-20 HU, on half the patches; no flips (laterality)",
            "loss": ("cross entropy + soft Dice (batch Dice, labels 1-5, smooth 1e-5), deep supervision on the "
                     "decoder outputs at full, 1/2 and 1/4 resolution, weights 4:2:1 (labels subsampled)"),
            "optimizer": {"name": "AdamW", "lr": args.lr, "weight_decay": args.weight_decay, "betas": [0.9, 0.999]},
            "schedule": (f"linear warm-up over {args.warmup_steps} steps, then lr * (1 - t/T)^0.9 over the "
                         "budget T on the budget clock (time-based polynomial decay)"),
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
            "cpu_count": __import__("os").cpu_count(),
        },
    }

    ckpt_path = out / "phantom_unet.pt"
    best_path = out / "best_state.pt"
    history: list[dict[str, Any]] = []
    best = {"score": -1.0, "step": 0}
    step = 0
    t_val_total = 0.0
    last_val_cost = 0.0
    t_train_start = clock.now()
    train_span = max(1.0, deadline - t_train_start)
    next_val = t_train_start + args.val_every
    loss_ema = None
    ce_ema = None

    def validate(tag: str) -> None:
        nonlocal t_val_total, last_val_cost
        tv = time.perf_counter()
        model.eval()
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(Path(tmp) / "ck.pt", model, recipe)
            with contextlib.redirect_stdout(io.StringIO()):
                build_package(Path(tmp) / "ck.pt", Path(tmp) / "pkg")
            results = evaluate_package(Path(tmp) / "pkg", val_cases, threads=args.threads, dicom=False, logf=logf)
        model.train()
        summary = summarise(results)
        elapsed = clock.now()
        entry = {"step": step, "budget_s": round(elapsed, 1), "wall_s": round(clock.wall(), 1), "tag": tag, **summary}
        history.append(entry)
        if summary["mean_of_labels"] >= best["score"]:
            best.update(score=summary["mean_of_labels"], step=step)
            torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, best_path)
        last_val_cost = time.perf_counter() - tv
        t_val_total += last_val_cost
        log(f"val @ step {step} ({elapsed:.0f} s): mean Dice " + " ".join(
            f"{k} {v:.3f}" for k, v in summary["mean_dice"].items()) + f" | {last_val_cost:.0f} s", logf)

    label_weights = {value: float(w) for value, w in zip(LABELS, args.label_weights, strict=False)}
    # deep supervision: weights 1, 1/2, 1/4 ... normalised to sum 1 (nnU-Net)
    ds_raw = [0.5**k for k in range(1 + len(model.aux_heads))]
    ds_weights = [w / sum(ds_raw) for w in ds_raw]
    model.train()
    times = []
    while True:
        now = clock.now()
        # keep time for the final validation (estimated from the last one) and saving
        reserve = (last_val_cost if last_val_cost else (3.0 if args.small else 12.0) * args.val) + 5.0
        if now + reserve >= deadline and step > 0:
            break
        frac = min(1.0, (now - t_train_start) / max(1.0, train_span - reserve))
        lr = args.lr * min(1.0, (step + 1) / args.warmup_steps) * (1.0 - frac) ** 0.9
        for group in optimizer.param_groups:
            group["lr"] = max(lr, args.lr * 1e-3)
        ts = time.perf_counter()
        step_ctx = clock.step()
        step_ctx.__enter__()
        xs, ys = [], []
        for _ in range(args.batch):
            case = pool[int(rng.integers(len(pool)))]
            img, lab = sample_patch(case, rng, patch, args.fg_prob, label_weights)
            if rng.random() < 0.5:
                img = img + rng.normal(0.0, rng.uniform(0, 20.0) / norm["std"], img.shape).astype(np.float32)
            xs.append(img)
            ys.append(lab)
        x = torch.from_numpy(np.stack(xs)[:, None]).contiguous(memory_format=torch.channels_last_3d)
        y = torch.from_numpy(np.stack(ys).astype(np.int64))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            outputs = model.forward_train(x)
        loss = torch.zeros(())
        for k, (weight, logits) in enumerate(zip(ds_weights, outputs, strict=False)):
            target = y[:, :: 2**k, :: 2**k, :: 2**k] if k else y
            logits = logits.float()
            term_ce = F.cross_entropy(logits, target)
            loss = loss + weight * (term_ce + soft_dice_loss(logits, target))
            if k == 0:
                ce = term_ce
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step_ctx.__exit__(None, None, None)
        step += 1
        times.append(time.perf_counter() - ts)
        loss_value = loss.item()
        loss_ema = loss_value if loss_ema is None else 0.95 * loss_ema + 0.05 * loss_value
        ce_value = ce.item()
        ce_ema = ce_value if ce_ema is None else 0.95 * ce_ema + 0.05 * ce_value
        if step % 25 == 0:
            log(f"step {step} loss {loss_ema:.4f} (ce {ce_ema:.4f}) lr {lr:.2e} {np.mean(times[-25:]):.2f} s/step "
                f"(budget {clock.now():.0f} s, wall {clock.wall():.0f} s)", logf)
        if clock.now() >= next_val and clock.now() + 2 * reserve < deadline:
            validate("periodic")
            next_val = clock.now() + args.val_every
    validate("final")
    # best weights -> checkpoint
    model.load_state_dict(torch.load(best_path, weights_only=True))
    best_path.unlink(missing_ok=True)
    t_train = time.perf_counter() - t_start
    recipe["training"].update(
        {
            "budget_clock": args.clock,
            "budget_seconds_charged": round(clock.now(), 1),
            "step_seconds_charged_cpu": round(clock.step_cpu, 1),
            "step_wall_seconds": round(clock.step_wall, 1),
            "steps": step,
            "patches_seen": step * args.batch,
            "voxels_seen": step * args.batch * int(np.prod(patch)),
            "mean_step_seconds": round(float(np.mean(times)), 3) if times else None,
            "best_step": best["step"],
            "wall_seconds": {
                "total": round(t_train, 1),
                "data": round(t_data, 1),
                "validation": round(t_val_total, 1),
                "optimisation": round(t_train - t_data - t_val_total, 1),
            },
        }
    )
    recipe["validation"]["history"] = history
    save_checkpoint(ckpt_path, model.to(memory_format=torch.contiguous_format), recipe)
    log(f"training done in {t_train:.0f} s wall, {clock.now():.0f} s on the {args.clock} budget clock "
        f"({step} steps); best step {best['step']} "
        f"(val mean Dice {best['score']:.4f}); checkpoint {ckpt_path} ({ckpt_path.stat().st_size / 1e6:.2f} MB)", logf)

    # -- held-out evaluation (outside the budget) -------------------------------------------------------
    package_dir = out / "package"
    if package_dir.exists():
        shutil.rmtree(package_dir)
    code = 0
    if args.heldout != "none":
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
            "path": ("phantom -> DICOM series (write_series) -> edge_runtime.imaging.volume.load_volume -> "
                     "edge_runtime.inference.pipeline.segment (ONNX Runtime CPU, package manifest) -> "
                     "edge_runtime.quality.metrics.compare_label_maps(surface=False) on the source grid")
            if not args.no_dicom else "phantom array -> Volume -> segment -> compare_label_maps(surface=False)",
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
        code = 0 if report.passed else 1
        log("held-out mean Dice " + " ".join(f"{k} {v:.4f}" for k, v in summary["mean_dice"].items())
            + " | min " + " ".join(f"{k} {v:.4f}" for k, v in summary["min_dice"].items()), logf)
    else:
        _pkg, report = build_package(ckpt_path, package_dir)
        code = 0 if report.passed else 1
    (out / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n", encoding="utf-8")
    log(f"wrote {ckpt_path}, {out / 'recipe.json'} and {package_dir}", logf)
    logf.close()
    return code


if __name__ == "__main__":
    sys.exit(main())
