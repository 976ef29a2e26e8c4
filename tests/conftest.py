"""Shared fixtures: the real DICOM peers of ``tests/peers.py`` (DCMTK, the service as a subprocess) as pytest fixtures.

The helpers themselves live in ``tests/peers.py`` (benchmarks use them too); they are re-exported here for the
test modules that import them from ``tests.conftest``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers import (
    REPO,
    SHARED_DATA,
    ServiceProcess,
    StoreSCP,
    dciodvfy_errors,
    dcmtk_env,
    free_port,
    require_tool,
    storescu,
    wait_port,
)

__all__ = [
    "REPO",
    "SHARED_DATA",
    "ServiceProcess",
    "StoreSCP",
    "dciodvfy_errors",
    "dcmtk_env",
    "free_port",
    "require_tool",
    "storescu",
    "wait_port",
]


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCP]:
    scp = StoreSCP(tmp_path / "pacs")
    yield scp
    scp.stop()
