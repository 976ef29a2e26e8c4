"""Write a volume as a DICOM image series: one single-frame CT or MR Image Storage file per slice.

The series is what a scanner would send: geometry to the letter of the Image Plane module (gantry tilt, gaps,
irregular steps and any orientation included), file names and instance numbers in any order, and any transfer
syntax pydicom can encode. Tests, benchmarks and training push these series through the runtime, so the bytes
written for a given input and UIDs must not change.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRBigEndian, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pydicom.valuerep import format_number_as_ds

from phantom.generate import as_generator

CT_RESCALE_INTERCEPT = -1024.0
"""CT stored values are HU + 1024 (RescaleIntercept -1024, slope 1)."""

_SOP_CLASSES = {"CT": CTImageStorage, "MR": MRImageStorage}
_INSTANCE_NUMBER_ORDERS = ("spatial", "reversed", "random")
# the date and time of every phantom study, series and content
_DATE, _TIME = "20240101", "120000"


@dataclass
class SeriesInfo:
    """What :func:`write_series` wrote. Per-slice lists are in array (spatial) order."""

    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    paths: list[Path]
    sop_instance_uids: list[str]
    positions: list[tuple[float, float, float]]
    """ImagePositionPatient of each slice, as written."""
    orientation: tuple[float, float, float, float, float, float]
    """ImageOrientationPatient as written (tilted when a gantry tilt was asked for)."""
    instance_numbers: list[int]
    modality: str


def _ds(value: float) -> str:
    """A decimal string (DS) of at most 16 characters, rounded to 1 um; never "-0"."""
    return format_number_as_ds(float(round(value, 6)) + 0.0)


def _unit(v: np.ndarray, what: str) -> np.ndarray:
    n = float(np.linalg.norm(v))
    if not n > 1e-6:
        raise ValueError(f"{what} has zero length")
    return v / n


@dataclass
class _SliceGeometry:
    """Where the slices of a series lie, as the DS strings written and the table position of each slice."""

    image_positions: list[list[str]]
    """ImagePositionPatient of each slice, in spatial order."""
    image_orientation: list[str]
    """ImageOrientationPatient (row, then column direction cosines), tilted with the gantry."""
    table_positions: np.ndarray
    """SliceLocation of each slice: its position along the untilted slice normal (mm)."""

    @property
    def positions(self) -> list[tuple[float, float, float]]:
        return [(float(p[0]), float(p[1]), float(p[2])) for p in self.image_positions]

    @property
    def orientation(self) -> tuple[float, float, float, float, float, float]:
        o = [float(c) for c in self.image_orientation]
        return (o[0], o[1], o[2], o[3], o[4], o[5])


def _slice_geometry(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    iop: Sequence[float],
    origin: Sequence[float] | None,
    slice_positions: Sequence[float] | None,
    gantry_tilt_deg: float,
) -> _SliceGeometry:
    """Image Plane geometry of each slice; see :func:`write_series` for the conventions, tilt included."""
    nz, ny, nx = shape
    sz, sy, sx = spacing
    io = np.asarray(iop, dtype=np.float64)
    if io.shape != (6,):
        raise ValueError("iop must have six values")
    row = _unit(io[:3], "iop row")
    col0 = _unit(io[3:], "iop column")
    if abs(float(row @ col0)) > 1e-3:
        raise ValueError("iop row and column directions are not orthogonal")
    normal0 = np.cross(row, col0)
    t = math.radians(float(gantry_tilt_deg))
    if abs(t) >= math.radians(60):
        raise ValueError("gantry_tilt_deg must be within +-60 degrees")
    col = math.cos(t) * col0 - math.sin(t) * normal0
    step = normal0 / math.cos(t)  # IPP advance per mm along the tilted normal
    if slice_positions is None:
        d = np.arange(nz, dtype=np.float64) * sz
    else:
        d = np.asarray(slice_positions, dtype=np.float64)
        if d.shape != (nz,):
            raise ValueError(f"slice_positions needs {nz} values, got {d.shape}")
        if np.any(np.diff(d) < 0) or not np.all(np.isfinite(d)):
            raise ValueError("slice_positions must be finite and non-decreasing")
    if origin is None:
        o = -((nx - 1) / 2.0 * sx) * row - ((ny - 1) / 2.0 * sy) * col - (float(d[0] + d[-1]) / 2.0) * step
    else:
        o = np.asarray(origin, dtype=np.float64)
        if o.shape != (3,):
            raise ValueError("origin must be (x, y, z) in mm")
    ipp = o[None, :] + d[:, None] * step[None, :]
    return _SliceGeometry(
        image_positions=[[_ds(c) for c in p] for p in ipp],
        image_orientation=[_ds(c) for c in (*row, *col)],
        table_positions=ipp @ normal0,
    )


def _slice_order(
    nz: int,
    shuffle_files: bool | np.random.Generator,
    rng: np.random.Generator | int | None,
    instance_number_order: str,
) -> tuple[np.ndarray, np.ndarray]:
    """File-name index and InstanceNumber of each slice, in spatial order (the file shuffle is drawn first)."""
    if isinstance(shuffle_files, np.random.Generator):
        gen, shuffle = shuffle_files, True
    elif isinstance(shuffle_files, (bool, np.bool_)):
        gen, shuffle = as_generator(rng), bool(shuffle_files)
    else:
        raise TypeError("shuffle_files must be a bool or a numpy Generator")
    file_index = gen.permutation(nz) if shuffle else np.arange(nz)
    if instance_number_order == "spatial":
        instance_numbers = np.arange(1, nz + 1)
    elif instance_number_order == "reversed":
        instance_numbers = np.arange(nz, 0, -1)
    else:
        instance_numbers = gen.permutation(nz) + 1
    return file_index, instance_numbers


def _stored_values(vol: np.ndarray, modality: str, ts: UID) -> np.ndarray:
    """Pixel values as stored: signed 16 bit in the byte order of the transfer syntax (CT: HU + 1024)."""
    values = np.rint(vol.astype(np.float32, copy=False))
    if modality == "CT":
        values = values - CT_RESCALE_INTERCEPT
    stored = np.clip(values, -32768, 32767)
    return stored.astype(">i2" if ts == ExplicitVRBigEndian else "<i2")


def _patient_and_study(ds: Dataset, patient_name: str, patient_id: str, study_uid: str) -> None:
    """Patient and General Study attributes; the anonymous rest of them are present but empty."""
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate, ds.StudyTime = _DATE, _TIME
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""


def _series_and_equipment(ds: Dataset, modality: str, series_uid: str, number: int, description: str) -> None:
    """SOP Common (the class), General Series and General Equipment attributes."""
    ds.SOPClassUID = _SOP_CLASSES[modality]
    ds.SeriesInstanceUID = series_uid
    ds.SeriesDate, ds.SeriesTime = _DATE, _TIME
    ds.SeriesNumber = int(number)
    ds.SeriesDescription = description
    ds.Modality = modality
    ds.BodyPartExamined = "CHESTABDOMEN"
    ds.PatientPosition = "HFS"
    ds.Manufacturer = "edge_runtime"
    ds.ManufacturerModelName = "phantom"


def _acquisition(ds: Dataset, modality: str, slice_thickness: float, gantry_tilt_deg: float) -> None:
    """General Image and the CT Image or MR Image module: how the slices were acquired."""
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if modality == "CT" else "OTHER"]
    ds.ContentDate, ds.ContentTime = _DATE, _TIME
    ds.AcquisitionNumber = 1
    ds.SliceThickness = _ds(slice_thickness)
    if modality == "CT":
        ds.KVP = "120"
        ds.GantryDetectorTilt = _ds(float(gantry_tilt_deg)) if gantry_tilt_deg else "0"
    else:
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = "500"
        ds.EchoTime = "15"
        ds.EchoTrainLength = "1"
        ds.ImagedNucleus = "1H"
        ds.MagneticFieldStrength = "1.5"
        ds.SpacingBetweenSlices = _ds(slice_thickness)


def _plane_and_pixel(
    ds: Dataset,
    frame_of_reference_uid: str,
    orientation: list[str],
    shape: tuple[int, int],
    pixel_spacing: tuple[float, float],
) -> None:
    """Frame of Reference, the series-wide part of Image Plane, and Image Pixel (signed 16 bit, one sample)."""
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.ImageOrientationPatient = orientation
    ds.PixelSpacing = [_ds(pixel_spacing[0]), _ds(pixel_spacing[1])]
    ds.Rows, ds.Columns = shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1


def _rescale_and_window(ds: Dataset, modality: str, stored: np.ndarray) -> None:
    """CT: the HU rescale and a soft-tissue window; MR (no rescale): a window over the stored range."""
    if modality == "CT":
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.RescaleIntercept = _ds(CT_RESCALE_INTERCEPT)
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
    else:
        lo, hi = float(stored.min()), float(stored.max())
        ds.WindowCenter = _ds((lo + hi) / 2.0)
        ds.WindowWidth = _ds(max(hi - lo, 1.0))


def _apply_extra(ds: Dataset, extra: Mapping[str, Any] | None) -> None:
    """Set or override attributes by keyword; a value of None deletes the attribute."""
    for key, value in (extra or {}).items():
        if value is None:
            if key in ds:
                delattr(ds, key)
        else:
            setattr(ds, key, value)


def _encode(ds: Dataset, sop_class: UID, ts: UID, frame: np.ndarray) -> None:
    """File Meta of a Part 10 file, and the pixel data of ``frame`` encoded in transfer syntax ``ts``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ts
    ds.file_meta = meta
    if ts.is_compressed:
        ds.compress(ts, frame, generate_instance_uid=False)
    else:
        ds.PixelData = frame.tobytes()


