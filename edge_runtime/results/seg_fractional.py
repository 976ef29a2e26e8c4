"""The model's per-class probabilities as a FRACTIONAL SEG (PROBABILITY, Maximum Fractional Value 255).

The frames are the pipeline's uint8 softmax planes as they are (``Segmentation.probabilities``: 0..255 already
is the DICOM encoding), so nothing is rescaled. Only (segment, plane) pairs where the class has a non-zero
probability somewhere get a frame, as highdicom's ``omit_empty_frames`` does; away from a structure the uint8
softmax rounds to 0, so a many-class model on a CT stays near the size of its structures rather than
classes x slices full frames.

Single-frame sources go through the same direct encoder as the BINARY SEG
(:func:`edge_runtime.results.seg_binary.assemble_seg`): highdicom accepts fractional values only as a float
array of (slices, rows, columns, segments), four bytes a voxel and class (60 GB for 117 classes on a 500-slice
CT), and compares every plane. The frames of one multi-frame source go through highdicom
(:func:`highdicom_fractional_seg`), which pairs them with the source's frames; such sources are small.
"""

from __future__ import annotations

from dataclasses import asdict

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from edge_runtime.results._seg_frames import FramePlan, SegmentBox, highdicom_plane_order, plan_frames
from edge_runtime.results.formats import FRACTIONAL
from edge_runtime.results.seg import SegIdentity, format_identity, on_source_frames, segment_descriptions
from edge_runtime.results.seg_binary import SegPixels, assemble_seg, check_inputs
from edge_runtime.results.series_result import SeriesResult

__all__ = ["encode_fractional_seg", "highdicom_fractional_seg", "fractional_identity"]

#: the FRACTIONAL SEG's Series Number: the BINARY SEG's + this
SERIES_OFFSET = 2
MAX_FRACTIONAL_VALUE = 255
PIXELS = SegPixels(
    segmentation_type="FRACTIONAL",
    bits=8,
    segments_overlap="UNDEFINED",  # as highdicom: probabilities of several classes share each voxel
    fractional=("PROBABILITY", MAX_FRACTIONAL_VALUE),
    encoder="edge_runtime.seg_fractional",
)


def fractional_identity(result: SeriesResult) -> SegIdentity:
    return format_identity(result, FRACTIONAL, description="AI probabilities", series_offset=SERIES_OFFSET)


def _classes(result: SeriesResult) -> tuple[np.ndarray, list[int]]:
    """The result's probabilities and the class index (= label value) of each segment, once the probabilities
    are there, of the right type and with the package's classes."""
    probabilities, package = result.probabilities, result.package
    if probabilities is None:
        raise ValueError("a FRACTIONAL SEG needs the model's per-class probabilities, and the result has none")
    if probabilities.dtype != np.uint8 or probabilities.ndim != 4:
        raise ValueError(
            "probabilities must be uint8 (classes, slices, rows, columns), "
            f"not {probabilities.dtype} of {probabilities.ndim} dimensions"
        )
    classes = [int(label.value) for label in package.labels]
    if max(classes, default=0) >= probabilities.shape[0]:
        raise ValueError(
            f"probabilities hold {probabilities.shape[0]} classes; the package's label values go up to {max(classes)}"
        )
    return probabilities, classes


def _pixel_data(probabilities: np.ndarray, classes: list[int], plan: FramePlan) -> bytes:
    """The planned frames, one byte a pixel, segment by segment, padded to even length."""
    rows, cols = probabilities.shape[2:]
    n_bytes = len(plan.slices) * rows * cols
    buffer = np.zeros(n_bytes + n_bytes % 2, dtype=np.uint8)
    if not plan.empty:
        frames = buffer[:n_bytes].reshape(len(plan.slices), rows, cols)
        offset = 0
        for value, slices in zip(classes, plan.per_segment, strict=True):
            frames[offset : offset + len(slices)] = probabilities[value, slices]
            offset += len(slices)
    return buffer.tobytes()


def encode_fractional_seg(result: SeriesResult) -> Dataset:
    """A FRACTIONAL SEG of ``result.probabilities`` (uint8, (classes, slices, rows, columns), class index = label
    value, 0..255) on its volume: segment ``i`` is ``package.labels[i - 1]``, as in the BINARY SEG."""
    volume, package = result.volume, result.package
    if volume.multiframe:
        return highdicom_fractional_seg(result)
    probabilities, classes = _classes(result)
    sources = volume.datasets
    check_inputs(sources, probabilities.shape[1:], package, what="probabilities")
    n_slices = probabilities.shape[1]
    boxes: list[SegmentBox | None] = []
    for value in classes:
        present = np.asarray(probabilities[value].reshape(n_slices, -1).any(axis=1))
        boxes.append(SegmentBox(0, present, None, None) if present.any() else None)
    orientation = [float(v) for v in sources[0].ImageOrientationPatient]
    positions = np.asarray([[float(v) for v in d.ImagePositionPatient] for d in sources], dtype=np.float64)
    plan = plan_frames(boxes, highdicom_plane_order(positions, orientation))
    pixel_data = _pixel_data(probabilities, classes, plan)
    return assemble_seg(volume, package, plan, pixel_data, fractional_identity(result), result.uid_seed, PIXELS)


def highdicom_fractional_seg(result: SeriesResult) -> hd.seg.Segmentation:
    """The same FRACTIONAL SEG made by highdicom (frames of a multi-frame source; the benchmark's anchor).

    highdicom takes fractional values as floats in [0, 1] and multiplies them by 255 and rounds: ``p / 255``
    comes back as ``p`` exactly."""
    probabilities, classes = _classes(result)
    stacked = np.stack([probabilities[v] for v in classes], axis=-1).astype(np.float32)
    stacked /= MAX_FRACTIONAL_VALUE
    return hd.seg.Segmentation(
        source_images=result.volume.datasets,
        pixel_array=on_source_frames(result.volume, stacked),
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        max_fractional_value=MAX_FRACTIONAL_VALUE,
        segment_descriptions=segment_descriptions(result.package, result.uid_seed),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        omit_empty_frames=True,
        **asdict(fractional_identity(result)),
    )
