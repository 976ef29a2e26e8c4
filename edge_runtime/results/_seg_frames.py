"""The frames of a BINARY SEG: which (segment, plane) pairs get one, in which order, and their bits.

highdicom compares every (segment, slice) plane of the label map to find the empty ones. Here one
:func:`scipy.ndimage.find_objects` pass gives each segment's bounding box; a segment's masks are computed (and,
when a row is a whole number of bytes, bit-packed) inside its box only, which also tells on which slices it is
present. The frames are then bit-packed straight into the Pixel Data buffer (1 bit per pixel, frames
contiguous, no per-frame padding, PS3.5 8.1.1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy import ndimage

#: the largest native Pixel Data value: its length is a 32-bit even number
_MAX_PIXEL_DATA = 0xFFFFFFFE
#: how many bytes of masks :func:`_pack_in_chunks` compares at a time
_CHUNK_BYTES = 32 << 20


class SegmentBox(NamedTuple):
    """Where one segment lies: its bounding box starts at slice ``z0``; ``present[i]`` tells whether it is on
    slice ``z0 + i``.

    With whole-byte rows (Columns % 8 == 0), ``packed`` holds the box's masks, (slices, y1 - y0, b1 - b0),
    little-endian bit-packed over columns [8 * b0, 8 * b1) (the box widened to whole bytes), ready to be copied
    into rows y0:y1, bytes b0:b1 of the frames, and ``extent`` is (y0, y1, b0, b1). Otherwise both are None:
    the masks are recomputed frame by frame."""

    z0: int
    present: np.ndarray
    packed: np.ndarray | None
    extent: tuple[int, int, int, int] | None


@dataclass(frozen=True)
class FramePlan:
    """The frames, segment by segment and, within a segment, plane by plane in highdicom's order."""

    #: source index (slice) of each frame
    slices: np.ndarray
    #: segment number (1-based) of each frame
    segments: np.ndarray
    #: each segment's run of ``slices``
    per_segment: list[np.ndarray]
    #: per source index: the Dimension Index Value of its plane (1-based, among the planes with frames), 0 if none
    plane_index: np.ndarray
    #: source indices of the planes that have frames, in highdicom's plane order
    planes: np.ndarray
    #: no segment is present anywhere (one empty frame per segment, at the first plane)
    empty: bool


def highdicom_plane_order(positions: np.ndarray, orientation: Sequence[float]) -> np.ndarray:
    """Source indices in the order highdicom sorts planes: ascending along column x row direction."""
    iop = np.asarray(orientation, dtype=np.float64)
    normal = np.cross(iop[3:], iop[:3])
    _, order = np.unique(positions @ normal, return_index=True)
    if len(order) != len(positions):
        raise ValueError("two source images share a position; plane positions must not contain duplicates")
    return order


