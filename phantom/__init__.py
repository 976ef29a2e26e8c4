"""Synthetic CT torso phantoms with ground truth, and writers for DICOM series and reference SEG.

Used by tests and benchmarks (realistic CT series to push over DICOM), to train compact models on
phantoms, and for offline validation (series with exact ground truth).

Conventions
-----------
* Arrays are indexed ``(slice, row, column) = (z, y, x)``; spacing tuples use the same order, in mm.
* Patient coordinates are DICOM LPS. A phantom is laid out for the default image orientation
  ``IOP = [1, 0, 0, 0, 1, 0]`` that :func:`write_series` uses: the column index increases toward the
  patient's left (so the liver sits at low column index, the spleen at high), the row index increases
  toward posterior (the spine is at high row index) and the slice index increases toward superior
  (lungs at high slice index, kidneys low).
* Anatomy is defined in millimetres, so it has the same physical size at any spacing. Two fits to
  the field of view (FOV) apply, both independent of spacing: in-plane, the torso is scaled down
  (never up) when it would not fit the FOV; along z, the anatomical span from the iliac crest to
  above the lung apex (430 mm) is compressed to the FOV when the FOV is shorter, so that every label
  is present even in short volumes, and centred (neck and pelvis beyond) when it is longer.
* Labels are exclusive: structures are painted in order and later ones overwrite earlier ones.

Only numpy, scipy and pydicom are needed; highdicom is imported by :func:`write_reference_seg`.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds
from scipy import ndimage

__all__ = [
    "LABELS",
    "Phantom",
    "SeriesInfo",
    "make_phantom",
    "write_series",
    "write_reference_seg",
    "main",
]

LABELS: dict[int, str] = {1: "lung", 2: "liver", 3: "spleen", 4: "kidney", 5: "bone"}
"""Label values of :class:`Phantom` ``labels``: both lungs are 1, both kidneys 4, bone is spine, ribs,
sternum and iliac wings."""

_LUNG, _LIVER, _SPLEEN, _KIDNEY, _BONE = 1, 2, 3, 4, 5

_CT_RESCALE_INTERCEPT = -1024.0


@dataclass
class Phantom:
    """A synthetic CT volume with its ground-truth label map.

    ``hu`` is float32 Hounsfield units, ``labels`` uint8 (values of :data:`LABELS`, 0 = background),
    both shaped ``(z, y, x)``; ``spacing`` is ``(z, y, x)`` in mm.
    """

    hu: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]

    def label_volumes_ml(self) -> dict[int, float]:
        """Volume of each label of :data:`LABELS` in millilitres."""
        voxel_ml = float(np.prod(self.spacing)) / 1000.0
        counts = np.bincount(self.labels.ravel(), minlength=max(LABELS) + 1)
        return {k: float(counts[k]) * voxel_ml for k in LABELS}


# ---------------------------------------------------------------------------------------------------
# Phantom generation
# ---------------------------------------------------------------------------------------------------

# Tissue classes (internal); their HU are drawn per phantom.
(
    _T_AIR,
    _T_FAT,
    _T_MUSCLE,
    _T_ABD,
    _T_MEDIAST,
    _T_LUNG,
    _T_LIVER,
    _T_SPLEEN,
    _T_KID_MED,
    _T_KID_CORT,
    _T_TRAB,
    _T_CORT,
    _T_BLOOD,
    _T_GAS,
    _T_CSF,
    _T_CART,
    _T_DISC,
    _T_FLUID,
    _T_RIB,
    _T_POST,
) = range(20)
_N_TISSUES = 20
_KEEP = 255  # "leave unchanged" in templates

# (mean HU, +- range of the per-phantom draw)
_TISSUE_HU: dict[int, tuple[float, float]] = {
    _T_AIR: (-1000.0, 0.0),
    _T_FAT: (-100.0, 10.0),
    _T_MUSCLE: (50.0, 6.0),
    _T_ABD: (30.0, 5.0),
    _T_MEDIAST: (-85.0, 10.0),
    _T_LUNG: (-860.0, 30.0),
    _T_LIVER: (58.0, 8.0),
    _T_SPLEEN: (46.0, 5.0),
    _T_KID_MED: (30.0, 4.0),
    _T_KID_CORT: (38.0, 4.0),
    _T_TRAB: (500.0, 100.0),
    _T_CORT: (1000.0, 100.0),
    _T_BLOOD: (42.0, 5.0),
    _T_GAS: (-990.0, 5.0),
    _T_CSF: (8.0, 4.0),
    _T_CART: (120.0, 20.0),
    _T_DISC: (85.0, 10.0),
    _T_FLUID: (12.0, 5.0),
    _T_RIB: (650.0, 80.0),
    _T_POST: (600.0, 80.0),
}

_ZETA_LO, _ZETA_HI = -10.0, 420.0  # anatomical z span (mm) fitted to short fields of view


class _Jitter:
    """Draws parameter variations; returns the canonical value unchanged when variety is off."""

    def __init__(self, rng: np.random.Generator, variety: bool) -> None:
        self.rng = rng
        self.variety = variety

    def add(self, x: float, d: float) -> float:
        return x + d * float(self.rng.uniform(-1.0, 1.0)) if self.variety else x

    def rel(self, x: float, r: float) -> float:
        return x * (1.0 + r * float(self.rng.uniform(-1.0, 1.0))) if self.variety else x

    def deg(self, x: float, d: float) -> float:
        return math.radians(self.add(x, d))

    def harmonics(self, amp: float, orders: Sequence[int] = (2, 3, 4)) -> list[tuple[int, float, float]]:
        if not self.variety:
            return []
        return [(k, amp * float(self.rng.uniform(-1, 1)), float(self.rng.uniform(0, 2 * np.pi))) for k in orders]


@dataclass
class _Ellipsoid:
    cu: float  # canonical in-plane centre, mm (u: toward patient left, v: toward posterior)
    cv: float
    au: float  # in-plane semi-axes along the rotated axes
    av: float
    rot: float  # in-plane rotation (rad)
    cz: float  # anatomical z centre and semi-axis (mm, zeta units)
    az: float
    harm: list[tuple[int, float, float]]


def _draw_anatomy(rng: np.random.Generator, variety: bool) -> dict[str, Any]:
    """All random choices of the anatomy, drawn in a fixed order independent of shape and spacing."""
    j = _Jitter(rng, variety)
    p: dict[str, Any] = {}
    p["scale"] = j.rel(1.0, 0.08)
    p["aspect"] = (j.rel(1.0, 0.05), j.rel(1.0, 0.06))
    p["rot"] = j.deg(0.0, 4.0)
    p["offset"] = (j.add(0.0, 8.0), j.add(0.0, 8.0))  # physical mm (x, y)
    p["zshift"] = j.add(0.0, 10.0)
    # body outline: superellipse, anterior/posterior half-axes differ
    p["body"] = {
        "a": 165.0,
        "b_ant": 120.0,
        "b_post": 108.0,
        "p": 2.3,
        "harm": j.harmonics(0.015),
        "g_amp": j.add(0.0, 0.03),
        "g_phase": j.add(0.0, np.pi),
        "fat": j.rel(16.0, 0.4),
        "wall": j.rel(12.0, 0.2),
    }
    p["diaphragm"] = {"base": j.add(188.0, 8.0), "right": j.rel(48.0, 0.15), "left": j.rel(36.0, 0.15)}
    apex = j.add(400.0, 8.0)
    p["lungs"] = [
        (
            _Ellipsoid(
                j.add(-80.0, 5.0),
                j.add(5.0, 5.0),
                j.rel(62.0, 0.08),
                j.rel(95.0, 0.08),
                j.deg(0.0, 5.0),
                0.0,
                0.0,
                j.harmonics(0.04),
            ),
            apex,
        ),
        (
            _Ellipsoid(
                j.add(80.0, 5.0),
                j.add(5.0, 5.0),
                j.rel(60.0, 0.08),
                j.rel(95.0, 0.08),
                j.deg(0.0, 5.0),
                0.0,
                0.0,
                j.harmonics(0.04),
            ),
            apex + j.add(0.0, 4.0),
        ),
    ]
    p["heart"] = _Ellipsoid(
        j.add(18.0, 5.0),
        j.add(-35.0, 5.0),
        j.rel(55.0, 0.1),
        j.rel(45.0, 0.1),
        j.deg(35.0, 8.0),
        j.add(262.0, 8.0),
        j.rel(55.0, 0.1),
        [],
    )
    p["liver"] = _Ellipsoid(
        j.add(-50.0, 6.0),
        j.add(-5.0, 6.0),
        j.rel(80.0, 0.1),
        j.rel(75.0, 0.1),
        j.deg(-10.0, 8.0),
        j.add(165.0, 8.0),
        j.rel(80.0, 0.1),
        j.harmonics(0.05),
    )
    p["spleen"] = _Ellipsoid(
        j.add(100.0, 5.0),
        j.add(30.0, 5.0),
        j.rel(22.0, 0.15),
        j.rel(45.0, 0.15),
        j.deg(40.0, 10.0),
        j.add(168.0, 8.0),
        j.rel(48.0, 0.12),
        j.harmonics(0.04),
    )
    p["kidneys"] = [
        _Ellipsoid(
            j.add(-62.0, 5.0),
            j.add(50.0, 4.0),
            j.rel(30.0, 0.1),
            j.rel(20.0, 0.1),
            j.deg(-30.0, 8.0),
            j.add(100.0, 8.0),
            j.rel(55.0, 0.1),
            j.harmonics(0.03),
        ),
        _Ellipsoid(
            j.add(60.0, 5.0),
            j.add(50.0, 4.0),
            j.rel(30.0, 0.1),
            j.rel(20.0, 0.1),
            j.deg(30.0, 8.0),
            j.add(112.0, 8.0),
            j.rel(55.0, 0.1),
            j.harmonics(0.03),
        ),
    ]
    p["kidney_cortex"] = j.rel(6.0, 0.2)
    p["stomach"] = _Ellipsoid(
        j.add(45.0, 6.0),
        j.add(-40.0, 6.0),
        j.rel(40.0, 0.15),
        j.rel(32.0, 0.15),
        j.deg(20.0, 10.0),
        j.add(180.0, 10.0),
        j.rel(45.0, 0.15),
        j.harmonics(0.05),
    )
    p["stomach_gas"] = j.add(0.45, 0.3)  # fraction of the AP semi-axis filled with gas (anterior)
    if variety:
        n_gas = int(rng.integers(3, 10))
        p["gas"] = [
            (
                float(rng.uniform(-80, 80)),
                float(rng.uniform(-90, -15)),
                float(rng.uniform(10, 150)),
                float(rng.uniform(6, 15)),
            )
            for _ in range(n_gas)
        ]
    else:
        p["gas"] = [
            (-40.0, -60.0, 60.0, 10.0),
            (30.0, -70.0, 40.0, 12.0),
            (60.0, -30.0, 90.0, 8.0),
            (-20.0, -80.0, 120.0, 9.0),
        ]
    p["spine"] = {
        "cv": j.add(25.0, 3.0),
        "au": j.rel(22.0, 0.08),
        "av": j.rel(16.0, 0.08),
        "shell": 2.0,
        "period": j.add(30.0, 2.0),
        "phase": j.add(0.0, 15.0),
        "canal": 8.0,
    }
    p["aorta"] = {
        "r": j.rel(11.0, 0.12),
        "thorax": (j.add(25.0, 3.0), j.add(8.0, 3.0)),
        "abdomen": (j.add(12.0, 3.0), j.add(-5.0, 3.0)),
        "top": 330.0,
    }
    p["ribs"] = {
        "first": apex - 8.0 + j.add(0.0, 4.0),
        "spacing": j.add(23.0, 2.0),
        "n": 10,
        "drop": j.add(70.0, 10.0),
        "thick": j.add(8.0, 1.0),
    }
    p["pelvis_crest"] = j.add(30.0, 8.0)
    p["hu"] = {t: j.add(mean, spread) for t, (mean, spread) in _TISSUE_HU.items()}
    p["noise"] = j.rel(15.0, 0.3)
    # perirenal fat inside the renal fascia (mm beyond the kidney's surface); drawn last so that every
    # earlier draw, and so every earlier phantom's other anatomy, stays as it was
    p["perirenal_fat"] = j.rel(7.0, 0.4)
    return p


class _Grid:
    """Coordinates of one phantom: physical mm axes, canonical in-plane (u, v) and anatomical z."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float], p: dict[str, Any]):
        nz, ny, nx = shape
        sz, sy, sx = spacing
        self.shape = shape
        self.z_mm = ((np.arange(nz) - (nz - 1) / 2.0) * sz).astype(np.float64)
        self.y_mm = ((np.arange(ny) - (ny - 1) / 2.0) * sy).astype(np.float64)
        self.x_mm = ((np.arange(nx) - (nx - 1) / 2.0) * sx).astype(np.float64)
        fov_z, fov_y, fov_x = nz * sz, ny * sy, nx * sx
        body = p["body"]
        su, sv = p["aspect"]
        scale = p["scale"]
        # scale the torso down (never up) when it would not fit the in-plane FOV
        need_x = 2.0 * body["a"] * scale * su * 1.06
        need_y = (body["b_ant"] + body["b_post"]) * scale * sv * 1.06
        fit = min(1.0, 0.96 * fov_x / need_x, 0.96 * fov_y / need_y)
        self.inplane_scale = scale * fit
        ox, oy = p["offset"][0] * fit, p["offset"][1] * fit
        # the body's AP centre sits between its anterior and posterior extents
        oy += (body["b_ant"] - body["b_post"]) / 2.0 * self.inplane_scale * sv
        c, s = math.cos(p["rot"]), math.sin(p["rot"])
        X = (self.x_mm[None, :] - ox).astype(np.float32)
        Y = (self.y_mm[:, None] - oy).astype(np.float32)
        self.u = ((c * X + s * Y) / (self.inplane_scale * su)).astype(np.float32)
        self.v = ((-s * X + c * Y) / (self.inplane_scale * sv)).astype(np.float32)
        # anatomical z ("zeta"): compress the span to short FOVs; centre it otherwise
        self.z_scale = min(1.0, fov_z / (_ZETA_HI - _ZETA_LO))
        self.zeta = self.z_mm / self.z_scale + (_ZETA_LO + _ZETA_HI) / 2.0 + p["zshift"]

        # body outline: normalised radius rn(u, v) <= g(zeta)
        vb = np.where(self.v < 0, self.v / body["b_ant"], self.v / body["b_post"])
        ub = self.u / body["a"]
        rn = (np.abs(ub) ** body["p"] + np.abs(vb) ** body["p"]) ** (1.0 / body["p"])
        if body["harm"]:
            rn = rn / _radial(ub, vb, body["harm"])
        self.rn = rn.astype(np.float32)
        g_prof = 1.0 + body["g_amp"] * np.sin(2 * np.pi * self.zeta / 400.0 + body["g_phase"])
        # above the lung apex (long fields of view only) the torso narrows toward the neck
        g_prof *= 1.0 - 0.5 * np.clip((self.zeta - 425.0) / 80.0, 0.0, 1.0)
        self.g = g_prof.astype(np.float32)
        bmean = (body["b_ant"] + body["b_post"]) / 2.0
        self.fat_n = body["fat"] / bmean
        self.wall_n = body["wall"] / bmean
        self.g_in = self.g - np.float32(self.fat_n + self.wall_n)  # inner boundary of the body wall

        d = p["diaphragm"]
        u, v = self.u, self.v
        self.zd = (
            d["base"]
            + d["right"] * np.exp(-(((u + 70.0) / 55.0) ** 2 + ((v - 0.0) / 75.0) ** 2) / 2.0)
            + d["left"] * np.exp(-(((u - 70.0) / 55.0) ** 2 + ((v - 0.0) / 75.0) ** 2) / 2.0)
            - 0.15 * np.maximum(v, 0.0)
        ).astype(np.float32)

    def zslice(self, lo: float, hi: float) -> slice:
        """Slice indices whose anatomical z lies in [lo, hi]."""
        i0 = int(np.searchsorted(self.zeta, lo, side="left"))
        i1 = int(np.searchsorted(self.zeta, hi, side="right"))
        return slice(i0, max(i0, i1))

    @staticmethod
    def box(mask2d: np.ndarray) -> tuple[slice, slice] | None:
        rows = np.flatnonzero(mask2d.any(axis=1))
        if rows.size == 0:
            return None
        cols = np.flatnonzero(mask2d.any(axis=0))
        return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def _radial(x: np.ndarray, y: np.ndarray, harm: Sequence[tuple[int, float, float]]) -> np.ndarray:
    """Radial scale 1 + sum a_k cos(k phi + phase_k) of a lobulated outline."""
    phi = np.arctan2(y, x)
    r = np.ones_like(phi)
    for k, a, ph in harm:
        r += a * np.cos(k * phi + ph)
    return r


