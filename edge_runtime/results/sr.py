"""Measurements as DICOM: a TID 1500 Measurement Report (Comprehensive 3D SR) that references the SEG.

One measurement group (TID 1411, Volumetric ROI Measurements and Qualitative Evaluations) per segment of
the SEG, in segment number order, each holding:

- Tracking Identifier / Tracking Unique Identifier: the segment's own Tracking ID / Tracking UID from the
  SEG (so SEG segment and SR group share one identity), else the segment label and a UID derived from
  ``uid_seed``.
- Referenced Segment: the SEG's SOP Class / SOP Instance UID and the segment number, with "Source series
  for image segmentation" = the source series (the segment reference applies to all frames of the
  segment, as in dcmqi's TID 1500 examples; no per-frame or per-slice lists).
- Finding = the segment's Segmented Property Type, Finding Category = its Segmented Property Category,
  Algorithm Identification = the model package.
- Finding Site, with its Laterality (CID 244), where the SEG says where the segment is or which side: its
  Anatomic Region with the region's laterality modifier (a left kidney's cyst: Kidney, Left), or, for an
  anatomical structure whose type carries a laterality modifier (TotalSegmentator's kidney_left: Kidney +
  Left), that structure on that side. A segment that says neither gets no Finding Site (its Finding is
  where it is).
- Measurements (TID 300):

  ========================================  =====================================  ================
  concept name                               concept modifier                       units (UCUM)
  ========================================  =====================================  ================
  (118565006, SCT, "Volume")                 Measurement Method = (126030, DCM,     ml
                                             "Sum of segmented voxel method for
                                             volume")
  (voxel-count, 99EDGE, "Number of voxels")  --                                     {voxels}
  (112031, DCM, "Attenuation Coefficient")   Derivation = (SCT) Mean, Standard      [hnsf'U] (CT)
  for CT; (110852, DCM, "MR signal           Deviation, Minimum, Maximum            1 (MR)
  intensity") for MR
  ========================================  =====================================  ================

  Intensities are in modality units after the Modality LUT (HU for CT). Only CT and MR get intensity
  statistics in the SR: DICOM has no modality-independent concept for "pixel value"; the JSON
  measurements keep them for every modality. The voxel count uses a private coding scheme (99EDGE,
  declared in the Coding Scheme Identification Sequence) since no standard concept exists.
- Truncation: a qualitative evaluation (130576, DCM, "Anatomy coverage incomplete") = (373066001, SCT,
  "Yes") when the segment touches the border of the scanned volume, so that its volume is a lower
  bound, else (373067005, SCT, "No").
- Confidence (when the pipeline computed it): (122157, DCM, "Probability") with Derivation = (SCT) Mean,
  unit 1: the mean softmax probability of the segment's voxels; (low-conf-share, 99EDGE, "Share of
  low-confidence voxels") in %: the voxels below the package's ``confidence.low``; and a qualitative
  evaluation (low-confidence, 99EDGE, "Low confidence segmentation") = Yes when the mean is below the
  package's ``confidence.flag_below``, else No. The numbers are measurements (TID 300) because a
  qualitative evaluation is coded; the flag is the qualitative evaluation a reader filters on.
- Applicability: for a series outside the package's declared domain that the site chose to segment anyway
  (``out_of_domain = "mark"``), every segment group carries (out-of-domain, 99EDGE, "Outside the model's
  validated domain") = Yes, and one more group (TID 1501, Measurements and Qualitative Evaluations, no ROI)
  lists each failed check as a qualitative evaluation = Yes (the values found are in ``measurements.json``
  and in the SEG's Series Description).

Empty segments (0 voxels) are reported, not omitted: their group carries Volume = 0 ml and Number of
voxels = 0, and no intensity statistics nor truncation evaluation (both undefined for an empty region).
A structure that the model looked for and did not find is a result, and the report then lists every
segment of the SEG.

The observer is the device (the runtime; its Device Observer UID is derived from the device serial number
so that it is stable across reports); the document is complete, unverified and preliminary (machine output
awaiting review).
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from edge_runtime import __version__
from edge_runtime.dicom import SEGMENTATION_CLASSES, derive_uid
from edge_runtime.imaging.volume import Volume
from edge_runtime.inference.domain import Applicability
from edge_runtime.inference.package import ModelPackage
from edge_runtime.results.measurements import SegmentMeasurement

#: private coding scheme for the concepts DICOM does not define
PRIVATE_SCHEME = "99EDGE"
VOXEL_COUNT = ("voxel-count", PRIVATE_SCHEME, "Number of voxels")
LOW_CONFIDENCE_SHARE = ("low-conf-share", PRIVATE_SCHEME, "Share of low-confidence voxels")
LOW_CONFIDENCE = ("low-confidence", PRIVATE_SCHEME, "Low confidence segmentation")
OUT_OF_DOMAIN = ("out-of-domain", PRIVATE_SCHEME, "Outside the model's validated domain")
APPLICABILITY = ("applicability", PRIVATE_SCHEME, "Applicability of the model to the series")
#: the checks of :mod:`edge_runtime.inference.domain`, as concepts of their own (Code Value is at most 16 characters)
DOMAIN_CHECKS = {
    "modality": "Modality outside the validated domain",
    "body-part": "Body part outside the validated domain",
    "anatomy": "Anatomic region outside the validated domain",
    "z-extent": "Z extent outside the validated range",
    "y-extent": "Y extent outside the validated range",
    "x-extent": "X extent outside the validated range",
    "z-spacing": "Z spacing outside the validated range",
    "y-spacing": "Y spacing outside the validated range",
    "x-spacing": "X spacing outside the validated range",
    "slice-thickness": "Slice thickness outside the validated range",
    "image-type": "Image type excluded by the model",
    "contrast": "Contrast not as validated",
    "intensity": "Intensities implausible for the modality",
    "intensity-air": "Air intensity implausible (rescale?)",
    "intensity-body": "Body intensity implausible (rescale?)",
}


#: CID 244 Laterality: the modifiers that name a side
LATERALITY = frozenset((codes.cid244.Left.value, codes.cid244.Right.value, codes.cid244.Bilateral.value,
                        codes.cid244.Unilateral.value))
#: Segmented Property Categories whose Type is itself a place (Anatomical Structure; Organ)
ANATOMY_CATEGORIES = frozenset(("123037004", "91772007"))


def _concept(value: str, scheme: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def _coded(item: Dataset) -> hd.sr.CodedConcept:
    return _concept(str(item.CodeValue), str(item.CodingSchemeDesignator), str(item.CodeMeaning))


def _laterality(modifiers: Sequence[Dataset]) -> hd.sr.CodedConcept | None:
    """The first modifier that names a side (CID 244), or None."""
    sides = [m for m in modifiers if str(m.CodeValue) in LATERALITY and m.CodingSchemeDesignator == "SCT"]
    return _coded(sides[0]) if sides else None


def finding_sites(desc: Dataset) -> list[hd.sr.FindingSite] | None:
    """The segment's Finding Site with its Laterality, from a SEG's Segment Sequence item (see the module
    docstring); None where the segment says neither where nor which side."""
    regions = desc.get("AnatomicRegionSequence") or []
    if regions:
        region = regions[0]
        side = _laterality(region.get("AnatomicRegionModifierSequence") or [])
        return [hd.sr.FindingSite(anatomic_location=_coded(region), laterality=side)]
    kind = desc.SegmentedPropertyTypeCodeSequence[0]
    side = _laterality(kind.get("SegmentedPropertyTypeModifierCodeSequence") or [])
    category = desc.SegmentedPropertyCategoryCodeSequence[0]
    if side is None or str(category.CodeValue) not in ANATOMY_CATEGORIES:
        return None
    return [hd.sr.FindingSite(anatomic_location=_coded(kind), laterality=side)]


def _intensity_concept(modality: str) -> tuple[Code, hd.sr.CodedConcept] | None:
    """(concept name, unit) of intensity statistics for ``modality``; None where no standard concept fits."""
    if modality == "CT":
        return codes.DCM.AttenuationCoefficient, _concept("[hnsf'U]", "UCUM", "Hounsfield unit")
    if modality == "MR":
        return codes.DCM.MRSignalIntensity, _concept("1", "UCUM", "no units")
    return None


def _procedure_reported(modality: str) -> Code:
    return {
        "CT": codes.cid100.CTUnspecifiedBodyRegion,
        "MR": codes.cid100.MRIUnspecifiedBodyRegion,
        "PT": codes.cid100.PETUnspecifiedBodyRegion,
    }.get(modality, codes.cid100.ImagingProcedure)


def build_sr(
    seg: Dataset,
    measurements: list[SegmentMeasurement],
    volume: Volume,
    package: ModelPackage,
    *,
    uid_seed: str,
    series_number: int | None = None,
    device_serial_number: str = "edge-runtime",
    applicability: Applicability | None = None,
) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 Measurement Report for ``measurements`` of the segments of ``seg`` on ``volume``.

    ``seg`` is the SEG the measurements were taken from (a highdicom ``Segmentation`` or any SEG dataset,
    e.g. read back from disk); ``measurements`` come from :func:`edge_runtime.results.measurements.measure` and
    are matched to the SEG's segments by segment number. ``uid_seed`` makes the Series and SOP Instance UIDs
    deterministic (a result re-sent after a crash keeps its UIDs); the SEG built from the same seed has
    different UIDs. ``series_number`` defaults to 6000 + the source series number. ``applicability``: the
    domain check of the series; outside the domain, the report says so (see the module docstring).
    """
    if str(seg.get("SOPClassUID", "")) not in SEGMENTATION_CLASSES:
        raise ValueError(f"seg is not a Segmentation (SOP Class {seg.get('SOPClassUID')!r})")
    descriptions = {int(item.SegmentNumber): item for item in seg.SegmentSequence}
    by_number = {m.segment_number: m for m in measurements}
    unknown = sorted(set(by_number) - set(descriptions))
    if unknown:
        raise ValueError(f"measurements for segment(s) {unknown} that the SEG does not describe")
    source_series = str(volume.datasets[0].SeriesInstanceUID)
    seg_series = {str(item.SeriesInstanceUID) for item in seg.get("ReferencedSeriesSequence", [])}
    if seg_series and source_series not in seg_series:
        raise ValueError("the SEG does not reference the series of the volume the measurements were taken on")

    modality = volume.modality
    intensity = _intensity_concept(modality)
    ml = _concept("ml", "UCUM", "milliliter")
    voxels_unit = _concept("{voxels}", "UCUM", "voxels")
    algorithm = hd.sr.AlgorithmIdentification(name=package.algorithm_name, version=package.algorithm_version)

    outside = applicability is not None and not applicability.inside
    groups: list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations | hd.sr.MeasurementsAndQualitativeEvaluations]
    groups = []
    for number in sorted(by_number):
        m = by_number[number]
        desc = descriptions[number]
        tracking_uid = desc.get("TrackingUID") or derive_uid(uid_seed, "sr-tracking", str(number))
        tracking_id = desc.get("TrackingID") or str(desc.get("SegmentLabel") or m.name)
        items = [
            hd.sr.Measurement(
                name=codes.SCT.Volume,
                value=float(m.volume_ml),
                unit=ml,
                method=codes.DCM.SumOfSegmentedVoxelMethodForVolume,
            ),
            hd.sr.Measurement(name=_concept(*VOXEL_COUNT), value=int(m.voxels), unit=voxels_unit),
        ]
        evaluations = []
        if m.voxels > 0:
            if intensity is not None:
                name, unit = intensity
                for derivation, value in (
                    (codes.SCT.Mean, m.mean),
                    (codes.SCT.StandardDeviation, m.std),
                    (codes.SCT.Minimum, m.min),
                    (codes.SCT.Maximum, m.max),
                ):
                    if value is not None:
                        items.append(hd.sr.Measurement(name=name, value=float(value), unit=unit, derivation=derivation))
            evaluations.append(
                hd.sr.QualitativeEvaluation(
                    name=codes.DCM.AnatomyCoverageIncomplete,
                    value=codes.SCT.Yes if m.truncated else codes.SCT.No,
                )
            )
            _add_confidence(m, items, evaluations)
        if outside:
            evaluations.append(hd.sr.QualitativeEvaluation(name=_concept(*OUT_OF_DOMAIN), value=codes.SCT.Yes))
        finding = desc.SegmentedPropertyTypeCodeSequence[0]
        category = desc.SegmentedPropertyCategoryCodeSequence[0]
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=str(tracking_uid), identifier=str(tracking_id)[:64]),
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=str(seg.SOPClassUID),
                    sop_instance_uid=str(seg.SOPInstanceUID),
                    segment_number=number,
                    source_series=hd.sr.SourceSeriesForSegmentation(source_series),
                ),
                finding_type=_coded(finding),
                finding_category=_coded(category),
                finding_sites=finding_sites(desc),
                algorithm_id=algorithm,
                measurements=items,
                qualitative_evaluations=evaluations or None,
            )
        )

    if applicability is not None and outside:
        groups.append(_applicability_group(applicability, algorithm, uid_seed))

    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derive_uid("edge-runtime device", device_serial_number),
        name="edge-runtime",
        manufacturer_name="edge-runtime",
        model_name=package.name[:64],
        serial_number=device_serial_number,
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.cid270.Device,
            observer_identifying_attributes=device,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=_procedure_reported(modality),
        imaging_measurements=groups,
    )
    source_number = volume.datasets[0].get("SeriesNumber")
    if series_number is None:
        series_number = 6000 + int(source_number) if source_number not in (None, "") else 6000
    return hd.sr.Comprehensive3DSR(
        evidence=[seg, *volume.datasets],
        content=report,
        series_instance_uid=derive_uid(uid_seed, "sr-series"),
        series_number=series_number,
        sop_instance_uid=derive_uid(uid_seed, "sr"),
        instance_number=1,
        manufacturer="edge-runtime",
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=f"AI measurements: {package.name}"[:64],
        manufacturer_model_name=package.name[:64],
        software_versions=f"edge-runtime {__version__}; model {package.version}",
        device_serial_number=device_serial_number,
        coding_schemes=[
            hd.coding_schemes.CodingSchemeIdentificationItem(
                designator=PRIVATE_SCHEME,
                name="edge-runtime private concepts",
                responsible_organization="edge-runtime",
            )
        ],
    )


