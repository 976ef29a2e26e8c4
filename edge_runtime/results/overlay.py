"""The result for viewers without SEG support: colour Secondary Capture images with the outlines and a legend
burned in, and a Key Object Selection document (TID 2010) that points at them.

Any PACS viewer shows a Secondary Capture. Each image is one source slice, windowed (CT: soft tissue, L 40 /
W 400; other modalities: the slice's 1st to 99th percentile), with the outline of every segment on it drawn
in the segment's colour, and a legend panel on the right naming them and saying what the image is: derived from
an automatic segmentation, not for primary diagnosis (also in Image Type DERIVED\\SECONDARY, Burned In
Annotation YES, Series Description and Derivation Description).

Which slices: each present segment is shown on the slice where its area is largest, unless a slice already
chosen shows at least half that area (segments are taken largest first), so that a many-class model gives a
handful of images rather than one per class.
"""

from __future__ import annotations

from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian
from scipy import ndimage

from edge_runtime import __version__
from edge_runtime.dicom import derive_uid
from edge_runtime.extras import require
from edge_runtime.imaging.volume import Volume
from edge_runtime.inference.package import Label, ModelPackage
from edge_runtime.results.display import grey_levels
from edge_runtime.results.formats import OVERLAY
from edge_runtime.results.series_result import MANUFACTURER, SeriesResult

__all__ = ["OverlayObjects", "build_overlays", "choose_slices"]

#: the Secondary Capture series' Series Number: the BINARY SEG's + this; the KOS's: + 1 more
SERIES_OFFSET = 4
NOT_FOR_DIAGNOSIS = "derived, not for primary diagnosis"
LEGEND_WIDTH = 260
LINE = 18


@dataclass(frozen=True)
class OverlayObjects:
    """The Secondary Capture images (in slice order) and the Key Object Selection that references them."""

    images: list[Dataset]
    selection: Dataset


def slice_areas(labels: np.ndarray, values: list[int]) -> np.ndarray:
    """(len(values), slices): the pixel count of each label value on each slice, in one pass over the labels."""
    top = max(values, default=0) + 1
    areas = np.zeros((top, len(labels)), np.int64)
    for z, plane in enumerate(labels):
        counts = np.bincount(plane.ravel(), minlength=top)
        areas[:, z] = counts[:top]
    return areas[values]


def choose_slices(labels: np.ndarray, values: list[int], share: float = 0.5) -> dict[int, list[int]]:
    """Slice index -> the label values shown there (see the module notes); absent labels are not shown."""
    areas = slice_areas(labels, values)
    shown: dict[int, list[int]] = {}
    for k in np.argsort(-areas.max(axis=1, initial=0), kind="stable"):
        best = int(areas[k].max(initial=0))
        if best == 0:
            continue
        reuse = [z for z in shown if areas[k, z] >= share * best]
        z = max(reuse, key=lambda s: areas[k, s]) if reuse else int(areas[k].argmax())
        shown.setdefault(z, []).append(values[k])
    return dict(sorted(shown.items()))


def _grey(volume: Volume, z: int) -> np.ndarray:
    """The slice as 8-bit grey (see the module notes for the window)."""
    return (grey_levels(volume.array[z], volume.modality) * 255.0 + 0.5).astype(np.uint8)


def _render(volume: Volume, labels: np.ndarray, z: int, shown: list[Label], package: ModelPackage) -> np.ndarray:
    """One slice with the outlines of every label on it and the legend panel, as (rows, columns, 3) uint8 RGB."""
    pil_image = require("PIL.Image", feature="overlay results", package="Pillow")
    pil_draw = require("PIL.ImageDraw", feature="overlay results", package="Pillow")
    pil_font = require("PIL.ImageFont", feature="overlay results", package="Pillow")
    grey = _grey(volume, z)
    rows, cols = grey.shape
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    thick = max(rows, cols) >= 256  # two-pixel outlines on full-size images, to be seen
    plane = labels[z]
    boxes = ndimage.find_objects(plane, max_label=max(label.value for label in package.labels))
    on_slice = [label for label in package.labels if boxes[label.value - 1] is not None]
    for label in on_slice:
        box = boxes[label.value - 1]
        grown = tuple(slice(max(b.start - 1, 0), b.stop + 1) for b in box)  # the outline needs the box's edge
        mask = plane[grown] == label.value
        edge = mask & ~ndimage.binary_erosion(mask)
        if thick:
            edge = ndimage.binary_dilation(edge) & mask
        rgb[grown][edge] = label.color
    height = max(rows, LINE * (len(on_slice) + 5))
    canvas = np.zeros((height, cols + LEGEND_WIDTH, 3), np.uint8)
    canvas[:rows, :cols] = rgb
    image = pil_image.fromarray(canvas)
    draw = pil_draw.Draw(image)
    font = pil_font.load_default(size=14)
    x, y = cols + 8, 4
    for text in ("AI RESULT", NOT_FOR_DIAGNOSIS, package.name[:32]):
        draw.text((x, y), text, fill=(255, 220, 0), font=font)
        y += LINE
    y += LINE // 2
    for label in on_slice:
        draw.rectangle((x, y + 3, x + 12, y + 15), fill=tuple(label.color))
        marker = " *" if label in shown else ""
        draw.text((x + 18, y), f"{label.name[:28]}{marker}", fill=(255, 255, 255), font=font)
        y += LINE
    return np.asarray(image, dtype=np.uint8)


