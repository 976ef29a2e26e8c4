"""The result as a DICOM Segmentation: a BINARY SEG built with highdicom, and what both SEG encoders share.

The SEG is what viewers read: BINARY, Explicit VR Little Endian, pixel-aligned with the source, every frame
referencing its source instance, SNOMED CT coded segments, algorithm identification. Frames where a segment is
absent are omitted (the segment itself is always described).

:func:`build_seg` (highdicom) is the reference encoder and the one for multi-frame sources;
:func:`edge_runtime.results.seg_binary.encode_binary_seg` writes the same object much faster from single-frame
slices. Both take their segment descriptions and their identifying attributes (:class:`SegIdentity`) from here,
so the two cannot drift apart.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.datadict import keyword_dict
from pydicom.sr.codedict import codes
from pydicom.uid import UID, ExplicitVRLittleEndian

from edge_runtime import __version__
from edge_runtime.dicom import derive_uid
from edge_runtime.imaging.volume import Volume
from edge_runtime.inference.package import Code, Label, ModelPackage
from edge_runtime.results.series_result import MANUFACTURER, SeriesResult


def _coded(code: Code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def _lab_color(rgb: tuple[int, int, int]) -> hd.color.CIELabColor:
    return hd.color.CIELabColor.from_rgb(*(v / 255.0 for v in rgb))


@dataclass(frozen=True)
class SegIdentity:
    """The attributes that identify a SEG and the equipment that made it (General Series, General Equipment,
    SOP Common, Segmentation Image modules), named as highdicom's ``Segmentation`` parameters.

    The UIDs are derived from a seed, so a result that is re-sent after a crash carries the same UIDs and a
    PACS treats it as the same object.
    """

    series_instance_uid: UID
    series_number: int
    sop_instance_uid: UID
    series_description: str
    manufacturer_model_name: str
    software_versions: str
    device_serial_number: str
    content_description: str
    instance_number: int = 1
    manufacturer: str = MANUFACTURER
    content_label: str = "SEGMENTATION"
    content_creator_name: str = "EDGE^RUNTIME"

    @classmethod
    def derive(cls, result: SeriesResult) -> SegIdentity:
        """The identity of the BINARY SEG of ``result``; LO values cut to 64 characters."""
        package = result.package
        return cls(
            series_instance_uid=derive_uid(result.uid_seed, "series"),
            series_number=result.seg_series_number,
            sop_instance_uid=derive_uid(result.uid_seed, "seg"),
            series_description=f"AI segmentation: {package.name}"[:64],
            manufacturer_model_name=package.name[:64],
            software_versions=f"edge-runtime {__version__}; model {package.version}",
            device_serial_number=result.device_serial_number,
            content_description=f"{package.identity}"[:64],
        )

    def by_keyword(self) -> dict[str, Any]:
        """The same values by DICOM keyword (``sop_instance_uid``: ``SOPInstanceUID``), for an encoder that sets
        them on a Dataset."""
        return {_keyword(name): value for name, value in asdict(self).items()}


def _keyword(parameter: str) -> str:
    """The DICOM keyword of a highdicom parameter named after it."""
    keyword = "".join(part.upper() if part in ("sop", "uid") else part.capitalize() for part in parameter.split("_"))
    if keyword not in keyword_dict:
        raise KeyError(f"{parameter!r} names no DICOM attribute ({keyword!r} is not a keyword)")
    return keyword


def segment_descriptions(package: ModelPackage, uid_seed: str) -> list[hd.seg.SegmentDescription]:
    """One highdicom SegmentDescription per label: SNOMED CT codes (with the label's modifiers and anatomic
    region), algorithm identification, tracking UID."""
    algorithm = hd.AlgorithmIdentificationSequence(
        name=package.algorithm_name,
        family=codes.cid7162.ArtificialIntelligence,
        version=package.algorithm_version,
    )
    return [
        _with_modifiers(
            hd.seg.SegmentDescription(
                segment_number=i,
                segment_label=label.name,
                segmented_property_category=_coded(label.category),
                segmented_property_type=_coded(label.type),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                tracking_uid=derive_uid(uid_seed, "segment", str(i)),
                tracking_id=label.name,
                anatomic_regions=None if label.anatomic_region is None else [_coded(label.anatomic_region)],
                display_color=_lab_color(label.color),
            ),
            label,
        )
        for i, label in enumerate(package.labels, start=1)
    ]


def _with_modifiers(description: hd.seg.SegmentDescription, label: Label) -> hd.seg.SegmentDescription:
    """The label's modifiers nested in the codes they modify, as the Segment Description Macro nests them
    (PS3.3 Table 10-25): the Segmented Property Type Modifier Code Sequence inside the Segmented Property Type
    item, the Anatomic Region Modifier Sequence inside the Anatomic Region item. highdicom 0.28 takes neither
    as a parameter (and reads both back, as nested elements of the code items)."""
    if label.type_modifier is not None:
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            _coded(label.type_modifier)
        ]
    if label.anatomic_region_modifier is not None:
        description.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = [_coded(label.anatomic_region_modifier)]
    return description


def on_source_frames(volume: Volume, array: np.ndarray) -> np.ndarray:
    """``array`` (one plane per slice of ``volume``) as highdicom pairs planes with sources: unchanged for
    single-frame slices; for the frames of one multi-frame source, one plane per frame of it (the frames that
    are not slices of the volume left empty)."""
    if not volume.multiframe:
        return array
    assert volume.frames is not None
    frames = np.zeros((int(volume.datasets[0].NumberOfFrames), *array.shape[1:]), dtype=array.dtype)
    frames[volume.frames] = array
    return frames


def segment_numbers(labels: np.ndarray, package: ModelPackage) -> np.ndarray:
    """``labels`` (the package's label values) as segment numbers (label ``i`` of the package is segment ``i``)."""
    dtype = np.uint8 if len(package.labels) < 256 else np.uint16
    lut = np.zeros(max(lab.value for lab in package.labels) + 1, dtype=dtype)
    for i, label in enumerate(package.labels, start=1):
        lut[label.value] = i
    return lut[labels]


def format_identity(result: SeriesResult, fmt: str, *, description: str, series_offset: int) -> SegIdentity:
    """The identity of the object of result format ``fmt`` other than the BINARY SEG: its own series (UIDs
    derived from the result's seed and ``fmt``; Series Number the SEG's + ``series_offset``), so that viewers
    list each format apart and a re-made result replaces the same objects."""
    base = SegIdentity.derive(result)
    return replace(
        base,
        series_instance_uid=derive_uid(result.uid_seed, "series", fmt),
        sop_instance_uid=derive_uid(result.uid_seed, fmt),
        series_number=base.series_number + series_offset,
        series_description=f"{description}: {result.package.name}"[:64],
    )


def build_seg(
    result: SeriesResult,
    *,
    segmentation_type: hd.seg.SegmentationTypeValues = hd.seg.SegmentationTypeValues.BINARY,
    identity: SegIdentity | None = None,
    **options: Any,
) -> hd.seg.Segmentation:
    """A highdicom ``Segmentation`` of ``result.labels`` (the package's label values) on ``result.volume``.

    The result's ``uid_seed`` makes the SEG's Series and SOP Instance UIDs deterministic (see
    :class:`SegIdentity`); ``identity`` replaces them (another format's object); ``options`` go to highdicom as
    they are.
    """
    volume = result.volume
    segments = on_source_frames(volume, segment_numbers(result.labels, result.package))
    if identity is None:
        identity = SegIdentity.derive(result)
    return hd.seg.Segmentation(
        source_images=volume.datasets,
        pixel_array=segments,
        segmentation_type=segmentation_type,
        segment_descriptions=segment_descriptions(result.package, result.uid_seed),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        omit_empty_frames=True,
        **asdict(identity),
        **options,
    )
