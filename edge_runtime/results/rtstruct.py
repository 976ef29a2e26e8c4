"""The label map as an RT Structure Set: closed planar contours in patient coordinates, for RT planning systems.

One ROI per package label (ROI number = segment number of the SEG, colour = the label's colour, name = its name,
generation AUTOMATIC), each with one CLOSED_PLANAR contour per connected outline on each source slice where the
label is present. Holes are contours of their own on the same slice, read by the even-odd rule (as rt-utils
does, filling all of a slice's contours at once with OpenCV). Every contour references its source image, and
the RT Referenced Study/Series/Contour Image sequences list every source instance. A label with no voxel has no
ROI: an ROI without contours is valid DICOM, but readers such as rt-utils fail on it (the SEG and SR still list
it).

Each ROI's observation is identified by the label's type code, with the label's side (its type modifier) and
anatomic region where the package has them, as the SEG's segments are.

Outlines: marching squares (contourpy, matplotlib's C++ contour generator, small and numpy-only) on each
slice's mask, inside the label's bounding box; vertices in the middle of straight runs are dropped. Each vertex
lies between a pixel inside and one outside, 0.45 pixel from the inside one (level 0.55, not 0.5), so that both
ways readers rasterise give back the mask: testing pixel centres against the polygon (planning systems,
matplotlib), and rounding vertices to pixel centres and filling with the outline included (OpenCV's fillPoly,
as rt-utils does; at 0.5, rounding half to even would add every other outside pixel).

Encoding: the ROI Contour Sequence (tens of thousands of contours on a whole-body CT) is written as Implicit VR
Little Endian bytes, as pydicom would write it, rather than as Datasets with DS values (seconds); the file is
Implicit VR because a long contour's Contour Data exceeds the 64 KiB length of an Explicit VR DS value.
"""

from __future__ import annotations

import datetime
from collections.abc import Collection, Iterator
from typing import cast

import contourpy
import numpy as np
from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ImplicitVRLittleEndian, RTStructureSetStorage
from scipy import ndimage

from edge_runtime import __version__
from edge_runtime.dicom import derive_uid
from edge_runtime.imaging.volume import Volume
from edge_runtime.inference.package import Code, ModelPackage
from edge_runtime.results._elements import implicit_element, implicit_sequence, item, raw_implicit_sequence
from edge_runtime.results.formats import RTSTRUCT
from edge_runtime.results.seg_binary import check_inputs, patient_and_study
from edge_runtime.results.series_result import MANUFACTURER, SeriesResult

__all__ = ["build_rtstruct", "slice_contours"]

#: the RT Structure Set's Series Number: the BINARY SEG's + this
SERIES_OFFSET = 3
#: the marching squares level: vertices 0.45 pixel out from the inside pixel centres (see the module notes)
LEVEL = 0.55
#: how many pixels :func:`stack_contours` contours at once (float64: 128 MB)
_TILE_PIXELS = 16 << 20
#: Referenced SOP Class UID of the RT Referenced Study Sequence (PS3.3 C.8.8.5: Detached Study Management)
STUDY_COMPONENT_CLASS = "1.2.840.10008.3.1.2.3.1"


def slice_contours(mask: np.ndarray) -> list[np.ndarray]:
    """The closed outlines of a 2-D boolean mask as (n, 2) arrays of (row, column) pixel coordinates, without the
    repeated closing vertex and without vertices in the middle of straight runs."""
    return stack_contours(mask[None])[0]


