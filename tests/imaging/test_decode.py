"""Isolation of decoders: a crash, a hang or a lie about the image size costs one series, not the process."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import RLELossless

from edge_runtime.imaging.decode import DecoderFailed, IsolatedDecoder
from edge_runtime.imaging.volume import SliceCache, VolumeError, load_volume
from phantom import write_series


def _crash() -> None:
    os.abort()  # what a segfaulting native decoder looks like from outside


def _hang() -> None:
    time.sleep(60)


def _allocate(n: int) -> int:
    return len(bytearray(n))


def test_a_crashing_decoder_is_reported_and_the_next_call_gets_a_fresh_child() -> None:
    decoder = IsolatedDecoder(timeout=20)
    try:
        with pytest.raises(DecoderFailed, match="died"):
            decoder.run(_crash)
        assert decoder.run(_allocate, 1000) == 1000
    finally:
        decoder.close()


def test_a_hanging_decoder_times_out() -> None:
    decoder = IsolatedDecoder(timeout=1.0)
    try:
        t0 = time.monotonic()
        with pytest.raises(DecoderFailed, match="longer than"):
            decoder.run(_hang)
        assert time.monotonic() - t0 < 10
        assert decoder.run(_allocate, 10) == 10
    finally:
        decoder.close()


def test_the_decoder_child_has_a_memory_ceiling() -> None:
    decoder = IsolatedDecoder(memory_limit=512 * 1024**2, timeout=20)
    try:
        with pytest.raises(DecoderFailed):
            decoder.run(_allocate, 2 * 1024**3)
    finally:
        decoder.close()


def test_compressed_series_decodes_in_the_child_to_the_same_pixels(tmp_path: Path) -> None:
    hu = np.arange(4 * 32 * 32, dtype=np.float32).reshape(4, 32, 32) - 1000
    native = write_series(hu, (2.0, 1.0, 1.0), tmp_path / "native")
    rle = write_series(hu, (2.0, 1.0, 1.0), tmp_path / "rle", transfer_syntax=RLELossless)
    np.testing.assert_array_equal(load_volume(rle.paths).array, load_volume(native.paths).array)
    cache = SliceCache()
    assert all(cache.add(p) for p in rle.paths)
    np.testing.assert_array_equal(load_volume(rle.paths, cache=cache).array, load_volume(native.paths).array)


def test_an_image_that_declares_65535_squared_pixels_is_refused_without_allocating(tmp_path: Path) -> None:
    info = write_series(np.zeros((3, 16, 16), np.float32), (2.0, 1.0, 1.0), tmp_path)
    for p in info.paths:
        ds = pydicom.dcmread(p)
        ds.Rows = ds.Columns = 65535
        ds.save_as(p)
    with pytest.raises(VolumeError) as err:
        load_volume(info.paths)
    assert err.value.code == "too-large"
    assert not SliceCache().add(info.paths[0])
