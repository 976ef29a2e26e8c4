"""Applicability: the bundled package's declared domain, checked on phantoms and on real CTs of the corpus.

No inference here: the check runs on the loaded volume before any model does.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from edge_runtime.errors import PackageError
from edge_runtime.imaging.volume import Volume, load_volume
from edge_runtime.inference.domain import Domain
from edge_runtime.inference.package import DEFAULT_PACKAGE, MANIFEST_NAME, ModelPackage
from phantom import make_phantom, write_series
from tests.peers import SHARED_DATA

PHILIPS = SHARED_DATA / "dcm_qa_ct" / "philips_S201_std_brain_5mm"
CT_3SLICE = SHARED_DATA / "dcmqi" / "segmentations" / "ct-3slice"


@pytest.fixture(scope="module")
def domain() -> Domain:
    package = ModelPackage.load(DEFAULT_PACKAGE, verify_hashes=False)
    assert package.domain is not None, "the bundled package declares its domain"
    return package.domain


@pytest.fixture(scope="module")
def torso(tmp_path_factory: pytest.TempPathFactory) -> Volume:
    """A phantom torso as the training covered it: 240 mm long, 336 mm across, 3 mm slices of 1.5 mm pixels."""
    ph = make_phantom((80, 224, 224), (3.0, 1.5, 1.5), rng=7)
    info = write_series(ph.hu, ph.spacing, tmp_path_factory.mktemp("torso"), rng=7)
    return load_volume(info.paths)


def real_series(folder: Path, count: int | None = None) -> Volume:
    if not folder.is_dir():
        pytest.skip(f"{folder.name} is not here because the shared corpus (../shared/data) is absent")
    return load_volume(slab(folder, count))


def slab(folder: Path, count: int | None = None) -> list[Path]:
    """The files of an axial series in table order, the first ``count`` of them: a contiguous slab."""
    paths = [p for p in folder.iterdir() if p.is_file() and p.suffix in (".dcm", "")]
    paths.sort(key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))
    return paths[:count] if count else paths


def test_a_phantom_torso_is_inside_the_domain(domain: Domain, torso: Volume) -> None:
    verdict = domain.check(torso)
    assert verdict.inside, verdict.summary
    assert verdict.notes == ()


def test_a_real_head_ct_slab_is_outside_with_each_reason(domain: Domain) -> None:
    """20 slices of the Philips head phantom (Body Part BRAIN), the case of the issue."""
    verdict = domain.check(real_series(PHILIPS, 20))
    assert not verdict.inside
    checks = dict(verdict.problems)
    assert checks["body-part"].startswith("body part BRAIN not in CHEST")
    assert checks["z-extent"] == "z extent 100 mm < 240 mm"  # 20 slices 5 mm apart
    assert checks["y-extent"] == "y extent 231 mm < 330 mm"
    assert checks["intensity-body"].startswith("body median ")  # plastic, not soft tissue
    assert "z extent 100 mm < 240 mm" in verdict.summary and verdict.mark.startswith("OUT OF DOMAIN: ")
    assert len(verdict.mark) <= 64


def test_no_real_ct_of_the_corpus_is_inside_a_torso_domain(domain: Domain) -> None:
    """The corpus has head CTs and tiny slabs only: each is outside, for its extent at least."""
    for folder in (PHILIPS, CT_3SLICE):
        verdict = domain.check(real_series(folder))
        assert "z-extent" in verdict.checks_failed, (folder.name, verdict.summary)


def test_a_lost_rescale_is_caught_by_the_intensity_check(domain: Domain, torso: Volume) -> None:
    """Stored values read as HU (Rescale Intercept -1024 ignored): air sits at 0."""
    shifted = domain.check(dataclasses.replace(torso, array=torso.array + 1024))
    assert shifted.checks_failed[0] == "intensity-air", shifted.summary
    assert shifted.problems[0][1].startswith("air (5th percentile) ") and shifted.problems[0][1].endswith("> -850 HU")
    doubled = domain.check(dataclasses.replace(torso, array=torso.array * 2))
    assert "intensity-air" in doubled.checks_failed, doubled.summary


def test_padding_outside_the_reconstruction_circle_is_not_air(domain: Domain, torso: Volume) -> None:
    padded = torso.array.copy()
    yy, xx = np.mgrid[: padded.shape[1], : padded.shape[2]]
    outside = (yy - 111.5) ** 2 + (xx - 111.5) ** 2 > 112**2
    padded[:, outside] = -3024.0
    assert domain.check(dataclasses.replace(torso, array=padded)).inside


def test_a_derived_series_and_a_missing_body_part(domain: Domain, tmp_path: Path) -> None:
    """(Localizers never reach the check: the volume builder sets them aside.)"""
    ph = make_phantom((80, 224, 224), (3.0, 1.5, 1.5), rng=8)
    reformat = write_series(
        ph.hu, ph.spacing, tmp_path / "a", rng=8, extra={"ImageType": ["DERIVED", "SECONDARY", "REFORMATTED"]}
    )
    verdict = domain.check(load_volume(reformat.paths))
    assert dict(verdict.problems) == {"image-type": "image type DERIVED is excluded"}
    anonymous = write_series(ph.hu, ph.spacing, tmp_path / "b", rng=8, extra={"BodyPartExamined": None})
    verdict = domain.check(load_volume(anonymous.paths))
    assert verdict.inside and verdict.notes == ("no Body Part Examined: body part not checked",)
    strict = dataclasses.replace(domain, require_body_part=True)
    assert strict.check(load_volume(anonymous.paths)).checks_failed == ["body-part"]


def test_a_bad_domain_section_names_every_problem(tmp_path: Path) -> None:
    folder = tmp_path / "pkg"
    shutil.copytree(DEFAULT_PACKAGE, folder)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["domain"].update(
        {"extent_mm": {"z": [300, 200]}, "contrast": "maybe", "spacing_mm": {"w": [1, 2]}, "colour": 1}
    )
    manifest["confidence"] = {"low": 1.5}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(PackageError) as caught:
        ModelPackage.load(folder, verify_hashes=False)
    text = str(caught.value)
    for needle in (
        "'domain.extent_mm.z' has min 300 > max 200",
        "'domain.contrast' is 'maybe'",
        "'domain.spacing_mm' must be an object with keys z, y, x",
        "unknown key(s) colour",
        "'confidence.low' must be a number in [0, 1]",
    ):
        assert needle in text, text


def test_a_manifest_without_a_domain_still_loads(tmp_path: Path) -> None:
    folder = tmp_path / "pkg"
    shutil.copytree(DEFAULT_PACKAGE, folder)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    del manifest["domain"], manifest["confidence"]
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    package = ModelPackage.load(folder, verify_hashes=False)
    assert package.domain is None and package.confidence.flag_below == 0.7
