"""Time-bounded fuzzing of the parse and assembly path (hypothesis).

Whatever bytes arrive, the listener's inspection returns an instance or a documented status, and volume
assembly returns a volume or a VolumeError with its reason: no other exception escapes to take a series
(or the service) down with an internal error.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_runtime.dicom import STATUS_CANNOT_PARSE
from edge_runtime.imaging.geometry import GeometryPolicy
from edge_runtime.imaging.volume import VolumeError, load_volume
from edge_runtime.ingest.listener import InstanceInfo, Refusal, inspect_dataset
from phantom import write_series

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    derandomize=True,
)


@pytest.fixture(scope="module")
def seed_series(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    folder = tmp_path_factory.mktemp("seed")
    info = write_series(np.linspace(-1000, 1000, 4 * 16 * 16).reshape(4, 16, 16), (2.0, 1.0, 1.0), folder)
    return [p.read_bytes() for p in info.paths]


def parse(data: bytes) -> pydicom.Dataset | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception:
        return None  # the listener answers 0xC210 when pynetdicom's decode fails


def mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    buf = bytearray(data)
    for position, value in edits:
        buf[position % len(buf)] = value
    return bytes(buf[:cut] if cut else buf)


edits_strategy = st.lists(st.tuples(st.integers(128, 10**6), st.integers(0, 255)), max_size=24)


@FUZZ
@given(edits=edits_strategy, cut=st.one_of(st.none(), st.integers(132, 4000)))
def test_inspection_never_raises(seed_series: list[bytes], edits: list[tuple[int, int]], cut: int | None) -> None:
    ds = parse(mutate(seed_series[0], edits, cut))
    if ds is None:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = inspect_dataset(ds, "1.2.840.10008.5.1.4.1.1.2", str(ds.get("SOPInstanceUID", "")))
    assert isinstance(out, (InstanceInfo, Refusal))
    if isinstance(out, Refusal):
        assert out.status in (0xA900, STATUS_CANNOT_PARSE, 0xC220, 0xC221)


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 3), edits_strategy), max_size=4))
def test_assembly_returns_a_volume_or_a_reason(
    seed_series: list[bytes],
    tmp_path_factory: pytest.TempPathFactory,
    edits: list[tuple[int, list[tuple[int, int]]]],
) -> None:
    folder = tmp_path_factory.mktemp("case")
    series = list(seed_series)
    for index, changes in edits:
        series[index] = mutate(series[index], changes, None)
    paths = []
    for i, data in enumerate(series):
        path = Path(folder) / f"s{i}.dcm"
        path.write_bytes(data)
        paths.append(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            volume = load_volume(paths, GeometryPolicy(min_slices=2))
        except VolumeError as exc:
            assert exc.code and exc.detail
            return
    assert volume.array.ndim == 3 and np.isfinite(volume.spacing).all()


@FUZZ
@given(
    positions=st.lists(st.floats(-500, 500, allow_nan=False), min_size=1, max_size=8),
    iop=st.lists(st.floats(-1, 1, allow_nan=False), min_size=6, max_size=6),
    spacing=st.tuples(st.floats(0.01, 10), st.floats(0.01, 10)),
)
def test_arbitrary_geometry_is_assembled_or_refused(
    tmp_path_factory: pytest.TempPathFactory,
    positions: list[float],
    iop: list[float],
    spacing: tuple[float, float],
) -> None:
    folder = tmp_path_factory.mktemp("geo")
    hu = np.zeros((len(positions), 8, 8), dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            info = write_series(hu, (1.0, *spacing), folder, slice_positions=sorted(positions))
        except ValueError:
            return  # the writer itself rejects it
        paths = list(info.paths)
        for p in paths:
            ds = pydicom.dcmread(p)
            ds.ImageOrientationPatient = [round(v, 6) for v in iop]
            ds.save_as(p)
        try:
            volume = load_volume(paths)
        except VolumeError:
            return
    assert volume.array.shape[0] >= 3 and volume.spacing[0] > 0
