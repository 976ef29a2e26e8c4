"""Render a painted tissue map into Hounsfield units: per-phantom tissue HU, texture and CT-like noise.

Texture comes from smooth random fields on a coarse physical grid, so the same seed and field of view give the
same texture at any spacing; the noise is blurred in-plane, as reconstruction kernels correlate real CT noise.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import ndimage

from phantom.anatomy import Tissue
from phantom.grid import Grid


class SmoothField:
    """Smooth random field on a coarse physical grid (cell in mm), evaluated by trilinear
    interpolation; the same seed and FOV give the same field at any spacing."""

    def __init__(self, rng: np.random.Generator, g: Grid, cell: float) -> None:
        self.cell = cell
        self.lo = [float(a[0]) - cell for a in (g.z_mm, g.y_mm, g.x_mm)]
        n = [int(math.ceil((float(a[-1]) - float(a[0])) / cell)) + 3 for a in (g.z_mm, g.y_mm, g.x_mm)]
        coarse = ndimage.gaussian_filter(rng.standard_normal(n), 0.7, mode="wrap")
        coarse /= max(float(coarse.std()), 1e-6)
        self.coarse = coarse.astype(np.float32)
        self.axes = (g.z_mm, g.y_mm, g.x_mm)

    def __call__(self, zs: slice, ys: slice, xs: slice) -> np.ndarray:
        a = self.coarse
        for axis in (2, 1, 0):  # x first: the large final pass copies whole planes
            sl = (zs, ys, xs)[axis]
            c = (self.axes[axis][sl] - self.lo[axis]) / self.cell
            i0 = np.clip(np.floor(c).astype(np.intp), 0, a.shape[axis] - 2)
            w = (c - i0).astype(np.float32)
            shape = [1, 1, 1]
            shape[axis] = w.size
            w = w.reshape(shape)
            a0 = np.take(a, i0, axis=axis)
            a1 = np.take(a, i0 + 1, axis=axis)
            a1 -= a0
            a1 *= w
            a0 += a1
            a = a0
        return a


def render(
    g: Grid,
    p: dict[str, Any],
    tissue: np.ndarray,
    labels: np.ndarray,
    tex_rng: np.random.Generator,
    noise_rng: np.random.Generator,
) -> np.ndarray:
    lut = np.zeros(len(Tissue), np.float32)
    for t, hu in p["hu"].items():
        lut[t] = hu
    hu = lut[tissue]
    body_bb = Grid.box(g.rn <= float(g.g.max()))
    field_a = SmoothField(tex_rng, g, 10.0)
    field_b = SmoothField(tex_rng, g, 12.0)
    field_c = SmoothField(tex_rng, g, 12.0)
    fat, soft = np.float32(p["hu"][Tissue.FAT] + 10.0), np.float32(p["hu"][Tissue.ABDOMEN])
    amp = np.zeros(len(Tissue), np.float32)  # texture amplitude per tissue
    amp[[Tissue.LIVER, Tissue.SPLEEN, Tissue.KIDNEY_MEDULLA, Tissue.KIDNEY_CORTEX, Tissue.MUSCLE]] = 5.0
    amp[Tissue.TRABECULAR] = 60.0
    amp[Tissue.LUNG] = 30.0
    # noise is pre-scaled so that after the in-plane [w, 1-2w, w] blur its std is p["noise"]
    w = 0.2
    gain = 2 * w * w + (1 - 2 * w) ** 2  # per-axis variance gain of the kernel
    sigma_pre = np.float32(p["noise"] / gain)
    chunk = 16  # slices per step: bounds the memory of the temporaries
    for z0 in range(0, hu.shape[0], chunk):
        zs = slice(z0, min(z0 + chunk, hu.shape[0]))
        if body_bb is not None:
            ys, xs = body_bb
            box = (zs, ys, xs)
            f = field_a(*box)
            t = tissue[box]
            h = hu[box]  # view
            # abdominal cavity: soft tissue / visceral fat mix
            mix = np.clip((f - 0.45) * 3.0, 0.0, 1.0)
            np.copyto(h, soft + (fat - soft) * mix, where=t == Tissue.ABDOMEN)
            # mild texture of solid organs, trabecular bone and lung parenchyma
            f *= amp[t]
            h += f
            # lung: denser posteriorly (gravity), vessels where two smooth fields cross zero
            lm = t == Tissue.LUNG
            lb = Grid.box(lm.any(axis=0))
            if lb is not None:
                ly, lx = lb
                lbox = (
                    zs,
                    slice(ys.start + ly.start, ys.start + ly.stop),
                    slice(xs.start + lx.start, xs.start + lx.stop),
                )
                lm = lm[:, ly, lx]
                hl = hu[lbox]
                post = np.clip(g.v[lbox[1], lbox[2]] / 100.0, -1.0, 1.0) * np.float32(25.0)
                np.copyto(hl, hl + post[None], where=lm)
                vessel = np.abs(field_b(*lbox)) < 0.28
                vessel &= np.abs(field_c(*lbox)) < 0.28
                vessel &= lm
                hl[vessel] = np.float32(-40.0)
        blk = hu[zs]
        noise = noise_rng.standard_normal(blk.shape, dtype=np.float32)
        noise *= sigma_pre
        blk += noise
        blur3(blk, 1, w, noise)
        blur3(blk, 2, w, noise)
    return hu


def blur3(a: np.ndarray, axis: int, w: float, tmp: np.ndarray) -> None:
    """In-place [w, 1-2w, w] filter along ``axis`` (edges replicated); ``tmp`` is scratch of a's shape."""
    n = a.shape[axis]
    if n < 2:
        return

    def sl(s: slice) -> tuple[slice, ...]:
        idx = [slice(None)] * a.ndim
        idx[axis] = s
        return tuple(idx)

    np.multiply(a, np.float32(1 - 2 * w), out=tmp)
    ww = np.float32(w)
    tmp[sl(slice(1, None))] += ww * a[sl(slice(None, -1))]
    tmp[sl(slice(None, -1))] += ww * a[sl(slice(1, None))]
    tmp[sl(slice(0, 1))] += ww * a[sl(slice(0, 1))]
    tmp[sl(slice(-1, None))] += ww * a[sl(slice(-1, None))]
    a[...] = tmp