def _add_confidence(
    m: SegmentMeasurement, items: list[hd.sr.Measurement], evaluations: list[hd.sr.QualitativeEvaluation]
) -> None:
    """The segment's confidence summary: mean probability, share of low-confidence voxels, and the flag."""
    if m.mean_confidence is None or m.low_confidence_fraction is None:
        return
    items.append(
        hd.sr.Measurement(
            name=codes.DCM.Probability,
            value=float(m.mean_confidence),
            unit=_concept("1", "UCUM", "no units"),
            derivation=codes.SCT.Mean,
        )
    )
    items.append(
        hd.sr.Measurement(
            name=_concept(*LOW_CONFIDENCE_SHARE),
            value=round(100.0 * m.low_confidence_fraction, 2),
            unit=_concept("%", "UCUM", "percent"),
        )
    )
    evaluations.append(
        hd.sr.QualitativeEvaluation(
            name=_concept(*LOW_CONFIDENCE), value=codes.SCT.Yes if m.low_confidence else codes.SCT.No
        )
    )


def _applicability_group(
    applicability: Applicability, algorithm: hd.sr.AlgorithmIdentification, uid_seed: str
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """One TID 1501 group: the series is outside the domain, and which checks failed."""
    evaluations = [hd.sr.QualitativeEvaluation(name=_concept(*OUT_OF_DOMAIN), value=codes.SCT.Yes)]
    for check in dict.fromkeys(applicability.checks_failed):
        meaning = DOMAIN_CHECKS.get(check, "Outside the validated domain")
        evaluations.append(
            hd.sr.QualitativeEvaluation(name=_concept(check[:16], PRIVATE_SCHEME, meaning), value=codes.SCT.Yes)
        )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derive_uid(uid_seed, "sr-applicability"), identifier="Applicability"
        ),
        finding_type=_concept(*APPLICABILITY),
        algorithm_id=algorithm,
        qualitative_evaluations=evaluations,
    )