def _q2d(u: np.ndarray, v: np.ndarray, e: _Ellipsoid) -> np.ndarray:
    """Normalised squared in-plane radius of an (optionally lobulated) rotated ellipse."""
    c, s = math.cos(e.rot), math.sin(e.rot)
    du, dv = u - e.cu, v - e.cv
    a = (c * du + s * dv) / e.au
    b = (-s * du + c * dv) / e.av
    q = a * a + b * b
    if e.harm:
        q = q / _radial(a, b, e.harm) ** 2
    return q.astype(np.float32)


def _put(arr: np.ndarray, box: tuple[slice, ...], mask: np.ndarray, value: int) -> None:
    np.putmask(arr[box], mask, value)


def _paint_ellipsoid(
    g: _Grid,
    tissue: np.ndarray,
    labels: np.ndarray,
    e: _Ellipsoid,
    tcode: int,
    label: int,
    *,
    below_diaphragm: float | None = None,
    above_diaphragm: bool = False,
    in_cavity: bool = True,
    core: tuple[float, int] | None = None,
) -> None:
    """Paint an ellipsoid (in-plane ellipse whose size follows the z semi-axis) into the volume.

    ``below_diaphragm=gap`` keeps it ``gap`` mm below the diaphragm; ``above_diaphragm`` above it;
    ``in_cavity`` inside the inner boundary of the body wall; ``core=(fraction, tcode)`` paints the
    inner part (normalised radius < fraction) with another tissue (same label).
    """
    q = _q2d(g.u, g.v, e)
    bb = _Grid.box(q <= 1.0)
    zs = g.zslice(e.cz - e.az, e.cz + e.az)
    if bb is None or zs.stop <= zs.start:
        return
    ys, xs = bb
    qz = ((g.zeta[zs] - e.cz) / e.az).astype(np.float32) ** 2
    qb = q[ys, xs]
    qq = qb[None] + qz[:, None, None]
    m = qq <= 1.0
    zeta3 = g.zeta[zs].astype(np.float32)[:, None, None]
    if below_diaphragm is not None:
        m &= zeta3 < (g.zd[ys, xs][None] - below_diaphragm)
    if above_diaphragm:
        m &= zeta3 > g.zd[ys, xs][None]
    if in_cavity:
        m &= g.rn[ys, xs][None] <= g.g_in[zs][:, None, None]
    box = (zs, ys, xs)
    _put(tissue, box, m, tcode)
    _put(labels, box, m, label)
    if core is not None:
        frac, tcode2 = core
        _put(tissue, box, m & (qq <= frac * frac), tcode2)


