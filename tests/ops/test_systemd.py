"""The systemd unit verifies, and the service speaks the notify protocol (READY, STATUS, WATCHDOG, STOPPING)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.peers import REPO, free_port, serve_command, wait_port


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    unit = (REPO / "systemd" / "edge-runtime.service").read_text()
    assert "Type=notify" in unit and "ProtectSystem=strict" in unit and "NoNewPrivileges=yes" in unit
    # verify needs ExecStart to exist: point it at this environment's console script
    exe = Path(sys.executable).parent / "edge-runtime"
    if not exe.exists():
        pytest.skip("the edge-runtime console script is not installed in this environment")
    local = tmp_path / "edge-runtime.service"
    local.write_text(unit.replace("/opt/edge-runtime/.venv/bin/edge-runtime", str(exe)))
    out = subprocess.run(
        ["systemd-analyze", "verify", str(local)], capture_output=True, text=True, timeout=60
    )
    problems = [line for line in (out.stdout + out.stderr).splitlines() if "edge-runtime.service" in line]
    assert out.returncode == 0 and problems == [], out.stdout + out.stderr


def test_service_sends_ready_watchdog_and_stopping(tmp_path: Path) -> None:
    address = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(1.0)
    port = free_port()
    env = dict(os.environ, NOTIFY_SOCKET=address, WATCHDOG_USEC="400000")
    proc = subprocess.Popen(
        serve_command(port, tmp_path / "spool", tmp_path / "out"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    messages: list[str] = []
    try:
        wait_port(port, 90, proc)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any("WATCHDOG=1" in m for m in messages):
            try:
                messages.append(sock.recv(4096).decode())
            except TimeoutError:
                pass
        proc.send_signal(signal.SIGTERM)
        while True:
            try:
                messages.append(sock.recv(4096).decode())
            except TimeoutError:
                if proc.poll() is not None:
                    break
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()
    ready = [m for m in messages if "READY=1" in m]
    assert ready and f"port {port}" in ready[0]
    assert any("WATCHDOG=1" in m for m in messages)
    assert any("STOPPING=1" in m for m in messages)
