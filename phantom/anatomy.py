"""The anatomy of a phantom: label values, tissue classes and the random draw of every shape parameter.

Everything random about a phantom's anatomy is drawn here, by :func:`draw_anatomy`, in one fixed order that
depends neither on the shape nor on the spacing of the volume. That order is part of the contract: a trained
model's recipe names phantoms by seed, so a seed must give the same phantom bit for bit. New draws go last.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, NamedTuple

import numpy as np

LABELS: dict[int, str] = {1: "lung", 2: "liver", 3: "spleen", 4: "kidney", 5: "bone"}
"""Label values of :class:`~phantom.Phantom` ``labels``: both lungs are 1, both kidneys 4, bone is spine, ribs,
sternum and iliac wings."""

LUNG, LIVER, SPLEEN, KIDNEY, BONE = 1, 2, 3, 4, 5


class Tissue(IntEnum):
    """Tissue classes of the painted volume; each becomes HU through :data:`TISSUE_HU`, drawn per phantom."""

    AIR = 0
    FAT = 1
    MUSCLE = 2
    ABDOMEN = 3  # soft tissue of the abdominal cavity, mixed with visceral fat by the texture
    MEDIASTINUM = 4
    LUNG = 5
    LIVER = 6
    SPLEEN = 7
    KIDNEY_MEDULLA = 8
    KIDNEY_CORTEX = 9
    TRABECULAR = 10  # bone marrow space: vertebral bodies, sternum
    CORTICAL = 11  # compact bone: vertebral shells and endplates
    BLOOD = 12
    GAS = 13
    CSF = 14
    CARTILAGE = 15
    DISC = 16
    FLUID = 17
    RIB = 18
    POSTERIOR = 19  # vertebral arches and processes, iliac wings


# mean HU and the +- range of its uniform per-phantom draw, one row per tissue
_TISSUE_HU_TABLE = """
    #             mean HU    +-
    AIR             -1000     0
    FAT              -100    10
    MUSCLE             50     6
    ABDOMEN            30     5
    MEDIASTINUM       -85    10
    LUNG             -860    30
    LIVER              58     8
    SPLEEN             46     5
    KIDNEY_MEDULLA     30     4
    KIDNEY_CORTEX      38     4
    TRABECULAR        500   100
    CORTICAL         1000   100
    BLOOD              42     5
    GAS              -990     5
    CSF                 8     4
    CARTILAGE         120    20
    DISC               85    10
    FLUID              12     5
    RIB               650    80
    POSTERIOR         600    80