def _paint_body(g: _Grid, p: dict[str, Any]) -> np.ndarray:
    """Air, subcutaneous fat, muscle wall, and the cavity (abdomen / diaphragm / mediastinum)."""
    rn = g.rn[None]
    level = (rn <= g.g[:, None, None]).view(np.uint8).copy()
    level += rn <= (g.g - np.float32(g.fat_n))[:, None, None]
    level += rn <= g.g_in[:, None, None]
    zeta3 = g.zeta.astype(np.float32)[:, None, None]
    level += 4 * (zeta3 >= g.zd[None] - np.float32(6.0)).view(np.uint8)
    level += 4 * (zeta3 >= g.zd[None]).view(np.uint8)
    lut = np.array(
        [
            _T_AIR,
            _T_FAT,
            _T_MUSCLE,
            _T_ABD,
            _T_AIR,
            _T_FAT,
            _T_MUSCLE,
            _T_MUSCLE,
            _T_AIR,
            _T_FAT,
            _T_MUSCLE,
            _T_MEDIAST,
        ],
        dtype=np.uint8,
    )
    return lut[level]


def _paint_spine(g: _Grid, tissue: np.ndarray, labels: np.ndarray, sp: dict[str, Any]) -> None:
    """Vertebral bodies (trabecular core, cortical shell, endplates), discs, canal, posterior arch."""
    u, v = g.u, g.v
    cv, au, av = sp["cv"], sp["au"], sp["av"]
    vc = cv + av + sp["canal"] + 1.0  # canal centre
    bb = _Grid.box((np.abs(u) <= 50.0) & (v >= cv - av - 5.0) & (v <= vc + 45.0))
    if bb is None:
        return
    ys, xs = bb
    ub, vb = u[ys, xs], v[ys, xs]
    qb = (ub / au) ** 2 + ((vb - cv) / av) ** 2
    inner = (1.0 - sp["shell"] / av) ** 2
    rc = np.hypot(ub, vb - vc)
    canal = rc <= sp["canal"]
    arch = (rc > sp["canal"]) & (rc <= sp["canal"] + 6.0) & (vb >= vc - 4.0)
    spinous = (ub / 4.5) ** 2 + ((vb - (vc + 22.0)) / 12.0) ** 2 <= 1.0
    transverse = ((np.abs(ub) - 24.0) / 13.0) ** 2 + ((vb - (vc - 2.0)) / 5.0) ** 2 <= 1.0
    post = (arch | spinous | transverse) & ~canal
    body = qb <= 1.0

    def template(body_code: int | None, shell_code: int | None, with_post: bool) -> tuple[np.ndarray, np.ndarray]:
        t = np.full(qb.shape, _KEEP, np.uint8)
        lab = np.full(qb.shape, _KEEP, np.uint8)
        if with_post:
            t[post] = _T_POST
            lab[post] = _BONE
        if body_code is not None:
            t[body] = body_code
            lab[body] = _BONE if body_code != _T_DISC else 0
        if shell_code is not None:
            t[body & (qb > inner)] = shell_code
        t[canal] = _T_CSF
        lab[canal] = 0
        return t, lab

    kinds = [
        template(_T_DISC, None, False),  # 0 disc
        template(_T_CORT, None, True),  # 1 endplate
        template(_T_TRAB, _T_CORT, False),  # 2 body, no arch
        template(_T_TRAB, _T_CORT, True),  # 3 body with arch
    ]
    t_stack = np.stack([k[0] for k in kinds])
    l_stack = np.stack([k[1] for k in kinds])
    phase = np.mod((g.zeta - sp["phase"]) / sp["period"], 1.0)
    endplate_frac = 1.8 / sp["period"]
    kind = np.full(phase.shape, 2, np.intp)
    kind[(phase >= 0.2) & (phase < 0.7)] = 3
    kind[(phase < endplate_frac) | ((phase >= 0.78 - endplate_frac) & (phase < 0.78))] = 1
    kind[phase >= 0.78] = 0
    t3 = t_stack[kind]
    l3 = l_stack[kind]
    box = (slice(None), ys, xs)
    inside = g.rn[ys, xs][None] <= (g.g - np.float32(g.fat_n))[:, None, None]  # never outside the body
    np.copyto(tissue[box], t3, where=(t3 != _KEEP) & inside)
    np.copyto(labels[box], l3, where=(l3 != _KEEP) & inside)