def _orientation(direction: np.ndarray) -> str:
    """The patient orientation letter of a direction (its largest component): L/R, P/A, H/F."""
    axis = int(np.argmax(np.abs(direction)))
    return ("LR", "PA", "HF")[axis][0 if direction[axis] > 0 else 1]


def _secondary_capture(
    volume: Volume, z: int, pixels: np.ndarray, number: int, shown: list[Label], uid_seed: str, series_number: int
) -> Dataset:
    source = volume.datasets[0 if volume.multiframe else z]
    spacing = (float(volume.spacing[1]), float(volume.spacing[2]))
    image = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=derive_uid(uid_seed, "series", OVERLAY),
        series_number=series_number,
        sop_instance_uid=derive_uid(uid_seed, OVERLAY, str(z)),
        instance_number=number,
        manufacturer=MANUFACTURER,
        pixel_spacing=spacing,  # type: ignore[arg-type]  # highdicom 0.28 annotates it as ints; mm are floats
        patient_orientation=(_orientation(volume.row_direction), _orientation(volume.column_direction)),
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    image.ImageType = ["DERIVED", "SECONDARY"]
    image.BurnedInAnnotation = "YES"
    image.Laterality = source.get("Laterality", "")  # type 2C; the body part is not known here
    image.RecognizableVisualFeatures = "NO"
    image.SeriesDescription = f"AI overlays, {NOT_FOR_DIAGNOSIS}"[:64]
    names = ", ".join(label.name for label in shown)
    image.DerivationDescription = f"Automatic segmentation outlines ({names}); {NOT_FOR_DIAGNOSIS}"[:1024]
    image.SoftwareVersions = f"edge-runtime {__version__}"
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if volume.multiframe and volume.frames is not None:
        reference.ReferencedFrameNumber = volume.frames[z] + 1
    image.SourceImageSequence = [reference]
    return image


def build_overlays(result: SeriesResult) -> OverlayObjects:
    """The overlay images of ``result.labels`` (the package's label values) on its volume and their Key Object
    Selection; with no segment present, a single image of the middle slice says so in its legend."""
    volume, package, uid_seed = result.volume, result.package, result.uid_seed
    device_serial_number = result.device_serial_number
    labels = np.asarray(result.labels)
    if labels.shape != volume.array.shape:
        raise ValueError(f"labels are {labels.shape}; the volume is {volume.array.shape}")
    by_value = {label.value: label for label in package.labels}
    slices = choose_slices(labels, list(by_value)) or {len(labels) // 2: []}
    base = result.seg_series_number + SERIES_OFFSET
    images = [
        _secondary_capture(
            volume,
            z,
            _render(volume, labels, z, [by_value[v] for v in values], package),
            number,
            [by_value[v] for v in values],
            uid_seed,
            base,
        )
        for number, (z, values) in enumerate(slices.items(), start=1)
    ]
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derive_uid("edge-runtime device", device_serial_number),
            name=MANUFACTURER,
            model_name=package.name[:64],
            serial_number=device_serial_number,
        ),
    )
    selection = hd.ko.KeyObjectSelectionDocument(
        evidence=images,
        content=hd.ko.KeyObjectSelection(
            document_title=codes.DCM.OfInterest,
            referenced_objects=images,
            observer_device_context=device,
            description=f"AI overlays of {package.name}: {NOT_FOR_DIAGNOSIS}"[:1024],
        ),
        series_instance_uid=derive_uid(uid_seed, "series", OVERLAY, "kos"),
        series_number=base + 1,
        sop_instance_uid=derive_uid(uid_seed, OVERLAY, "kos"),
        instance_number=1,
        manufacturer=MANUFACTURER,
    )
    selection.SeriesDescription = f"AI key images, {NOT_FOR_DIAGNOSIS}"[:64]
    return OverlayObjects(images, selection)