"""


def _table_rows(table: str) -> list[list[str]]:
    """The rows of a whitespace-aligned table, split into fields; blank lines and ``#`` headings are left out."""
    return [line.split() for line in table.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _parse_tissue_hu(table: str) -> dict[Tissue, tuple[float, float]]:
    rows = {name: (float(mean), float(spread)) for name, mean, spread in _table_rows(table)}
    # in Tissue order: the per-phantom HU are drawn in this order
    return {tissue: rows[tissue.name] for tissue in Tissue}


TISSUE_HU: dict[Tissue, tuple[float, float]] = _parse_tissue_hu(_TISSUE_HU_TABLE)
"""(mean HU, +- range of the per-phantom draw) of each tissue class."""


class Jitter:
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

    def ellipsoid(self, shape: OrganShape) -> Ellipsoid:
        """Draw an organ's ellipsoid; its parameters are drawn in field order (u, v, au, av, rot, z, az, lobes)."""
        return Ellipsoid(
            self.add(*shape.u),
            self.add(*shape.v),
            self.rel(*shape.au),
            self.rel(*shape.av),
            self.deg(*shape.rot),
            self.add(*shape.z) if shape.z is not None else 0.0,
            self.rel(*shape.az) if shape.az is not None else 0.0,
            self.harmonics(shape.lobes) if shape.lobes is not None else [],
        )


@dataclass
class Ellipsoid:
    cu: float  # canonical in-plane centre, mm (u: toward patient left, v: toward posterior)
    cv: float
    au: float  # in-plane semi-axes along the rotated axes
    av: float
    rot: float  # in-plane rotation (rad)
    cz: float  # anatomical z centre and semi-axis (mm, zeta units)
    az: float
    harm: list[tuple[int, float, float]]


class OrganShape(NamedTuple):
    """An organ's canonical ellipsoid and how far each parameter varies between phantoms."""

    u: tuple[float, float]  # in-plane centre (mm, +- mm)
    v: tuple[float, float]
    au: tuple[float, float]  # in-plane semi-axes (mm, +- fraction)
    av: tuple[float, float]
    rot: tuple[float, float]  # in-plane rotation (degrees, +- degrees)
    z: tuple[float, float] | None  # anatomical z centre (mm, +- mm); None: 0, the lungs are bounded otherwise
    az: tuple[float, float] | None  # z semi-axis (mm, +- fraction)
    lobes: float | None  # amplitude of the lobulated outline; None: a smooth ellipse


# The organs drawn as ellipsoids, one row each, in the fields of OrganShape: value, then the +- range of its
# draw; "-" marks a parameter the organ does not have.
_ORGAN_SHAPE_TABLE = """
    #              u   +-      v  +-     au   +-     av   +-    rot  +-      z  +-     az   +-  lobes
    right_lung   -80    5      5   5     62  .08     95  .08      0   5      -   -      -    -    .04
    left_lung     80    5      5   5     60  .08     95  .08      0   5      -   -      -    -    .04
    heart         18    5    -35   5     55  .10     45  .10     35   8    262   8     55  .10      -
    liver        -50    6     -5   6     80  .10     75  .10    -10   8    165   8     80  .10    .05
    spleen       100    5     30   5     22  .15     45  .15     40  10    168   8     48  .12    .04
    right_kidney -62    5     50   4     30  .10     20  .10    -30   8    100   8     55  .10    .03
    left_kidney   60    5     50   4     30  .10     20  .10     30   8    112   8     55  .10    .03
    stomach       45    6    -40   6     40  .15     32  .15     20  10    180  10     45  .15    .05
"""


def _parse_organ_shapes(table: str) -> dict[str, OrganShape]:
    def pair(value: str, spread: str) -> tuple[float, float]:
        return float(value), float(spread)

    def optional_pair(value: str, spread: str) -> tuple[float, float] | None:
        return None if value == "-" else pair(value, spread)

    shapes = {}
    for name, *f in _table_rows(table):
        shapes[name] = OrganShape(
            pair(f[0], f[1]),
            pair(f[2], f[3]),
            pair(f[4], f[5]),
            pair(f[6], f[7]),
            pair(f[8], f[9]),
            optional_pair(f[10], f[11]),
            optional_pair(f[12], f[13]),
            None if f[14] == "-" else float(f[14]),
        )
    return shapes


_ORGAN_SHAPES = _parse_organ_shapes(_ORGAN_SHAPE_TABLE)

# bowel gas pockets of the canonical anatomy (u, v, z centre, radius; mm)
_CANONICAL_GAS = [
    (-40.0, -60.0, 60.0, 10.0),
    (30.0, -70.0, 40.0, 12.0),
    (60.0, -30.0, 90.0, 8.0),
    (-20.0, -80.0, 120.0, 9.0),
]


def draw_anatomy(rng: np.random.Generator, variety: bool) -> dict[str, Any]:
    """All random choices of the anatomy, drawn in a fixed order independent of shape and spacing."""
    j = Jitter(rng, variety)
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
    # the left apex varies around the right one: drawn after both lungs' shapes
    right_lung = j.ellipsoid(_ORGAN_SHAPES["right_lung"])
    left_lung = j.ellipsoid(_ORGAN_SHAPES["left_lung"])
    p["lungs"] = [(right_lung, apex), (left_lung, apex + j.add(0.0, 4.0))]
    p["heart"] = j.ellipsoid(_ORGAN_SHAPES["heart"])
    p["liver"] = j.ellipsoid(_ORGAN_SHAPES["liver"])
    p["spleen"] = j.ellipsoid(_ORGAN_SHAPES["spleen"])
    p["kidneys"] = [j.ellipsoid(_ORGAN_SHAPES["right_kidney"]), j.ellipsoid(_ORGAN_SHAPES["left_kidney"])]
    p["kidney_cortex"] = j.rel(6.0, 0.2)
    p["stomach"] = j.ellipsoid(_ORGAN_SHAPES["stomach"])
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
        p["gas"] = list(_CANONICAL_GAS)
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
    p["hu"] = {t: j.add(mean, spread) for t, (mean, spread) in TISSUE_HU.items()}
    p["noise"] = j.rel(15.0, 0.3)
    # perirenal fat inside the renal fascia (mm beyond the kidney's surface); drawn last so that every
    # earlier draw, and so every earlier phantom's other anatomy, stays as it was
    p["perirenal_fat"] = j.rel(7.0, 0.4)
    return p