def _paint_sparse(
    g: _Grid,
    tissue: np.ndarray,
    labels: np.ndarray,
    cand2d: np.ndarray,
    zs: slice,
    fn: Any,
) -> None:
    """Paint thin structures on a sparse set of in-plane pixels: ``fn(zeta[:,None], u[None], v[None],
    rn[None], g_in[:,None], g[:,None])`` returns (tissue codes, labels) with _KEEP for no change."""
    iy, ix = np.nonzero(cand2d)
    if iy.size == 0 or zs.stop <= zs.start:
        return
    zeta = g.zeta[zs].astype(np.float32)[:, None]
    t_new, l_new = fn(
        zeta, g.u[iy, ix][None], g.v[iy, ix][None], g.rn[iy, ix][None], g.g_in[zs][:, None], g.g[zs][:, None]
    )
    sub_t = tissue[zs]
    sub_l = labels[zs]
    cur_t = sub_t[:, iy, ix]
    cur_l = sub_l[:, iy, ix]
    np.copyto(cur_t, t_new, where=t_new != _KEEP)
    np.copyto(cur_l, l_new, where=l_new != _KEEP)
    sub_t[:, iy, ix] = cur_t
    sub_l[:, iy, ix] = cur_l


def _paint_ribs(g: _Grid, tissue: np.ndarray, labels: np.ndarray, p: dict[str, Any]) -> None:
    rb = p["ribs"]
    body = p["body"]
    wall_n = np.float32(g.wall_n)
    lo = float(g.g_in.min())
    hi = float(g.g_in.max() + wall_n)
    u, v = g.u, g.v
    cand = (g.rn >= lo) & (g.rn <= hi) & ~((np.abs(u) < 32.0) & (v > 0.0)) & (np.abs(u) > 14.0)
    sternum = (g.rn >= lo) & (g.rn <= hi) & (np.abs(u) <= 14.0) & (v < 0.0)
    first, spacing, n, drop, thick = rb["first"], rb["spacing"], rb["n"], rb["drop"], rb["thick"]
    vmax, vmin = body["b_post"], -body["b_ant"]
    zs = g.zslice(first - (n - 1) * spacing - drop - thick, first + thick)

    def ribs(zeta, uu, vv, rn, gin, gg):
        s = np.clip((vmax - vv) / (vmax - vmin), 0.0, 1.0)  # 0 posterior .. 1 anterior
        dz = drop * s**1.3
        w = (first - dz - zeta) / spacing
        i = np.rint(w)
        inband = (rn >= gin + 0.25 * wall_n) & (rn <= gin + 0.75 * wall_n)
        on = inband & (i >= 0) & (i < n) & (np.abs(w - i) * spacing <= thick / 2.0)
        cart = on & (s > 0.78)
        t = np.full(on.shape, _KEEP, np.uint8)
        lab = np.full(on.shape, _KEEP, np.uint8)
        t[on] = _T_RIB
        lab[on] = _BONE
        t[cart] = _T_CART
        lab[cart] = 0
        return t, lab

    _paint_sparse(g, tissue, labels, cand, zs, ribs)

    top, bottom = first - 10.0, first - 150.0

    def sternum_fn(zeta, uu, vv, rn, gin, gg):
        on = (rn >= gin + 0.1 * wall_n) & (rn <= gin + 0.9 * wall_n) & (zeta <= top) & (zeta >= bottom)
        t = np.where(on, np.uint8(_T_TRAB), np.uint8(_KEEP))
        lab = np.where(on, np.uint8(_BONE), np.uint8(_KEEP))
        return t, lab

    _paint_sparse(g, tissue, labels, sternum, g.zslice(bottom, top), sternum_fn)


