"""The coordinates of one phantom: physical axes, the canonical in-plane frame, anatomical z and the body outline.

Anatomy is defined in millimetres in a canonical frame (u toward the patient's left, v toward posterior,
anatomical z "zeta" toward superior); :class:`Grid` maps the voxel grid into that frame, fitting the torso to the
field of view, so that the painters in :mod:`phantom.paint` never see the spacing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from phantom.anatomy import Ellipsoid

ZETA_LO, ZETA_HI = -10.0, 420.0  # anatomical z span (mm) fitted to short fields of view


class Grid:
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
        self.z_scale = min(1.0, fov_z / (ZETA_HI - ZETA_LO))
        self.zeta = self.z_mm / self.z_scale + (ZETA_LO + ZETA_HI) / 2.0 + p["zshift"]

        # body outline: normalised radius rn(u, v) <= g(zeta)
        vb = np.where(self.v < 0, self.v / body["b_ant"], self.v / body["b_post"])
        ub = self.u / body["a"]
        rn = (np.abs(ub) ** body["p"] + np.abs(vb) ** body["p"]) ** (1.0 / body["p"])
        if body["harm"]:
            rn = rn / radial(ub, vb, body["harm"])
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


def radial(x: np.ndarray, y: np.ndarray, harm: Sequence[tuple[int, float, float]]) -> np.ndarray:
    """Radial scale 1 + sum a_k cos(k phi + phase_k) of a lobulated outline."""
    phi = np.arctan2(y, x)
    r = np.ones_like(phi)
    for k, a, ph in harm:
        r += a * np.cos(k * phi + ph)
    return r


def q2d(u: np.ndarray, v: np.ndarray, e: Ellipsoid) -> np.ndarray:
    """Normalised squared in-plane radius of an (optionally lobulated) rotated ellipse."""
    c, s = math.cos(e.rot), math.sin(e.rot)
    du, dv = u - e.cu, v - e.cv
    a = (c * du + s * dv) / e.au
    b = (-s * du + c * dv) / e.av
    q = a * a + b * b
    if e.harm:
        q = q / radial(a, b, e.harm) ** 2
    return q.astype(np.float32)
