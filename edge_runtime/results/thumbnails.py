"""Pictures of a result for the status page: the source with the segments overlaid in their package colours.

Three planes (axial, coronal, sagittal) through the centre of the segmented region, each as a small thumbnail
and a larger view, written once when the result is published into ``<result>/thumbs/``. A person looking at
them sees in two seconds that a liver was drawn in the lung; the page never decodes DICOM to show them.

Every picture is a square canvas (:data:`THUMB_SIZE` or :data:`LARGE_SIZE` pixels) with the plane fitted into it
at its true physical aspect (pixel spacing and slice spacing), superior up in the coronal and sagittal planes.
Segments are filled with their colour at :data:`FILL_ALPHA` and outlined in the exact package colour, so the
outline is the label's colour even where the fill blends with the anatomy. The pictures carry no text, hence no
patient data: only pixels.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from edge_runtime.dicom import write_atomic
from edge_runtime.imaging.volume import Volume
from edge_runtime.inference.package import ModelPackage
from edge_runtime.results.display import grey_levels

log = logging.getLogger(__name__)

PLANES = ("axial", "coronal", "sagittal")
THUMB_SIZE = 256
LARGE_SIZE = 768
FILL_ALPHA = 0.35
THUMBS_DIR = "thumbs"


def thumbnail_name(plane: str, large: bool = False) -> str:
    """File name of one picture inside ``thumbs/`` (the page and the renderer agree through this)."""
    return f"{plane}-large.png" if large else f"{plane}.png"


def render_thumbnails(directory: Path, volume: Volume, labels: np.ndarray, package: ModelPackage) -> list[Path]:
    """Write every plane as a thumbnail and a large view into ``directory/thumbs``; the files written."""
    out = directory / THUMBS_DIR
    out.mkdir(parents=True, exist_ok=True)
    palette = _palette(package, int(labels.max(initial=0)))
    written = []
    for plane, image, label_map, height_mm, width_mm in _planes(volume, labels):
        grey = grey_levels(image, volume.modality)
        for large, size in ((False, THUMB_SIZE), (True, LARGE_SIZE)):
            canvas = _compose(grey, label_map, palette, (height_mm, width_mm), size)
            buffer = io.BytesIO()
            Image.fromarray(canvas, "RGB").save(buffer, format="PNG", compress_level=1)
            written.append(write_atomic(out / thumbnail_name(plane, large), buffer.getvalue()))
    return written


def publish_thumbnails(
    directory: Path, volume: Volume, labels: np.ndarray, package: ModelPackage, series: str
) -> list[Path]:
    """:func:`render_thumbnails`, for the worker: a picture that cannot be written (disk full, a volume too small
    to show) is logged and skipped, since the result it illustrates must still be published and sent."""
    try:
        return render_thumbnails(directory, volume, labels, package)
    except (OSError, ValueError) as exc:
        log.warning("series %s: thumbnails not written: %s", series, exc)
        return []


# -- planes ------------------------------------------------------------------------------------------------


def _planes(volume: Volume, labels: np.ndarray) -> Iterator[tuple[str, np.ndarray, np.ndarray, float, float]]:
    """(plane, image, labels, height in mm, width in mm) for each plane through the segmented region's centre."""
    array = volume.array
    if array.ndim != 3 or labels.shape != array.shape:
        raise ValueError(f"labels {labels.shape} do not match the volume {array.shape}")
    dz, dy, dx = (abs(float(s)) for s in volume.spacing)
    z, y, x = _centre(labels)
    # slices ascend along the normal; when the normal points to the head (+z in LPS), superior is the last slice
    up = slice(None, None, -1) if float(volume.normal[2]) >= 0 else slice(None)
    n_z, n_y, n_x = array.shape
    yield "axial", array[z], labels[z], n_y * dy, n_x * dx
    yield "coronal", array[up, y, :], labels[up, y, :], n_z * dz, n_x * dx
    yield "sagittal", array[up, :, x], labels[up, :, x], n_z * dz, n_y * dy


def _centre(labels: np.ndarray) -> tuple[int, int, int]:
    """The centre of the segmented voxels' bounding box (the volume's centre when nothing was segmented): the
    three planes through it cross the segmented region along its whole extent in each direction."""
    found = [np.flatnonzero(labels.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1))]
    if any(len(f) == 0 for f in found):
        return labels.shape[0] // 2, labels.shape[1] // 2, labels.shape[2] // 2
    z, y, x = ((int(f[0]) + int(f[-1])) // 2 for f in found)
    return z, y, x


# -- pixels ------------------------------------------------------------------------------------------------


def _palette(package: ModelPackage, max_value: int) -> np.ndarray:
    """RGB per label value (row 0, background, unused); values the package does not name are drawn white."""
    palette = np.full((max(max_value, max((lab.value for lab in package.labels), default=0)) + 1, 3), 255, np.uint8)
    for label in package.labels:
        palette[label.value] = label.color
    return palette


def _fit(height_mm: float, width_mm: float, size: int) -> tuple[int, int]:
    """Pixel height and width of a plane fitted into a ``size`` square at its physical aspect."""
    scale = size / max(height_mm, width_mm, 1e-6)
    return max(1, min(size, round(height_mm * scale))), max(1, min(size, round(width_mm * scale)))


def _compose(
    grey: np.ndarray, labels: np.ndarray, palette: np.ndarray, extent_mm: tuple[float, float], size: int
) -> np.ndarray:
    """The plane as RGB on a black ``size`` square: grey resampled smoothly, labels by nearest neighbour (a
    label value is never interpolated), filled translucently and outlined in their own colour."""
    height, width = _fit(*extent_mm, size)
    smooth = Image.fromarray(np.ascontiguousarray(grey, dtype=np.float32), "F").resize(
        (width, height), Image.Resampling.BILINEAR
    )
    rgb = np.repeat((np.asarray(smooth) * 255.0)[:, :, None], 3, axis=2)
    rows = (np.arange(height) * labels.shape[0] // height).clip(0, labels.shape[0] - 1)
    cols = (np.arange(width) * labels.shape[1] // width).clip(0, labels.shape[1] - 1)
    lab = labels[np.ix_(rows, cols)].astype(np.intp)
    inside = lab > 0
    colour = palette[lab].astype(np.float32)
    rgb[inside] = (1.0 - FILL_ALPHA) * rgb[inside] + FILL_ALPHA * colour[inside]
    edge = inside & _boundary(lab)
    rgb[edge] = colour[edge]
    canvas = np.zeros((size, size, 3), np.uint8)
    top, left = (size - height) // 2, (size - width) // 2
    canvas[top : top + height, left : left + width] = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    return canvas


def _boundary(lab: np.ndarray) -> np.ndarray:
    """Pixels whose label differs from one of their four neighbours (the image border counts as background)."""
    padded = np.pad(lab, 1)
    centre = padded[1:-1, 1:-1]
    return (
        (padded[:-2, 1:-1] != centre)
        | (padded[2:, 1:-1] != centre)
        | (padded[1:-1, :-2] != centre)
        | (padded[1:-1, 2:] != centre)
    )
