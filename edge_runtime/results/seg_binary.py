"""A fast BINARY DICOM SEG encoder: the object :func:`edge_runtime.results.seg.build_seg` makes with highdicom, in
a fraction of the time.

highdicom builds every per-frame functional group item as a tree of pydicom Datasets and compares every
(segment, slice) plane of the label map; with a hundred segments on a CT that takes tens of seconds. Here:

* one :func:`scipy.ndimage.find_objects` pass gives each segment's bounding box; a segment's masks are
  computed and bit-packed inside its box only, which also tells on which slices it is present;
* the frames are bit-packed straight into the Pixel Data buffer (1 bit per pixel, frames contiguous, no
  per-frame padding, PS3.5 8.1.1), one vectorised assignment per segment when a row is a whole number of
  bytes (Columns % 8 == 0, e.g. 512), else in chunks of whole bytes (8 frames at a time);
* the Per-Frame Functional Groups Sequence (and the two long source reference sequences) are encoded
  directly as Explicit VR Little Endian bytes and placed in the dataset as raw elements, which pydicom
  writes out unchanged (and still parses on access).

The content follows highdicom 0.28 (``Segmentation(..., segmentation_type=BINARY, omit_empty_frames=True)``)
attribute for attribute: same frame order (segment by segment, planes sorted along the normal as highdicom
sorts them) and Dimension Index Values, same segment descriptions, references and shared groups. Deliberate
differences, each for a reason stated where it is made:

* Dimension Organization UID: derived from ``uid_seed`` (highdicom draws a random one), so that a re-sent
  result is byte-for-byte the same object apart from its creation times.
* An entirely empty label map: one empty frame per segment, all at the first plane (highdicom encodes every
  plane of every segment, 58,500 empty frames or 1.9 GB for 117 segments on 500 slices). Number of Frames
  must be at least 1; every described segment still has a frame.
* Contributing Equipment: the source's acquisition equipment as highdicom lists it, then this encoder as
  the processing equipment (instead of highdicom).
* Odd-length Pixel Data is padded with a NUL byte (highdicom pads with the character ``'0'``).
"""

from __future__ import annotations

import copy
import datetime
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
import pydicom
from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.tag import Tag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian
from pydicom.valuerep import DS, format_number_as_ds
from scipy import ndimage

from edge_runtime import __version__
from edge_runtime.dicom import SegmentationStorage, derive_uid
from edge_runtime.imaging.volume import Volume
from edge_runtime.inference.package import ModelPackage
from edge_runtime.results.seg import seg_series_number, segment_descriptions

__all__ = ["encode_binary_seg", "seg_series_number"]


