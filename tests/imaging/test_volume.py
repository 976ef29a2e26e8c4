"""Volume assembly and the geometry policy, on written series and on real scanner files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from edge_runtime.imaging.geometry import GeometryPolicy
from edge_runtime.imaging.volume import VolumeError, load_volume
from phantom import write_series
from tests.peers import SHARED_DATA

SPACING = (2.5, 0.8, 0.8)


def ramp(n: int = 8, size: int = 16) -> np.ndarray:
    """Slice k holds HU 100*k (plus a column ramp), so order and rescale are visible."""
    z = np.arange(n, dtype=np.float32)[:, None, None] * 100 - 500
    x = np.arange(size, dtype=np.float32)[None, None, :]
    return np.broadcast_to(z + x, (n, size, size)).copy()


def files(info) -> list[Path]:  # noqa: ANN001
    return list(info.paths)


def test_shuffled_files_and_reversed_instance_numbers_sort_by_position(tmp_path: Path) -> None:
    hu = ramp()
    info = write_series(hu, SPACING, tmp_path, shuffle_files=True, instance_number_order="reversed")
    paths = sorted(tmp_path.glob("*.dcm"))
    vol = load_volume(paths)
    np.testing.assert_allclose(vol.array, hu, atol=0.5)  # rescale slope/intercept applied
    assert vol.spacing == pytest.approx(SPACING)
    assert vol.regular and vol.notes == []
    assert [str(d.SOPInstanceUID) for d in vol.datasets] == list(info.sop_instance_uids)


def test_spacing_comes_from_positions_not_slice_thickness(tmp_path: Path) -> None:
    info = write_series(ramp(), SPACING, tmp_path, extra={"SliceThickness": 5.0})
    assert load_volume(files(info)).spacing[0] == pytest.approx(2.5)


def test_irregular_spacing_is_resampled_or_refused_by_policy(tmp_path: Path) -> None:
    positions = [0.0, 2.5, 5.0, 6.5, 9.0, 11.5, 13.0, 15.5]
    info = write_series(ramp(), SPACING, tmp_path, slice_positions=positions)
    vol = load_volume(files(info))
    assert not vol.regular and "irregular spacing" in vol.notes[0]
    np.testing.assert_allclose(vol.positions, positions)
    with pytest.raises(VolumeError) as err:
        load_volume(files(info), GeometryPolicy(irregular_spacing="refuse"))
    assert err.value.code == "irregular-spacing"


def test_missing_slice_is_refused(tmp_path: Path) -> None:
    positions = [0.0, 2.5, 5.0, 7.5, 12.5, 15.0, 17.5, 20.0]  # 10.0 is missing
    info = write_series(ramp(), SPACING, tmp_path, slice_positions=positions)
    with pytest.raises(VolumeError) as err:
        load_volume(files(info))
    assert err.value.code == "missing-slices" and "1 slice(s) missing" in err.value.detail


def test_duplicate_positions_are_refused(tmp_path: Path) -> None:
    positions = [0.0, 2.5, 5.0, 5.0, 7.5, 10.0, 12.5, 15.0]
    info = write_series(ramp(), SPACING, tmp_path, slice_positions=positions)
    with pytest.raises(VolumeError) as err:
        load_volume(files(info))
    assert err.value.code == "duplicate-positions"


def test_gantry_tilt_is_refused(tmp_path: Path) -> None:
    info = write_series(ramp(), SPACING, tmp_path, gantry_tilt_deg=15.0)
    with pytest.raises(VolumeError) as err:
        load_volume(files(info))
    assert err.value.code == "gantry-tilt" and "15.0 degrees" in err.value.detail


def test_mixed_orientations_are_refused(tmp_path: Path) -> None:
    a = write_series(ramp(), SPACING, tmp_path / "a")
    b = write_series(
        ramp(),
        SPACING,
        tmp_path / "b",
        iop=(1, 0, 0, 0, 0, -1),
        study_uid=a.study_uid,
        series_uid=a.series_uid,
    )
    with pytest.raises(VolumeError) as err:
        load_volume(files(a) + files(b))
    assert err.value.code == "mixed-stacks"


def test_localizer_is_set_aside(tmp_path: Path) -> None:
    info = write_series(ramp(9), SPACING, tmp_path)
    scout = pydicom.dcmread(info.paths[8])
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # a sagittal scout: another stack if it were kept
    scout.save_as(info.paths[8])
    vol = load_volume(files(info))
    assert vol.array.shape[0] == 8
    assert vol.notes == ["set aside 1 instance(s): localizer"]


def test_too_few_slices(tmp_path: Path) -> None:
    info = write_series(ramp(2), SPACING, tmp_path)
    with pytest.raises(VolumeError) as err:
        load_volume(files(info))
    assert err.value.code == "too-few-slices"


def test_affine_maps_indices_to_patient_positions(tmp_path: Path) -> None:
    info = write_series(ramp(), SPACING, tmp_path)
    vol = load_volume(files(info))
    a = vol.affine()
    for k in (0, 5):
        np.testing.assert_allclose((a @ [k, 0, 0, 1])[:3], info.positions[k], atol=1e-4)


# -- real files from other tools and scanners (../shared/data; skipped where absent) --------------------------


def shared(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared test corpus not present ({path.name})")
    return path


def all_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def test_real_philips_ct_builds_a_regular_volume() -> None:
    vol = load_volume(all_files(shared("dcm_qa_ct", "philips_S201_std_brain_5mm")))
    assert vol.array.shape == (28, 512, 512) and vol.regular
    assert vol.spacing[0] == pytest.approx(5.0, abs=0.01)
    assert -1100 < vol.array.min() < -900  # HU after rescale


@pytest.mark.parametrize(
    "folder, code",
    [
        (("dcm_qa_ct", "ge_head_tilt_variable_spacing"), "gantry-tilt"),
        (("dicom2nifti", "failing", "gantrytilting"), "gantry-tilt"),
        (("dicom2nifti", "failing", "notavolume"), "duplicate-positions"),
        (("dicom2nifti", "failing", "slicecount"), "too-few-slices"),
        (("dicom2nifti", "failing", "sliceorientation"), "mixed-stacks"),
    ],
)
def test_real_problem_series_are_refused_with_a_reason(folder: tuple[str, ...], code: str) -> None:
    with pytest.raises(VolumeError) as err:
        load_volume(all_files(shared(*folder)))
    assert err.value.code == code


# -- evidence that a stack is complete (used to finish a series before its quiet period) -------------------


def geometries(info) -> list:  # noqa: ANN001
    from edge_runtime.imaging.geometry import SliceGeometry

    return [SliceGeometry.from_dataset(pydicom.dcmread(p, stop_before_pixels=True)) for p in info.paths]


def test_a_whole_regular_stack_is_evidence_of_completion(tmp_path: Path) -> None:
    from edge_runtime.imaging.geometry import SliceGeometry, stack_evidence

    info = write_series(ramp(), SPACING, tmp_path, shuffle_files=True)
    geos = geometries(info)
    assert stack_evidence(geos).complete
    assert SliceGeometry.from_json(geos[0].to_json()) == geos[0]


def test_partial_stacks_are_not_evidence(tmp_path: Path) -> None:
    from edge_runtime.imaging.geometry import stack_evidence

    geos = geometries(write_series(ramp(), SPACING, tmp_path / "a"))
    every_other = stack_evidence(geos[::2])
    assert not every_other.complete and "exceeds slice thickness" in every_other.reason
    assert stack_evidence(geos[:3] + geos[4:]).reason == "missing-slices"
    counted = geometries(write_series(ramp(), SPACING, tmp_path / "b", extra={"ImagesInAcquisition": 8}))
    assert stack_evidence(counted).complete
    half = stack_evidence(counted[:4])
    assert not half.complete and half.reason == "4 of 8 expected instances"


def test_repeated_echoes_are_split_and_the_first_stack_used(tmp_path: Path) -> None:
    first = write_series(ramp(), SPACING, tmp_path / "e1", extra={"EchoNumbers": 1})
    second = write_series(
        ramp() + 1000,
        SPACING,
        tmp_path / "e2",
        study_uid=first.study_uid,
        series_uid=first.series_uid,
        frame_of_reference_uid=first.frame_of_reference_uid,
        extra={"EchoNumbers": 2},
    )
    vol = load_volume(files(second) + files(first))
    assert vol.array.shape[0] == 8 and vol.array.max() < 1000  # echo 1
    assert "2 stacks at the same positions" in vol.notes[0]


def test_real_enhanced_mr_builds_from_functional_groups() -> None:
    folder = shared("dcm_qa_enh", "siemens_XA10_enhanced_MR")
    vol = load_volume([folder / "6_1.dcm"])
    assert vol.multiframe and vol.array.shape == (6, 64, 64) and vol.regular
    assert vol.spacing[0] == pytest.approx(2.4, abs=0.01)


def test_slices_decoded_on_arrival_build_the_same_volume(tmp_path: Path) -> None:
    from edge_runtime.imaging.volume import SliceCache

    info = write_series(ramp(), SPACING, tmp_path, shuffle_files=True)
    cache = SliceCache()
    assert all(cache.add(p) for p in info.paths[:5])  # the rest is read from disk as usual
    cached = load_volume(files(info), cache=cache)
    np.testing.assert_array_equal(cached.array, load_volume(files(info)).array)
    assert [str(d.SOPInstanceUID) for d in cached.datasets] == list(info.sop_instance_uids)
    cache.forget(info.paths)
    assert len(cache) == 0
    tiny = SliceCache(max_bytes=1)
    assert tiny.add(info.paths[0]) and not tiny.add(info.paths[1])  # full: later slices are not cached
