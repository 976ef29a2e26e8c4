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

Modules: :mod:`~phantom.anatomy` (labels, tissues, the random draw of the anatomy), :mod:`~phantom.grid`
(coordinates), :mod:`~phantom.paint` (tissue and label maps), :mod:`~phantom.render` (HU, texture, noise),
:mod:`~phantom.generate` (:func:`make_phantom`), :mod:`~phantom.series` (:func:`write_series`),
:mod:`~phantom.reference_seg` (:func:`write_reference_seg`) and :mod:`~phantom.cli` (``python -m phantom``).
"""

from phantom.anatomy import LABELS
from phantom.cli import main
from phantom.generate import Phantom, make_phantom
from phantom.reference_seg import write_reference_seg
from phantom.series import SeriesInfo, write_series

__all__ = [
    "LABELS",
    "Phantom",
    "SeriesInfo",
    "make_phantom",
    "write_series",
    "write_reference_seg",
    "main",
]
