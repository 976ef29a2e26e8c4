"""Paint a phantom's anatomy into a tissue map and a label map, both on the voxel grid.

Structures are painted in order, later ones over earlier ones, so labels are exclusive. Each painter works in the
canonical frame of :class:`~phantom.grid.Grid` and touches only the bounding box of its structure: a 512 x 512
phantom paints in a second, not a minute.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from phantom.anatomy import BONE, KIDNEY, LIVER, LUNG, SPLEEN, Ellipsoid, Tissue
from phantom.grid import Grid, q2d

KEEP = 255  # "leave unchanged" in templates


def _put(arr: np.ndarray, box: tuple[slice, ...], mask: np.ndarray, value: int) -> None:
    np.putmask(arr[box], mask, value)


def _paint_ellipsoid(
    g: Grid,
    tissue: np.ndarray,
    labels: np.ndarray,
    e: Ellipsoid,
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
    q = q2d(g.u, g.v, e)
    bb = Grid.box(q <= 1.0)
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


def _paint_body(g: Grid, p: dict[str, Any]) -> np.ndarray:
    """Air, subcutaneous fat, muscle wall, and the cavity (abdomen / diaphragm / mediastinum)."""
    rn = g.rn[None]
    level = (rn <= g.g[:, None, None]).view(np.uint8).copy()
    level += rn <= (g.g - np.float32(g.fat_n))[:, None, None]
    level += rn <= g.g_in[:, None, None]
    zeta3 = g.zeta.astype(np.float32)[:, None, None]
    level += 4 * (zeta3 >= g.zd[None] - np.float32(6.0)).view(np.uint8)
    level += 4 * (zeta3 >= g.zd[None]).view(np.uint8)
    # level = 4 * zone + ring; ring: outside, fat, wall, cavity; zone: below the diaphragm, its 6 mm band, above
    lut = np.array(
        [
            [Tissue.AIR, Tissue.FAT, Tissue.MUSCLE, Tissue.ABDOMEN],
            [Tissue.AIR, Tissue.FAT, Tissue.MUSCLE, Tissue.MUSCLE],
            [Tissue.AIR, Tissue.FAT, Tissue.MUSCLE, Tissue.MEDIASTINUM],
        ],
        dtype=np.uint8,
    ).ravel()
    return lut[level]


def _paint_spine(g: Grid, tissue: np.ndarray, labels: np.ndarray, sp: dict[str, Any]) -> None:
    """Vertebral bodies (trabecular core, cortical shell, endplates), discs, canal, posterior arch."""
    u, v = g.u, g.v
    cv, au, av = sp["cv"], sp["au"], sp["av"]
    vc = cv + av + sp["canal"] + 1.0  # canal centre
    bb = Grid.box((np.abs(u) <= 50.0) & (v >= cv - av - 5.0) & (v <= vc + 45.0))
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
        t = np.full(qb.shape, KEEP, np.uint8)
        lab = np.full(qb.shape, KEEP, np.uint8)
        if with_post:
            t[post] = Tissue.POSTERIOR
            lab[post] = BONE
        if body_code is not None:
            t[body] = body_code
            lab[body] = BONE if body_code != Tissue.DISC else 0
        if shell_code is not None:
            t[body & (qb > inner)] = shell_code
        t[canal] = Tissue.CSF
        lab[canal] = 0
        return t, lab

    kinds = [
        template(Tissue.DISC, None, False),  # 0 disc
        template(Tissue.CORTICAL, None, True),  # 1 endplate
        template(Tissue.TRABECULAR, Tissue.CORTICAL, False),  # 2 body, no arch
        template(Tissue.TRABECULAR, Tissue.CORTICAL, True),  # 3 body with arch
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
    np.copyto(tissue[box], t3, where=(t3 != KEEP) & inside)
    np.copyto(labels[box], l3, where=(l3 != KEEP) & inside)


def _paint_sparse(
    g: Grid,
    tissue: np.ndarray,
    labels: np.ndarray,
    cand2d: np.ndarray,
    zs: slice,
    fn: Any,
) -> None:
    """Paint thin structures on a sparse set of in-plane pixels: ``fn(zeta[:,None], u[None], v[None],
    rn[None], g_in[:,None], g[:,None])`` returns (tissue codes, labels) with KEEP for no change."""
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
    np.copyto(cur_t, t_new, where=t_new != KEEP)
    np.copyto(cur_l, l_new, where=l_new != KEEP)
    sub_t[:, iy, ix] = cur_t
    sub_l[:, iy, ix] = cur_l


def _paint_ribs(g: Grid, tissue: np.ndarray, labels: np.ndarray, p: dict[str, Any]) -> None:
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
        t = np.full(on.shape, KEEP, np.uint8)
        lab = np.full(on.shape, KEEP, np.uint8)
        t[on] = Tissue.RIB
        lab[on] = BONE
        t[cart] = Tissue.CARTILAGE
        lab[cart] = 0
        return t, lab

    _paint_sparse(g, tissue, labels, cand, zs, ribs)

    top, bottom = first - 10.0, first - 150.0

    def sternum_fn(zeta, uu, vv, rn, gin, gg):
        on = (rn >= gin + 0.1 * wall_n) & (rn <= gin + 0.9 * wall_n) & (zeta <= top) & (zeta >= bottom)
        t = np.where(on, np.uint8(Tissue.TRABECULAR), np.uint8(KEEP))
        lab = np.where(on, np.uint8(BONE), np.uint8(KEEP))
        return t, lab

    _paint_sparse(g, tissue, labels, sternum, g.zslice(bottom, top), sternum_fn)


def _paint_pelvis(g: Grid, tissue: np.ndarray, labels: np.ndarray, p: dict[str, Any]) -> None:
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
            t = np.where(on, np.uint8(Tissue.POSTERIOR), np.uint8(KEEP))
            lab = np.where(on, np.uint8(BONE), np.uint8(KEEP))
            return t, lab

        _paint_sparse(g, tissue, labels, cand, zs, wing)


def _paint_tube(
    g: Grid,
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
    bb = Grid.box(
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


def _paint_lungs(g: Grid, tissue: np.ndarray, labels: np.ndarray, p: dict[str, Any]) -> None:
    base = 250.0  # the lungs are widest below this level and taper to the apex above it
    for e, apex in p["lungs"]:
        q = q2d(g.u, g.v, e)
        # medial limit: the mediastinum
        side = math.copysign(1.0, e.cu)
        medial = side * g.u >= 16.0
        bb = Grid.box((q <= 1.0) & medial & (g.rn <= float(g.g_in.max())))
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
        _put(tissue, box, m, Tissue.LUNG)
        _put(labels, box, m, LUNG)


def paint_anatomy(g: Grid, p: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    tissue = _paint_body(g, p)
    labels = np.zeros(g.shape, np.uint8)
    # muscles
    for side in (-1.0, 1.0):
        _paint_ellipsoid(
            g,
            tissue,
            labels,
            Ellipsoid(side * 32.0, 72.0, 22.0, 18.0, 0.0, 200.0, 400.0, []),
            Tissue.MUSCLE,
            0,
            in_cavity=False,
        )
        # psoas: grows inferiorly
        _paint_ellipsoid(
            g,
            tissue,
            labels,
            Ellipsoid(side * 38.0, 28.0, 20.0, 18.0, side * 0.3, -20.0, 190.0, []),
            Tissue.MUSCLE,
            0,
        )
    # stomach (fluid, gas cap anteriorly) and bowel gas
    st = p["stomach"]
    _paint_ellipsoid(g, tissue, labels, st, Tissue.FLUID, 0, below_diaphragm=6.0)
    gas_cap = Ellipsoid(
        st.cu,
        st.cv - st.av * (1.0 - p["stomach_gas"]),
        st.au * 0.8,
        st.av * p["stomach_gas"],
        st.rot,
        st.cz,
        st.az * 0.8,
        [],
    )
    _paint_ellipsoid(g, tissue, labels, gas_cap, Tissue.GAS, 0, below_diaphragm=8.0)
    for cu, cv, cz, r in p["gas"]:
        _paint_ellipsoid(
            g, tissue, labels, Ellipsoid(cu, cv, r, r * 0.8, 0.0, cz, r, []), Tissue.GAS, 0, below_diaphragm=10.0
        )
    # retroperitoneum: each kidney sits in its perirenal fat (the cue that separates it from the
    # iso-dense bowel and muscle on unenhanced CT), also against the posterior wall; the liver and spleen
    # may indent the capsule
    d = p["perirenal_fat"]
    for k in p["kidneys"]:
        capsule = Ellipsoid(k.cu, k.cv, k.au + d, k.av + d, k.rot, k.cz, k.az + d, k.harm)
        _paint_ellipsoid(g, tissue, labels, capsule, Tissue.FAT, 0, below_diaphragm=6.0, in_cavity=False)
    # labelled abdominal organs, then lungs, heart, vessels, bone
    _paint_ellipsoid(g, tissue, labels, p["liver"], Tissue.LIVER, LIVER, below_diaphragm=6.0)
    _paint_ellipsoid(g, tissue, labels, p["spleen"], Tissue.SPLEEN, SPLEEN, below_diaphragm=6.0)
    core = 1.0 - p["kidney_cortex"] / 20.0
    for k in p["kidneys"]:
        _paint_ellipsoid(
            g, tissue, labels, k, Tissue.KIDNEY_CORTEX, KIDNEY, below_diaphragm=6.0, core=(core, Tissue.KIDNEY_MEDULLA)
        )
    _paint_lungs(g, tissue, labels, p)
    _paint_ellipsoid(g, tissue, labels, p["heart"], Tissue.BLOOD, 0, above_diaphragm=True)
    ao = p["aorta"]
    (tu, tv), (au_, av_) = ao["thorax"], ao["abdomen"]

    def aorta_centre(zeta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        w = np.clip((zeta - 190.0) / 40.0, 0.0, 1.0)
        return au_ + (tu - au_) * w, av_ + (tv - av_) * w

    _paint_tube(g, tissue, labels, aorta_centre, ao["r"], 0.0, ao["top"], Tissue.BLOOD)
    _paint_spine(g, tissue, labels, p["spine"])
    _paint_ribs(g, tissue, labels, p)
    _paint_pelvis(g, tissue, labels, p)
    return tissue, labels
