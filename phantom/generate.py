"""Make a phantom: draw its anatomy, fit it to the grid, paint tissues and labels, render HU.

One seed gives three independent streams (anatomy, texture, noise), so that the anatomy does not change when
the texture or the noise draws more or fewer numbers (at another shape, say).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from phantom.anatomy import LABELS, draw_anatomy
from phantom.grid import Grid
from phantom.paint import paint_anatomy
from phantom.render import render


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


def as_generator(rng: np.random.Generator | int | None) -> np.random.Generator:
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
    the spacing itself. Arrays follow the package conventions (column index toward patient left, row
    toward posterior, slice toward superior), so :func:`write_series` with its default orientation
    writes an anatomically correct series.
    """
    if len(shape) != 3 or any(int(n) < 1 for n in shape):
        raise ValueError(f"shape must be three positive sizes (z, y, x), got {shape!r}")
    if len(spacing) != 3 or any(not float(s) > 0 for s in spacing):
        raise ValueError(f"spacing must be three positive values in mm (z, y, x), got {spacing!r}")
    shp = (int(shape[0]), int(shape[1]), int(shape[2]))
    spc = (float(spacing[0]), float(spacing[1]), float(spacing[2]))
    gen = as_generator(rng)
    seeds = gen.integers(0, 2**63 - 1, size=3)
    anat_rng, tex_rng, noise_rng = (np.random.default_rng(int(s)) for s in seeds)
    p = draw_anatomy(anat_rng, variety)
    g = Grid(shp, spc, p)
    tissue, labels = paint_anatomy(g, p)
    hu = render(g, p, tissue, labels, tex_rng, noise_rng)
    return Phantom(hu=hu, labels=labels, spacing=spc)
