"""The service as a user runs it (``python -m edge_runtime serve`` in a subprocess), and waiting for its results."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.peers.base import dciodvfy_errors, free_port, stop_process, wait_port
from tests.peers.dcmtk import StoreSCP, storescu

# -- the service -------------------------------------------------------------------------------------------


def serve_command(
    port: int, spool: Path, output: Path, *args: str, ae_title: str = "EDGE", http_port: int = 0
) -> list[str]:
    """``python -m edge_runtime serve`` on loopback with its own spool and output (``http_port`` 0: no HTTP).

    The test phantoms are far smaller than the bundled model's declared domain (a torso of 240 mm or more), so
    series outside it are segmented and marked (``--out-of-domain mark``) rather than refused as by default;
    a later ``--out-of-domain`` in ``args`` wins."""
    return [
        sys.executable,
        "-m",
        "edge_runtime",
        "serve",
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--ae-title",
        ae_title,
        "--spool",
        str(spool),
        "--output",
        str(output),
        "--http-port",
        str(http_port),
        "--out-of-domain",
        "mark",
        *args,
    ]


class ServiceProcess:
    """``edge-runtime serve`` as a user runs it, in a subprocess; spool, output and log in ``workdir``.

    The DICOM port is free unless given; ``http_port`` None picks a free one (0 turns HTTP off).
    Construction returns once the DICOM port is open (``t_launch``, ``t_listening``: epochs).
    """

    def __init__(
        self,
        workdir: Path,
        *args: str,
        ae_title: str = "EDGE",
        port: int | None = None,
        http_port: int | None = None,
        start_timeout: float = 90.0,
    ):
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.http_port = free_port() if http_port is None else http_port
        self.ae_title = ae_title
        self.spool = workdir / "spool"
        self.output = workdir / "out"
        self.log_path = workdir / "service.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115
        self.cmd = serve_command(self.port, self.spool, self.output, *args, ae_title=ae_title, http_port=self.http_port)
        self.t_launch = time.time()
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=workdir)
        self.pid = self.proc.pid
        try:
            wait_port(self.port, start_timeout, self.proc)
        except Exception:
            self.stop()
            print(self.log()[-3000:], file=sys.stderr)
            raise
        self.t_listening = time.time()

    def http_get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def wait_ready(self, timeout: float = 120.0) -> float:
        """Poll ``/readyz`` until it answers 200 (or ``timeout`` s pass); the epoch it did."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                if self.http_get("/readyz")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.05)
        return time.time()

    def record(self, series_uid: str, timeout: float = 60.0) -> dict[str, Any]:
        return spool_record(self.spool, series_uid, timeout)

    def status(self) -> list[str]:
        """``edge-runtime status`` on this service's spool, as a user reads it: the lines of its table."""
        out = subprocess.run(
            [sys.executable, "-m", "edge_runtime", "status", "--spool", str(self.spool)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return out.stdout.splitlines()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """``sig`` (SIGTERM: a clean shutdown), SIGKILL after 60 s; the exit status."""
        stop_process(self.proc, 60, sig=sig)
        self._log.close()
        return self.proc.returncode

    def stop_cleanly(self) -> None:
        """Stop with SIGTERM and check the service ended as it should: exit status 0 and no traceback logged."""
        code = self.stop()
        assert code == 0, self.log()
        assert "Traceback" not in self.log()


def served_seg(work: Path, model: Path, paths: list[Path], series_uid: str, timeout: float = 90.0) -> Path:
    """Serve ``model`` to a DCMTK PACS, push ``paths`` with DCMTK ``storescu``, and return the SEG the PACS
    received for ``series_uid``, once dciodvfy finds no error in it and the service is still alive."""
    pacs = StoreSCP(work / "pacs")
    service = ServiceProcess(
        work / "svc", "--model", str(model), "--destination", pacs.address, "--quiet-seconds", "1"
    )
    try:
        storescu(service.port, paths)
        seg = pacs.wait_for_seg(series_uid, timeout=timeout)
        assert dciodvfy_errors(seg) == []
        assert service.alive()
        return seg
    finally:
        service.stop()
        pacs.stop()


def spool_record(spool: Path, series_uid: str, timeout: float = 60.0) -> dict[str, Any]:
    """The spool index's rows for one series once its result is published and every result file is sent.

    Read-only: ``series`` (instances, first/last received), the newest ``results`` row (timings, created,
    directory) and its ``outbox`` rows by file name (state, sent, attempts, error). A series the service
    refused raises at once.
    """
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        con = sqlite3.connect(f"file:{spool / 'index.sqlite3'}?mode=ro", uri=True, timeout=10)
        try:
            row = con.execute(
                "SELECT id, state, instance_count, first_received, last_received, reason "
                "FROM series WHERE series_uid=?",
                (series_uid,),
            ).fetchone()
            if row is not None:
                sid, state, count, first, last_rx, reason = row
                if state == "failed":
                    raise RuntimeError(f"series refused by the service: {reason}")
                res = con.execute(
                    "SELECT id, timings, created, directory, stage FROM results WHERE series_id=? ORDER BY id DESC",
                    (sid,),
                ).fetchone()
                if res is not None:
                    out = con.execute(
                        "SELECT path, state, sent, attempts, last_error FROM outbox WHERE result_id=?", (res[0],)
                    ).fetchall()
                    last = {
                        "instances": count,
                        "first_received": first,
                        "last_received": last_rx,
                        "timings": json.loads(res[1]),
                        "created": res[2],
                        "directory": res[3],
                        "outbox": {
                            Path(p).name: {"state": s, "sent": t, "attempts": a, "error": e} for p, s, t, a, e in out
                        },
                    }
                    # a result at stage "seg" has sent its SEG; the SR and the other objects are still to come
                    if out and all(s == "sent" for _, s, *_ in out) and res[4] != "seg":
                        return last
        except sqlite3.OperationalError:
            pass  # the index is not created yet, or its schema is busy
        finally:
            con.close()
        time.sleep(0.05)
    raise TimeoutError(f"series not published and sent after {timeout} s (last seen: {last})")