#: Root attributes of the Patient, Clinical Trial Subject, General Study, Patient Study and Clinical Trial
#: Study modules (the Patient and Study IEs of the CT, MR and PET image IODs), and of the Specimen module,
#: which highdicom 0.28 copies from the first source image when present.
_COPIED_FROM_SOURCE = (
    "ReferencedPatientSequence",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "TypeOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "SourcePatientGroupIdentificationSequence",
    "GroupOfPatientsIdentificationSequence",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientBirthDateInAlternativeCalendar",
    "PatientDeathDateInAlternativeCalendar",
    "PatientAlternativeCalendar",
    "PatientSex",
    "QualityControlSubject",
    "StrainDescription",
    "StrainNomenclature",
    "StrainStockSequence",
    "StrainAdditionalInformation",
    "StrainCodeSequence",
    "GeneticModificationsSequence",
    "OtherPatientNames",
    "OtherPatientIDsSequence",
    "ReferencedPatientPhotoSequence",
    "EthnicGroupCodeSequence",
    "PatientSpeciesDescription",
    "PatientSpeciesCodeSequence",
    "PatientBreedDescription",
    "PatientBreedCodeSequence",
    "BreedRegistrationSequence",
    "ResponsiblePerson",
    "ResponsiblePersonRole",
    "ResponsibleOrganization",
    "PatientComments",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    "ClinicalTrialSponsorName",
    "ClinicalTrialProtocolID",
    "ClinicalTrialProtocolName",
    "IssuerOfClinicalTrialProtocolID",
    "OtherClinicalTrialProtocolIDsSequence",
    "ClinicalTrialSiteID",
    "ClinicalTrialSiteName",
    "IssuerOfClinicalTrialSiteID",
    "ClinicalTrialSubjectID",
    "IssuerOfClinicalTrialSubjectID",
    "ClinicalTrialSubjectReadingID",
    "IssuerOfClinicalTrialSubjectReadingID",
    "ClinicalTrialProtocolEthicsCommitteeName",
    "ClinicalTrialProtocolEthicsCommitteeApprovalNumber",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "ReferringPhysicianName",
    "ReferringPhysicianIdentificationSequence",
    "ConsultingPhysicianName",
    "ConsultingPhysicianIdentificationSequence",
    "StudyDescription",
    "ProcedureCodeSequence",
    "PhysiciansOfRecord",
    "PhysiciansOfRecordIdentificationSequence",
    "NameOfPhysiciansReadingStudy",
    "PhysiciansReadingStudyIdentificationSequence",
    "ReferencedStudySequence",
    "StudyInstanceUID",
    "StudyID",
    "RequestingService",
    "RequestingServiceCodeSequence",
    "ReasonForPerformedProcedureCodeSequence",
    "AdmittingDiagnosesDescription",
    "AdmittingDiagnosesCodeSequence",
    "PatientAge",
    "PatientSize",
    "PatientSizeCodeSequence",
    "PatientBodyMassIndex",
    "MeasuredAPDimension",
    "MeasuredLateralDimension",
    "PatientWeight",
    "MedicalAlerts",
    "Allergies",
    "Occupation",
    "SmokingStatus",
    "AdditionalPatientHistory",
    "PregnancyStatus",
    "LastMenstrualDate",
    "PatientSexNeutered",
    "ReasonForVisit",
    "ReasonForVisitCodeSequence",
    "AdmissionID",
    "IssuerOfAdmissionIDSequence",
    "ServiceEpisodeID",
    "ServiceEpisodeDescription",
    "IssuerOfServiceEpisodeIDSequence",
    "PatientState",
    "ClinicalTrialTimePointID",
    "ClinicalTrialTimePointDescription",
    "LongitudinalTemporalOffsetFromEvent",
    "LongitudinalTemporalEventType",
    "ClinicalTrialTimePointTypeCodeSequence",
    "IssuerOfClinicalTrialTimePointID",
    "ConsentForClinicalTrialUseSequence",
    # Specimen module
    "ContainerIdentifier",
    "IssuerOfTheContainerIdentifierSequence",
    "AlternateContainerIdentifierSequence",
    "ContainerTypeCodeSequence",
    "ContainerDescription",
    "ContainerComponentSequence",
    "SpecimenDescriptionSequence",
)

#: type 2 attributes highdicom sets from the source before copying (empty when the source lacks them)
_TYPE2_FROM_SOURCE = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)

# ---------------------------------------------------------------------------------------------------
# Explicit VR Little Endian encoding of the few element types the long sequences use
# ---------------------------------------------------------------------------------------------------

_LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"))
_ITEM = b"\xfe\xff\x00\xe0"


def _tag(tag: int) -> bytes:
    return struct.pack("<HH", tag >> 16, tag & 0xFFFF)


def _el(tag: int, vr: bytes, value: bytes) -> bytes:
    """One element; ``value`` is padded to even length (NUL for UI, space for text VRs)."""
    if len(value) % 2:
        value += b"\x00" if vr in (b"UI", b"OB", b"UN") else b" "
    if vr in _LONG_VRS:
        return _tag(tag) + vr + b"\x00\x00" + struct.pack("<I", len(value)) + value
    if len(value) > 0xFFFF:
        raise ValueError(f"value of ({tag >> 16:04X},{tag & 0xFFFF:04X}) is too long for VR {vr.decode()}")
    return _tag(tag) + vr + struct.pack("<H", len(value)) + value


def _item(content: bytes) -> bytes:
    return _ITEM + struct.pack("<I", len(content)) + content


def _sq(tag: int, items: Sequence[bytes]) -> bytes:
    return _el(tag, b"SQ", b"".join(_item(i) for i in items))


def _code(value: str, scheme: str, meaning: str) -> bytes:
    return (
        _el(0x00080100, b"SH", value.encode())
        + _el(0x00080102, b"SH", scheme.encode())
        + _el(0x00080104, b"LO", meaning.encode())
    )


