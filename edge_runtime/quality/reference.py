"""Reference segmentations (ground truth as DICOM SEG) read onto the grid of a source :class:`Volume`.

Every kind of SEG is read the same way, frame by frame, with pydicom:

- **BINARY** (Segmentation Storage, 1 bit): a voxel belongs to the frame's segment when its value is 1.
- **FRACTIONAL** (PROBABILITY or OCCUPANCY): a voxel belongs to the segment when its fraction is at least
  ``threshold`` (default 0.5), i.e. stored value >= ``threshold * MaximumFractionalValue``.
- **LABELMAP** (Label Map Segmentation Storage, ...66.7, 8 or 16 bit): each value is a segment number. The
  background is the Pixel Padding Value where present, else 0 (as dcmqi writes and reads them); segments
  with that number, or typed (125040, DCM, "Background"), are background and not returned. Slices that
  the SEG has no frame for (sparse label maps) are background.

Each frame is placed on a slice of the volume by its source reference (Derivation Image Sequence ->
Source Image Sequence -> Referenced SOP Instance UID = the SOP Instance UID of ``volume.datasets[k]``);
frames without a usable reference are placed by Image Position (Patient) projected on the slice normal,
nearest slice within a tolerance. A frame that has both must agree with itself. Slices no frame covers
are empty. The SEG is refused (``ValueError`` with the reason) when its Frame of Reference UID, image
orientation, pixel spacing or rows/columns differ from the volume's, when a frame is shifted within the
plane (not pixel-aligned), or when a frame with foreground lies outside the volume (``ignore_outside``
drops such frames instead). Empty frames outside the volume are dropped silently.

Overlaps: :func:`read_reference_masks` returns one boolean mask per segment, so overlapping segments keep
all their voxels. :func:`read_reference_seg` flattens them into one label map whose values are segment
numbers (0 = background); where segments overlap, the **higher segment number wins**.
"""

from __future__ import annotations

from collections.abc import Iterator
from os import PathLike
from typing import Union

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from edge_runtime.dicom import SEGMENTATION_CLASSES
from edge_runtime.errors import UndecodablePixels
from edge_runtime.imaging.volume import Volume

BACKGROUND_TYPE = ("125040", "DCM")

SegSource = Union[str, "PathLike[str]", Dataset]


def read_reference_masks(
    seg: SegSource,
    volume: Volume,
    *,
    threshold: float = 0.5,
    tolerance_mm: float | None = None,
    ignore_outside: bool = False,
) -> dict[int, np.ndarray]:
    """One boolean mask shaped like ``volume.array`` per described, non-background segment number.

    Segments that the SEG describes but that have no foreground get an all-False mask.
    ``tolerance_mm`` bounds how far a frame placed by position may lie from a slice, along the normal and
    within the plane; by default a quarter of the smallest slice step along the normal and a quarter of the
    pixel spacing within the plane (at least 0.01 mm).
    """
    reader = _Reader(seg, volume, threshold=threshold, tolerance_mm=tolerance_mm, ignore_outside=ignore_outside)
    masks = {number: np.zeros(volume.array.shape, dtype=bool) for number in reader.names}
    for k, frame_masks in reader.frames():
        for number, mask in frame_masks.items():
            masks[number][k] |= mask
    return masks


def read_reference_seg(
    seg: SegSource,
    volume: Volume,
    *,
    threshold: float = 0.5,
    tolerance_mm: float | None = None,
    ignore_outside: bool = False,
) -> tuple[np.ndarray, dict[int, str]]:
    """A label map shaped like ``volume.array`` (values: segment numbers, 0 = background) and segment names.

    The names map every described, non-background segment number to its Segment Label. Where segments
    overlap, the higher segment number wins; use :func:`read_reference_masks` to keep overlaps. Arguments
    as for :func:`read_reference_masks`.
    """
    reader = _Reader(seg, volume, threshold=threshold, tolerance_mm=tolerance_mm, ignore_outside=ignore_outside)
    if 0 in reader.names:
        raise ValueError(
            "segment 0 is a foreground segment of this label map (its background is another "
            "value); a label map with 0 as background cannot hold it: use read_reference_masks"
        )
    top = max(reader.names, default=0)
    labels = np.zeros(volume.array.shape, dtype=np.uint8 if top < 256 else np.uint16)
    for k, frame_masks in reader.frames():
        for number, mask in frame_masks.items():
            np.maximum(labels[k], np.where(mask, number, 0).astype(labels.dtype), out=labels[k])
    return labels, dict(reader.names)


