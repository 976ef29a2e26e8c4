"""The fast BINARY SEG encoder: dciodvfy judges it, highdicom reads it back voxel for voxel, and it carries
what ``build_seg`` (highdicom) writes for the same input, frame for frame."""

from __future__ import annotations

import dataclasses
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from edge_runtime.dicom import SegmentationStorage as SEGMENTATION_STORAGE
from edge_runtime.imaging.volume import Volume, load_volume
from edge_runtime.inference.package import DEFAULT_PACKAGE, Code, Label, ModelPackage
from edge_runtime.results.seg import build_seg
from edge_runtime.results.seg_binary import encode_binary_seg
from edge_runtime.results.series_result import SeriesResult
from phantom import make_phantom, write_series
from tests.peers import dciodvfy_errors

#: top-level attributes that must be the same in both encoders' output
SAME_ATTRIBUTES = [
    "SpecificCharacterSet",
    "ImageType",
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "Modality",
    "Manufacturer",
    "ReferringPhysicianName",
    "SeriesDescription",
    "ManufacturerModelName",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "DeviceSerialNumber",
    "SoftwareVersions",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "StudyID",
    "SeriesNumber",
    "InstanceNumber",
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
    "DimensionOrganizationType",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "NumberOfFrames",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "LossyImageCompression",
    "SegmentationType",
    "SegmentsOverlap",
    "ContentLabel",
    "ContentDescription",
    "ContentCreatorName",
    "PresentationLUTShape",
]
SAME_SEQUENCES = [
    "ReferencedSeriesSequence",
    "SourceImageSequence",
    "SegmentSequence",
    "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
]
#: differ on purpose: creation times, a deterministic Dimension Organization UID, this encoder as equipment
MAY_DIFFER = {
    "InstanceCreationTime",
    "InstanceCreationDate",
    "ContentDate",
    "ContentTime",
    "DimensionOrganizationSequence",
    "DimensionIndexSequence",
    "ContributingEquipmentSequence",
    "PixelData",
}


def package_with(n: int, order: list[int] | None = None) -> ModelPackage:
    """The default package with labels 1..n (listed in ``order``), SNOMED codes and distinct colours."""
    base = ModelPackage.load(DEFAULT_PACKAGE)
    codes_ = [(lab.category, lab.type) for lab in base.labels]
    labels = tuple(
        Label(
            v, f"Structure {v}", *codes_[v % len(codes_)], ((37 * v) % 256, (91 * v) % 256, (151 * v) % 256)
        )
        for v in (order or range(1, n + 1))
    )
    return dataclasses.replace(base, labels=labels)


def make_volume(folder: Path, shape: tuple[int, int, int], **kwargs) -> Volume:  # noqa: ANN003
    phantom = make_phantom(shape, (2.5, 3.5, 3.5), rng=3)
    info = write_series(phantom.hu, phantom.spacing, folder, shuffle_files=True, **kwargs)
    return load_volume(info.paths)


