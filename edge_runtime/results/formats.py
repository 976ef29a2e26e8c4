"""The result formats a series can be published in, by the names configuration and destinations use.

Each name is one kind of DICOM object (or a group of them) that :func:`edge_runtime.results.publish.write_results`
can write; a destination lists the ones its receiver reads. The defaults are what the runtime has always sent
(a BINARY SEG and a TID 1500 SR), so a configuration that names no formats behaves as before.
"""

from __future__ import annotations

from collections.abc import Collection

BINARY = "binary"
"""BINARY Segmentation Storage: one bit plane per segment and slice (the original output)."""
LABELMAP = "labelmap"
"""Label Map Segmentation Storage: one 8/16-bit frame per slice, each pixel the segment number."""
FRACTIONAL = "fractional"
"""FRACTIONAL SEG (PROBABILITY): the model's per-class softmax as 0..255 frames."""
RTSTRUCT = "rtstruct"
"""RT Structure Set: closed planar contours in patient coordinates, for RT planning systems."""
OVERLAY = "overlay"
"""Colour Secondary Capture images with burned-in contours, and a Key Object Selection pointing at them."""
SR = "sr"
"""TID 1500 Measurement Report (volumes per segment), referencing the SEG."""

FORMATS: tuple[str, ...] = (BINARY, LABELMAP, FRACTIONAL, RTSTRUCT, OVERLAY, SR)
"""Every format name, in the order results are written."""

DEFAULT_FORMATS: tuple[str, ...] = (BINARY, SR)
"""What is written when nothing asks for more: today's SEG and SR."""


def check_formats(formats: Collection[str]) -> tuple[str, ...]:
    """``formats`` in :data:`FORMATS` order, without repeats; a ValueError naming the unknown ones otherwise."""
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"unknown result format(s) {', '.join(unknown)}; known: {', '.join(FORMATS)}")
    return tuple(name for name in FORMATS if name in formats)