class _Reader:
    """Checks a SEG against a volume, then yields each frame's segment masks with its slice index."""

    def __init__(
        self,
        seg: SegSource,
        volume: Volume,
        *,
        threshold: float,
        tolerance_mm: float | None,
        ignore_outside: bool,
    ):
        ds = seg if isinstance(seg, Dataset) else pydicom.dcmread(seg)
        self.ds = ds
        self.volume = volume
        self.ignore_outside = ignore_outside
        sop_class = str(ds.get("SOPClassUID", ""))
        if sop_class not in SEGMENTATION_CLASSES:
            raise ValueError(f"not a Segmentation: SOP Class UID {sop_class or '(none)'}")
        self.kind = str(ds.get("SegmentationType", "")).upper()
        if self.kind not in ("BINARY", "FRACTIONAL", "LABELMAP"):
            raise ValueError(f"unsupported Segmentation Type {self.kind or '(none)'}")
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.cutoff = threshold * float(ds.get("MaximumFractionalValue", 1) or 1)
        self.n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        self.names = self._segment_names()

        shape = volume.array.shape
        if (int(ds.Rows), int(ds.Columns)) != shape[1:]:
            raise ValueError(
                f"the SEG's frames are {ds.Rows}x{ds.Columns} (rows x columns); the volume's "
                f"slices are {shape[1]}x{shape[2]}"
            )
        seg_for = ds.get("FrameOfReferenceUID")
        vol_for = volume.datasets[0].get("FrameOfReferenceUID")
        if seg_for and vol_for and str(seg_for) != str(vol_for):
            raise ValueError(f"the SEG's Frame of Reference UID {seg_for} is not the volume's ({vol_for})")

        steps = np.diff(volume.positions)
        step = float(steps.min()) if steps.size else float(volume.spacing[0])
        if tolerance_mm is not None:
            self.tol_along = self.tol_in_plane = float(tolerance_mm)
        else:
            self.tol_along = max(0.01, 0.25 * step) if np.isfinite(step) and step > 0 else 0.01
            self.tol_in_plane = max(0.01, 0.25 * min(volume.spacing[1], volume.spacing[2]))
        self.uid_index = {str(d.SOPInstanceUID): k for k, d in enumerate(volume.datasets)}
        self.slice_origins = np.array([[float(v) for v in d.ImagePositionPatient] for d in volume.datasets])
        self.slice_along = (self.slice_origins - volume.origin) @ volume.normal

    # -- description ---------------------------------------------------------------------------------
    def _segment_names(self) -> dict[int, str]:
        background: set[int] = set()
        if self.kind == "LABELMAP":
            background.add(int(self.ds.get("PixelPaddingValue", 0)))
        names: dict[int, str] = {}
        for item in self.ds.get("SegmentSequence", []):
            number = int(item.SegmentNumber)
            types = item.get("SegmentedPropertyTypeCodeSequence") or [Dataset()]
            code = (str(types[0].get("CodeValue", "")), str(types[0].get("CodingSchemeDesignator", "")))
            if self.kind == "LABELMAP" and code == BACKGROUND_TYPE:
                background.add(number)
            names[number] = str(item.get("SegmentLabel", ""))
        if not names:
            raise ValueError("the SEG describes no segment")
        return {n: name for n, name in sorted(names.items()) if n not in background}

    # -- functional groups ---------------------------------------------------------------------------
    def _items(self, index: int, keyword: str) -> list[Dataset]:
        """Items of a functional group macro for a frame: its per-frame group, else the shared one."""
        per_frame = self.ds.get("PerFrameFunctionalGroupsSequence")
        if per_frame is not None and index < len(per_frame) and per_frame[index].get(keyword):
            return list(per_frame[index][keyword])
        shared = self.ds.get("SharedFunctionalGroupsSequence")
        if shared and shared[0].get(keyword):
            return list(shared[0][keyword])
        return []

    def _group(self, index: int, keyword: str) -> Dataset | None:
        items = self._items(index, keyword)
        return items[0] if items else None

    def _check_plane(self, index: int) -> None:
        orientation = self._group(index, "PlaneOrientationSequence")
        if orientation is not None and "ImageOrientationPatient" in orientation:
            iop = np.array([float(v) for v in orientation.ImageOrientationPatient])
            expected = np.concatenate([self.volume.row_direction, self.volume.column_direction])
            if iop.shape != (6,) or not np.allclose(iop, expected, atol=1e-3):
                raise ValueError(
                    f"frame {index + 1} has Image Orientation (Patient) "
                    f"{iop.round(4).tolist()}; the volume's is {expected.round(4).tolist()}"
                )
        measures = self._group(index, "PixelMeasuresSequence")
        if measures is not None and "PixelSpacing" in measures:
            spacing = [float(v) for v in measures.PixelSpacing]
            if not np.allclose(spacing, self.volume.spacing[1:], rtol=1e-3, atol=1e-4):
                raise ValueError(
                    f"frame {index + 1} has Pixel Spacing {spacing}; the volume's is {list(self.volume.spacing[1:])}"
                )

    def _segment_of(self, index: int) -> int:
        ident = self._group(index, "SegmentIdentificationSequence")
        if ident is None or "ReferencedSegmentNumber" not in ident:
            raise ValueError(f"frame {index + 1} does not say which segment it belongs to")
        return int(ident.ReferencedSegmentNumber)

    def _slice_of(self, index: int) -> int | None:
        """Slice index of a frame, or None when it lies outside the volume."""
        referenced: set[int] = set()
        for item in self._items(index, "DerivationImageSequence"):
            for source in item.get("SourceImageSequence", []):
                k = self.uid_index.get(str(source.get("ReferencedSOPInstanceUID", "")))
                if k is not None:
                    referenced.add(k)
        by_position = self._slice_by_position(index)
        if len(referenced) == 1:
            k = referenced.pop()
            if by_position != k and self._position(index) is not None:
                where = "outside the volume" if by_position is None else f"on slice {by_position}"
                raise ValueError(
                    f"frame {index + 1} references source slice {k} but its Image Position (Patient) lies {where}"
                )
            return k
        if by_position is None and self._position(index) is None:
            detail = "several source slices" if referenced else "no instance of the volume"
            raise ValueError(f"frame {index + 1} references {detail} and has no Image Position (Patient)")
        return by_position

    def _position(self, index: int) -> np.ndarray | None:
        plane = self._group(index, "PlanePositionSequence")
        if plane is None or "ImagePositionPatient" not in plane:
            return None
        return np.array([float(v) for v in plane.ImagePositionPatient])

    def _slice_by_position(self, index: int) -> int | None:
        ipp = self._position(index)
        if ipp is None:
            return None
        along = float((ipp - self.volume.origin) @ self.volume.normal)
        k = int(np.argmin(np.abs(self.slice_along - along)))
        if abs(self.slice_along[k] - along) > self.tol_along:
            return None
        shift = ipp - self.slice_origins[k]
        in_plane = (
            abs(float(shift @ self.volume.row_direction)),
            abs(float(shift @ self.volume.column_direction)),
        )
        if max(in_plane) > self.tol_in_plane:
            raise ValueError(
                f"frame {index + 1} is shifted by {in_plane[0]:.3g} mm along rows and "
                f"{in_plane[1]:.3g} mm along columns from slice {k}: not pixel-aligned with the "
                "volume"
            )
        return k

    # -- pixels --------------------------------------------------------------------------------------
    def frames(self) -> Iterator[tuple[int, dict[int, np.ndarray]]]:
        from pydicom.pixels import iter_pixels

        if "PerFrameFunctionalGroupsSequence" in self.ds:
            n_groups = len(self.ds.PerFrameFunctionalGroupsSequence)
            if n_groups != self.n_frames:
                raise ValueError(f"{self.n_frames} frames but {n_groups} Per-Frame Functional Groups items")
        placed = []
        for index in range(self.n_frames):
            self._check_plane(index)
            segment = self._segment_of(index) if self.kind != "LABELMAP" else None
            placed.append((self._slice_of(index), segment))
        outside = 0
        pixels = _decoded(iter_pixels(self.ds), self.ds)
        for (k, segment), frame in zip(placed, pixels, strict=True):
            frame = np.asarray(frame)
            if frame.ndim == 3:  # a single frame read as (1, rows, columns)
                frame = frame[0]
            masks = self._masks(frame, segment)
            if k is None:
                if any(m.any() for m in masks.values()):
                    outside += 1
                continue
            yield k, masks
        if outside and not self.ignore_outside:
            raise ValueError(
                f"{outside} frame(s) with foreground lie outside the volume (no slice within "
                f"{self.tol_along:.3g} mm); pass ignore_outside=True to drop them"
            )

    def _masks(self, frame: np.ndarray, segment: int | None) -> dict[int, np.ndarray]:
        if self.kind == "LABELMAP":
            present = np.unique(frame)
            return {int(v): frame == v for v in present if int(v) in self.names}
        if segment not in self.names:
            raise ValueError(f"a frame belongs to segment {segment}, which the SEG does not describe")
        if self.kind == "FRACTIONAL":
            return {segment: frame >= self.cutoff}
        return {segment: frame > 0}


def _decoded(frames: Iterator[np.ndarray], ds: Dataset) -> Iterator[np.ndarray]:
    """``frames`` with any decoder failure turned into :class:`UndecodablePixels` naming the transfer syntax."""
    while True:
        try:
            frame = next(frames)
        except StopIteration:
            return
        except Exception as exc:  # decoders raise NotImplementedError, RuntimeError, ValueError, ...
            syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
            name = getattr(syntax, "name", str(syntax))
            raise UndecodablePixels(
                f"pixel data ({name}, {ds.get('BitsAllocated')} bit(s) allocated) cannot be decoded: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            ) from exc
        yield frame
