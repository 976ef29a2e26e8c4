"""A fast BINARY DICOM SEG encoder: the object :func:`edge_runtime.results.seg.build_seg` makes with highdicom, in
a fraction of the time.

highdicom builds every per-frame functional group item as a tree of pydicom Datasets and compares every
(segment, slice) plane of the label map; with a hundred segments on a CT that takes tens of seconds. Here the
work is split as the IOD is:

* :mod:`edge_runtime.results._seg_frames` chooses the frames from each segment's bounding box and bit-packs
  them straight into the Pixel Data buffer;
* the Per-Frame Functional Groups Sequence and the two long source reference sequences are encoded directly
  as Explicit VR Little Endian bytes (:mod:`edge_runtime.results._elements`) and placed in the dataset as raw
  elements, which pydicom writes out unchanged (and still parses on access);
* everything else is set module by module of the Segmentation IOD (PS3.3 A.51), one function each, below.

The content follows highdicom 0.28 (``Segmentation(..., segmentation_type=BINARY, omit_empty_frames=True)``)
attribute for attribute: same frame order (segment by segment, planes sorted along the normal as highdicom
sorts them) and Dimension Index Values, same segment descriptions and identifying attributes (both encoders
take them from :mod:`edge_runtime.results.seg`), same references and shared groups. Deliberate differences,
each for a reason stated where it is made:

* Dimension Organization UID: derived from ``uid_seed`` (highdicom draws a random one), so that a re-sent
  result is byte-for-byte the same object apart from its creation times.
* An entirely empty label map: one empty frame per segment, all at the first plane
  (:func:`edge_runtime.results._seg_frames.plan_frames`).
* Contributing Equipment: the source's acquisition equipment as highdicom lists it, then this encoder as
  the processing equipment (instead of highdicom).
* Odd-length Pixel Data is padded with a NUL byte (highdicom pads with the character ``'0'``).
"""

from __future__ import annotations

import copy
import datetime
import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from highdicom.spatial import get_volume_positions
from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian
from pydicom.valuerep import DS, format_number_as_ds

from edge_runtime import __version__
from edge_runtime.dicom import SegmentationStorage, derive_uid
from edge_runtime.imaging.volume import Volume
from edge_runtime.inference.package import ModelPackage
from edge_runtime.results._elements import ITEM, code_item, element, encode_tag, item, raw_sequence, sequence
from edge_runtime.results._seg_frames import (
    FramePlan,
    highdicom_plane_order,
    pack_pixel_data,
    plan_frames,
    segment_boxes,
)
from edge_runtime.results.seg import SegIdentity, segment_descriptions
from edge_runtime.results.series_result import MANUFACTURER, SeriesResult

__all__ = ["SegPixels", "assemble_seg", "check_inputs", "encode_binary_seg", "patient_and_study"]

log = logging.getLogger(__name__)

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


def _ds(value: Any) -> str:
    """A DS value as highdicom writes it: the source's own string when valid, else auto-formatted."""
    return str(DS(value, auto_format=True))


def _series_identity(d: Dataset) -> tuple:
    return d.StudyInstanceUID, d.SeriesInstanceUID, int(d.Rows), int(d.Columns), d.get("FrameOfReferenceUID")


def check_inputs(
    sources: Sequence[Dataset], shape: tuple[int, ...], package: ModelPackage, what: str = "labels"
) -> list[int]:
    """The package's label values, once the sources are one series of one geometry that ``what`` (an array of
    ``shape``, one plane per source) matches."""
    if not sources:
        raise ValueError("the volume has no source datasets")
    src = sources[0]
    expected = (len(sources), int(src.Rows), int(src.Columns))
    if shape != expected:
        raise ValueError(f"{what} are {shape}; the source series is {expected}")
    first = _series_identity(src)
    for d in sources:
        if _series_identity(d) != first:
            raise ValueError("source images must be one series with one image size and frame of reference")
        if list(d.ImageOrientationPatient) != list(src.ImageOrientationPatient):
            raise ValueError("source images must share an orientation")
    values = [int(label.value) for label in package.labels]
    if not values:
        raise ValueError("the package has no labels")
    if min(values) < 1:
        raise ValueError("label values must be positive")
    return values


def _regularly_spaced(positions: np.ndarray, orientation: list[float]) -> bool:
    """Whether planes at ``positions`` (in this order) are at least two, evenly spaced along the normal."""
    if len(positions) < 2:
        return False
    spacing, _ = get_volume_positions(image_positions=positions.tolist(), image_orientation=orientation, sort=False)
    return spacing is not None and spacing > 0.0


# ---------------------------------------------------------------------------------------------------
# The long sequences, as bytes
# ---------------------------------------------------------------------------------------------------


