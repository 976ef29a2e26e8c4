"""SEG and measurements: dciodvfy judges the SEG; highdicom reads it back voxel for voxel."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from edge_runtime.imaging.volume import Volume, load_volume
from edge_runtime.inference.package import DEFAULT_PACKAGE, ModelPackage
from edge_runtime.inference.pipeline import segment
from edge_runtime.inference.runner import load_runner
from edge_runtime.results.measurements import measure
from edge_runtime.results.seg import build_seg
from edge_runtime.results.series_result import SeriesResult
from phantom import make_phantom, write_series
from tests.peers import dciodvfy_errors


@pytest.fixture(scope="module")
def package() -> ModelPackage:
    return ModelPackage.load(DEFAULT_PACKAGE)


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory, package: ModelPackage) -> tuple[Volume, np.ndarray]:
    folder = tmp_path_factory.mktemp("ct")
    phantom = make_phantom((24, 96, 96), (2.5, 3.5, 3.5), rng=3)
    info = write_series(phantom.hu, phantom.spacing, folder, shuffle_files=True)
    volume = load_volume(info.paths)
    labels = segment(volume, package, load_runner(package, threads=1)).labels
    return volume, labels


def roundtrip(seg: hd.seg.Segmentation) -> hd.seg.Segmentation:
    buf = BytesIO()
    seg.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return hd.seg.segread(buf)


def test_seg_is_valid_and_reads_back_voxel_for_voxel(case, package, tmp_path: Path) -> None:  # noqa: ANN001
    volume, labels = case
    assert set(np.unique(labels)) >= {0, 1, 2}, "the phantom should show lung and bone"
    seg = build_seg(SeriesResult(volume, labels, package, uid_seed="test"))
    path = tmp_path / "seg.dcm"
    seg.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []

    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.SegmentationType == "BINARY"
    assert [s.SegmentLabel for s in ds.SegmentSequence] == [lab.name for lab in package.labels]
    for item, label in zip(ds.SegmentSequence, package.labels, strict=False):
        assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == label.type.value
        assert item.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
        assert (
            item.SegmentAlgorithmType == "AUTOMATIC" and item.SegmentAlgorithmName == package.algorithm_name
        )
    source_uids = [str(d.SOPInstanceUID) for d in volume.datasets]
    for frame in ds.PerFrameFunctionalGroupsSequence:
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert ref in source_uids

    back = roundtrip(seg)
    pixels = back.get_pixels_by_source_instance(
        source_sop_instance_uids=source_uids, combine_segments=True, skip_overlap_checks=True
    )
    np.testing.assert_array_equal(pixels, labels)  # segment numbers equal label values in this package


def test_empty_result_still_gives_a_valid_seg(case, package, tmp_path: Path) -> None:  # noqa: ANN001
    volume, labels = case
    seg = build_seg(SeriesResult(volume, np.zeros_like(labels), package, uid_seed="empty"))
    path = tmp_path / "empty.dcm"
    seg.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    assert len(pydicom.dcmread(path).SegmentSequence) == len(package.labels)


def test_uids_are_deterministic_per_seed(case, package) -> None:  # noqa: ANN001
    volume, labels = case
    a = build_seg(SeriesResult(volume, labels, package, uid_seed="x"))
    b = build_seg(SeriesResult(volume, labels, package, uid_seed="x"))
    c = build_seg(SeriesResult(volume, labels, package, uid_seed="y"))
    assert a.SOPInstanceUID == b.SOPInstanceUID != c.SOPInstanceUID
    assert a.SeriesInstanceUID == b.SeriesInstanceUID
    assert a.SeriesNumber == 5000 + int(volume.datasets[0].SeriesNumber)


def test_measurements_match_a_direct_computation(case, package) -> None:  # noqa: ANN001
    volume, labels = case
    found = {m.label: m for m in measure(volume, labels, package)}
    voxel_ml = np.prod(volume.spacing) / 1000
    for label in package.labels:
        mask = labels == label.value
        m = found[label.value]
        assert m.voxels == int(mask.sum())
        assert m.volume_ml == pytest.approx(mask.sum() * voxel_ml)
        if m.voxels:
            assert m.mean == pytest.approx(float(volume.array[mask].mean()), rel=1e-6)
            assert m.std == pytest.approx(float(volume.array[mask].std()), rel=1e-5)
            assert m.min == volume.array[mask].min() and m.max == volume.array[mask].max()
            idx = np.argwhere(mask)
            touches = (idx.min(0) == 0).any() or (idx.max(0) == np.array(labels.shape) - 1).any()
            assert m.truncated == bool(touches)
            c = np.array(m.centroid_mm)
            lo, hi = np.array(m.bbox_mm)
            assert np.all(lo - 1e-3 <= c) and np.all(c <= hi + 1e-3)


def test_measurement_of_an_absent_label_is_empty(case, package) -> None:  # noqa: ANN001
    volume, labels = case
    ms = measure(volume, np.zeros_like(labels), package)
    assert all(m.voxels == 0 and m.mean is None and not m.truncated for m in ms)


def test_enhanced_multiframe_ct_volume_and_seg(tmp_path: Path, package: ModelPackage) -> None:
    """A Legacy Converted Enhanced CT (one multi-frame instance) of a phantom, from shuffled slices."""
    phantom = make_phantom((16, 64, 64), (2.5, 4.0, 4.0), rng=5)
    info = write_series(phantom.hu, phantom.spacing, tmp_path / "ct")
    singles = [pydicom.dcmread(p) for p in info.paths]
    order = [5, 0, 9, 3, 15, 1, 2, 4, 6, 7, 8, 10, 11, 12, 13, 14]
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        [singles[i] for i in order],
        series_instance_uid=pydicom.uid.generate_uid(),
        series_number=2,
        sop_instance_uid=pydicom.uid.generate_uid(),
        instance_number=1,
    )
    path = tmp_path / "enhanced.dcm"
    enhanced.save_as(path, enforce_file_format=True)

    volume = load_volume([path])
    reference = load_volume(info.paths)
    z = [
        float(f.PlanePositionSequence[0].ImagePositionPatient[2])
        for f in enhanced.PerFrameFunctionalGroupsSequence
    ]
    assert volume.multiframe and volume.frames == list(np.argsort(z))
    np.testing.assert_allclose(volume.array, reference.array)  # rescale from the functional groups
    assert volume.spacing == pytest.approx(reference.spacing)

    labels = segment(volume, package, load_runner(package, threads=1)).labels
    seg = build_seg(SeriesResult(volume, labels, package, uid_seed="enhanced"))
    out = tmp_path / "seg.dcm"
    seg.save_as(out, enforce_file_format=True)
    assert dciodvfy_errors(out) == []
    back = roundtrip(seg)
    frames = back.get_pixels_by_source_frame(
        source_sop_instance_uid=str(enhanced.SOPInstanceUID),
        source_frame_numbers=list(range(1, 17)),
        combine_segments=True,
        skip_overlap_checks=True,
    )
    np.testing.assert_array_equal(frames[volume.frames], labels)
