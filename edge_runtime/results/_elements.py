"""Explicit VR Little Endian bytes of the few element types the SEG's long sequences use (PS3.5 7.1.2, 7.5).

:mod:`edge_runtime.results.seg_binary` writes the Per-Frame Functional Groups Sequence and the two source
reference sequences as bytes rather than as trees of pydicom Datasets: tens of thousands of items built as
Datasets take seconds, joined bytes milliseconds. :func:`raw_sequence` puts such bytes into a dataset as a raw
element, which pydicom writes out unchanged (and still parses on access).

Sequences and items are written with explicit lengths, as pydicom writes them.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

#: VRs with a 2-byte reserved field and a 4-byte length (PS3.5 Table 7.1-1); the others have a 2-byte length
_LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"))
#: the Item tag (FFFE,E000), little endian
ITEM = b"\xfe\xff\x00\xe0"


def encode_tag(tag: int) -> bytes:
    """A tag as group and element, each little endian."""
    return struct.pack("<HH", tag >> 16, tag & 0xFFFF)


def element(tag: int, vr: bytes, value: bytes) -> bytes:
    """One element; ``value`` is padded to even length (NUL for UI, OB and UN, space for text VRs)."""
    if len(value) % 2:
        value += b"\x00" if vr in (b"UI", b"OB", b"UN") else b" "
    if vr in _LONG_VRS:
        return encode_tag(tag) + vr + b"\x00\x00" + struct.pack("<I", len(value)) + value
    if len(value) > 0xFFFF:
        raise ValueError(f"value of ({tag >> 16:04X},{tag & 0xFFFF:04X}) is too long for VR {vr.decode()}")
    return encode_tag(tag) + vr + struct.pack("<H", len(value)) + value


def item(content: bytes) -> bytes:
    """One sequence item holding the encoded elements ``content``."""
    return ITEM + struct.pack("<I", len(content)) + content


def sequence(tag: int, items: Sequence[bytes]) -> bytes:
    """A sequence element of one item per entry of ``items`` (each the encoded elements of an item)."""
    return element(tag, b"SQ", b"".join(item(i) for i in items))


def code_item(value: str, scheme: str, meaning: str) -> bytes:
    """The elements of a Code Sequence Macro item (PS3.3 Table 8.8-1): Code Value, Coding Scheme, Meaning."""
    return (
        element(0x00080100, b"SH", value.encode())
        + element(0x00080102, b"SH", scheme.encode())
        + element(0x00080104, b"LO", meaning.encode())
    )


def raw_sequence(tag: int, value: bytes) -> RawDataElement:
    """The value (concatenated items) of a sequence as a raw element that pydicom writes as it is."""
    return RawDataElement(Tag(tag), "SQ", len(value), value, 0, False, True)


# -- Implicit VR Little Endian (PS3.5 7.1.3): the RT Structure Set's contours ------------------------------


def implicit_element(tag: int, value: bytes, pad: bytes = b" ") -> bytes:
    """One Implicit VR element (tag, 4-byte length, value); ``value`` padded to even length with ``pad``
    (NUL for UI, space for text). Four-byte lengths are why an RT Structure Set is written this way: a long
    contour's Contour Data (DS) exceeds the 64 KiB that Explicit VR gives a DS value."""
    if len(value) % 2:
        value += pad
    return encode_tag(tag) + struct.pack("<I", len(value)) + value


def implicit_sequence(tag: int, items: Sequence[bytes]) -> bytes:
    """An Implicit VR sequence of one item per entry of ``items`` (explicit lengths, as pydicom writes them)."""
    return implicit_element(tag, b"".join(item(i) for i in items))


def raw_implicit_sequence(tag: int, value: bytes) -> RawDataElement:
    """The value (concatenated items) of a sequence as a raw Implicit VR element that pydicom writes as it is."""
    return RawDataElement(Tag(tag), None, len(value), value, 0, True, True)