def write_series(
    hu: np.ndarray,
    spacing: Sequence[float],
    out_dir: Path | str,
    *,
    modality: str = "CT",
    iop: Sequence[float] = (1, 0, 0, 0, 1, 0),
    origin: Sequence[float] | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    patient_name: str = "PHANTOM^CT",
    patient_id: str = "PH0001",
    series_number: int = 1,
    series_description: str = "Phantom CT",
    shuffle_files: bool | np.random.Generator = False,
    instance_number_order: str = "spatial",
    slice_positions: Sequence[float] | None = None,
    gantry_tilt_deg: float = 0.0,
    file_prefix: str = "ct",
    transfer_syntax: str = ExplicitVRLittleEndian,
    extra: Mapping[str, Any] | None = None,
    rng: np.random.Generator | int | None = None,
) -> SeriesInfo:
    """Write a volume ``(z, y, x)`` as one single-frame DICOM file per slice.

    ``modality="CT"`` writes CT Image Storage (stored = round(HU) + 1024, RescaleIntercept -1024,
    slope 1, signed 16 bit); ``"MR"`` writes MR Image Storage without rescale (values rounded).

    Geometry: rows run along ``iop[:3]`` with spacing ``spacing[2]``, columns along ``iop[3:]`` with
    ``spacing[1]``; the slice normal is ``cross(row, col)``. Slice ``k`` sits at offset ``d_k`` along
    the normal: ``d_k = k * spacing[0]`` or ``slice_positions[k]`` (mm, non-decreasing; gaps and
    irregular steps allowed). ``origin`` is the ImagePositionPatient at offset 0 (LPS mm); by default
    the volume is centred on (0, 0, 0).

    Gantry tilt (the convention of real tilted CT, e.g. GE): the image plane is rotated by ``t`` about
    the row axis, so the column cosine becomes ``cos t * col - sin t * normal`` (for the default IOP:
    ``[0, cos t, -sin t]``) while the table still moves along the untilted normal: IPP_k = origin +
    ``d_k / cos t`` * untilted normal. Relative to the tilted image frame the slice origin advances by
    ``d_k`` along the tilted normal and shifts by ``-tan(t) * d_k`` along the column direction (a sheared
    stack). GantryDetectorTilt is written as ``t``.

    Files are named ``{file_prefix}{index:04d}.dcm`` (no UIDs); with ``shuffle_files`` the index is a
    random permutation of the spatial order. ``instance_number_order`` is ``"spatial"`` (1..n along the
    normal), ``"reversed"`` or ``"random"``. ``rng`` drives the shuffles (a Generator passed as
    ``shuffle_files`` takes precedence). ``extra`` sets or overrides attributes (keyword -> value; None
    deletes) on every file; the per-slice SOPInstanceUID, InstanceNumber, ImagePositionPatient,
    SliceLocation (table position along the untilted normal) and pixel data are not overridable.
    Returns :class:`SeriesInfo` with lists in spatial (array) order.
    """
    vol = np.asarray(hu)
    if vol.ndim != 3:
        raise ValueError(f"hu must be a 3-D (z, y, x) array, got shape {vol.shape}")
    nz, ny, nx = vol.shape
    sz, sy, sx = (float(s) for s in spacing)
    modality = modality.upper()
    if modality not in _SOP_CLASSES:
        raise ValueError(f"modality must be 'CT' or 'MR', got {modality!r}")
    if instance_number_order not in _INSTANCE_NUMBER_ORDERS:
        raise ValueError(f"instance_number_order must be spatial, reversed or random, got {instance_number_order!r}")
    ts = UID(str(transfer_syntax))
    if not ts.is_transfer_syntax:
        raise ValueError(f"{ts} is not a transfer syntax UID")
    geometry = _slice_geometry((nz, ny, nx), (sz, sy, sx), iop, origin, slice_positions, gantry_tilt_deg)
    file_index, instance_numbers = _slice_order(nz, shuffle_files, rng, instance_number_order)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    for_uid = frame_of_reference_uid or generate_uid()
    stored = _stored_values(vol, modality, ts)

    series = Dataset()
    if any(ord(ch) > 127 for ch in patient_name + patient_id + series_description):
        series.SpecificCharacterSet = "ISO_IR 192"  # UTF-8
    _patient_and_study(series, patient_name, patient_id, study_uid)
    _series_and_equipment(series, modality, series_uid, series_number, series_description)
    _acquisition(series, modality, sz, gantry_tilt_deg)
    _plane_and_pixel(series, for_uid, geometry.image_orientation, (ny, nx), (sy, sx))
    _rescale_and_window(series, modality, stored)
    _apply_extra(series, extra)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    width = max(4, len(str(nz - 1)))
    paths: list[Path] = []
    sops: list[str] = []
    for k in range(nz):
        sop = generate_uid()
        ds = Dataset()
        ds.update(series)
        ds.SOPInstanceUID = sop
        ds.InstanceNumber = int(instance_numbers[k])
        ds.ImagePositionPatient = geometry.image_positions[k]
        ds.SliceLocation = _ds(float(geometry.table_positions[k]))
        _encode(ds, _SOP_CLASSES[modality], ts, stored[k])
        path = out / f"{file_prefix}{int(file_index[k]):0{width}d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        sops.append(sop)

    return SeriesInfo(
        study_uid=str(study_uid),
        series_uid=str(series_uid),
        frame_of_reference_uid=str(for_uid),
        paths=paths,
        sop_instance_uids=sops,
        positions=geometry.positions,
        orientation=geometry.orientation,
        instance_numbers=[int(i) for i in instance_numbers],
        modality=modality,
    )
