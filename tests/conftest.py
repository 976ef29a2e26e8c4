"""Shared fixtures: the real DICOM peers of ``tests/peers/`` (DCMTK, the service as a subprocess) as pytest fixtures.

The helpers themselves live in ``tests/peers/``, where the benchmarks import them too.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers import StoreSCP


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreSCP]:
    """DCMTK storescp as the PACS that a module's service sends its results to."""
    scp = StoreSCP(tmp_path_factory.mktemp("pacs"))
    yield scp
    scp.stop()


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCP]:
    scp = StoreSCP(tmp_path / "pacs")
    yield scp
    scp.stop()
