"""A received C-STORE data set as a DICOM Part 10 file, written from the bytes as they arrived.

pynetdicom's ``event.encoded_dataset()`` builds the File Meta Information as a pydicom data set, encodes it and
joins it with a copy of the received bytes: about as much Python work per instance as the rest of the C-STORE
handler together, on the thread that holds up the sender's next instance. The File Meta Information is seven
fixed elements (PS3.10 7.1), so :func:`file_meta` encodes them directly (Explicit VR Little Endian, the same
bytes as pynetdicom's), and :func:`received_parts` hands the spool the preamble + meta and a view of the received
buffer, which it writes with one ``writev``: the data set is never copied, decoded or re-encoded.
"""

from __future__ import annotations

import struct
from io import BytesIO
from typing import cast

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom.dimse_primitives import C_STORE

PREAMBLE = b"\x00" * 128 + b"DICM"


def _element(group_element: int, vr: bytes, value: bytes, pad: bytes) -> bytes:
    """One Explicit VR Little Endian element of group 0002 (PS3.5 7.1.2), its value padded to even length."""
    if len(value) % 2:
        value += pad
    tag = struct.pack("<HH", 0x0002, group_element)
    if vr == b"OB":  # OB has a reserved field and a 4-byte length
        return tag + vr + b"\x00\x00" + struct.pack("<I", len(value)) + value
    return tag + vr + struct.pack("<H", len(value)) + value


def file_meta(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """The encoded File Meta Information group (0002,xxxx) that pynetdicom's ``event.file_meta`` holds:
    group length, version 00 01, Media Storage SOP Class and Instance UID, Transfer Syntax UID and pynetdicom's
    implementation class UID and version name."""
    body = b"".join(
        (
            _element(0x0001, b"OB", b"\x00\x01", b"\x00"),
            _element(0x0002, b"UI", sop_class.encode("ascii"), b"\x00"),
            _element(0x0003, b"UI", sop_instance.encode("ascii"), b"\x00"),
            _element(0x0010, b"UI", transfer_syntax.encode("ascii"), b"\x00"),
            _element(0x0012, b"UI", str(PYNETDICOM_IMPLEMENTATION_UID).encode("ascii"), b"\x00"),
            _element(0x0013, b"SH", PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii"), b" "),
        )
    )
    return _element(0x0000, b"UL", struct.pack("<I", len(body)), b"\x00") + body


def received_parts(event: evt.Event) -> tuple[bytes, memoryview]:
    """Preamble + File Meta Information, and a view of the data set's bytes as received: together the bytes of
    ``event.encoded_dataset()``, without its copies. The caller releases the view once written."""
    request = cast(C_STORE, event.request)
    head = PREAMBLE + file_meta(
        str(request.AffectedSOPClassUID),
        str(request.AffectedSOPInstanceUID),
        str(event.context.transfer_syntax),
    )
    return head, cast(BytesIO, request.DataSet).getbuffer()