def _per_frame_functional_groups(sources: Sequence[Dataset], plan: FramePlan, n_segments: int) -> bytes:
    """The items of the Per-Frame Functional Groups Sequence: Derivation Image (the frame's source slice),
    Frame Content (Dimension Index Values: segment, plane), Plane Position and, with several segments,
    Segment Identification.

    The parts that depend on the slice or on the segment only are encoded once; each item is then joined from
    them with its two Dimension Index Values packed in place."""
    purpose = sequence(0x0040A170, [code_item("121322", "DCM", "Source image for image processing operation")])
    derivation_code = sequence(0x00089215, [code_item("113076", "DCM", "Segmentation")])
    slice_parts: dict[int, tuple[bytes, bytes]] = {}
    for s in np.unique(plan.slices).tolist():
        d = sources[s]
        source_item = (
            element(0x00081150, b"UI", str(d.SOPClassUID).encode())
            + element(0x00081155, b"UI", str(d.SOPInstanceUID).encode())
            + element(0x0028135A, b"CS", b"YES")
            + purpose
        )
        derivation = sequence(0x00089124, [sequence(0x00082112, [source_item]) + derivation_code])
        position_value = "\\".join(_ds(v) for v in d.ImagePositionPatient).encode()
        position = sequence(0x00209113, [element(0x00200032, b"DS", position_value)])
        slice_parts[s] = (derivation, position)
    segment_ids = [
        sequence(0x0062000A, [element(0x0062000B, b"US", struct.pack("<H", i))]) if n_segments > 1 else b""
        for i in range(1, n_segments + 1)
    ]
    # Frame Content Sequence: one item holding Dimension Index Values, two UL values (8 bytes) that follow
    content_head = (
        encode_tag(0x00209111)
        + b"SQ\x00\x00"
        + struct.pack("<I", 24)
        + ITEM
        + struct.pack("<I", 16)
        + encode_tag(0x00209157)
        + b"UL"
        + struct.pack("<H", 8)
    )
    item_parts: list[bytes] = []
    pack_ii = struct.Struct("<II").pack
    pack_i = struct.Struct("<I").pack
    fixed = len(content_head) + 8
    for s, seg in zip(plan.slices.tolist(), plan.segments.tolist(), strict=True):
        derivation, position = slice_parts[s]
        seg_id = segment_ids[seg - 1]
        item_parts += (
            ITEM,
            pack_i(len(derivation) + fixed + len(position) + len(seg_id)),
            derivation,
            content_head,
            pack_ii(seg, int(plan.plane_index[s])),
            position,
            seg_id,
        )
    return b"".join(item_parts)


def _source_references(sources: Sequence[Dataset]) -> tuple[bytes, bytes]:
    """The items of the Referenced Series Sequence (every source instance, by series) and of the Source Image
    Sequence (every source instance)."""
    references = [
        element(0x00081150, b"UI", str(d.SOPClassUID).encode())
        + element(0x00081155, b"UI", str(d.SOPInstanceUID).encode())
        for d in sources
    ]
    by_series: dict[str, list[bytes]] = {}
    for d, ref in zip(sources, references, strict=True):
        by_series.setdefault(str(d.SeriesInstanceUID), []).append(ref)
    referenced_series = b"".join(
        item(sequence(0x0008114A, refs) + element(0x0020000E, b"UI", uid.encode())) for uid, refs in by_series.items()
    )
    return referenced_series, b"".join(item(r) for r in references)


# ---------------------------------------------------------------------------------------------------
# The modules of the Segmentation IOD
# ---------------------------------------------------------------------------------------------------


def _file_meta(sop_instance_uid: UID) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = SegmentationStorage
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"PYDICOM {pydicom.__version__}"[:16]
    return meta


def patient_and_study(ds: Dataset, src: Dataset) -> None:
    """Patient and Study modules (and Specimen): the type 2 attributes first, then whatever the source has of
    those modules, as highdicom does."""
    for keyword in _TYPE2_FROM_SOURCE:
        value = src.get(keyword)
        setattr(ds, keyword, value if value is not None else "")
    ds.StudyInstanceUID = src.StudyInstanceUID
    for keyword in _COPIED_FROM_SOURCE:
        if keyword in src:
            ds.add(copy.deepcopy(src.data_element(keyword)))  # type: ignore[arg-type]


def _series_equipment_and_sop_common(
    ds: Dataset, identity: SegIdentity, src: Dataset, now: datetime.datetime, encoder: str
) -> None:
    """General Series, General Equipment (and Enhanced General Equipment), SOP Common modules, and the
    identifying attributes of the Segmentation Image module (Content Label, Description, Creator's Name)."""
    ds.Modality = "SEG"
    ds.SOPClassUID = SegmentationStorage
    for keyword, value in identity.by_keyword().items():
        setattr(ds, keyword, value)
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S.%f")
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S.%f")
    ds.ContributingEquipmentSequence = _contributing_equipment(src, now, encoder)


