"""Compressed transfer syntaxes decode, in the isolated decoder child, to the pixels of the uncompressed file.

The corpus has one CT slice (cornerstone) and one MR slice (dcm_qa_ts) in many syntaxes; lossless ones must
match exactly, lossy ones closely. Retired JPEG processes (.53, .55) are not decodable by pydicom's plugins.
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import get_decoder

from edge_runtime.dicom import COMPRESSED_SYNTAXES, NATIVE_SYNTAXES
from edge_runtime.imaging.decode import needs_isolation, shared_decoder
from edge_runtime.ingest.listener import decodable_syntaxes
from tests.peers import SHARED_DATA

CT = SHARED_DATA / "cornerstoneWADOImageLoader"
LOSSY = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.91"}


def cases() -> list[tuple[Path, Path]]:
    if not SHARED_DATA.is_dir():
        return []
    ct = [(p, CT / "CTImage.dcm_LittleEndianExplicitTransferSyntax_1.2.840.10008.1.2.1.dcm")
          for p in sorted(CT.glob("CTImage.dcm_*")) if not p.name.endswith((".4.53.dcm", ".4.55.dcm"))]
    mr = [(p, SHARED_DATA / "dcm_qa_ts" / "1.dcm") for p in sorted((SHARED_DATA / "dcm_qa_ts").glob("*.dcm"))]
    return ct + mr


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="the shared corpus (../shared/data) is not present")
@pytest.mark.parametrize("path, reference", cases(), ids=lambda p: p.name if isinstance(p, Path) else "")
def test_every_syntax_decodes_to_the_reference_pixels(path: Path, reference: Path) -> None:
    syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    if not get_decoder(syntax).is_available:
        pytest.skip(f"no decoder installed for {syntax.name}")
    try:
        got = shared_decoder().pixels(path) if needs_isolation(syntax) else pydicom.dcmread(path).pixel_array
    except RuntimeError as exc:
        if "does not support" not in str(exc):
            raise
        # 12-bit JPEG Extended: only pylibjpeg-libjpeg (GPL-3, not in any extra) decodes it
        pytest.skip(f"the installed decoders do not support this {syntax.name} variant")
    expected = pydicom.dcmread(reference).pixel_array.astype(np.int64)
    got = got.astype(np.int64)
    assert got.shape == expected.shape
    if str(syntax) in LOSSY:
        if str(syntax) == "1.2.840.10008.1.2.4.50":  # 8-bit baseline of a 16-bit image: the encoder rescaled it
            assert np.corrcoef(got.ravel(), expected.ravel())[0, 1] > 0.99
        else:
            assert np.abs(got - expected).mean() < 0.01 * (expected.max() - expected.min())
    else:
        np.testing.assert_array_equal(got, expected)


def test_the_default_install_decodes_every_compressed_syntax_it_offers() -> None:
    """The MIT/BSD decoders are regular dependencies (no extra), the GPL one is none; with them installed the
    listener offers every compressed syntax it knows, so a router forwarding a series as stored is understood."""
    requirements = importlib.metadata.requires("edge-runtime") or []
    core = {re.split(r"[<>=!~;\s\[]", r, maxsplit=1)[0].lower() for r in requirements if "extra ==" not in r}
    assert {"python-gdcm", "pylibjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle"} <= core
    assert not any(r.lower().startswith("pylibjpeg-libjpeg") for r in requirements)  # GPL-3: never pulled in
    assert [uid.name for uid in COMPRESSED_SYNTAXES if not get_decoder(uid).is_available] == []
    assert decodable_syntaxes() == [*NATIVE_SYNTAXES, *COMPRESSED_SYNTAXES]