def _paint_pelvis(g: _Grid, tissue: np.ndarray, labels: np.ndarray, p: dict[str, Any]) -> None:
    crest = p["pelvis_crest"]
    zs = g.zslice(crest - 150.0, crest)
    if zs.stop <= zs.start:
        return
    u, v = g.u, g.v
    for side in (-1.0, 1.0):
        # lateral half of an ellipse centred medially: from the sacroiliac joint (posterior) around the
        # flank to the anterior superior iliac spine; it flares outward toward the crest
        cu, cv, au, av = side * 60.0, 15.0, 58.0, 55.0
        r = np.hypot((u - cu) / au, (v - cv) / av)
        cand = (r >= 0.65) & (r <= 1.12) & (side * (u - cu) > -5.0)

        def wing(zeta, uu, vv, rn, gin, gg, cu=cu, cv=cv, au=au, av=av):
            rr = np.hypot((uu - cu) / au, (vv - cv) / av)
            flare = 1.0 - 0.25 * np.clip((crest - zeta) / 150.0, 0.0, 1.0)
            on = (np.abs(rr - flare) <= 5.0 / au) & (rn <= gin)
            t = np.where(on, np.uint8(_T_POST), np.uint8(_KEEP))
            lab = np.where(on, np.uint8(_BONE), np.uint8(_KEEP))
            return t, lab

        _paint_sparse(g, tissue, labels, cand, zs, wing)


def _paint_tube(
    g: _Grid,
    tissue: np.ndarray,
    labels: np.ndarray,
    centre_fn: Any,
    r: float,
    lo: float,
    hi: float,
    tcode: int,
) -> None:
    zs = g.zslice(lo, hi)
    if zs.stop <= zs.start:
        return
    zeta = g.zeta[zs]
    cu, cv = centre_fn(zeta)
    bb = _Grid.box(
        (g.u >= cu.min() - r - 2) & (g.u <= cu.max() + r + 2) & (g.v >= cv.min() - r - 2) & (g.v <= cv.max() + r + 2)
    )
    if bb is None:
        return
    ys, xs = bb
    du = g.u[ys, xs][None] - cu.astype(np.float32)[:, None, None]
    dv = g.v[ys, xs][None] - cv.astype(np.float32)[:, None, None]
    m = du * du + dv * dv <= np.float32(r * r)
    box = (zs, ys, xs)
    _put(tissue, box, m, tcode)
    _put(labels, box, m, 0)


def _paint_lungs(g: _Grid, tissue: np.ndarray, labels: np.ndarray, p: dict[str, Any]) -> None:
    base = 250.0  # the lungs are widest below this level and taper to the apex above it
    for e, apex in p["lungs"]:
        q = _q2d(g.u, g.v, e)
        # medial limit: the mediastinum
        side = math.copysign(1.0, e.cu)
        medial = side * g.u >= 16.0
        bb = _Grid.box((q <= 1.0) & medial & (g.rn <= float(g.g_in.max())))
        zs = g.zslice(float(g.zd.min()), apex)
        if bb is None or zs.stop <= zs.start:
            continue
        ys, xs = bb
        zeta = g.zeta[zs]
        t = np.clip((zeta - base) / (apex - base), 0.0, 1.0)
        f2 = np.clip(1.0 - t**2.2, 0.0, 1.0).astype(np.float32)  # squared in-plane scale
        m = q[ys, xs][None] <= f2[:, None, None]
        m &= medial[ys, xs][None]
        m &= g.rn[ys, xs][None] <= g.g_in[zs][:, None, None] - np.float32(0.01)
        m &= zeta.astype(np.float32)[:, None, None] > g.zd[ys, xs][None]
        box = (zs, ys, xs)
        _put(tissue, box, m, _T_LUNG)
        _put(labels, box, m, _LUNG)


