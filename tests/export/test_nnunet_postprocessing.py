"""nnU-Net's postprocessing.pkl: read as data at export (nothing in it is run), applied by the runtime with scipy's
connected components, and checked against nnunetv2's own ``apply_postprocessing`` on the same label maps. The
gate with a postprocessing.pkl beside the folds runs in tests/inference/test_nnunet_regions.py."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_runtime.inference.nnunet.postprocessing import KeepLargestComponent, apply_postprocessing
from export.loaders.base import LoaderError
from export.nnunet_postprocessing import find_postprocessing, read_postprocessing

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]


def _theirs():  # noqa: ANN202
    pytest.importorskip("nnunetv2", reason="nnunetv2 is not installed (scripts/bootstrap --dev installs it)")
    import nnunetv2.postprocessing.remove_connected_components as theirs

    return theirs


def nnunet_pickle(path: Path, kwargs: list[dict]) -> tuple[list, list[dict]]:
    """A postprocessing.pkl as nnUNetv2_find_best_configuration writes it (nnunetv2's function and save_pickle),
    with nnU-Net's kinds of arguments: numpy integer labels (LabelManager's np.unique), a lone region tuple, a list
    of labels and regions."""
    from batchgenerators.utilities.file_and_folder_operations import save_pickle  # type: ignore[import-untyped]

    fns = [_theirs().remove_all_but_largest_component_from_segmentation] * len(kwargs)
    save_pickle((fns, kwargs), str(path))
    return fns, kwargs


KWARGS: list[dict[str, Any]] = [{"labels_or_regions": list(np.unique([3, 1, 2]))},  # the whole foreground, numpy ints
          {"labels_or_regions": (2, 3)},  # one region
          {"labels_or_regions": [np.int64(1), (2, 3)], "background_label": 0}]


def _label_map(seed: int, shape: tuple[int, ...] = (18, 26, 22)) -> np.ndarray:
    """Blobs of labels 1..3 of many sizes, some touching only at an edge or a corner."""
    rng = np.random.default_rng(seed)
    from scipy import ndimage

    noise = ndimage.gaussian_filter(rng.normal(size=shape), 1.2)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[noise > 0.05] = 1
    labels[noise > 0.12] = 2
    labels[noise > 0.2] = 3
    labels[rng.random(shape) < 0.01] = 2  # single voxels: diagonal neighbours test the connectivity
    return labels


def test_the_pickle_becomes_steps_that_do_what_nnunets_functions_do(tmp_path: Path) -> None:
    theirs = _theirs()
    fns, kwargs = nnunet_pickle(tmp_path / "postprocessing.pkl", KWARGS)
    steps = read_postprocessing(tmp_path / "postprocessing.pkl")
    assert steps == (KeepLargestComponent((1, 2, 3)), KeepLargestComponent(((2, 3),)),
                     KeepLargestComponent((1, (2, 3))))
    for seed in range(4):
        labels = _label_map(seed)
        expected = theirs.apply_postprocessing(labels, fns, kwargs)
        got = apply_postprocessing(labels, steps)
        assert int((expected != labels).sum()) > 0  # the steps change something
        np.testing.assert_array_equal(got, expected)
        for fn_kwargs, step in zip(kwargs, steps, strict=True):  # and each step alone
            np.testing.assert_array_equal(step.apply(labels), fns[0](labels, **fn_kwargs))
    flat = _label_map(9, (1, 40, 40))[0]  # 2D label maps: 8-connectivity as skimage's default
    np.testing.assert_array_equal(apply_postprocessing(flat, steps), theirs.apply_postprocessing(flat, fns, kwargs))


def test_ties_keep_every_largest_component_as_nnunet_does() -> None:
    theirs = _theirs()
    labels = np.zeros((5, 9, 9), dtype=np.uint8)
    labels[1:3, 1:3, 1:3] = 1
    labels[1:3, 5:7, 5:7] = 1
    labels[4, 8, 0] = 1
    step = KeepLargestComponent((1,))
    expected = theirs.remove_all_but_largest_component_from_segmentation(labels, 1)
    np.testing.assert_array_equal(step.apply(labels), expected)
    assert int(expected.sum()) == 16


class _Boom:
    def __reduce__(self) -> tuple:
        return (os.system, ("touch should-never-exist",))


def test_a_pickle_that_names_anything_else_is_refused_without_running_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "postprocessing.pkl"
    path.write_bytes(pickle.dumps(([_Boom()], [{}])))
    with pytest.raises(LoaderError, match="not part of nnU-Net's post-processing"):
        read_postprocessing(path)
    assert not (tmp_path / "should-never-exist").exists()
    path.write_bytes(pickle.dumps(([print], [{}])))
    with pytest.raises(LoaderError, match="builtins.print"):
        read_postprocessing(path)
    path.write_bytes(b"not a pickle")
    with pytest.raises(LoaderError):
        read_postprocessing(path)


def test_the_file_is_found_where_nnunet_writes_it(tmp_path: Path) -> None:
    assert find_postprocessing(tmp_path, ["0", "1"]) is None
    (tmp_path / "postprocessing.pkl").write_bytes(b"")
    assert find_postprocessing(tmp_path, ["0", "1"]) == tmp_path / "postprocessing.pkl"
    crossval = tmp_path / "crossval_results_folds_0_1"
    crossval.mkdir()
    (crossval / "postprocessing.pkl").write_bytes(b"")
    assert find_postprocessing(tmp_path, ["0", "1"]) == crossval / "postprocessing.pkl"


def test_the_manifest_records_the_steps_and_a_switch() -> None:
    from dataclasses import replace

    from edge_runtime.inference.nnunet.settings import parse_nnunet
    from tests.inference.test_nnunet_pipeline import _settings

    settings = replace(_settings(), postprocessing=(KeepLargestComponent((1, (2, 3))),))
    section = settings.to_dict()
    assert section["postprocessing"] == [{"function": "remove_all_but_largest_component_from_segmentation",
                                          "background_label": 0, "labels_or_regions": [1, [2, 3]]}]
    problems: list[str] = []
    assert parse_nnunet(section, problems) == settings and settings.active_postprocessing
    off = parse_nnunet(section | {"use_postprocessing": False}, problems)
    assert off is not None and off.postprocessing and off.active_postprocessing == ()
    bad = section | {"postprocessing": [{"function": "os.system"}, {"function": section["postprocessing"][0]
                                                                    ["function"], "labels_or_regions": "x"}]}
    assert parse_nnunet(bad, problems) is None and len(problems) == 2 and "os.system" in problems[0]