def _contributing_equipment(source: Dataset, now: datetime.datetime, encoder: str) -> list[Dataset]:
    """The source's acquisition equipment (when it names a manufacturer), then this encoder."""
    items: list[Dataset] = []
    try:
        items.append(hd.ContributingEquipment.for_image_acquisition(source))
    except Exception as exc:  # noqa: BLE001 - highdicom 0.28 (base.py) skips any such source the same way
        # nothing is lost: the source has no acquisition equipment to credit (not an image, or no Manufacturer)
        log.debug("no acquisition equipment in the SEG's Contributing Equipment: %s", exc)
    items.append(
        hd.ContributingEquipment(
            manufacturer=MANUFACTURER,
            manufacturer_model_name=encoder,
            software_versions=__version__,
            contribution_datetime=now,
            purpose_of_reference=codes.DCM.ProcessingEquipment,
            contribution_description="Software library used to create this instance",
        )
    )
    return items


@dataclass(frozen=True)
class SegPixels:
    """What sets one kind of SEG apart in the Image Pixel and Segmentation Image modules: BINARY (1 bit) here,
    FRACTIONAL (8 bits, :mod:`edge_runtime.results.seg_fractional`) beside it."""

    segmentation_type: str = "BINARY"
    bits: int = 1
    segments_overlap: str = "NO"  # a label map: one segment per voxel
    #: Segmentation Fractional Type and Maximum Fractional Value (FRACTIONAL only)
    fractional: tuple[str, int] | None = None
    #: the Manufacturer's Model Name of this encoder in Contributing Equipment
    encoder: str = "edge_runtime.seg_binary"  # the encoder's name in every BINARY SEG so far: kept


def _image_and_segmentation_image(ds: Dataset, src: Dataset, pixels: SegPixels) -> None:
    """General Image, Image Pixel and Segmentation Image modules (segments and identifying attributes aside)."""
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = int(src.Rows)
    ds.Columns = int(src.Columns)
    ds.BitsAllocated = pixels.bits
    ds.BitsStored = pixels.bits
    ds.HighBit = pixels.bits - 1
    ds.PixelRepresentation = 0
    ds.PresentationLUTShape = "IDENTITY"
    ds.LossyImageCompression = src.get("LossyImageCompression", "00")
    if ds.LossyImageCompression == "01":
        for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if keyword in src:
                ds.add(src.data_element(keyword))  # type: ignore[arg-type]
    ds.SegmentationType = pixels.segmentation_type
    if pixels.fractional is not None:
        ds.SegmentationFractionalType, ds.MaximumFractionalValue = pixels.fractional
    ds.SegmentsOverlap = pixels.segments_overlap


def _multiframe_dimension(ds: Dataset, organization_uid: str) -> None:
    """Multi-frame Dimension module: the dimensions are the segment, then the plane position."""
    organization = Dataset()
    organization.DimensionOrganizationUID = organization_uid
    ds.DimensionOrganizationSequence = [organization]
    dimensions = []
    for pointer, group, label in (
        (0x0062000B, 0x0062000A, "Referenced Segment Number"),
        (0x00200032, 0x00209113, "Image Position Patient"),
    ):
        dimension = Dataset()
        dimension.DimensionOrganizationUID = organization_uid
        dimension.DimensionIndexPointer = pointer
        dimension.FunctionalGroupPointer = group
        dimension.DimensionDescriptionLabel = label
        dimensions.append(dimension)
    ds.DimensionIndexSequence = dimensions


def _shared_functional_groups(
    src: Dataset, positions: np.ndarray, orientation: list[float], single_segment: bool
) -> Dataset:
    """Pixel Measures, Plane Orientation and, for a single segment, Segment Identification."""
    measures = Dataset()
    measures.PixelSpacing = [_ds(v) for v in src.PixelSpacing]
    if src.get("SliceThickness") not in (None, ""):
        measures.SliceThickness = _ds(src.SliceThickness)
    if src.get("SpacingBetweenSlices") not in (None, ""):
        measures.SpacingBetweenSlices = _ds(src.SpacingBetweenSlices)
    else:
        spacing, _ = get_volume_positions(image_positions=positions.tolist(), image_orientation=orientation)
        if spacing is not None:
            measures.SpacingBetweenSlices = format_number_as_ds(spacing)
    plane = Dataset()
    plane.ImageOrientationPatient = [_ds(v) for v in src.ImageOrientationPatient]
    shared = Dataset()
    shared.PixelMeasuresSequence = [measures]
    shared.PlaneOrientationSequence = [plane]
    if single_segment:
        identification = Dataset()
        identification.ReferencedSegmentNumber = 1
        shared.SegmentIdentificationSequence = [identification]
    return shared