def segment_boxes(labels: np.ndarray, values: Sequence[int], aligned: bool) -> list[SegmentBox | None]:
    """For each segment value its :class:`SegmentBox`, None when absent; ``aligned``: Columns % 8 == 0."""
    if labels.dtype == np.bool_:
        lab = labels.view(np.uint8)
    elif np.issubdtype(labels.dtype, np.integer):
        lab = labels
    else:
        lab = labels.astype(np.int64)
    boxes = ndimage.find_objects(lab, max_label=max(values))
    out: list[SegmentBox | None] = []
    for value in values:
        box = boxes[value - 1] if 0 < value <= len(boxes) else None
        if box is None:
            out.append(None)
            continue
        zs, ys, xs = box
        if aligned:
            x0 = xs.start // 8 * 8
            x1 = -(-xs.stop // 8) * 8
            packed = np.packbits(lab[zs, ys, x0:x1] == value, axis=-1, bitorder="little")
            present = np.asarray(packed.any(axis=(1, 2)))
            out.append(SegmentBox(zs.start, present, packed, (ys.start, ys.stop, x0 // 8, x1 // 8)))
        else:
            present = np.asarray((lab[box] == value).any(axis=(1, 2)))
            out.append(SegmentBox(zs.start, present, None, None))
    return out


def plan_frames(boxes: Sequence[SegmentBox | None], order: np.ndarray) -> FramePlan:
    """One frame per segment and plane where the segment is present; ``order`` is highdicom's plane order.

    An entirely empty label map gets one empty frame per segment, all at the first plane: Number of Frames
    must be at least 1 and every described segment keeps a frame (highdicom encodes every plane of every
    segment then, 58,500 empty frames or 1.9 GB for 117 segments on 500 slices)."""
    n_segments, n_slices = len(boxes), len(order)
    present = np.zeros((n_segments, n_slices), dtype=bool)
    for k, box in enumerate(boxes):
        if box is not None:
            present[k, box.z0 : box.z0 + len(box.present)] = box.present
    nonempty = np.asarray(present.any(axis=0))
    empty = not nonempty.any()
    plane_index = np.zeros(n_slices, dtype=np.int64)
    if empty:
        slices = np.full(n_segments, order[0], dtype=np.int64)
        segments = np.arange(1, n_segments + 1, dtype=np.int64)
        plane_index[order[0]] = 1
        per_segment = [slices[k : k + 1] for k in range(n_segments)]
        planes = order[:1]
    else:
        planes = order[nonempty[order]]
        plane_index[planes] = np.arange(1, len(planes) + 1)
        per_segment = [planes[present[k, planes]] for k in range(n_segments)]
        slices = np.concatenate(per_segment)
        segments = np.repeat(np.arange(1, n_segments + 1), [len(p) for p in per_segment])
    return FramePlan(slices, segments, per_segment, plane_index, planes, empty)


def pack_pixel_data(
    labels: np.ndarray, values: Sequence[int], boxes: Sequence[SegmentBox | None], plan: FramePlan
) -> bytes:
    """The Pixel Data of the planned frames, padded to even length with a NUL byte.

    With whole-byte rows each segment's packed box is copied in with one vectorised assignment; otherwise the
    frames are packed as one bit stream, 8 frames (a whole number of bytes) or more at a time."""
    n_frames, rows, cols = len(plan.slices), labels.shape[1], labels.shape[2]
    n_bytes = -(-n_frames * rows * cols // 8)
    if n_bytes > _MAX_PIXEL_DATA:
        raise ValueError(f"{n_frames} frames of {rows} x {cols} exceed the 4 GiB limit of native Pixel Data")
    if cols % 8 == 0:
        buffer = np.zeros(n_bytes + n_bytes % 2, dtype=np.uint8)
        frames = buffer[:n_bytes].reshape(n_frames, rows, cols // 8)
        offset = 0
        for box, slices in zip(boxes, plan.per_segment, strict=True):
            if box is not None and box.packed is not None and box.extent is not None and len(slices) and not plan.empty:
                y0, y1, b0, b1 = box.extent
                frames[offset : offset + len(slices), y0:y1, b0:b1] = box.packed[slices - box.z0]
            offset += len(slices)
        return buffer.tobytes()
    if plan.empty:
        pixel_data = bytes(n_bytes)
    else:
        frame_values = np.asarray(values, dtype=np.int64)[plan.segments - 1]
        pixel_data = _pack_in_chunks(labels, plan.slices, frame_values)
    return pixel_data + b"\x00" if len(pixel_data) % 2 else pixel_data


def _pack_in_chunks(labels: np.ndarray, frame_slices: np.ndarray, frame_values: np.ndarray) -> bytes:
    """Bit-pack the masks ``labels[s] == v`` of all frames as one bit stream (any frame size), 8 frames
    (a whole number of bytes) or more at a time, so that memory stays bounded."""
    per_frame = labels.shape[1] * labels.shape[2]
    step = max(8, _CHUNK_BYTES // max(per_frame, 1) // 8 * 8)
    parts = []
    for start in range(0, len(frame_slices), step):
        s = frame_slices[start : start + step]
        v = frame_values[start : start + step]
        parts.append(np.packbits((labels[s] == v[:, None, None]).ravel(), bitorder="little").tobytes())
    return b"".join(parts)
