"""The DICOM vocabulary of the runtime, owned here once: SOP classes, transfer syntaxes, statuses, UIDs.

Names come from pydicom (``pydicom.uid``) wherever pydicom has them; what it lacks (the Label Map Segmentation
Storage class of 2024) is spelled out here and nowhere else. The file-system half of "durable" is here too:
:func:`write_atomic` is the one way a result or a record reaches its final name.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    PYDICOM_ROOT_UID,
    UID,
    Comprehensive3DSRStorage,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    LegacyConvertedEnhancedCTImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    MRImageStorage,
    RLELossless,
    SegmentationStorage,
    generate_uid,
)

__all__ = [
    "COMPRESSED_SYNTAXES",
    "IMAGE_STORAGE",
    "LabelMapSegmentationStorage",
    "NATIVE_SYNTAXES",
    "SEGMENTATION_CLASSES",
    "STATUS_CANNOT_PARSE",
    "STATUS_DATASET_MISMATCH",
    "STATUS_INVALID_UID",
    "STATUS_MISSING_ATTRIBUTE",
    "STATUS_OUT_OF_RESOURCES",
    "STATUS_SUCCESS",
    "UID_PREFIX",
    "VERIFICATION",
    "Comprehensive3DSRStorage",
    "SegmentationStorage",
    "derive_uid",
    "fsync_dir",
    "is_success",
    "write_atomic",
]

# -- SOP classes -------------------------------------------------------------------------------------------

#: Label Map Segmentation Storage (PS3.4, 2024): one value per segment in one frame; pydicom has no name for it
LabelMapSegmentationStorage = UID("1.2.840.10008.5.1.4.1.1.66.7")
#: the Segmentation Storage classes: BINARY/FRACTIONAL, and LABELMAP
SEGMENTATION_CLASSES: tuple[UID, ...] = (SegmentationStorage, LabelMapSegmentationStorage)
#: Verification SOP Class (C-ECHO)
VERIFICATION = UID("1.2.840.10008.1.1")
#: image storage classes the listener accepts, by modality: single-frame, Enhanced and Legacy Converted Enhanced
IMAGE_STORAGE: dict[str, tuple[UID, ...]] = {
    "CT": (CTImageStorage, EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage),
    "MR": (MRImageStorage, EnhancedMRImageStorage, LegacyConvertedEnhancedMRImageStorage),
}

# -- transfer syntaxes -------------------------------------------------------------------------------------

#: uncompressed syntaxes, Explicit VR Little Endian first: pynetdicom accepts the first of ours that the
#: requestor proposed. Deflate is zlib in pydicom, not a pixel decoder, so it counts as native.
NATIVE_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
)
#: compressed syntaxes offered when a decoder for them is installed
COMPRESSED_SYNTAXES: tuple[UID, ...] = (
    RLELossless,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    HTJ2KLossless,
    HTJ2K,
)

# -- DIMSE statuses (PS3.4 B.2.3, PS3.7 C) -------------------------------------------------------------------

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_PARSE = 0xC210
STATUS_MISSING_ATTRIBUTE = 0xC220
STATUS_INVALID_UID = 0xC221


def is_success(status: int | None) -> bool:
    """A C-STORE response that means "stored": success, or a warning (0xB000-0xBFFF: coerced, elements
    discarded); ``None`` (no response) is not."""
    return status is not None and (status == STATUS_SUCCESS or 0xB000 <= status <= 0xBFFF)


# -- UIDs --------------------------------------------------------------------------------------------------

#: the root of every UID we make (pydicom's registered root)
UID_PREFIX = PYDICOM_ROOT_UID


def derive_uid(seed: str, *parts: str) -> UID:
    """A UID that is a pure function of ``seed`` and ``parts``: the same result re-made after a restart
    gets the same UIDs, so a receiver sees a re-send, not a second object."""
    return generate_uid(prefix=UID_PREFIX, entropy_srcs=[seed, *parts])


# -- durable files -----------------------------------------------------------------------------------------


def write_atomic(path: Path, content: Dataset | bytes | str) -> Path:
    """Write ``content`` beside ``path``, fsync it and rename it into place: the file is whole or absent.

    A :class:`~pydicom.dataset.Dataset` is written as a DICOM file (with its file meta); ``str`` as UTF-8.
    """
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(content, Dataset):
        content.save_as(tmp, enforce_file_format=True)
    else:
        tmp.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
