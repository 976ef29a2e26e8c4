"""Cases of the phantom U-Net's training: phantoms on the model grid, random patches of them, and the score of a
package on phantoms taken through the runtime's own path (``edge_runtime``'s model grid, ``segment``, Dice).

Training data and evaluation share these helpers so that what the model learns from and what it is judged on are
made the same way as a series the service receives. Used by :mod:`export.models.train_phantom_unet`.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from phantom import LABELS, make_phantom

#: a phantom's geometry: (slices, rows, columns) and spacing (z, y, x) in mm
Geometry = tuple[tuple[int, int, int], tuple[float, float, float]]

# Seeds: training pool, validation and held-out phantoms never share one.
POOL_SEED_BASE = 1_000_000  # + 10_000 * seed + i
VAL_SEED_BASE = 2_000_000  # + 10_000 * seed + i
HELDOUT_SEED_BASE = 9_000_000  # + i, independent of --seed

#: held-out geometries: (slices, rows, columns), spacing (z, y, x) mm. Realistic CT: 512 x 512 at
#: 0.7-0.9 mm, 1-3 mm slices, 150-300 slices (280-450 mm along z).
REALISTIC_HELDOUT: list[Geometry] = [
    ((200, 512, 512), (2.0, 0.8, 0.8)),
    ((280, 512, 512), (1.0, 0.75, 0.75)),
    ((150, 512, 512), (3.0, 0.9, 0.9)),
    ((300, 512, 512), (1.25, 0.7, 0.7)),
    ((160, 512, 512), (2.5, 0.85, 0.85)),
    ((240, 512, 512), (1.5, 0.78, 0.78)),
]
#: a quick check for smoke tests
SMALL_HELDOUT: list[Geometry] = [((40, 96, 96), (8.0, 4.0, 4.0))]


def pool_seeds(seed: int, size: int) -> range:
    """The phantom seeds of a training pool of ``size`` for the run seed ``seed``."""
    first = POOL_SEED_BASE + 10_000 * seed
    return range(first, first + size)


def log(msg: str, file: Any = None) -> None:
    """A time-stamped line on stdout and, when given, in the run's ``train.log``."""
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


def model_grid(hu: np.ndarray, spacing: Sequence[float], target: Sequence[float]) -> Any:
    """The runtime's model grid for a regular volume ``hu`` with ``spacing``."""
    from edge_runtime.inference.pipeline import ModelGrid

    volume = volume_from_array(hu, spacing)
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
        n_z, n_y, n_x = (int(round(f / s)) for f, s in zip(fov, spacing, strict=False))
        shape = (n_z, n_y, n_x)
        ph = make_phantom(shape, spacing, rng=seed, variety=True)
        grid = model_grid(ph.hu, spacing, target)
        hu = grid.resample(np.rint(ph.hu))  # rounded as stored in DICOM
        idx = [np.clip(np.rint(c).astype(np.intp), 0, n - 1) for c, n in zip(grid.coords, shape, strict=False)]
        labels = ph.labels[np.ix_(*idx)]
        source = f"fine {shape} @ {tuple(round(s, 3) for s in spacing)} -> model grid"
    else:
        n_z, n_y, n_x = (max(p, int(round(f / s))) for p, f, s in zip(patch, fov, target, strict=False))
        shape = (n_z, n_y, n_x)
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


def volume_from_array(hu: np.ndarray, spacing: Sequence[float]) -> Any:
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
            volume = volume_from_array(ph.hu, spacing)
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


@dataclass
class Pool:
    """The training phantoms held in memory, and what making them cost."""

    cases: list[Case]
    fine: int
    nbytes: int
    seconds: float


def build_pool(
    size: int, fine_fraction: float, seed: int, rng: np.random.Generator, cfg: dict[str, Any], logf: Any = None
) -> Pool:
    """``size`` phantoms on the model grid (seeds ``pool_seeds(seed, size)``), ``fine_fraction`` of them
    resampled from scanner spacing."""
    t0 = time.perf_counter()
    n_fine = int(round(size * fine_fraction))
    fine_slots = set(rng.choice(size, n_fine, replace=False).tolist()) if n_fine else set()
    cases = [make_case(s, rng, cfg, fine=i in fine_slots) for i, s in enumerate(pool_seeds(seed, size))]
    pool = Pool(cases, n_fine, sum(c.image.nbytes + c.labels.nbytes for c in cases), time.perf_counter() - t0)
    log(
        f"pool: {len(cases)} phantoms ({n_fine} resampled from scanner spacing), "
        f"{pool.nbytes / 1e9:.2f} GB, {pool.seconds:.1f} s",
        logf,
    )
    return pool
