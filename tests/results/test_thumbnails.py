"""The pictures of a result: three planes through the segmented region, the segments in their package colours."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from edge_runtime.imaging.volume import load_volume
from edge_runtime.inference.package import DEFAULT_PACKAGE, ModelPackage
from edge_runtime.results.thumbnails import LARGE_SIZE, PLANES, THUMB_SIZE, render_thumbnails, thumbnail_name
from phantom import make_phantom, write_series


def pixels(path: Path) -> np.ndarray:
    """The picture as an RGB array (rows, columns, 3)."""
    with Image.open(path) as image:
        assert image.mode == "RGB"
        return np.asarray(image)


def colours_in(path: Path) -> set[tuple[int, int, int]]:
    found = pixels(path).reshape(-1, 3)
    return {tuple(int(v) for v in p) for p in np.unique(found, axis=0)}  # type: ignore[misc]


def test_every_plane_shows_the_segments_in_their_package_colours(tmp_path: Path) -> None:
    phantom = make_phantom((24, 64, 80), (2.5, 4.0, 4.0), rng=3)
    volume = load_volume(write_series(phantom.hu, phantom.spacing, tmp_path / "ct").paths)
    package = ModelPackage.load(DEFAULT_PACKAGE)
    labels = np.zeros(volume.array.shape, np.uint8)
    liver, bone = (next(lab for lab in package.labels if lab.name == name) for name in ("Liver", "Bone"))
    labels[8:16, 20:40, 20:50] = liver.value  # a box: every plane through its centre cuts it
    labels[10:14, 45:50, 30:34] = bone.value

    written = render_thumbnails(tmp_path / "result", volume, labels, package)

    assert sorted(p.name for p in written) == sorted(thumbnail_name(p, big) for p in PLANES for big in (False, True))
    for plane in PLANES:
        assert pixels(tmp_path / "result" / "thumbs" / thumbnail_name(plane)).shape == (THUMB_SIZE, THUMB_SIZE, 3)
        assert pixels(tmp_path / "result" / "thumbs" / thumbnail_name(plane, True)).shape == (LARGE_SIZE, LARGE_SIZE, 3)
        assert liver.color in colours_in(tmp_path / "result" / "thumbs" / thumbnail_name(plane)), plane
    # the bone box lies off the centre in y and x: only the axial plane crosses it
    assert bone.color in colours_in(tmp_path / "result" / "thumbs" / "axial-large.png")
    assert bone.color not in colours_in(tmp_path / "result" / "thumbs" / "sagittal-large.png")


def test_physical_aspect_is_kept_and_an_empty_result_still_has_pictures(tmp_path: Path) -> None:
    phantom = make_phantom((10, 64, 64), (5.0, 2.0, 2.0), rng=4)  # 50 mm tall, 128 mm wide
    volume = load_volume(write_series(phantom.hu, phantom.spacing, tmp_path / "ct").paths)
    package = ModelPackage.load(DEFAULT_PACKAGE)
    render_thumbnails(tmp_path / "r", volume, np.zeros(volume.array.shape, np.uint8), package)
    coronal = pixels(tmp_path / "r" / "thumbs" / "coronal.png")
    rows_with_image = np.flatnonzero(coronal.any(axis=(1, 2)))
    height = rows_with_image[-1] - rows_with_image[0] + 1
    assert abs(height - THUMB_SIZE * 50 / 128) <= 2, height
    assert not any(lab.color in colours_in(tmp_path / "r" / "thumbs" / "axial.png") for lab in package.labels)
