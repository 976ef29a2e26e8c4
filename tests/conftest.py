"""Shared fixtures: free ports, real DICOM peers (DCMTK, pynetdicom) and the service as a subprocess."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before opening port {port}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (apt-get install dcmtk dicom3tools)")
    return path


def dciodvfy_errors(path: Path) -> list[str]:
    require_tool("dciodvfy")
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def dcmtk_env() -> dict[str, str]:
    # Debian's DCMTK leaves Nagle's algorithm on unless told otherwise: 30x slower on loopback.
    return dict(os.environ, TCP_NODELAY="1")


class StoreSCP:
    """DCMTK storescp as the PACS: every received object lands in ``folder``."""

    def __init__(self, folder: Path, ae_title: str = "PACS"):
        require_tool("storescp")
        self.folder = folder
        self.ae_title = ae_title
        self.port = free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["storescp", "-od", str(folder), "-aet", ae_title, "--fork", str(self.port)],
            env=dcmtk_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port, 20, self.proc)

    @property
    def address(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"

    def received(self, sop_class: str) -> dict[str, list[Path]]:
        """Files of one SOP class received so far, by the source SeriesInstanceUID they reference."""
        found: dict[str, list[Path]] = {}
        for f in sorted(self.folder.iterdir()):
            try:
                ds = pydicom.dcmread(f, stop_before_pixels=True)
                if ds.get("SOPClassUID") != sop_class:
                    continue
                if "ReferencedSeriesSequence" in ds:
                    refs = {str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID)}
                else:  # SR: the evidence sequence names the source series (and the SEG's)
                    refs = {
                        str(s.SeriesInstanceUID)
                        for study in ds.CurrentRequestedProcedureEvidenceSequence
                        for s in study.ReferencedSeriesSequence
                    }
            except Exception:
                continue  # storescp may still be writing it
            for ref in refs:
                found.setdefault(ref, []).append(f)
        return found

    def segs(self) -> dict[str, list[Path]]:
        return self.received(SEG_SOP_CLASS)

    def wait_for(self, sop_class: str, series_uid: str, timeout: float = 120.0) -> Path:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            got = self.received(sop_class).get(series_uid)
            if got:
                return got[0]
            time.sleep(0.2)
        raise TimeoutError(f"no {sop_class} object for the series after {timeout} s")

    def wait_for_seg(self, series_uid: str, timeout: float = 120.0) -> Path:
        return self.wait_for(SEG_SOP_CLASS, series_uid, timeout)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def storescu(
    port: int, paths: list[Path], ae_title: str = "EDGE", extra: list[str] | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    require_tool("storescu")
    cmd = [
        "storescu",
        "-aec",
        ae_title,
        "-aet",
        "SCANNER",
        *(extra or []),
        "127.0.0.1",
        str(port),
        *map(str, paths),
    ]
    return subprocess.run(cmd, env=dcmtk_env(), capture_output=True, text=True, timeout=300, check=check)


class ServiceProcess:
    """``edge-runtime serve`` as a user runs it, in a subprocess."""

    def __init__(self, workdir: Path, *args: str, ae_title: str = "EDGE"):
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.http_port = free_port()
        self.ae_title = ae_title
        self.spool = workdir / "spool"
        self.output = workdir / "out"
        self.log_path = workdir / "service.log"
        self._log = open(self.log_path, "ab")
        cmd = [
            sys.executable,
            "-m",
            "edge_runtime",
            "serve",
            "--port",
            str(self.port),
            "--host",
            "127.0.0.1",
            "--ae-title",
            ae_title,
            "--spool",
            str(self.spool),
            "--output",
            str(self.output),
            "--http-port",
            str(self.http_port),
            *args,
        ]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=workdir)
        try:
            wait_port(self.port, 90, self.proc)
        except Exception:
            self.stop()
            raise

    def http_get(self, path: str) -> tuple[int, str]:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int | None = None) -> int:
        if self.proc.poll() is None:
            if sig is None:
                self.proc.terminate()
            else:
                self.proc.send_signal(sig)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCP]:
    scp = StoreSCP(tmp_path / "pacs")
    yield scp
    scp.stop()
