"""The real network peers that tests and benchmarks share: free ports, DCMTK as scanner and PACS, the service.

Everything talks DICOM over loopback with real programs, never mocks: DCMTK ``storescu`` as the scanner,
DCMTK ``storescp`` as the PACS, and ``python -m edge_runtime serve`` in a subprocess as a user runs it.
DCMTK programs are taken from ``/usr/bin`` first: the project's venv holds pynetdicom's apps of the same
names (``storescp``, ``storescu``), which take other options. Debian's DCMTK leaves Nagle's algorithm on
unless ``TCP_NODELAY=1`` is set (30x slower on loopback), so every DCMTK peer gets :func:`dcmtk_env`.

One module a peer (``base``: paths, ports, processes, tools; ``dcmtk``; ``service``; ``triton``; ``orthanc``;
``syslog``); the names are re-exported here. ``tests/conftest.py`` turns them into pytest fixtures;
``benchmarks/`` imports them from here. pytest is imported only where a missing tool skips a test, so a
benchmark runs without it.
"""

from tests.peers.base import (
    REPO,
    SHARED_DATA,
    SYSTEM_BIN,
    dciodvfy_errors,
    dcmtk_env,
    free_port,
    require_tool,
    skip_missing,
    stop_process,
    wait_port,
)
from tests.peers.dcmtk import StoreSCP, referenced_series, storescu, wait_for_measurements, wait_for_seg
from tests.peers.orthanc import DICOMWEB_PLUGIN, ORTHANC_BINARY, Orthanc, orthanc_programs
from tests.peers.service import ServiceProcess, serve_command, served_seg, spool_record
from tests.peers.syslog import SyslogReceiver
from tests.peers.triton import TRITON_MODEL_NAME, TRITON_SERVER_SCRIPT, TritonServer, triton_python

__all__ = [
    "DICOMWEB_PLUGIN",
    "ORTHANC_BINARY",
    "Orthanc",
    "REPO",
    "SHARED_DATA",
    "SYSTEM_BIN",
    "ServiceProcess",
    "StoreSCP",
    "SyslogReceiver",
    "TRITON_MODEL_NAME",
    "TRITON_SERVER_SCRIPT",
    "TritonServer",
    "dciodvfy_errors",
    "dcmtk_env",
    "free_port",
    "orthanc_programs",
    "referenced_series",
    "require_tool",
    "serve_command",
    "served_seg",
    "skip_missing",
    "spool_record",
    "stop_process",
    "storescu",
    "triton_python",
    "wait_for_measurements",
    "wait_for_seg",
    "wait_port",
]