def _raw_sq(tag: int, value: bytes) -> RawDataElement:
    """The value (concatenated items) of a sequence as a raw element that pydicom writes as it is."""
    return RawDataElement(Tag(tag), "SQ", len(value), value, 0, False, True)


# ---------------------------------------------------------------------------------------------------
# Frames
# ---------------------------------------------------------------------------------------------------


def _ds(value: Any) -> str:
    """A DS value as highdicom writes it: the source's own string when valid, else auto-formatted."""
    return str(DS(value, auto_format=True))


def _series_identity(d: Dataset) -> tuple:
    return d.StudyInstanceUID, d.SeriesInstanceUID, int(d.Rows), int(d.Columns), d.get("FrameOfReferenceUID")


def _highdicom_plane_order(datasets: Sequence[Dataset]) -> np.ndarray:
    """Source indices in the order highdicom sorts planes: ascending along column x row direction."""
    iop = np.asarray([float(v) for v in datasets[0].ImageOrientationPatient], dtype=np.float64)
    normal = np.cross(iop[3:], iop[:3])
    ipp = np.asarray([[float(v) for v in d.ImagePositionPatient] for d in datasets], dtype=np.float64)
    _, order = np.unique(ipp @ normal, return_index=True)
    if len(order) != len(datasets):
        raise ValueError("two source images share a position; plane positions must not contain duplicates")
    return order


