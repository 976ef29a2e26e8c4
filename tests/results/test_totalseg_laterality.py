"""Laterality from TotalSegmentator's SNOMED CT mapping, through the manifest into every result format.

TotalSegmentator codes a paired structure as one type with a side (kidney_left: Kidney + Left) and a finding in
an organ as a type in a region with a side (kidney_cyst_left: Cyst in Kidney, Left). The labels here are coded by
``export.totalsegmentator.snomed_labels`` and checked against the mapping file itself; the objects are judged by
dciodvfy (which warns about a modifier nested where the IOD has none), read back by highdicom (SEGs and SR) and
parsed by dcmjs, through the adapter OHIF loads a SEG with.
"""

from __future__ import annotations

import csv
import importlib.resources
import json
import subprocess
import time
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from edge_runtime.errors import PackageError
from edge_runtime.inference.package import DEFAULT_PACKAGE, MANIFEST_NAME, ModelPackage
from edge_runtime.results.formats import FORMATS
from edge_runtime.results.publish import ResultFiles, write_results
from tests.peers import require_tool
from tests.results.readers import dciodvfy_new_errors, dcmjs_read
from tests.results.test_formats import Case, make_case

pytest.importorskip("totalsegmentator", reason="totalsegmentator is not installed (scripts/bootstrap --dev)")

#: sides, a side on a region, and a class without either (the case's label 4 is absent from its label map)
NAMES = ("kidney_left", "kidney_right", "kidney_cyst_left", "spleen")
#: the type modifier, anatomic region and region modifier sequences, as dciodvfy names their tags
MODIFIER_TAGS = ("(0x0062,0x0011)", "(0x0008,0x2218)", "(0x0008,0x2220)")


def _mapping() -> dict[str, dict[str, str]]:
    table = importlib.resources.files("totalsegmentator") / "resources" / "totalsegmentator_snomed_mapping.csv"
    with table.open(encoding="utf-8") as f:
        return {row["Structure"]: row for row in csv.DictReader(f)}


def _expected(name: str) -> tuple[str, list[str], str | None, list[str]]:
    """(type, type modifiers, anatomic region, its modifiers) of ``name`` as the mapping file codes it."""
    row = _mapping()[name]

    def values(column: str) -> list[str]:
        return [row[f"{column}.CodeValue"]] if row[f"{column}.CodeValue"] else []

    region = values("AnatomicRegionSequence")
    return (row["SegmentedPropertyTypeCodeSequence.CodeValue"], values("SegmentedPropertyTypeModifierCodeSequence"),
            region[0] if region else None, values("AnatomicRegionModifierSequence"))


def _package_folder(folder: Path, labels: list[dict]) -> Path:
    """The default package's manifest with ``labels``, beside links to its files."""
    folder.mkdir()
    manifest = json.loads((DEFAULT_PACKAGE / MANIFEST_NAME).read_text())
    manifest["labels"] = labels
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    for name in manifest["files"]:
        (folder / name).symlink_to(DEFAULT_PACKAGE / name)
    return folder


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[Case, ResultFiles]:
    from export.totalsegmentator import snomed_labels

    work = tmp_path_factory.mktemp("laterality")
    labels, missing = snomed_labels({i: (i, name) for i, name in enumerate(NAMES, start=1)})
    assert missing == []
    package = ModelPackage.load(_package_folder(work / "package", labels), verify_hashes=False)
    case = make_case(work / "series")
    case = Case(case.folder, case.volume, case.labels, case.probabilities, package)
    result = case.result(uid_seed="laterality", device_serial_number="TEST")
    files = write_results(work / "out", result, timings={}, t_start=time.perf_counter(), formats=FORMATS)
    assert files.not_written == {}
    return case, files


def _codes(segment: hd.seg.SegmentDescription) -> tuple[str, list[str], str | None, list[str]]:
    kind = segment.SegmentedPropertyTypeCodeSequence[0]
    regions = segment.anatomic_regions
    return (kind.value, [str(c.CodeValue) for c in kind.get("SegmentedPropertyTypeModifierCodeSequence", [])],
            regions[0].value if regions else None,
            [str(c.CodeValue) for c in regions[0].get("AnatomicRegionModifierSequence", [])] if regions else [])


