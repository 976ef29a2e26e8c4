"""Paths, free ports, processes and the tools the peers need; a missing tool skips the test with its reason."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import NoReturn

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"
#: where Debian installs DCMTK and dicom3tools
SYSTEM_BIN = Path("/usr/bin")


def skip_missing(reason: str) -> NoReturn:
    """Skip the test (outside pytest: raise pytest's skip exception) for a peer that is not installed."""
    import pytest

    pytest.skip(reason)


# -- ports and processes -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    """Block until something accepts connections on ``port``; fail early when ``proc`` exits first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before opening port {port}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


def stop_process(
    proc: subprocess.Popen, timeout: float = 30.0, *, sig: int = signal.SIGTERM, group: bool = False
) -> int | None:
    """``sig`` (SIGTERM), then SIGKILL after ``timeout`` s; ``group``: the whole process group (its forked
    children too). Returns the exit status."""

    def send(number: int) -> None:
        try:
            if group:
                os.killpg(proc.pid, number)
            else:
                proc.send_signal(number)
        except ProcessLookupError:
            pass

    if proc.poll() is None:
        send(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            send(signal.SIGKILL)
            proc.wait()
    return proc.returncode


# -- tools -------------------------------------------------------------------------------------------------


def require_tool(name: str) -> str:
    """The program's path: ``/usr/bin`` first (DCMTK, not the venv's pynetdicom apps), else ``PATH``.

    A missing program skips the test (outside pytest: raises pytest's skip exception with the same message).
    """
    system = SYSTEM_BIN / name
    path = str(system) if system.exists() else shutil.which(name)
    if path is None:
        skip_missing(f"{name} is not installed (apt-get install dcmtk dicom3tools)")
    return path


def dcmtk_env() -> dict[str, str]:
    # Debian's DCMTK leaves Nagle's algorithm on unless told otherwise: 30x slower on loopback.
    return dict(os.environ, TCP_NODELAY="1")


def dciodvfy_errors(path: Path) -> list[str]:
    """The ``Error`` lines of dicom3tools' IOD verifier for one file."""
    out = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
