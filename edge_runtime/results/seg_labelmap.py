"""The label map as a LABELMAP SEG (Label Map Segmentation Storage, 1.2.840.10008.5.1.4.1.1.66.7).

One frame per slice where any segment is present, each pixel its segment number (8 bits up to 255 segments,
16 beyond), MONOCHROME2. The segments carry their colours as the BINARY SEG's do (Recommended Display CIELab
Value, which viewers such as OHIF use); highdicom allows either those or a Palette Color LUT, not both.

highdicom writes it: unlike BINARY, a label map needs no plane per segment, and highdicom 0.28 encodes the
500-slice, 117-segment CT in about a second (``benchmarks/writers.py``), so a hand-made encoder would buy little.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np

from edge_runtime.imaging.volume import Volume
from edge_runtime.inference.package import ModelPackage
from edge_runtime.results.formats import LABELMAP
from edge_runtime.results.seg import MANUFACTURER, build_seg, format_identity

__all__ = ["build_labelmap_seg"]

#: the LABELMAP SEG's Series Number: the BINARY SEG's + this
SERIES_OFFSET = 1


def build_labelmap_seg(
    volume: Volume,
    labels: np.ndarray,
    package: ModelPackage,
    *,
    uid_seed: str,
    series_number: int | None = None,
    device_serial_number: str = MANUFACTURER,
) -> hd.seg.Segmentation:
    """A LABELMAP SEG of ``labels`` (the package's label values, 0 = background) on ``volume``; segment ``i`` is
    ``package.labels[i - 1]``, as in the BINARY SEG. Slices without any segment are omitted."""
    identity = format_identity(
        volume,
        package,
        uid_seed,
        LABELMAP,
        description="AI label map",
        series_offset=SERIES_OFFSET,
        series_number=series_number,
        device_serial_number=device_serial_number,
    )
    return build_seg(
        volume,
        labels,
        package,
        uid_seed=uid_seed,
        segmentation_type=hd.seg.SegmentationTypeValues.LABELMAP,
        identity=identity,
    )
