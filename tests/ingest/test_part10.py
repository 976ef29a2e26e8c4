"""The spooled file is the received data set as it arrived, behind pynetdicom's own File Meta Information.

The listener writes the preamble and meta it encodes itself plus the received buffer (no decode, no re-encode);
the bytes must be exactly what ``event.encoded_dataset()`` would have written. The sender is a real pynetdicom SCU
on loopback, in both uncompressed little-endian syntaxes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dsutils import create_file_meta, encode, encode_file_meta

from edge_runtime.ingest.listener import Listener, ListenerConfig
from edge_runtime.ingest.part10 import PREAMBLE, file_meta
from edge_runtime.spool import Spool
from phantom import write_series
from tests.peers import free_port


@pytest.mark.parametrize(
    "sop_instance",
    ["1.2.3.4", "1.2.3.45", "1.2.826.0.1.3680043.8.498.1234567890123456789012345678901234567"],
)
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, "1.2.840.10008.1.2.4.90"])
def test_file_meta_is_pynetdicoms_encoding(sop_instance: str, syntax: str) -> None:
    """Odd and even UID lengths (padded with NUL), every syntax: the same bytes as pynetdicom + pydicom write."""
    meta = create_file_meta(sop_class_uid=CTImageStorage, sop_instance_uid=sop_instance, transfer_syntax=syntax)
    assert file_meta(CTImageStorage, sop_instance, syntax) == encode_file_meta(meta)


def test_spooled_file_is_the_data_set_as_sent(tmp_path: Path) -> None:
    series = write_series(np.linspace(-1000, 1000, 2 * 32 * 32).reshape(2, 32, 32), (2.0, 1.0, 1.0), tmp_path / "s")
    spool = Spool(tmp_path / "spool")
    listener = Listener(
        ListenerConfig(ae_title="EDGE", host="127.0.0.1", port=free_port(), modalities=("CT",)), spool
    )
    listener.start()
    expected = {}
    try:
        for path, syntax in zip(series.paths, (ExplicitVRLittleEndian, ImplicitVRLittleEndian), strict=True):
            ae = AE(ae_title="SCANNER")
            ae.add_requested_context(CTImageStorage, [syntax])
            assoc = ae.associate("127.0.0.1", listener.port, ae_title="EDGE")
            assert assoc.is_established
            ds = pydicom.dcmread(path)
            status = assoc.send_c_store(ds)
            assoc.release()
            assert status.Status == 0x0000
            meta = create_file_meta(
                sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID, transfer_syntax=syntax
            )
            body = encode(ds, syntax == ImplicitVRLittleEndian, True)
            assert body is not None
            expected[str(ds.SOPInstanceUID)] = PREAMBLE + encode_file_meta(meta) + body
    finally:
        listener.stop()
    (row,) = spool.all_series()
    stored = {str(pydicom.dcmread(p).SOPInstanceUID): p.read_bytes() for p in spool.instance_paths(row.id)}
    assert stored == expected
    assert not any(spool.tmp_dir.iterdir())