def blobs(shape: tuple[int, ...], values: list[int], seed: int = 0) -> np.ndarray:
    """Exclusive blobs of the given label values: boxes at random places and of random sizes, with holes
    (so that no two slices of a blob are alike)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint8)
    for v in values:
        lo = rng.integers(0, np.array(shape) - 1)
        hi = np.minimum(lo + rng.integers(2, np.maximum(np.array(shape) // 2, 3)), shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        filled = rng.random(labels[box].shape) < 0.7
        filled.reshape(filled.shape[0], -1)[:, 0] = True  # present on every slice of its box
        labels[box][filled] = v
    return labels


@pytest.fixture(scope="module")
def odd_volume(tmp_path_factory: pytest.TempPathFactory) -> Volume:
    """15 x 17 pixels (255 bits a frame: frames do not start on byte boundaries), non-ASCII patient name."""
    return make_volume(tmp_path_factory.mktemp("odd"), (7, 15, 17), patient_name="Müller^Jürgen")


@pytest.fixture(scope="module")
def aligned_volume(tmp_path_factory: pytest.TempPathFactory) -> Volume:
    """16 x 24 pixels (whole bytes a row), coronal slices."""
    return make_volume(tmp_path_factory.mktemp("aligned"), (9, 16, 24), iop=(1, 0, 0, 0, 0, -1))


@pytest.fixture(params=["odd", "aligned"])
def volume(request: pytest.FixtureRequest) -> Volume:
    return request.getfixturevalue(f"{request.param}_volume")


def write(ds: pydicom.Dataset, path: Path) -> Path:
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def read_back(path: Path, volume: Volume) -> np.ndarray:
    seg = hd.seg.segread(path)
    return seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[str(d.SOPInstanceUID) for d in volume.datasets],
        combine_segments=True,
        skip_overlap_checks=True,
    )


def highdicom_file(volume: Volume, labels: np.ndarray, package: ModelPackage, path: Path, **kwargs) -> Path:  # noqa: ANN003
    build_seg(SeriesResult(volume, labels, package, **kwargs)).save_as(path, enforce_file_format=True)
    return path


def assert_same_as_highdicom(ours: pydicom.Dataset, theirs: pydicom.Dataset) -> None:
    assert set(ours.dir()) - MAY_DIFFER == set(theirs.dir()) - MAY_DIFFER
    for keyword in SAME_ATTRIBUTES:
        assert ours.get(keyword) == theirs.get(keyword), keyword
    for keyword in SAME_SEQUENCES:
        assert len(ours[keyword].value) == len(theirs[keyword].value), keyword
        for a, b in zip(ours[keyword].value, theirs[keyword].value, strict=True):
            assert a.to_json_dict() == b.to_json_dict(), keyword
    for a, b in zip(ours.DimensionIndexSequence, theirs.DimensionIndexSequence, strict=True):
        assert (a.DimensionIndexPointer, a.FunctionalGroupPointer, a.DimensionDescriptionLabel) == (
            b.DimensionIndexPointer,
            b.FunctionalGroupPointer,
            b.DimensionDescriptionLabel,
        )
        assert a.DimensionOrganizationUID == ours.DimensionOrganizationSequence[0].DimensionOrganizationUID
    assert len(ours.DimensionIndexSequence) == len(theirs.DimensionIndexSequence)
    assert ours.ContributingEquipmentSequence[0] == theirs.ContributingEquipmentSequence[0]
    # same bits; highdicom pads an odd length with b"0", this encoder with b"\0"
    n_bits = int(ours.NumberOfFrames) * int(ours.Rows) * int(ours.Columns)
    assert len(ours.PixelData) == len(theirs.PixelData) == (n_bits + 15) // 16 * 2
    assert ours.PixelData[: n_bits // 8] == theirs.PixelData[: n_bits // 8]
    tail = n_bits % 8
    if tail:
        mask = (1 << tail) - 1
        assert ours.PixelData[n_bits // 8] & mask == theirs.PixelData[n_bits // 8] & mask


def test_valid_reads_back_and_matches_highdicom(volume: Volume, tmp_path: Path) -> None:
    package = package_with(5)
    labels = blobs(volume.array.shape, [1, 2, 4, 5])  # segment 3 absent
    ds = encode_binary_seg(SeriesResult(volume, labels, package, uid_seed="test"))
    path = write(ds, tmp_path / "ours.dcm")
    assert dciodvfy_errors(path) == []

    back = pydicom.dcmread(path)
    assert back.SOPClassUID == SEGMENTATION_STORAGE
    assert back.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert back.SegmentationType == "BINARY" and back.BitsAllocated == 1
    assert [s.SegmentLabel for s in back.SegmentSequence] == [lab.name for lab in package.labels]
    for item in back.SegmentSequence:
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        assert item.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
    assert 3 not in {
        f.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        for f in back.PerFrameFunctionalGroupsSequence
    }
    expected_frames = sum(int(np.any(labels[z] == v)) for v in (1, 2, 4, 5) for z in range(labels.shape[0]))
    assert back.NumberOfFrames == expected_frames
    # frames are contiguous bits: only the end is padded, to an even length
    rows, cols = labels.shape[1:]
    assert len(back.PixelData) == (expected_frames * rows * cols + 15) // 16 * 2

    np.testing.assert_array_equal(read_back(path, volume), labels)

    theirs = pydicom.dcmread(highdicom_file(volume, labels, package, tmp_path / "hd.dcm", uid_seed="test"))
    assert_same_as_highdicom(back, theirs)


def test_segment_numbers_follow_the_package_order(aligned_volume: Volume, tmp_path: Path) -> None:
    package = package_with(4, order=[3, 1, 4, 2])  # segment i is package.labels[i - 1]
    labels = blobs(aligned_volume.array.shape, [1, 2, 3, 4], seed=5)
    path = write(
        encode_binary_seg(SeriesResult(aligned_volume, labels, package, uid_seed="order")), tmp_path / "ours.dcm"
    )
    lut = np.zeros(5, np.uint8)
    for number, label in enumerate(package.labels, start=1):
        lut[label.value] = number
    np.testing.assert_array_equal(read_back(path, aligned_volume), lut[labels])
    theirs = pydicom.dcmread(
        highdicom_file(aligned_volume, labels, package, tmp_path / "hd.dcm", uid_seed="order")
    )
    assert_same_as_highdicom(pydicom.dcmread(path), theirs)


def test_many_segments_round_trip(volume: Volume, tmp_path: Path) -> None:
    package = package_with(40)
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 41, volume.array.shape).astype(np.uint8)
    labels[:, :, : labels.shape[2] // 3] = 0  # some background
    labels[labels == 17] = 0  # an absent segment
    path = write(encode_binary_seg(SeriesResult(volume, labels, package, uid_seed="many")), tmp_path / "many.dcm")
    assert dciodvfy_errors(path) == []
    np.testing.assert_array_equal(read_back(path, volume), labels)
    theirs = pydicom.dcmread(highdicom_file(volume, labels, package, tmp_path / "hd.dcm", uid_seed="many"))
    assert_same_as_highdicom(pydicom.dcmread(path), theirs)


def test_a_single_segment_is_identified_in_the_shared_groups(aligned_volume: Volume, tmp_path: Path) -> None:
    package = package_with(1)
    labels = np.zeros(aligned_volume.array.shape, np.uint8)
    labels[2:6, 3:9, 4:20] = 1  # consecutive, regularly spaced planes: highdicom calls it 3D
    ours = pydicom.dcmread(
        write(encode_binary_seg(SeriesResult(aligned_volume, labels, package, uid_seed="one")), tmp_path / "ours.dcm")
    )
    theirs = pydicom.dcmread(
        highdicom_file(aligned_volume, labels, package, tmp_path / "hd.dcm", uid_seed="one")
    )
    assert ours.DimensionOrganizationType == "3D"
    shared = ours.SharedFunctionalGroupsSequence[0]
    assert shared.SegmentIdentificationSequence[0].ReferencedSegmentNumber == 1
    assert_same_as_highdicom(ours, theirs)
    assert dciodvfy_errors(tmp_path / "ours.dcm") == []


def test_an_empty_label_map_gives_a_valid_seg(volume: Volume, tmp_path: Path) -> None:
    package = package_with(3)
    labels = np.zeros(volume.array.shape, np.uint8)
    path = write(encode_binary_seg(SeriesResult(volume, labels, package, uid_seed="empty")), tmp_path / "empty.dcm")
    assert dciodvfy_errors(path) == []
    ds = pydicom.dcmread(path)
    assert len(ds.SegmentSequence) == 3
    # one empty frame per segment (highdicom would encode every plane of every segment)
    assert ds.NumberOfFrames == 3
    assert [
        f.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        for f in ds.PerFrameFunctionalGroupsSequence
    ] == [1, 2, 3]
    assert not any(ds.PixelData)
    np.testing.assert_array_equal(read_back(path, volume), labels)


def test_uids_series_number_and_the_returned_dataset(odd_volume: Volume) -> None:
    package = package_with(2)
    labels = blobs(odd_volume.array.shape, [1, 2])
    a = encode_binary_seg(SeriesResult(odd_volume, labels, package, uid_seed="x"))
    b = encode_binary_seg(SeriesResult(odd_volume, labels, package, uid_seed="x", series_number=42))
    c = encode_binary_seg(SeriesResult(odd_volume, labels, package, uid_seed="y"))
    reference = build_seg(SeriesResult(odd_volume, labels, package, uid_seed="x"))
    assert a.SOPInstanceUID == b.SOPInstanceUID == reference.SOPInstanceUID != c.SOPInstanceUID
    assert a.SeriesInstanceUID == reference.SeriesInstanceUID != c.SeriesInstanceUID
    assert a.file_meta.MediaStorageSOPInstanceUID == a.SOPInstanceUID
    uid = a.DimensionOrganizationSequence[0].DimensionOrganizationUID
    assert (
        uid
        == b.DimensionOrganizationSequence[0].DimensionOrganizationUID
        != (c.DimensionOrganizationSequence[0].DimensionOrganizationUID)
    )
    assert a.SeriesNumber == reference.SeriesNumber == 5000 + int(odd_volume.datasets[0].SeriesNumber)
    assert b.SeriesNumber == 42
    # the raw-encoded sequences parse on access, and the dataset survives a write and a read
    assert len(a.PerFrameFunctionalGroupsSequence) == a.NumberOfFrames
    assert len(a.SourceImageSequence) == len(odd_volume.datasets)
    buf = BytesIO()
    pydicom.dcmwrite(buf, a, enforce_file_format=True)
    back = pydicom.dcmread(BytesIO(buf.getvalue()))
    assert back.PerFrameFunctionalGroupsSequence[0].to_json_dict() == (
        a.PerFrameFunctionalGroupsSequence[0].to_json_dict()
    )


def test_labels_must_match_the_volume(odd_volume: Volume) -> None:
    with pytest.raises(ValueError, match="labels are"):
        encode_binary_seg(SeriesResult(odd_volume, np.zeros((2, 3, 4), np.uint8), package_with(1), uid_seed="bad"))


def test_package_order_codes_are_kept(odd_volume: Volume) -> None:
    # a label with its own codes and colour comes out as build_seg describes it
    base = package_with(1)
    label = Label(
        1,
        "Liver",
        Code("123037004", "SCT", "Anatomical Structure"),
        Code("10200004", "SCT", "Liver"),
        (221, 130, 101),
    )
    package = dataclasses.replace(base, labels=(label,))
    labels = blobs(odd_volume.array.shape, [1])
    ours = encode_binary_seg(SeriesResult(odd_volume, labels, package, uid_seed="liver")).SegmentSequence[0]
    theirs = build_seg(SeriesResult(odd_volume, labels, package, uid_seed="liver")).SegmentSequence[0]
    assert ours.to_json_dict() == theirs.to_json_dict()
    assert ours.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"


def test_copied_attributes_follow_highdicom() -> None:
    """The attributes copied from the source are those highdicom 0.28 copies (its standard tables)."""
    standard = pytest.importorskip("highdicom._standard_utils")
    from edge_runtime.results.seg_binary import _COPIED_FROM_SOURCE

    iods, modules, attributes = (
        standard.get_sop_class_iod_map(),
        standard.get_iod_module_map(),
        standard.get_module_attribute_map(),
    )
    ct, mr, pet = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.128"
    for sop_class in (ct, mr, pet):
        wanted = [
            item["keyword"]
            for module in modules[iods[sop_class]]
            if module["ie"] in ("Patient", "Study") or module["key"] == "specimen"
            for item in attributes[module["key"]]
            if len(item["path"]) == 0
        ]
        assert set(wanted) <= set(_COPIED_FROM_SOURCE), sop_class