def stack_contours(masks: np.ndarray) -> list[list[np.ndarray]]:
    """:func:`slice_contours` of each of ``masks`` (slices, rows, columns).

    The slices are laid side by side in one image, each with a border of background, and contoured at once,
    a few million pixels at a time: one contour generator per label rather than one per slice (building one
    costs more than contouring a slice). The border keeps every outline within its own slice."""
    n, rows, cols = masks.shape
    per_slice: list[list[np.ndarray]] = [[] for _ in range(n)]
    step = max(1, _TILE_PIXELS // ((rows + 2) * (cols + 2)))
    for first in range(0, n, step):
        chunk = masks[first : first + step]
        tiles = np.zeros((rows + 2, len(chunk), cols + 2), np.float64)
        tiles[1:-1, :, 1:-1] = chunk.transpose(1, 0, 2)
        generator = contourpy.contour_generator(z=tiles.reshape(rows + 2, -1), line_type=contourpy.LineType.Separate)
        for line in cast("list[np.ndarray]", generator.lines(LEVEL)):  # Separate: one (n, 2) array per line
            xy = line[:-1] if np.array_equal(line[0], line[-1]) else line
            k = int(xy[0, 0] // (cols + 2))
            points = xy[:, ::-1] - (1.0, k * (cols + 2) + 1.0)  # contourpy gives (x, y) = (column, row)
            if len(points) < 3:
                continue
            before = points - np.roll(points, 1, axis=0)
            after = np.roll(points, -1, axis=0) - points
            turns = np.abs(before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]) > 1e-9
            per_slice[first + k].append(points[turns] if turns.sum() >= 3 else points)
    return per_slice


def _slice_frames(volume: Volume) -> tuple[list[np.ndarray], list[bytes]]:
    """For each slice: the patient position of pixel (0, 0), and the encoded Contour Image Sequence item that
    references its source image (and frame, for a multi-frame source)."""
    sources = volume.datasets
    if volume.multiframe:
        assert volume.frames is not None
        src = sources[0]
        origins = [volume.origin + volume.normal * p for p in volume.positions]
        refs = [_image_ref(src) + implicit_element(0x00081160, str(f + 1).encode()) for f in volume.frames]
        return origins, refs
    origins = [np.asarray([float(v) for v in d.ImagePositionPatient]) for d in sources]
    return origins, [_image_ref(d) for d in sources]


def _image_ref(d: Dataset) -> bytes:
    return implicit_element(0x00081150, str(d.SOPClassUID).encode(), b"\x00") + implicit_element(
        0x00081155, str(d.SOPInstanceUID).encode(), b"\x00"
    )


def _format_points(points: np.ndarray) -> bytes:
    """Contour Data: x\\y\\z in mm, two decimals (a DS value is at most 16 characters)."""
    values = points.ravel().tolist()
    return (("%.2f\\" * len(values)) % tuple(values))[:-1].encode()


def _contours_of(
    volume: Volume,
    labels: np.ndarray,
    value: int,
    box: tuple[slice, ...] | None,
    slices: tuple[list[np.ndarray], list[bytes]],
) -> Iterator[bytes]:
    """The encoded items of one ROI's Contour Sequence; ``slices`` is :func:`_slice_frames`."""
    if box is None:
        return
    origins, refs = slices
    row_step = volume.row_direction * volume.spacing[2]  # along a row: the column index
    col_step = volume.column_direction * volume.spacing[1]  # down a column: the row index
    zs, ys, xs = box
    for z, outlines in enumerate(stack_contours(labels[box] == value), start=zs.start):
        for points in outlines:
            rows, cols = points[:, 0] + ys.start, points[:, 1] + xs.start
            xyz = origins[z] + np.outer(cols, row_step) + np.outer(rows, col_step)
            yield (
                implicit_sequence(0x30060016, [refs[z]])
                + implicit_element(0x30060042, b"CLOSED_PLANAR")
                + implicit_element(0x30060046, str(len(xyz)).encode())
                + implicit_element(0x30060050, _format_points(xyz))
            )


def _roi_contours(volume: Volume, labels: np.ndarray, package: ModelPackage, values: list[int]) -> dict[int, bytes]:
    """The encoded ROI Contour Sequence item of each present label, by ROI number (= segment number)."""
    lab = labels if np.issubdtype(labels.dtype, np.integer) else labels.astype(np.int64)
    boxes = ndimage.find_objects(lab, max_label=max(values))
    slices = _slice_frames(volume)
    items = {}
    for number, (label, value) in enumerate(zip(package.labels, values, strict=True), start=1):
        box = boxes[value - 1] if value <= len(boxes) else None
        contours = list(_contours_of(volume, labels, value, box, slices))
        if contours:
            colour = "\\".join(str(int(c)) for c in label.color).encode()
            items[number] = (
                implicit_element(0x3006002A, colour)
                + implicit_sequence(0x30060040, contours)
                + implicit_element(0x30060084, str(number).encode())
            )
    return items


def _referenced_frame_of_reference(volume: Volume) -> Dataset:
    """Referenced Frame of Reference > RT Referenced Study > RT Referenced Series > Contour Image (every source)."""
    src = volume.datasets[0]
    images = []
    for d in volume.datasets:
        frames = volume.frames if volume.multiframe and volume.frames is not None else [None]
        for frame in frames:
            image = Dataset()
            image.ReferencedSOPClassUID = d.SOPClassUID
            image.ReferencedSOPInstanceUID = d.SOPInstanceUID
            if frame is not None:
                image.ReferencedFrameNumber = frame + 1
            images.append(image)
    series = Dataset()
    series.SeriesInstanceUID = src.SeriesInstanceUID
    series.ContourImageSequence = images
    study = Dataset()
    study.ReferencedSOPClassUID = STUDY_COMPONENT_CLASS
    study.ReferencedSOPInstanceUID = src.StudyInstanceUID
    study.RTReferencedSeriesSequence = [series]
    frame_of_reference = Dataset()
    frame_of_reference.FrameOfReferenceUID = src.FrameOfReferenceUID
    frame_of_reference.RTReferencedStudySequence = [study]
    return frame_of_reference


def _structure_set_rois(package: ModelPackage, numbers: Collection[int], frame_of_reference_uid: str) -> list[Dataset]:
    rois = []
    for number, label in enumerate(package.labels, start=1):
        if number not in numbers:
            continue
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = frame_of_reference_uid
        roi.ROIName = label.name[:64]
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        roi.ROIGenerationDescription = f"{package.algorithm_name} {package.algorithm_version}"[:64]
        rois.append(roi)
    return rois


def _code(code: Code) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code.value, code.scheme, code.meaning[:64]
    return item


def _observations(package: ModelPackage, numbers: Collection[int]) -> list[Dataset]:
    """RT ROI Observations: each ROI an organ, identified by the label's SNOMED CT type code, with the label's
    side as that code's Segmented Property Type Modifier (CID 244) and its anatomic region (with the region's
    modifier) where the label has them, as the RT ROI Observations Module nests them (PS3.3 C.8.8.8)."""
    observations = []
    for number, label in enumerate(package.labels, start=1):
        if number not in numbers:
            continue
        code = _code(label.type)
        if label.type_modifier is not None:
            code.SegmentedPropertyTypeModifierCodeSequence = [_code(label.type_modifier)]
        observation = Dataset()
        observation.ObservationNumber = number
        observation.ReferencedROINumber = number
        if label.anatomic_region is not None:
            region = _code(label.anatomic_region)
            if label.anatomic_region_modifier is not None:
                region.AnatomicRegionModifierSequence = [_code(label.anatomic_region_modifier)]
            observation.AnatomicRegionSequence = [region]
        observation.RTROIIdentificationCodeSequence = [code]
        observation.RTROIInterpretedType = "ORGAN"
        observation.ROIInterpreter = ""
        observations.append(observation)
    return observations


def build_rtstruct(result: SeriesResult) -> Dataset:
    """An RT Structure Set of ``result.labels`` (the package's label values, 0 = background) on its volume's
    images; UIDs derived from its ``uid_seed``; ready for ``save_as(..., enforce_file_format=True)``."""
    volume, package, uid_seed = result.volume, result.package, result.uid_seed
    src = volume.datasets[0]
    labels = np.asarray(result.labels)
    if labels.shape != volume.array.shape:
        raise ValueError(f"labels are {labels.shape}; the volume is {volume.array.shape}")
    # single-frame sources: one series of one geometry; a multi-frame source is one instance, checked on loading
    values = [int(label.value) for label in package.labels]
    if not volume.multiframe:
        values = check_inputs(volume.datasets, labels.shape, package)
    if "FrameOfReferenceUID" not in src:
        raise ValueError("an RT Structure Set needs the source's Frame of Reference UID, and the source has none")
    now = datetime.datetime.now()
    sop_instance_uid = derive_uid(uid_seed, RTSTRUCT)
    ds = Dataset()
    ds.preamble = b"\x00" * 128
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RTStructureSetStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    if "SpecificCharacterSet" in src:
        ds.SpecificCharacterSet = src.SpecificCharacterSet
    ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = sop_instance_uid
    patient_and_study(ds, src)
    ds.FrameOfReferenceUID = src.FrameOfReferenceUID
    ds.PositionReferenceIndicator = src.get("PositionReferenceIndicator", "")
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = derive_uid(uid_seed, "series", RTSTRUCT)
    ds.SeriesNumber = result.seg_series_number + SERIES_OFFSET
    ds.SeriesDescription = f"AI contours: {package.name}"[:64]
    ds.OperatorsName = ""
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = package.name[:64]
    ds.DeviceSerialNumber = result.device_serial_number
    ds.SoftwareVersions = f"edge-runtime {__version__}; model {package.version}"
    ds.InstanceNumber = 1
    ds.StructureSetLabel = "AI contours"
    ds.StructureSetName = package.name[:64]
    ds.StructureSetDescription = "Automatic contours from a model; derived, to be reviewed"
    ds.StructureSetDate, ds.StructureSetTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.ReferencedFrameOfReferenceSequence = [_referenced_frame_of_reference(volume)]
    rois = _roi_contours(volume, labels, package, values)
    ds.StructureSetROISequence = _structure_set_rois(package, rois, str(src.FrameOfReferenceUID))
    ds[0x30060039] = raw_implicit_sequence(0x30060039, b"".join(item(i) for i in rois.values()))
    ds.RTROIObservationsSequence = _observations(package, rois)
    ds.ApprovalStatus = "UNAPPROVED"
    charset = convert_encodings(ds.SpecificCharacterSet) if ds.get("SpecificCharacterSet") else default_encoding
    # the raw sequence is written unchanged only when the dataset says it was encoded as the file will be
    ds.set_original_encoding(True, True, charset)
    return ds
