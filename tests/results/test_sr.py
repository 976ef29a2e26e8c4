"""TID 1500 Measurement Report: dciodvfy judges it; highdicom reads it back; values equal the measurements."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from edge_runtime.imaging.volume import Volume, load_volume
from edge_runtime.inference.package import DEFAULT_PACKAGE, ModelPackage
from edge_runtime.results.measurements import measure
from edge_runtime.results.seg import build_seg
from edge_runtime.results.series_result import SeriesResult
from edge_runtime.results.sr import build_sr
from phantom import make_phantom, write_series
from tests.peers import dciodvfy_errors

#: phantom label -> default package label value: the bundled model was trained on these phantoms' labels
PHANTOM_TO_PACKAGE = np.array([0, 1, 2, 3, 4, 5], dtype=np.uint8)


@pytest.fixture(scope="module")
def package() -> ModelPackage:
    return ModelPackage.load(DEFAULT_PACKAGE)


def _case(folder: Path, modality: str = "CT") -> tuple[Volume, np.ndarray]:
    phantom = make_phantom((12, 48, 48), (5.0, 7.0, 7.0), rng=7)
    hu = phantom.hu if modality == "CT" else phantom.hu + 1024.0
    info = write_series(hu, phantom.spacing, folder, modality=modality)
    return load_volume(info.paths), PHANTOM_TO_PACKAGE[phantom.labels]


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory) -> tuple[Volume, np.ndarray]:
    return _case(tmp_path_factory.mktemp("ct"))


def _groups(path: Path) -> list:
    sr = hd.sr.srread(path)
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    return sr.content.get_volumetric_roi_measurement_groups()


def _values(group) -> dict[str, float]:  # noqa: ANN001
    """Measurements of a group by concept (and derivation, for intensity statistics)."""
    out = {}
    for m in group.get_measurements():
        key = m.name.meaning if m.derivation is None else f"{m.name.meaning}/{m.derivation.meaning}"
        assert key not in out
        out[key] = (m.value, m.unit.value)
    return out


def _coverage(group) -> str | None:  # noqa: ANN001
    found = [
        q.value for q in group.get_qualitative_evaluations() if q.name == codes.DCM.AnatomyCoverageIncomplete
    ]
    return found[0].meaning if found else None


def test_sr_is_valid_references_the_seg_and_carries_the_measurements(ct, package, tmp_path: Path) -> None:  # noqa: ANN001
    volume, labels = ct
    assert set(np.unique(labels)) == {0, 1, 2, 3, 4, 5}
    seg = build_seg(SeriesResult(volume, labels, package, uid_seed="case"))
    seg_path = tmp_path / "seg.dcm"
    seg.save_as(seg_path, enforce_file_format=True)
    ms = measure(volume, labels, package)
    assert {m.truncated for m in ms} == {True, False}, "the phantom should give one truncated segment"

    sr = build_sr(pydicom.dcmread(seg_path), ms, volume, package, uid_seed="case")
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []

    ds = pydicom.dcmread(path)
    assert ds.Modality == "SR" and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert ds.ConceptNameCodeSequence[0].CodeValue == "126000"  # Imaging Measurement Report
    assert ds.StudyInstanceUID == volume.datasets[0].StudyInstanceUID
    assert ds.PatientID == volume.datasets[0].PatientID
    assert ds.CompletionFlag == "COMPLETE" and ds.VerificationFlag == "UNVERIFIED"
    assert ds.SeriesNumber == 6000 + int(volume.datasets[0].SeriesNumber)
    evidence = {
        str(i.ReferencedSOPInstanceUID)
        for s in ds.CurrentRequestedProcedureEvidenceSequence
        for r in s.ReferencedSeriesSequence
        for i in r.ReferencedSOPSequence
    }
    assert str(seg.SOPInstanceUID) in evidence

    groups = _groups(path)
    assert len(groups) == len(package.labels)
    source_series = str(volume.datasets[0].SeriesInstanceUID)
    for group, m, item in zip(groups, ms, seg.SegmentSequence, strict=True):
        ref = group.referenced_segment
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert ref.referenced_sop_class_uid == seg.SOPClassUID
        assert ref.referenced_segment_numbers == [m.segment_number] == [item.SegmentNumber]
        assert ref.source_series_for_segmentation.value == source_series
        assert group.tracking_uid == item.TrackingUID  # one identity for the SEG segment and the SR group
        assert group.finding_type.value == item.SegmentedPropertyTypeCodeSequence[0].CodeValue
        values = _values(group)
        assert values["Volume"] == (pytest.approx(m.volume_ml, rel=1e-12), "ml")
        assert values["Number of voxels"] == (m.voxels, "{voxels}")
        for stat, expected in (
            ("Mean", m.mean),
            ("Standard Deviation", m.std),
            ("Minimum", m.min),
            ("Maximum", m.max),
        ):
            value = values[f"Attenuation Coefficient/{stat}"]
            assert value == (pytest.approx(expected, rel=1e-12), "[hnsf'U]")
        assert _coverage(group) == ("Yes" if m.truncated else "No")


def test_absent_segment_is_reported_with_volume_zero(ct, package, tmp_path: Path) -> None:  # noqa: ANN001
    volume, labels = ct
    lung_only = np.where(labels == 1, labels, 0).astype(labels.dtype)
    seg = build_seg(SeriesResult(volume, lung_only, package, uid_seed="lung-only"))
    ms = measure(volume, lung_only, package)
    sr = build_sr(seg, ms, volume, package, uid_seed="lung-only")
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    lung, *absent = _groups(path)
    assert lung.referenced_segment.referenced_segment_numbers == [1]
    assert [g.referenced_segment.referenced_segment_numbers for g in absent] == [[2], [3], [4], [5]]
    for group in absent:
        assert _values(group) == {"Volume": (0.0, "ml"), "Number of voxels": (0, "{voxels}")}
        assert _coverage(group) is None  # undefined for an empty region
    assert _values(lung)["Volume"][0] > 0


def test_uids_are_deterministic_per_seed_and_differ_from_the_segs(ct, package) -> None:  # noqa: ANN001
    volume, labels = ct
    seg = build_seg(SeriesResult(volume, labels, package, uid_seed="x"))
    ms = measure(volume, labels, package)
    a = build_sr(seg, ms, volume, package, uid_seed="x")
    b = build_sr(seg, ms, volume, package, uid_seed="x")
    c = build_sr(seg, ms, volume, package, uid_seed="y", series_number=42)
    assert a.SOPInstanceUID == b.SOPInstanceUID != c.SOPInstanceUID
    assert a.SeriesInstanceUID == b.SeriesInstanceUID != c.SeriesInstanceUID
    assert a.SOPInstanceUID != seg.SOPInstanceUID and a.SeriesInstanceUID != seg.SeriesInstanceUID
    assert c.SeriesNumber == 42


def test_mr_intensities_have_no_units(tmp_path: Path, package) -> None:  # noqa: ANN001
    volume, labels = _case(tmp_path / "mr", modality="MR")
    assert volume.modality == "MR"
    seg = build_seg(SeriesResult(volume, labels, package, uid_seed="mr"))
    ms = measure(volume, labels, package)
    path = tmp_path / "sr.dcm"
    build_sr(seg, ms, volume, package, uid_seed="mr").save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    group = _groups(path)[0]
    values = _values(group)
    assert values["MR signal intensity/Mean"] == (pytest.approx(ms[0].mean, rel=1e-12), "1")
    assert "Attenuation Coefficient/Mean" not in values


def test_measurements_must_belong_to_the_seg(ct, package) -> None:  # noqa: ANN001
    volume, labels = ct
    seg = build_seg(SeriesResult(volume, labels, package, uid_seed="z"))
    ms = measure(volume, labels, package)
    stray = replace(ms[0], segment_number=9)
    with pytest.raises(ValueError, match="segment"):
        build_sr(seg, [*ms, stray], volume, package, uid_seed="z")
    other = replace(volume, datasets=[pydicom.Dataset(d) for d in volume.datasets])
    for d in other.datasets:
        d.SeriesInstanceUID = pydicom.uid.generate_uid()
    with pytest.raises(ValueError, match="series"):
        build_sr(seg, ms, other, package, uid_seed="z")
    with pytest.raises(ValueError, match="Segmentation"):
        build_sr(volume.datasets[0], ms, volume, package, uid_seed="z")