def _segment_boxes(labels: np.ndarray, values: Sequence[int], aligned: bool) -> list[tuple | None]:
    """For each segment value: None when absent, else ``(z0, present, packed, (y0, y1, b0, b1))``.

    The segment's bounding box starts at slice ``z0``; ``present`` tells on which of the box's slices it
    is. With ``aligned`` (Columns % 8 == 0), ``packed`` holds the box's masks, (slices, y1 - y0, b1 - b0),
    little-endian bit-packed over columns [8 * b0, 8 * b1) (the box widened to whole bytes), ready to be
    copied into rows y0:y1, bytes b0:b1 of the frames; otherwise ``packed`` and the extent are None (the
    masks are recomputed frame by frame)."""
    if labels.dtype == np.bool_:
        lab = labels.view(np.uint8)
    elif np.issubdtype(labels.dtype, np.integer):
        lab = labels
    else:
        lab = labels.astype(np.int64)
    boxes = ndimage.find_objects(lab, max_label=max(values))
    out: list[tuple | None] = []
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
            present = packed.any(axis=(1, 2))
            out.append((zs.start, present, packed, (ys.start, ys.stop, x0 // 8, x1 // 8)))
        else:
            present = (lab[box] == value).any(axis=(1, 2))
            out.append((zs.start, present, None, None))
    return out


def _pack_chunked(labels: np.ndarray, frame_slices: np.ndarray, frame_values: np.ndarray) -> bytes:
    """Bit-pack the masks ``labels[s] == v`` of all frames as one bit stream (any frame size), 8 frames
    (a whole number of bytes) or more at a time."""
    per_frame = labels.shape[1] * labels.shape[2]
    step = max(8, (32 << 20) // max(per_frame, 1) // 8 * 8)
    parts = []
    for start in range(0, len(frame_slices), step):
        s = frame_slices[start : start + step]
        v = frame_values[start : start + step]
        parts.append(np.packbits((labels[s] == v[:, None, None]).ravel(), bitorder="little").tobytes())
    return b"".join(parts)


# ---------------------------------------------------------------------------------------------------
# The SEG
# ---------------------------------------------------------------------------------------------------


def _contributing_equipment(source: Dataset, now: datetime.datetime) -> list[Dataset]:
    import highdicom as hd

    items: list[Dataset] = []
    try:
        items.append(hd.ContributingEquipment.for_image_acquisition(source))
    except Exception:  # noqa: BLE001 - highdicom skips sources without equipment information the same way
        pass
    items.append(
        hd.ContributingEquipment(
            manufacturer="edge-runtime",
            manufacturer_model_name="edge_runtime.results.seg_binary",
            software_versions=__version__,
            contribution_datetime=now,
            purpose_of_reference=codes.DCM.ProcessingEquipment,
            contribution_description="Software library used to create this instance",
        )
    )
    return items


def encode_binary_seg(
    volume: Volume,
    labels: np.ndarray,
    package: ModelPackage,
    *,
    uid_seed: str,
    series_number: int | None = None,
    device_serial_number: str = "edge-runtime",
) -> Dataset:
    """A BINARY Segmentation Storage dataset for ``labels`` on ``volume`` (see the module notes).

    ``labels`` holds the package's label values (0 = background), shaped like ``volume.array``; values that
    belong to no package label are background. Segment ``i`` is ``package.labels[i - 1]``. UIDs are derived
    from ``uid_seed`` as :func:`edge_runtime.results.seg.build_seg` derives them. The dataset is ready for
    :func:`pydicom.dcmwrite` / ``save_as(..., enforce_file_format=True)`` (Explicit VR Little Endian).
    """
    from highdicom.spatial import get_volume_positions

    sources = volume.datasets
    labels = np.asarray(labels)
    if not sources:
        raise ValueError("the volume has no source datasets")
    src = sources[0]
    rows, cols = int(src.Rows), int(src.Columns)
    if labels.shape != (len(sources), rows, cols):
        raise ValueError(f"labels are {labels.shape}; the source series is {(len(sources), rows, cols)}")
    first = _series_identity(src)
    for d in sources:
        if _series_identity(d) != first:
            raise ValueError("source images must be one series with one image size and frame of reference")
        if list(d.ImageOrientationPatient) != list(src.ImageOrientationPatient):
            raise ValueError("source images must share an orientation")
    values = [int(label.value) for label in package.labels]
    n_segments = len(values)
    if n_segments == 0:
        raise ValueError("the package has no labels")
    if min(values) < 1:
        raise ValueError("label values must be positive")

    # -- which frames: segment by segment, planes in highdicom's order, empty planes left out ------------
    order = _highdicom_plane_order(sources)
    aligned = cols % 8 == 0
    boxes = _segment_boxes(labels, values, aligned)
    n_slices = len(sources)
    present = np.zeros((n_segments, n_slices), dtype=bool)
    for k, box in enumerate(boxes):
        if box is not None:
            z0, occ = box[0], box[1]
            present[k, z0 : z0 + len(occ)] = occ
    nonempty = np.asarray(present.any(axis=0))
    empty_result = not nonempty.any()
    rank = np.zeros(n_slices, dtype=np.int64)
    if empty_result:
        # one empty frame per segment, at the first plane (see the module notes)
        frame_slices = np.full(n_segments, order[0], dtype=np.int64)
        frame_segments = np.arange(1, n_segments + 1, dtype=np.int64)
        rank[order[0]] = 1
        per_segment = [frame_slices[k : k + 1] for k in range(n_segments)]
        included_sorted = order[:1]
    else:
        included_sorted = order[nonempty[order]]
        rank[included_sorted] = np.arange(1, len(included_sorted) + 1)
        per_segment = [included_sorted[present[k, included_sorted]] for k in range(n_segments)]
        frame_slices = np.concatenate(per_segment)
        frame_segments = np.repeat(np.arange(1, n_segments + 1), [len(p) for p in per_segment])
    n_frames = len(frame_slices)

    # -- pixel data ------------------------------------------------------------------------------------
    n_bytes = -(-n_frames * rows * cols // 8)
    if n_bytes > 0xFFFFFFFE:
        raise ValueError(f"{n_frames} frames of {rows} x {cols} exceed the 4 GiB limit of native Pixel Data")
    if aligned:
        buffer = np.zeros(n_bytes + n_bytes % 2, dtype=np.uint8)
        frames = buffer[:n_bytes].reshape(n_frames, rows, cols // 8)
        offset = 0
        for box, slices in zip(boxes, per_segment, strict=True):
            if box is not None and len(slices) and not empty_result:
                z0, _, packed, (y0, y1, b0, b1) = box
                frames[offset : offset + len(slices), y0:y1, b0:b1] = packed[slices - z0]
            offset += len(slices)
        pixel_data = buffer.tobytes()
    else:
        frame_values = np.asarray(values, dtype=np.int64)[frame_segments - 1]
        if empty_result:
            pixel_data = bytes(n_bytes)
        else:
            pixel_data = _pack_chunked(labels, frame_slices, frame_values)
        if len(pixel_data) % 2:
            pixel_data += b"\x00"

    # -- per-slice and per-segment pieces of the per-frame functional groups -----------------------------
    purpose = _sq(0x0040A170, [_code("121322", "DCM", "Source image for image processing operation")])
    derivation_code = _sq(0x00089215, [_code("113076", "DCM", "Segmentation")])
    slice_parts: dict[int, tuple[bytes, bytes]] = {}
    for s in np.unique(frame_slices).tolist():
        d = sources[s]
        source_item = (
            _el(0x00081150, b"UI", str(d.SOPClassUID).encode())
            + _el(0x00081155, b"UI", str(d.SOPInstanceUID).encode())
            + _el(0x0028135A, b"CS", b"YES")
            + purpose
        )
        derivation = _sq(0x00089124, [_sq(0x00082112, [source_item]) + derivation_code])
        position = _sq(0x00209113, [_el(0x00200032, b"DS", "\\".join(_ds(v) for v in d.ImagePositionPatient).encode())])
        slice_parts[s] = (derivation, position)
    per_frame_segment = n_segments > 1
    segment_ids = [
        _sq(0x0062000A, [_el(0x0062000B, b"US", struct.pack("<H", i))]) if per_frame_segment else b""
        for i in range(1, n_segments + 1)
    ]
    content_head = (
        _tag(0x00209111)
        + b"SQ\x00\x00"
        + struct.pack("<I", 24)
        + _ITEM
        + struct.pack("<I", 16)
        + _tag(0x00209157)
        + b"UL"
        + struct.pack("<H", 8)
    )
    item_parts: list[bytes] = []
    pack_ii = struct.Struct("<II").pack
    pack_i = struct.Struct("<I").pack
    fixed = len(content_head) + 8
    for s, seg in zip(frame_slices.tolist(), frame_segments.tolist(), strict=True):
        derivation, position = slice_parts[s]
        seg_id = segment_ids[seg - 1]
        item_parts += (
            _ITEM,
            pack_i(len(derivation) + fixed + len(position) + len(seg_id)),
            derivation,
            content_head,
            pack_ii(seg, int(rank[s])),
            position,
            seg_id,
        )
    per_frame_groups = b"".join(item_parts)

    # -- source references -------------------------------------------------------------------------------
    references = [
        _el(0x00081150, b"UI", str(d.SOPClassUID).encode()) + _el(0x00081155, b"UI", str(d.SOPInstanceUID).encode())
        for d in sources
    ]
    by_series: dict[str, list[bytes]] = {}
    for d, ref in zip(sources, references, strict=True):
        by_series.setdefault(str(d.SeriesInstanceUID), []).append(ref)
    referenced_series = b"".join(
        _item(_sq(0x0008114A, refs) + _el(0x0020000E, b"UI", uid.encode())) for uid, refs in by_series.items()
    )

    # -- the dataset -------------------------------------------------------------------------------------
    now = datetime.datetime.now()
    sop_uid = derive_uid(uid_seed, "seg")
    ds = Dataset()
    ds.preamble = b"\x00" * 128
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = SegmentationStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"PYDICOM {pydicom.__version__}"[:16]
    ds.file_meta = meta

    if "SpecificCharacterSet" in src:
        ds.SpecificCharacterSet = src.SpecificCharacterSet
    # Patient, Study (type 2 first, then whatever the source has of those modules, as highdicom does)
    for keyword in _TYPE2_FROM_SOURCE:
        value = src.get(keyword)
        setattr(ds, keyword, value if value is not None else "")
    ds.StudyInstanceUID = src.StudyInstanceUID
    for keyword in _COPIED_FROM_SOURCE:
        if keyword in src:
            ds.add(copy.deepcopy(src.data_element(keyword)))  # type: ignore[arg-type]
    # General Series, General Equipment, SOP Common
    ds.Modality = "SEG"
    ds.SeriesInstanceUID = derive_uid(uid_seed, "series")
    ds.SeriesNumber = seg_series_number(volume, series_number)
    ds.SeriesDescription = f"AI segmentation: {package.name}"[:64]
    ds.Manufacturer = "edge-runtime"
    ds.ManufacturerModelName = package.name[:64]
    ds.DeviceSerialNumber = device_serial_number
    ds.SoftwareVersions = f"edge-runtime {__version__}; model {package.version}"
    ds.SOPClassUID = SegmentationStorage
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = 1
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S.%f")
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S.%f")
    ds.ContributingEquipmentSequence = _contributing_equipment(src, now)
    # Frame of Reference
    if "FrameOfReferenceUID" in src:
        ds.FrameOfReferenceUID = src.FrameOfReferenceUID
        ds.PositionReferenceIndicator = src.get("PositionReferenceIndicator")
    # General Image, Image Pixel, Segmentation Image
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 1
    ds.BitsStored = 1
    ds.HighBit = 0
    ds.PixelRepresentation = 0
    ds.PresentationLUTShape = "IDENTITY"
    ds.LossyImageCompression = src.get("LossyImageCompression", "00")
    if ds.LossyImageCompression == "01":
        for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if keyword in src:
                ds.add(src.data_element(keyword))  # type: ignore[arg-type]
    ds.SegmentationType = "BINARY"
    ds.SegmentsOverlap = "NO"  # a label map: one segment per voxel
    ds.ContentLabel = "SEGMENTATION"
    ds.ContentDescription = f"{package.identity}"[:64]
    ds.ContentCreatorName = "EDGE^RUNTIME"
    ds.SegmentSequence = segment_descriptions(package, uid_seed)
    # Multi-frame Dimension
    dim_uid = derive_uid(uid_seed, "dimension-organization")
    organization = Dataset()
    organization.DimensionOrganizationUID = dim_uid
    ds.DimensionOrganizationSequence = [organization]
    dimensions = []
    for pointer, group, label in (
        (0x0062000B, 0x0062000A, "Referenced Segment Number"),
        (0x00200032, 0x00209113, "Image Position Patient"),
    ):
        item = Dataset()
        item.DimensionOrganizationUID = dim_uid
        item.DimensionIndexPointer = pointer
        item.FunctionalGroupPointer = group
        item.DimensionDescriptionLabel = label
        dimensions.append(item)
    ds.DimensionIndexSequence = dimensions
    # Shared functional groups
    iop = src.ImageOrientationPatient
    measures = Dataset()
    measures.PixelSpacing = [_ds(v) for v in src.PixelSpacing]
    if src.get("SliceThickness") not in (None, ""):
        measures.SliceThickness = _ds(src.SliceThickness)
    positions = np.asarray([[float(v) for v in d.ImagePositionPatient] for d in sources])
    if src.get("SpacingBetweenSlices") not in (None, ""):
        measures.SpacingBetweenSlices = _ds(src.SpacingBetweenSlices)
    else:
        spacing, _ = get_volume_positions(image_positions=positions.tolist(), image_orientation=[float(v) for v in iop])
        if spacing is not None:
            measures.SpacingBetweenSlices = format_number_as_ds(spacing)
    orientation = Dataset()
    orientation.ImageOrientationPatient = [_ds(v) for v in iop]
    shared = Dataset()
    shared.PixelMeasuresSequence = [measures]
    shared.PlaneOrientationSequence = [orientation]
    if not per_frame_segment:
        identification = Dataset()
        identification.ReferencedSegmentNumber = 1
        shared.SegmentIdentificationSequence = [identification]
        # highdicom calls a single segment on several regularly spaced planes a 3D organisation
        included = np.sort(included_sorted)
        if len(included) > 1:
            spacing, _ = get_volume_positions(
                image_positions=positions[included].tolist(),
                image_orientation=[float(v) for v in iop],
                sort=False,
            )
            if spacing is not None and spacing > 0.0:
                ds.DimensionOrganizationType = "3D"
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.NumberOfFrames = n_frames
    # the long sequences, as raw Explicit VR Little Endian
    ds[0x00081115] = _raw_sq(0x00081115, referenced_series)  # type: ignore[assignment]
    ds[0x00082112] = _raw_sq(0x00082112, b"".join(_item(r) for r in references))  # type: ignore[assignment]
    ds[0x52009230] = _raw_sq(0x52009230, per_frame_groups)  # type: ignore[assignment]
    ds[0x7FE00010] = DataElement(0x7FE00010, "OB", pixel_data)
    charset = convert_encodings(ds.SpecificCharacterSet) if ds.get("SpecificCharacterSet") else default_encoding
    # raw elements are written unchanged only when the dataset says it was encoded as the file will be
    ds.set_original_encoding(False, True, charset)
    return ds
