"""The label map as a LABELMAP SEG (Label Map Segmentation Storage, 1.2.840.10008.5.1.4.1.1.66.7).

One frame per slice where any segment is present, each pixel its segment number (8 bits up to 255 segments,
16 beyond), MONOCHROME2. The segments carry their colours as the BINARY SEG's do (Recommended Display CIELab
Value, which viewers such as OHIF use); highdicom allows either those or a Palette Color LUT, not both.

highdicom writes it: unlike BINARY, a label map needs no plane per segment, and highdicom 0.28 encodes the
500-slice, 117-segment CT in about a second (``benchmarks/writers.py``), so a hand-made encoder would buy little.
"""

from __future__ import annotations

import highdicom as hd

from edge_runtime.results.formats import LABELMAP
from edge_runtime.results.seg import build_seg, format_identity
from edge_runtime.results.series_result import SeriesResult

__all__ = ["build_labelmap_seg"]

#: the LABELMAP SEG's Series Number: the BINARY SEG's + this
SERIES_OFFSET = 1


def build_labelmap_seg(result: SeriesResult) -> hd.seg.Segmentation:
    """A LABELMAP SEG of ``result.labels`` (the package's label values, 0 = background) on its volume; segment
    ``i`` is ``package.labels[i - 1]``, as in the BINARY SEG. Slices without any segment are omitted."""
    identity = format_identity(result, LABELMAP, description="AI label map", series_offset=SERIES_OFFSET)
    return build_seg(result, segmentation_type=hd.seg.SegmentationTypeValues.LABELMAP, identity=identity)