def encode_binary_seg(result: SeriesResult) -> Dataset:
    """A BINARY Segmentation Storage dataset for ``result.labels`` on its volume (see the module notes).

    ``result.other_sources``: instances of other series of the study that the segmentation was derived from too
    (the other input channels of a model of several, resampled onto the volume's grid); they are referenced in
    the Common Instance Reference and Source Image sequences, while each frame derives from its volume slice.

    ``result.labels`` holds the package's label values (0 = background), shaped like ``volume.array``; values
    that belong to no package label are background. Segment ``i`` is ``package.labels[i - 1]``. The identifying
    attributes and UIDs are :func:`edge_runtime.results.seg.build_seg`'s (:class:`SegIdentity`). The dataset
    is ready for :func:`pydicom.dcmwrite` / ``save_as(..., enforce_file_format=True)`` (Explicit VR Little
    Endian).
    """
    volume, package = result.volume, result.package
    sources = volume.datasets
    labels = np.asarray(result.labels)
    values = check_inputs(sources, labels.shape, package)
    src = sources[0]
    orientation = [float(v) for v in src.ImageOrientationPatient]
    positions = np.asarray([[float(v) for v in d.ImagePositionPatient] for d in sources], dtype=np.float64)

    boxes = segment_boxes(labels, values, aligned=int(src.Columns) % 8 == 0)
    plan = plan_frames(boxes, highdicom_plane_order(positions, orientation))
    pixel_data = pack_pixel_data(labels, values, boxes, plan)
    identity = SegIdentity.derive(result)
    return assemble_seg(volume, package, plan, pixel_data, identity, result.uid_seed, SegPixels(), result.other_sources)


def assemble_seg(
    volume: Volume,
    package: ModelPackage,
    plan: FramePlan,
    pixel_data: bytes,
    identity: SegIdentity,
    uid_seed: str,
    pixels: SegPixels,
    other_sources: Sequence[Dataset] = (),
) -> Dataset:
    """The SEG dataset around frames already planned and encoded (``pixel_data``, padded to even length): every
    module but the pixels is the same for a BINARY and a FRACTIONAL SEG."""
    sources = volume.datasets
    src = sources[0]
    n_segments = len(package.labels)
    orientation = [float(v) for v in src.ImageOrientationPatient]
    positions = np.asarray([[float(v) for v in d.ImagePositionPatient] for d in sources], dtype=np.float64)
    now = datetime.datetime.now()
    ds = Dataset()
    ds.preamble = b"\x00" * 128
    ds.file_meta = _file_meta(identity.sop_instance_uid)
    if "SpecificCharacterSet" in src:
        ds.SpecificCharacterSet = src.SpecificCharacterSet
    patient_and_study(ds, src)
    _series_equipment_and_sop_common(ds, identity, src, now, pixels.encoder)
    if "FrameOfReferenceUID" in src:  # Frame of Reference
        ds.FrameOfReferenceUID = src.FrameOfReferenceUID
        ds.PositionReferenceIndicator = src.get("PositionReferenceIndicator")
    _image_and_segmentation_image(ds, src, pixels)
    ds.SegmentSequence = segment_descriptions(package, uid_seed)
    _multiframe_dimension(ds, derive_uid(uid_seed, "dimension-organization"))
    single_segment = n_segments == 1
    ds.SharedFunctionalGroupsSequence = [_shared_functional_groups(src, positions, orientation, single_segment)]
    # highdicom calls a single segment on several regularly spaced planes a 3D organisation
    if single_segment and _regularly_spaced(positions[np.sort(plan.planes)], orientation):
        ds.DimensionOrganizationType = "3D"
    ds.NumberOfFrames = len(plan.slices)
    # the long sequences, as raw Explicit VR Little Endian
    referenced_series, source_images = _source_references([*sources, *other_sources])
    ds[0x00081115] = raw_sequence(0x00081115, referenced_series)
    ds[0x00082112] = raw_sequence(0x00082112, source_images)
    ds[0x52009230] = raw_sequence(0x52009230, _per_frame_functional_groups(sources, plan, n_segments))
    ds[0x7FE00010] = DataElement(0x7FE00010, "OB", pixel_data)
    charset = convert_encodings(ds.SpecificCharacterSet) if ds.get("SpecificCharacterSet") else default_encoding
    # raw elements are written unchanged only when the dataset says it was encoded as the file will be
    ds.set_original_encoding(False, True, charset)
    return ds
