"""Reference SEGs of every kind in the public corpus, read onto their source CT.

Truth comes from outside this project: the NRRD label maps that dcmqi converted its SEGs from, and highdicom's
own reading of its test SEGs.
"""

from __future__ import annotations

import gzip
from copy import deepcopy
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from edge_runtime.imaging.volume import Volume, load_volume
from edge_runtime.quality.reference import read_reference_masks, read_reference_seg
from tests.peers import SHARED_DATA

DCMQI = SHARED_DATA / "dcmqi" / "segmentations"
HIGHDICOM = SHARED_DATA / "highdicom"
PYDICOM_DATA = SHARED_DATA / "pydicom-data"


def corpus(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent: the public DICOM corpus (../shared/data) is not checked out here")
    return path


# -- NRRD (the subset dcmqi writes: one file, raw or gzip, LPS or RAS, axis-aligned) -----------------------

NRRD_TYPES = {
    "short": "i2",
    "int16": "i2",
    "signed short": "i2",
    "ushort": "u2",
    "unsigned short": "u2",
    "uint16": "u2",
    "uchar": "u1",
    "unsigned char": "u1",
    "uint8": "u1",
    "char": "i1",
    "int8": "i1",
    "signed char": "i1",
    "int": "i4",
    "int32": "i4",
    "uint": "u4",
    "uint32": "u4",
    "float": "f4",
    "double": "f8",
}


def read_nrrd(path: Path) -> tuple[dict[str, str], np.ndarray]:
    """Header fields and the data with numpy axes in reverse NRRD order (NRRD's first axis is the fastest)."""
    raw = path.read_bytes()
    end = raw.index(b"\n\n")
    lines = raw[:end].decode("ascii").splitlines()
    assert lines[0].startswith("NRRD")
    header = {}
    for line in lines[1:]:
        if line.startswith("#") or ":" not in line:
            continue
        key, value = line.split(":", 1)
        header[key.strip()] = value.strip()
    payload = raw[end + 2 :]
    encoding = header.get("encoding", "raw")
    if encoding in ("gzip", "gz"):
        payload = gzip.decompress(payload)
    else:
        assert encoding == "raw", f"NRRD encoding {encoding} not handled"
    sizes = [int(v) for v in header["sizes"].split()]
    order = "<" if header.get("endian", "little") == "little" else ">"
    dtype = np.dtype(NRRD_TYPES[header["type"]]).newbyteorder(order)
    data = np.frombuffer(payload, dtype=dtype, count=int(np.prod(sizes))).reshape(sizes[::-1])
    return header, data


def _vector(text: str) -> np.ndarray:
    return np.array([float(v) for v in text.strip("() ").split(",")])


def nrrd_on_volume(path: Path, volume: Volume) -> np.ndarray:
    """An NRRD label map on the volume's (slice, row, column) grid, checked against the volume's geometry."""
    header, data = read_nrrd(path)
    directions = [_vector(v) for v in header["space directions"].replace(") (", ")|(").split("|")]
    origin = _vector(header["space origin"])
    space = header.get("space", "left-posterior-superior")
    if space in ("right-anterior-superior", "RAS"):
        flip = np.array([-1.0, -1.0, 1.0])
        directions = [d * flip for d in directions]
        origin = origin * flip
    else:
        assert space in ("left-posterior-superior", "LPS"), space
    numpy_dirs = directions[::-1]  # numpy axis i is NRRD axis (n - 1 - i)
    targets = [volume.normal, volume.column_direction, volume.row_direction]
    order, flips = [], []
    for target in targets:
        cosines = [float(d @ target / np.linalg.norm(d)) for d in numpy_dirs]
        j = int(np.argmax(np.abs(cosines)))
        assert abs(cosines[j]) > 0.999, "NRRD axes not aligned with the volume"
        order.append(j)
        flips.append(cosines[j] < 0)
    out = data.transpose(order)
    for axis, flipped in enumerate(flips):
        if flipped:
            origin = origin + numpy_dirs[order[axis]] * (out.shape[axis] - 1)
            out = np.flip(out, axis)
    assert out.shape == volume.array.shape
    np.testing.assert_allclose(origin, volume.origin, atol=1e-3)
    return np.ascontiguousarray(out)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


# -- source volumes ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ct_3slice() -> Volume:
    return load_volume(sorted(corpus(DCMQI / "ct-3slice").iterdir()))


def small_ct(name: str) -> Volume:
    return load_volume(sorted(corpus(DCMQI / name / "image").iterdir()))


def hd_source_datasets() -> list[Dataset]:
    folder = corpus(HIGHDICOM / "source_pydicom_dicomdirtests_77654033_CT2")
    return [pydicom.dcmread(p) for p in sorted(folder.iterdir())]


@pytest.fixture(scope="module")
def hd_ct() -> Volume:
    """highdicom's 16x16 test CT: 4 slices at z = -99.48, 103.02, 104.27, 105.52.

    ``load_volume`` refuses this stack (202.5 mm = 162 regular 1.25 mm steps reads as missing slices), so the
    volume is assembled here, in spatial order with the true positions, as ``load_volume`` would.
    """
    datasets = hd_source_datasets()
    iop = np.array([float(v) for v in datasets[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    datasets.sort(key=lambda d: float(np.array([float(v) for v in d.ImagePositionPatient]) @ normal))
    ipp = np.array([[float(v) for v in d.ImagePositionPatient] for d in datasets])
    along = ipp @ normal
    array = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in datasets])
    return Volume(
        array=array.astype(np.float32),
        spacing=(float(np.median(np.diff(along))), *(float(v) for v in datasets[0].PixelSpacing)),
        positions=along - along[0],
        origin=ipp[0],
        row_direction=iop[:3],
        column_direction=iop[3:],
        datasets=datasets,
        regular=False,
    )


def uids(volume: Volume) -> list[str]:
    return [str(d.SOPInstanceUID) for d in volume.datasets]


def highdicom_masks(
    path: Path, volume: Volume, threshold: float = 0.5, numbers: list[int] | None = None
) -> dict[int, np.ndarray]:
    """What highdicom itself reads from a SEG, per segment, on the volume's source instances."""
    seg = hd.seg.segread(path)
    numbers = list(seg.segment_numbers) if numbers is None else numbers
    pixels = seg.get_pixels_by_source_instance(
        uids(volume),
        segment_numbers=numbers,
        assert_missing_frames_are_empty=True,
        # dcmqi writes no Spatial Locations Preserved; its frames are pixel-aligned with their sources
        ignore_spatial_locations=True,
    )
    return {n: pixels[..., i] >= threshold for i, n in enumerate(numbers)}


# -- BINARY --------------------------------------------------------------------------------------------------


def test_dcmqi_liver_matches_its_nrrd_voxel_for_voxel(ct_3slice: Volume) -> None:
    labels, names = read_reference_seg(corpus(DCMQI / "liver.dcm"), ct_3slice)
    truth = nrrd_on_volume(corpus(DCMQI / "liver_seg.nrrd"), ct_3slice)
    assert names == {1: "Liver"}
    assert labels.shape == ct_3slice.array.shape and labels.dtype == np.uint8
    assert set(np.unique(truth)) == {0, 1} and all(truth[k].any() for k in range(3))
    assert dice(labels == 1, truth == 1) == 1.0
    np.testing.assert_array_equal(labels, truth)
    np.testing.assert_array_equal(labels == 1, highdicom_masks(DCMQI / "liver.dcm", ct_3slice)[1])


@pytest.mark.parametrize("name", ["liver_expb.dcm", "liver_j2k.dcm"])
def test_liver_in_other_encodings_reads_the_same(ct_3slice: Volume, name: str) -> None:
    if name.endswith("j2k.dcm"):
        pytest.importorskip("openjpeg", reason="JPEG 2000 needs the codecs extra (pylibjpeg-openjpeg)")
    expected, _ = read_reference_seg(corpus(DCMQI / "liver.dcm"), ct_3slice)
    labels, names = read_reference_seg(corpus(PYDICOM_DATA / name), ct_3slice)
    assert names == {1: "Liver"}
    np.testing.assert_array_equal(labels, expected)


@pytest.mark.parametrize("name", ["23x38x3", "24x38x3"])
def test_dcmqi_small_ct_segs_match_their_nrrd(name: str) -> None:
    volume = small_ct(name)
    labels, names = read_reference_seg(corpus(DCMQI / name / "seg" / "label.seg"), volume)
    truth = nrrd_on_volume(corpus(DCMQI / name / "nrrd" / "label.nrrd"), volume)
    assert names == {1: "Liver"} and truth.any()
    np.testing.assert_array_equal(labels, truth)


@pytest.mark.parametrize("name", ["seg_image_ct_binary.dcm", "seg_image_ct_binary_overlap.dcm"])
def test_highdicom_binary_segs_match_highdicom(hd_ct: Volume, name: str) -> None:
    path = corpus(HIGHDICOM / name)
    masks = read_reference_masks(path, hd_ct)
    expected = highdicom_masks(path, hd_ct)
    assert masks.keys() == expected.keys()
    for number, mask in masks.items():
        assert mask.any()
        np.testing.assert_array_equal(mask, expected[number])


# -- overlapping segments ------------------------------------------------------------------------------------


def test_dcmqi_overlapping_segments_keep_every_voxel_and_the_higher_number_wins(ct_3slice: Volume) -> None:
    path = corpus(DCMQI / "partial_overlaps.dcm")
    masks = read_reference_masks(path, ct_3slice)
    labels, names = read_reference_seg(path, ct_3slice)
    assert names == {1: "GREEN", 2: "ORANGE", 3: "PURPLE", 4: "LIGHT_BLUE", 5: "DARK_BLUE"}
    # dcmqi made the SEG from three label maps: segment n is label value n of one of them
    layers = [nrrd_on_volume(corpus(DCMQI / f"partial_overlaps-{i}.nrrd"), ct_3slice) for i in (1, 2, 3)]
    for number, mask in masks.items():
        holders = [layer for layer in layers if (layer == number).any()]
        assert len(holders) == 1
        np.testing.assert_array_equal(mask, holders[0] == number)
    hd_masks = highdicom_masks(path, ct_3slice)
    for number, mask in masks.items():
        np.testing.assert_array_equal(mask, hd_masks[number])

    stacked = np.stack([masks[n] for n in sorted(masks)])
    assert (stacked.sum(axis=0) > 1).any(), "the corpus file should overlap"
    expected = np.zeros(labels.shape, dtype=labels.dtype)
    for number in sorted(masks):  # ascending: a higher number overwrites a lower one
        expected[masks[number]] = number
    np.testing.assert_array_equal(labels, expected)


# -- FRACTIONAL ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["seg_image_ct_binary_fractional.dcm", "seg_image_ct_true_fractional.dcm"])
def test_highdicom_fractional_segs_threshold_at_half(hd_ct: Volume, name: str) -> None:
    path = corpus(HIGHDICOM / name)
    assert pydicom.dcmread(path).SegmentationType == "FRACTIONAL"
    masks = read_reference_masks(path, hd_ct)
    expected = highdicom_masks(path, hd_ct, threshold=0.5)
    assert masks.keys() == expected.keys() == {1}
    assert masks[1].any()
    np.testing.assert_array_equal(masks[1], expected[1])
    labels, _ = read_reference_seg(path, hd_ct)
    np.testing.assert_array_equal(labels, masks[1].astype(np.uint8))


def test_fractional_threshold_is_a_parameter(hd_ct: Volume) -> None:
    path = corpus(HIGHDICOM / "seg_image_ct_true_fractional.dcm")
    half = read_reference_masks(path, hd_ct)[1]
    quarter = read_reference_masks(path, hd_ct, threshold=0.25)[1]
    np.testing.assert_array_equal(quarter, highdicom_masks(path, hd_ct, threshold=0.25)[1])
    assert quarter.sum() > half.sum() and np.all(quarter[half])
    with pytest.raises(ValueError, match="threshold"):
        read_reference_masks(path, hd_ct, threshold=0)


# -- LABELMAP (sparse) ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,truth",
    [
        ("sparse-labelmap-noppv.dcm", "sparse_labelmap_noppv_seg.nrrd"),
        ("sparse-labelmap-ppv5.dcm", "sparse_labelmap_ppv5_seg.nrrd"),
    ],
)
def test_dcmqi_sparse_labelmaps_match_their_nrrd(name: str, truth: str) -> None:
    path = corpus(DCMQI / name)
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7" and ds.SegmentationType == "LABELMAP"
    volume = small_ct("24x38x3")
    assert int(ds.NumberOfFrames) < len(volume.datasets), "sparse: a slice without a frame"
    labels, names = read_reference_seg(path, volume)
    assert names == {1: "Liver"}  # segment 0 "Background" (and the padding value) are background
    # dcmqi fills slices without a frame with the Pixel Padding Value (5 in ppv5): background here
    expected = np.where(nrrd_on_volume(corpus(DCMQI / truth), volume) == 1, 1, 0)
    assert expected.any()
    np.testing.assert_array_equal(labels, expected)
    np.testing.assert_array_equal(read_reference_masks(path, volume)[1], expected == 1)
    # highdicom counts the Background segment as a segment when the padding value differs: compare Liver only
    np.testing.assert_array_equal(labels == 1, highdicom_masks(path, volume, numbers=[1])[1])


# -- placement and refusals ----------------------------------------------------------------------------------


def test_frames_without_references_are_placed_by_position(ct_3slice: Volume) -> None:
    ds = pydicom.dcmread(corpus(DCMQI / "liver.dcm"))
    expected, _ = read_reference_seg(ds, ct_3slice)
    for frame in ds.PerFrameFunctionalGroupsSequence:
        del frame.DerivationImageSequence
    labels, _ = read_reference_seg(ds, ct_3slice)
    np.testing.assert_array_equal(labels, expected)


def test_frames_outside_the_volume_are_refused_unless_ignored(hd_ct: Volume) -> None:
    path = corpus(HIGHDICOM / "seg_image_ct_binary_overlap.dcm")
    top3 = load_volume([d.filename for d in hd_ct.datasets[1:]])  # the three regular slices
    with pytest.raises(ValueError, match="outside the volume"):
        read_reference_seg(path, top3)
    masks = read_reference_masks(path, top3, ignore_outside=True)
    full = read_reference_masks(path, hd_ct)
    for number, mask in masks.items():
        np.testing.assert_array_equal(mask, full[number][1:])


def _liver() -> Dataset:
    return pydicom.dcmread(corpus(DCMQI / "liver.dcm"))


def _other_frame_of_reference(ds: Dataset) -> None:
    ds.FrameOfReferenceUID = pydicom.uid.generate_uid()


def _tilted(ds: Dataset) -> None:
    plane = ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
    plane.ImageOrientationPatient = [1, 0, 0, 0, 0.8, 0.6]


def _other_spacing(ds: Dataset) -> None:
    ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing = [0.7, 0.7]


def _shifted(ds: Dataset) -> None:
    frame = ds.PerFrameFunctionalGroupsSequence[1]
    del frame.DerivationImageSequence
    ipp = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
    frame.PlanePositionSequence[0].ImagePositionPatient = [ipp[0] + 2.0, ipp[1], ipp[2]]


def _inconsistent(ds: Dataset) -> None:
    a, b = ds.PerFrameFunctionalGroupsSequence[0], ds.PerFrameFunctionalGroupsSequence[2]
    a.PlanePositionSequence, b.PlanePositionSequence = (
        deepcopy(b.PlanePositionSequence),
        deepcopy(a.PlanePositionSequence),
    )


def _unplaceable(ds: Dataset) -> None:
    frame = ds.PerFrameFunctionalGroupsSequence[0]
    del frame.DerivationImageSequence
    del frame.PlanePositionSequence


def _undescribed_segment(ds: Dataset) -> None:
    ds.PerFrameFunctionalGroupsSequence[0].SegmentIdentificationSequence[0].ReferencedSegmentNumber = 7


@pytest.mark.parametrize(
    "change,message",
    [
        (_other_frame_of_reference, "Frame of Reference"),
        (_tilted, "Orientation"),
        (_other_spacing, "Pixel Spacing"),
        (_shifted, "not pixel-aligned"),
        (_inconsistent, "references source slice"),
        (_unplaceable, "no Image Position"),
        (_undescribed_segment, "does not describe"),
    ],
)
def test_a_seg_that_does_not_fit_the_volume_is_refused(ct_3slice: Volume, change, message: str) -> None:  # noqa: ANN001
    ds = _liver()
    change(ds)
    with pytest.raises(ValueError, match=message):
        read_reference_seg(ds, ct_3slice)


def test_pixel_data_no_decoder_handles_is_refused_as_undecodable(ct_3slice: Volume) -> None:
    """liver_rle.dcm (the dcmqi liver SEG, RLE Lossless at 1 bit allocated): pydicom and pylibjpeg-rle both
    refuse 1-bit RLE; the service records that as undecodable-pixels instead of failing."""
    from edge_runtime.quality.reference import UndecodablePixels

    with pytest.raises(UndecodablePixels, match="RLE Lossless, 1 bit"):
        read_reference_seg(corpus(PYDICOM_DATA / "liver_rle.dcm"), ct_3slice)


def test_other_image_size_and_non_seg_are_refused(ct_3slice: Volume) -> None:
    with pytest.raises(ValueError, match="510x510"):
        read_reference_seg(corpus(PYDICOM_DATA / "liver_nonbyte_aligned.dcm"), ct_3slice)
    with pytest.raises(ValueError, match="not a Segmentation"):
        read_reference_seg(ct_3slice.datasets[0], ct_3slice)
    with pytest.raises(ValueError, match="Frame of Reference|rows x columns"):
        read_reference_seg(corpus(DCMQI / "23x38x3" / "seg" / "label.seg"), small_ct("24x38x3"))


def test_our_own_seg_reads_back(tmp_path: Path) -> None:
    """No corpus needed: the runtime's SEG (BINARY, empty frames omitted) on its phantom CT."""
    from edge_runtime.inference.package import DEFAULT_PACKAGE, ModelPackage
    from edge_runtime.results.seg import build_seg
    from edge_runtime.results.series_result import SeriesResult
    from phantom import make_phantom, write_series

    package = ModelPackage.load(DEFAULT_PACKAGE)
    phantom = make_phantom((10, 40, 40), (5.0, 8.0, 8.0), rng=11)
    volume = load_volume(write_series(phantom.hu, phantom.spacing, tmp_path, shuffle_files=True).paths)
    labels = phantom.labels.copy()  # the bundled model's labels are the phantom's
    assert set(np.unique(labels)) >= {0, 1, 5}
    labels[:2] = 0  # slices without any frame
    seg = build_seg(SeriesResult(volume, labels, package, uid_seed="reference"))
    back, names = read_reference_seg(seg, volume)
    assert {names[v] for v in np.unique(labels) if v} <= {"Lung", "Liver", "Spleen", "Kidney", "Bone"}
    assert names[1] == "Lung" and names[5] == "Bone"
    np.testing.assert_array_equal(back, labels)
    path = tmp_path / "seg.dcm"
    seg.save_as(path, enforce_file_format=True)
    np.testing.assert_array_equal(read_reference_seg(path, volume)[0], labels)