def test_the_mapping_s_sides_reach_the_package_and_old_manifests_still_load(
        published: tuple[Case, ResultFiles], tmp_path: Path) -> None:
    case, _ = published
    got = {lab.name: lab for lab in case.package.labels}
    assert (got["kidney_left"].type_modifier.value, got["kidney_right"].type_modifier.value) == (  # type: ignore[union-attr]
        "7771000", "24028007")
    cyst = got["kidney_cyst_left"]
    assert (cyst.type_modifier, cyst.anatomic_region.meaning, cyst.anatomic_region_modifier.meaning) == (  # type: ignore[union-attr]
        None, "Kidney", "Left")
    assert (got["spleen"].type_modifier, got["spleen"].anatomic_region) == (None, None)
    # a manifest of before (no modifiers) loads as it did; a modifier is checked as any code is
    assert all(lab.type_modifier is None for lab in ModelPackage.load(DEFAULT_PACKAGE).labels)
    labels = json.loads((DEFAULT_PACKAGE / MANIFEST_NAME).read_text())["labels"]
    labels[0]["type_modifier"] = {"value": "7771000", "scheme": "SCT"}
    labels[1]["anatomic_region_modifier"] = labels[1]["type"]
    with pytest.raises(PackageError) as err:
        ModelPackage.load(_package_folder(tmp_path / "bad", labels), verify_hashes=False)
    assert "'labels[0].type_modifier' must be a code object" in str(err.value)
    assert "'labels[1].anatomic_region_modifier' needs an 'anatomic_region'" in str(err.value)


def test_every_seg_carries_the_sides_where_dicom_puts_them(published: tuple[Case, ResultFiles]) -> None:
    _, files = published
    expected = [_expected(name) for name in NAMES]
    assert expected[0][1] == ["7771000"] and expected[2][2:] == ("64033007", ["7771000"])  # the mapping as read
    for fmt in ("binary", "labelmap", "fractional"):
        (path,) = files.objects[fmt]
        seg = hd.seg.segread(path)
        assert [_codes(seg.get_segment_description(n)) for n in range(1, len(NAMES) + 1)] == expected, fmt
    for path in files.files:
        assert dciodvfy_new_errors(path) == [], path.name
        if path not in files.objects["labelmap"]:  # Debian's 2022 dciodvfy does not know the Label Map class
            out = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=120)
            lines = (out.stdout + out.stderr).splitlines()
            assert [line for line in lines if line.startswith("Error")] == [], path.name
            assert [line for line in lines if any(tag in line for tag in MODIFIER_TAGS)] == [], path.name


def test_the_sr_gives_each_side_as_the_finding_site_s_laterality(published: tuple[Case, ResultFiles]) -> None:
    _, files = published
    groups = hd.sr.srread(files.sr).content.get_volumetric_roi_measurement_groups()
    sites = [[(s.value.meaning, s.laterality.meaning if s.laterality else None) for s in g.finding_sites]
             for g in groups]
    assert sites == [[("Kidney", "Left")], [("Kidney", "Right")], [("Kidney", "Left")], []]
    assert [g.finding_type.meaning for g in groups] == ["Kidney", "Kidney", "Cyst", "Spleen"]


def test_the_rt_structure_set_identifies_each_roi_with_its_side(published: tuple[Case, ResultFiles]) -> None:
    case, files = published
    (path,) = files.objects["rtstruct"]
    observations = pydicom.dcmread(path).RTROIObservationsSequence
    present = [name for value, name in enumerate(NAMES, start=1) if (case.labels == value).any()]
    assert len(observations) == len(present) == 3  # an absent label has no ROI

    def codes(o: pydicom.Dataset) -> tuple[str, list[str], str | None, list[str]]:
        kind, regions = o.RTROIIdentificationCodeSequence[0], o.get("AnatomicRegionSequence", [])
        return (kind.CodeValue, [c.CodeValue for c in kind.get("SegmentedPropertyTypeModifierCodeSequence", [])],
                regions[0].CodeValue if regions else None,
                [c.CodeValue for c in regions[0].get("AnatomicRegionModifierSequence", [])] if regions else [])

    assert [codes(o) for o in observations] == [_expected(name) for name in present]


def test_dcmjs_hands_the_sides_to_the_viewer(published: tuple[Case, ResultFiles], tmp_path: Path) -> None:
    case, files = published
    sources = [Path(d.filename) for d in case.volume.datasets]
    read = dcmjs_read(sources, files.objects["binary"], [], tmp_path)
    (seg,) = read["segs"]
    expected = [{"type": t, "typeModifiers": tm, "region": r, "regionModifiers": rm}
                for t, tm, r, rm in (_expected(name) for name in NAMES)]
    for item in expected:
        if item["region"] is None:
            del item["region"]  # undefined in JavaScript: absent from the JSON
    assert seg["segmentCodes"] == expected
    assert seg["toolState"]["segmentCodes"] == expected, seg.get("toolStateError")