def _paint_anatomy(g: _Grid, p: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    tissue = _paint_body(g, p)
    labels = np.zeros(g.shape, np.uint8)
    # muscles
    for side in (-1.0, 1.0):
        _paint_ellipsoid(
            g,
            tissue,
            labels,
            _Ellipsoid(side * 32.0, 72.0, 22.0, 18.0, 0.0, 200.0, 400.0, []),
            _T_MUSCLE,
            0,
            in_cavity=False,
        )
        # psoas: grows inferiorly
        _paint_ellipsoid(
            g,
            tissue,
            labels,
            _Ellipsoid(side * 38.0, 28.0, 20.0, 18.0, side * 0.3, -20.0, 190.0, []),
            _T_MUSCLE,
            0,
        )
    # stomach (fluid, gas cap anteriorly) and bowel gas
    st = p["stomach"]
    _paint_ellipsoid(g, tissue, labels, st, _T_FLUID, 0, below_diaphragm=6.0)
    gas_cap = _Ellipsoid(
        st.cu,
        st.cv - st.av * (1.0 - p["stomach_gas"]),
        st.au * 0.8,
        st.av * p["stomach_gas"],
        st.rot,
        st.cz,
        st.az * 0.8,
        [],
    )
    _paint_ellipsoid(g, tissue, labels, gas_cap, _T_GAS, 0, below_diaphragm=8.0)
    for cu, cv, cz, r in p["gas"]:
        _paint_ellipsoid(
            g, tissue, labels, _Ellipsoid(cu, cv, r, r * 0.8, 0.0, cz, r, []), _T_GAS, 0, below_diaphragm=10.0
        )
    # retroperitoneum: each kidney sits in its perirenal fat (the cue that separates it from the
    # iso-dense bowel and muscle on unenhanced CT), also against the posterior wall; the liver and spleen
    # may indent the capsule
    d = p["perirenal_fat"]
    for k in p["kidneys"]:
        capsule = _Ellipsoid(k.cu, k.cv, k.au + d, k.av + d, k.rot, k.cz, k.az + d, k.harm)
        _paint_ellipsoid(g, tissue, labels, capsule, _T_FAT, 0, below_diaphragm=6.0, in_cavity=False)
    # labelled abdominal organs, then lungs, heart, vessels, bone
    _paint_ellipsoid(g, tissue, labels, p["liver"], _T_LIVER, _LIVER, below_diaphragm=6.0)
    _paint_ellipsoid(g, tissue, labels, p["spleen"], _T_SPLEEN, _SPLEEN, below_diaphragm=6.0)
    core = 1.0 - p["kidney_cortex"] / 20.0
    for k in p["kidneys"]:
        _paint_ellipsoid(g, tissue, labels, k, _T_KID_CORT, _KIDNEY, below_diaphragm=6.0, core=(core, _T_KID_MED))
    _paint_lungs(g, tissue, labels, p)
    _paint_ellipsoid(g, tissue, labels, p["heart"], _T_BLOOD, 0, above_diaphragm=True)
    ao = p["aorta"]
    (tu, tv), (au_, av_) = ao["thorax"], ao["abdomen"]

    def aorta_centre(zeta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        w = np.clip((zeta - 190.0) / 40.0, 0.0, 1.0)
        return au_ + (tu - au_) * w, av_ + (tv - av_) * w

    _paint_tube(g, tissue, labels, aorta_centre, ao["r"], 0.0, ao["top"], _T_BLOOD)
    _paint_spine(g, tissue, labels, p["spine"])
    _paint_ribs(g, tissue, labels, p)
    _paint_pelvis(g, tissue, labels, p)
    return tissue, labels


class _SmoothField:
    """Smooth random field on a coarse physical grid (cell in mm), evaluated by trilinear
    interpolation; the same seed and FOV give the same field at any spacing."""

    def __init__(self, rng: np.random.Generator, g: _Grid, cell: float) -> None:
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


def _render(
    g: _Grid,
    p: dict[str, Any],
    tissue: np.ndarray,
    labels: np.ndarray,
    tex_rng: np.random.Generator,
    noise_rng: np.random.Generator,
) -> np.ndarray:
    lut = np.zeros(_N_TISSUES, np.float32)
    for t, hu in p["hu"].items():
        lut[t] = hu
    hu = lut[tissue]
    body_bb = _Grid.box(g.rn <= float(g.g.max()))
    field_a = _SmoothField(tex_rng, g, 10.0)
    field_b = _SmoothField(tex_rng, g, 12.0)
    field_c = _SmoothField(tex_rng, g, 12.0)
    fat, soft = np.float32(p["hu"][_T_FAT] + 10.0), np.float32(p["hu"][_T_ABD])
    amp = np.zeros(_N_TISSUES, np.float32)  # texture amplitude per tissue
    amp[[_T_LIVER, _T_SPLEEN, _T_KID_MED, _T_KID_CORT, _T_MUSCLE]] = 5.0
    amp[_T_TRAB] = 60.0
    amp[_T_LUNG] = 30.0
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
            np.copyto(h, soft + (fat - soft) * mix, where=t == _T_ABD)
            # mild texture of solid organs, trabecular bone and lung parenchyma
            f *= amp[t]
            h += f
            # lung: denser posteriorly (gravity), vessels where two smooth fields cross zero
            lm = t == _T_LUNG
            lb = _Grid.box(lm.any(axis=0))
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
        _blur3(blk, 1, w, noise)
        _blur3(blk, 2, w, noise)
    return hu


def _blur3(a: np.ndarray, axis: int, w: float, tmp: np.ndarray) -> None:
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


def _as_generator(rng: np.random.Generator | int | None) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def make_phantom(
    shape: tuple[int, int, int] = (64, 128, 128),
    spacing: tuple[float, float, float] = (2.5, 2.7, 2.7),
    *,
    rng: np.random.Generator | int | None = None,
    variety: bool = True,
) -> Phantom:
    """Make a CT-like torso phantom with labels (see :data:`LABELS`).

    ``shape`` and ``spacing`` are ``(z, y, x)`` (mm). ``rng`` seeds everything (same seed, same
    phantom); ``variety=False`` gives the canonical anatomy and tissue values (noise still comes from
    ``rng``). The anatomy depends only on the seed and the field of view (``shape * spacing``), not on
    the spacing itself. Arrays follow the module conventions (column index toward patient left, row
    toward posterior, slice toward superior), so :func:`write_series` with its default orientation
    writes an anatomically correct series.
    """
    if len(shape) != 3 or any(int(n) < 1 for n in shape):
        raise ValueError(f"shape must be three positive sizes (z, y, x), got {shape!r}")
    if len(spacing) != 3 or any(not float(s) > 0 for s in spacing):
        raise ValueError(f"spacing must be three positive values in mm (z, y, x), got {spacing!r}")
    shp = (int(shape[0]), int(shape[1]), int(shape[2]))
    spc = (float(spacing[0]), float(spacing[1]), float(spacing[2]))
    gen = _as_generator(rng)
    seeds = gen.integers(0, 2**63 - 1, size=3)
    anat_rng, tex_rng, noise_rng = (np.random.default_rng(int(s)) for s in seeds)
    p = _draw_anatomy(anat_rng, variety)
    g = _Grid(shp, spc, p)
    tissue, labels = _paint_anatomy(g, p)
    hu = _render(g, p, tissue, labels, tex_rng, noise_rng)
    return Phantom(hu=hu, labels=labels, spacing=spc)


# ---------------------------------------------------------------------------------------------------
# DICOM series writer
# ---------------------------------------------------------------------------------------------------


@dataclass
class SeriesInfo:
    """What :func:`write_series` wrote. Per-slice lists are in array (spatial) order."""

    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    paths: list[Path]
    sop_instance_uids: list[str]
    positions: list[tuple[float, float, float]]
    """ImagePositionPatient of each slice, as written."""
    orientation: tuple[float, float, float, float, float, float]
    """ImageOrientationPatient as written (tilted when a gantry tilt was asked for)."""
    instance_numbers: list[int]
    modality: str


def _ds(value: float) -> str:
    return format_number_as_ds(float(round(value, 6)) + 0.0)


def _unit(v: np.ndarray, what: str) -> np.ndarray:
    n = float(np.linalg.norm(v))
    if not n > 1e-6:
        raise ValueError(f"{what} has zero length")
    return v / n


def write_series(
    hu: np.ndarray,
    spacing: Sequence[float],
    out_dir: Path | str,
    *,
    modality: str = "CT",
    iop: Sequence[float] = (1, 0, 0, 0, 1, 0),
    origin: Sequence[float] | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    patient_name: str = "PHANTOM^CT",
    patient_id: str = "PH0001",
    series_number: int = 1,
    series_description: str = "Phantom CT",
    shuffle_files: bool | np.random.Generator = False,
    instance_number_order: str = "spatial",
    slice_positions: Sequence[float] | None = None,
    gantry_tilt_deg: float = 0.0,
    file_prefix: str = "ct",
    transfer_syntax: str = ExplicitVRLittleEndian,
    extra: Mapping[str, Any] | None = None,
    rng: np.random.Generator | int | None = None,
) -> SeriesInfo:
    """Write a volume ``(z, y, x)`` as one single-frame DICOM file per slice.

    ``modality="CT"`` writes CT Image Storage (stored = round(HU) + 1024, RescaleIntercept -1024,
    slope 1, signed 16 bit); ``"MR"`` writes MR Image Storage without rescale (values rounded).

    Geometry: rows run along ``iop[:3]`` with spacing ``spacing[2]``, columns along ``iop[3:]`` with
    ``spacing[1]``; the slice normal is ``cross(row, col)``. Slice ``k`` sits at offset ``d_k`` along
    the normal: ``d_k = k * spacing[0]`` or ``slice_positions[k]`` (mm, non-decreasing; gaps and
    irregular steps allowed). ``origin`` is the ImagePositionPatient at offset 0 (LPS mm); by default
    the volume is centred on (0, 0, 0).

    Gantry tilt (the convention of real tilted CT, e.g. GE): the image plane is rotated by ``t`` about
    the row axis, so the column cosine becomes ``cos t * col - sin t * normal`` (for the default IOP:
    ``[0, cos t, -sin t]``) while the table still moves along the untilted normal: IPP_k = origin +
    ``d_k / cos t`` * untilted normal. Relative to the tilted image frame the slice origin advances by
    ``d_k`` along the tilted normal and shifts by ``-tan(t) * d_k`` along the column direction (a sheared
    stack). GantryDetectorTilt is written as ``t``.

    Files are named ``{file_prefix}{index:04d}.dcm`` (no UIDs); with ``shuffle_files`` the index is a
    random permutation of the spatial order. ``instance_number_order`` is ``"spatial"`` (1..n along the
    normal), ``"reversed"`` or ``"random"``. ``rng`` drives the shuffles (a Generator passed as
    ``shuffle_files`` takes precedence). ``extra`` sets or overrides attributes (keyword -> value; None
    deletes) on every file; the per-slice SOPInstanceUID, InstanceNumber, ImagePositionPatient,
    SliceLocation (table position along the untilted normal) and pixel data are not overridable.
    Returns :class:`SeriesInfo` with lists in spatial (array) order.
    """
    vol = np.asarray(hu)
    if vol.ndim != 3:
        raise ValueError(f"hu must be a 3-D (z, y, x) array, got shape {vol.shape}")
    nz, ny, nx = vol.shape
    sz, sy, sx = (float(s) for s in spacing)
    modality = modality.upper()
    if modality not in ("CT", "MR"):
        raise ValueError(f"modality must be 'CT' or 'MR', got {modality!r}")
    if instance_number_order not in ("spatial", "reversed", "random"):
        raise ValueError(f"instance_number_order must be spatial, reversed or random, got {instance_number_order!r}")
    ts = UID(str(transfer_syntax))
    if not ts.is_transfer_syntax:
        raise ValueError(f"{ts} is not a transfer syntax UID")

    # geometry
    io = np.asarray(iop, dtype=np.float64)
    if io.shape != (6,):
        raise ValueError("iop must have six values")
    row = _unit(io[:3], "iop row")
    col0 = _unit(io[3:], "iop column")
    if abs(float(row @ col0)) > 1e-3:
        raise ValueError("iop row and column directions are not orthogonal")
    normal0 = np.cross(row, col0)
    t = math.radians(float(gantry_tilt_deg))
    if abs(t) >= math.radians(60):
        raise ValueError("gantry_tilt_deg must be within +-60 degrees")
    col = math.cos(t) * col0 - math.sin(t) * normal0
    step = normal0 / math.cos(t)  # IPP advance per mm along the tilted normal
    if slice_positions is None:
        d = np.arange(nz, dtype=np.float64) * sz
    else:
        d = np.asarray(slice_positions, dtype=np.float64)
        if d.shape != (nz,):
            raise ValueError(f"slice_positions needs {nz} values, got {d.shape}")
        if np.any(np.diff(d) < 0) or not np.all(np.isfinite(d)):
            raise ValueError("slice_positions must be finite and non-decreasing")
    if origin is None:
        o = -((nx - 1) / 2.0 * sx) * row - ((ny - 1) / 2.0 * sy) * col - (float(d[0] + d[-1]) / 2.0) * step
    else:
        o = np.asarray(origin, dtype=np.float64)
        if o.shape != (3,):
            raise ValueError("origin must be (x, y, z) in mm")
    ipp = o[None, :] + d[:, None] * step[None, :]
    ipp_str = [[_ds(c) for c in p] for p in ipp]
    positions = [(float(p[0]), float(p[1]), float(p[2])) for p in ipp_str]
    iop_str = [_ds(c) for c in (*row, *col)]
    ov = [float(c) for c in iop_str]
    orientation = (ov[0], ov[1], ov[2], ov[3], ov[4], ov[5])
    table_pos = ipp @ normal0

    # ordering
    if isinstance(shuffle_files, np.random.Generator):
        gen, shuffle = shuffle_files, True
    elif isinstance(shuffle_files, (bool, np.bool_)):
        gen, shuffle = _as_generator(rng), bool(shuffle_files)
    else:
        raise TypeError("shuffle_files must be a bool or a numpy Generator")
    file_index = gen.permutation(nz) if shuffle else np.arange(nz)
    if instance_number_order == "spatial":
        inst = np.arange(1, nz + 1)
    elif instance_number_order == "reversed":
        inst = np.arange(nz, 0, -1)
    else:
        inst = gen.permutation(nz) + 1

    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    for_uid = frame_of_reference_uid or generate_uid()
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage

    # pixel data
    if modality == "CT":
        stored = np.clip(np.rint(vol.astype(np.float32, copy=False)) - _CT_RESCALE_INTERCEPT, -32768, 32767)
    else:
        stored = np.clip(np.rint(vol.astype(np.float32, copy=False)), -32768, 32767)
    stored = stored.astype(">i2" if ts == ExplicitVRBigEndian else "<i2")

    base = Dataset()
    if any(ord(ch) > 127 for ch in patient_name + patient_id + series_description):
        base.SpecificCharacterSet = "ISO_IR 192"
    base.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if modality == "CT" else "OTHER"]
    base.SOPClassUID = sop_class
    base.StudyDate = "20240101"
    base.SeriesDate = "20240101"
    base.ContentDate = "20240101"
    base.StudyTime = "120000"
    base.SeriesTime = "120000"
    base.ContentTime = "120000"
    base.AccessionNumber = ""
    base.Modality = modality
    base.Manufacturer = "edge_runtime"
    base.ReferringPhysicianName = ""
    base.SeriesDescription = series_description
    base.ManufacturerModelName = "phantom"
    base.PatientName = patient_name
    base.PatientID = patient_id
    base.PatientBirthDate = ""
    base.PatientSex = "O"
    base.BodyPartExamined = "CHESTABDOMEN"
    base.SliceThickness = _ds(sz)
    if modality == "CT":
        base.KVP = "120"
        if gantry_tilt_deg:
            base.GantryDetectorTilt = _ds(float(gantry_tilt_deg))
        else:
            base.GantryDetectorTilt = "0"
    else:
        base.ScanningSequence = "SE"
        base.SequenceVariant = "NONE"
        base.ScanOptions = ""
        base.MRAcquisitionType = "2D"
        base.RepetitionTime = "500"
        base.EchoTime = "15"
        base.EchoTrainLength = "1"
        base.ImagedNucleus = "1H"
        base.MagneticFieldStrength = "1.5"
        base.SpacingBetweenSlices = _ds(sz)
    base.PatientPosition = "HFS"
    base.StudyInstanceUID = study_uid
    base.SeriesInstanceUID = series_uid
    base.StudyID = "1"
    base.SeriesNumber = int(series_number)
    base.AcquisitionNumber = 1
    base.ImageOrientationPatient = iop_str
    base.FrameOfReferenceUID = for_uid
    base.PositionReferenceIndicator = ""
    base.SamplesPerPixel = 1
    base.PhotometricInterpretation = "MONOCHROME2"
    base.Rows = ny
    base.Columns = nx
    base.PixelSpacing = [_ds(sy), _ds(sx)]
    base.BitsAllocated = 16
    base.BitsStored = 16
    base.HighBit = 15
    base.PixelRepresentation = 1
    if modality == "CT":
        base.WindowCenter = "40"
        base.WindowWidth = "400"
        base.RescaleIntercept = _ds(_CT_RESCALE_INTERCEPT)
        base.RescaleSlope = "1"
        base.RescaleType = "HU"
    else:
        lo, hi = float(stored.min()), float(stored.max())
        base.WindowCenter = _ds((lo + hi) / 2.0)
        base.WindowWidth = _ds(max(hi - lo, 1.0))
    for key, value in (extra or {}).items():
        if value is None:
            if key in base:
                delattr(base, key)
        else:
            setattr(base, key, value)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    width = max(4, len(str(nz - 1)))
    paths: list[Path] = []
    sops: list[str] = []
    for k in range(nz):
        sop = generate_uid()
        ds = Dataset()
        ds.update(base)
        ds.SOPInstanceUID = sop
        ds.InstanceNumber = int(inst[k])
        ds.ImagePositionPatient = ipp_str[k]
        ds.SliceLocation = _ds(float(table_pos[k]))
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ts
        ds.file_meta = meta
        if ts.is_compressed:
            ds.compress(ts, stored[k], generate_instance_uid=False)
        else:
            ds.PixelData = stored[k].tobytes()
        path = out / f"{file_prefix}{int(file_index[k]):0{width}d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        sops.append(sop)

    return SeriesInfo(
        study_uid=str(study_uid),
        series_uid=str(series_uid),
        frame_of_reference_uid=str(for_uid),
        paths=paths,
        sop_instance_uids=sops,
        positions=positions,
        orientation=orientation,
        instance_numbers=[int(i) for i in inst],
        modality=modality,
    )


# ---------------------------------------------------------------------------------------------------
# Reference DICOM SEG
# ---------------------------------------------------------------------------------------------------


def _property_code(name: str) -> tuple[Any, Any]:
    """(category, type) SNOMED CT codes for a label name."""
    from pydicom.sr.codedict import codes

    known = {
        "lung": (codes.SCT.Organ, codes.SCT.Lung),
        "liver": (codes.SCT.Organ, codes.SCT.Liver),
        "spleen": (codes.SCT.Organ, codes.SCT.Spleen),
        "kidney": (codes.SCT.Organ, codes.SCT.Kidney),
        "bone": (codes.SCT.Tissue, codes.SCT.Bone),
    }
    key = name.strip().lower()
    if key in known:
        return known[key]
    keyword = "".join(part.capitalize() for part in key.replace("_", " ").split())
    try:
        return codes.SCT.AnatomicalStructure, getattr(codes.SCT, keyword)
    except AttributeError:
        return codes.SCT.Tissue, codes.SCT.Tissue


def write_reference_seg(
    series: SeriesInfo,
    labels: np.ndarray,
    out_path: Path | str,
    label_names: Mapping[int, str] = LABELS,
) -> Path:
    """Write ground-truth ``labels`` (``(z, y, x)``, same order as ``series.paths``) as a BINARY
    DICOM SEG referencing the written source images.

    Each label value in ``label_names`` that occurs in ``labels`` becomes one segment, numbered
    1..n in increasing label value (so with :data:`LABELS` and all organs present, segment number ==
    label value); other values are left out. Segments carry SNOMED CT property codes and algorithm
    type MANUAL (reference annotation, distinct from the runtime's AUTOMATIC output).
    """
    import highdicom as hd
    from pydicom import dcmread

    from edge_runtime import __version__

    lab = np.asarray(labels)
    if lab.ndim != 3 or lab.shape[0] != len(series.paths):
        raise ValueError(f"labels must be (z, y, x) with z == {len(series.paths)} slices, got {lab.shape}")
    sources = [dcmread(p) for p in series.paths]
    if (int(sources[0].Rows), int(sources[0].Columns)) != lab.shape[1:]:
        raise ValueError(f"labels rows/columns {lab.shape[1:]} do not match the series")
    present = set(np.unique(lab).tolist())
    values = [v for v in sorted(label_names) if v in present and v != 0]
    if not values:
        raise ValueError("labels contain none of the label values in label_names")
    lut = np.zeros(int(max(int(lab.max()), max(values))) + 1, np.uint8)
    descriptions = []
    for number, value in enumerate(values, start=1):
        lut[value] = number
        category, prop = _property_code(label_names[value])
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=label_names[value],
                segmented_property_category=category,
                segmented_property_type=prop,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
            )
        )
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=lut[lab],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=int(sources[0].SeriesNumber or 0) + 100,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="edge_runtime",
        manufacturer_model_name="phantom",
        software_versions=__version__,
        device_serial_number="0",
        series_description="Phantom ground truth",
        content_label="GROUNDTRUTH",
    )
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(out)
    return out


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m phantom OUT_DIR [options]``: write a phantom CT series (and its SEG)."""
    ap = argparse.ArgumentParser(
        prog="python -m phantom",
        description="Write a synthetic CT torso series, one file per slice, and its reference SEG.",
    )
    ap.add_argument("out_dir", type=Path, help="folder for the series files")
    ap.add_argument("--slices", type=int, default=100)
    ap.add_argument(
        "--size", type=int, nargs="+", default=[512], metavar="N", help="rows and columns (one value: square)"
    )
    ap.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        default=[1.0, 0.8, 0.8],
        metavar=("Z", "Y", "X"),
        help="voxel spacing in mm, (z, y, x)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-variety", action="store_true", help="canonical anatomy")
    ap.add_argument(
        "--with-seg",
        action="store_true",
        help="also write the reference DICOM SEG (default: OUT_DIR's sibling OUT_DIR_seg.dcm)",
    )
    ap.add_argument("--seg-path", type=Path, default=None, help="where to write the reference SEG")
    ap.add_argument("--npz", type=Path, default=None, help="also save hu, labels and spacing to this .npz")
    ap.add_argument("--shuffle", action="store_true", help="shuffle file names relative to spatial order")
    ap.add_argument("--instance-order", choices=("spatial", "reversed", "random"), default="spatial")
    ap.add_argument("--tilt", type=float, default=0.0, help="gantry tilt in degrees")
    ap.add_argument("--patient-id", default="PH0001")
    ap.add_argument("--patient-name", default="PHANTOM^CT")
    args = ap.parse_args(argv)

    if len(args.size) not in (1, 2):
        ap.error("--size takes one or two values")
    rows, cols = (args.size[0], args.size[0]) if len(args.size) == 1 else (args.size[0], args.size[1])
    out_dir: Path = args.out_dir
    seg_path: Path | None = args.seg_path
    if args.with_seg and seg_path is None:
        seg_path = out_dir.resolve().parent / f"{out_dir.resolve().name}_seg.dcm"
    if seg_path is not None and seg_path.resolve().parent == out_dir.resolve():
        ap.error("the SEG must not be written into the series folder")

    ph = make_phantom(
        (args.slices, rows, cols),
        (args.spacing[0], args.spacing[1], args.spacing[2]),
        rng=args.seed,
        variety=not args.no_variety,
    )
    rng = np.random.default_rng(args.seed)
    info = write_series(
        ph.hu,
        ph.spacing,
        out_dir,
        shuffle_files=args.shuffle,
        instance_number_order=args.instance_order,
        gantry_tilt_deg=args.tilt,
        patient_id=args.patient_id,
        patient_name=args.patient_name,
        rng=rng,
    )
    print(f"wrote {len(info.paths)} slices to {out_dir} (series {info.series_uid})")
    if seg_path is not None:
        write_reference_seg(info, ph.labels, seg_path)
        print(f"wrote reference SEG {seg_path}")
    if args.npz is not None:
        np.savez_compressed(args.npz, hu=ph.hu, labels=ph.labels, spacing=np.asarray(ph.spacing))
        print(f"wrote {args.npz}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
