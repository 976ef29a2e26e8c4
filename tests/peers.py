"""The real network peers that tests and benchmarks share: free ports, DCMTK as scanner and PACS, the service.

Everything talks DICOM over loopback with real programs, never mocks: DCMTK ``storescu`` as the scanner,
DCMTK ``storescp`` as the PACS, and ``python -m edge_runtime serve`` in a subprocess as a user runs it.
DCMTK programs are taken from ``/usr/bin`` first: the project's venv holds pynetdicom's apps of the same
names (``storescp``, ``storescu``), which take other options. Debian's DCMTK leaves Nagle's algorithm on
unless ``TCP_NODELAY=1`` is set (30x slower on loopback), so every DCMTK peer gets :func:`dcmtk_env`.

``tests/conftest.py`` turns these into pytest fixtures; ``benchmarks/`` imports them from here. pytest is
imported only where a missing tool skips a test, so a benchmark runs without it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, NoReturn

import pydicom

from edge_runtime.dicom import SegmentationStorage

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
#: where Debian installs DCMTK and dicom3tools
SYSTEM_BIN = Path("/usr/bin")


def _skip(reason: str) -> NoReturn:
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
        _skip(f"{name} is not installed (apt-get install dcmtk dicom3tools)")
    return path


def dcmtk_env() -> dict[str, str]:
    # Debian's DCMTK leaves Nagle's algorithm on unless told otherwise: 30x slower on loopback.
    return dict(os.environ, TCP_NODELAY="1")


def dciodvfy_errors(path: Path) -> list[str]:
    """The ``Error`` lines of dicom3tools' IOD verifier for one file."""
    out = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


# -- DCMTK as the scanner and as the PACS ------------------------------------------------------------------


def storescu(
    port: int,
    paths: list[Path],
    ae_title: str = "EDGE",
    extra: list[str] | None = None,
    check: bool = True,
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """DCMTK storescu as calling AE ``SCANNER``: every file in one association, at full speed."""
    cmd = [
        require_tool("storescu"),
        "-aec",
        ae_title,
        "-aet",
        "SCANNER",
        *(extra or []),
        "127.0.0.1",
        str(port),
        *map(str, paths),
    ]
    return subprocess.run(cmd, env=dcmtk_env(), capture_output=True, text=True, timeout=timeout, check=check)


class StoreSCP:
    """DCMTK storescp as the PACS: every received object lands in ``folder``.

    ``fork``: one child per association (concurrent senders); ``options``: more storescp options (``+uf``:
    a file per received object, so a second delivery is seen); ``log``: storescp's output (else discarded).
    It runs in a process group of its own, so :meth:`stop` ends its forked children with it.
    """

    def __init__(
        self,
        folder: Path,
        ae_title: str = "PACS",
        port: int | None = None,
        *,
        fork: bool = True,
        options: tuple[str, ...] = (),
        log: Path | None = None,
    ):
        self.folder = folder
        self.ae_title = ae_title
        self.port = port or free_port()
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [require_tool("storescp"), *options, "-od", str(folder), "-aet", ae_title]
        cmd += ["--fork"] if fork else []
        out = open(log, "wb") if log is not None else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                [*cmd, str(self.port)], env=dcmtk_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        finally:
            if log is not None:
                out.close()  # type: ignore[union-attr]  # the child has its own descriptor
        wait_port(self.port, 30, self.proc)

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
                refs = referenced_series(ds)
            except Exception:
                continue  # storescp may still be writing it
            for ref in refs:
                found.setdefault(ref, []).append(f)
        return found

    def segs(self) -> dict[str, list[Path]]:
        return self.received(SegmentationStorage)

    def wait_for(self, sop_class: str, series_uid: str, timeout: float = 120.0) -> Path:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            got = self.received(sop_class).get(series_uid)
            if got:
                return got[0]
            time.sleep(0.2)
        raise TimeoutError(f"no {sop_class} object for the series after {timeout} s")

    def wait_for_seg(self, series_uid: str, timeout: float = 120.0) -> Path:
        return self.wait_for(SegmentationStorage, series_uid, timeout)

    def stop(self) -> None:
        stop_process(self.proc, 10, group=True)


def referenced_series(ds: pydicom.Dataset) -> list[str]:
    """The source series a result references: a SEG's ReferencedSeriesSequence, else an SR's evidence
    (which names the source series and the SEG's)."""
    if "ReferencedSeriesSequence" in ds:
        return [str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID)]
    return sorted(
        str(s.SeriesInstanceUID)
        for study in ds.CurrentRequestedProcedureEvidenceSequence
        for s in study.ReferencedSeriesSequence
    )


def wait_for_measurements(output: Path, seg: Path, timeout: float = 60.0) -> list[Path]:
    """The ``measurements.json`` files in a service's output folder that describe ``seg`` (a SEG received by a
    PACS), once there is one: the SEG leaves before the rest of its result is written (SEG first)."""
    uid = str(pydicom.dcmread(seg, stop_before_pixels=True).SOPInstanceUID)
    end = time.monotonic() + timeout
    while True:
        found = []
        for path in output.glob("*/measurements.json"):
            try:
                if json.loads(path.read_text()).get("seg_sop_instance_uid") == uid:
                    found.append(path)
            except (OSError, ValueError):
                continue
        if found or time.monotonic() >= end:
            return found
        time.sleep(0.1)


def wait_for_seg(folder: Path, seen: set[str], series_uid: str, timeout: float) -> tuple[Path, float, float]:
    """Poll a storescp folder for a new SEG that references ``series_uid``, opening only new files.

    Returns (path, first seen epoch, mtime epoch): the mtime is when storescp finished writing the file.
    DCMTK names files ``<modality prefix>.<SOP Instance UID>`` ("SG." for Segmentation Storage, "SR3." for
    Comprehensive 3D SR), so the poll is a directory listing; files that are not a SEG of this series are
    remembered in ``seen`` and never opened again.
    """
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for entry in os.scandir(folder):
            if entry.name in seen or entry.name.startswith(("SR", ".")):
                continue
            first_seen = time.time()
            size = -1
            while True:  # storescp may still be writing it
                st = os.stat(entry.path)
                if st.st_size == size and time.time() - st.st_mtime > 0.05:
                    break
                size = st.st_size
                time.sleep(0.01)
            seen.add(entry.name)
            try:
                ds = pydicom.dcmread(entry.path, stop_before_pixels=True)
                if str(ds.SOPClassUID) != SegmentationStorage:
                    continue
                ref = str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID)
            except Exception:
                continue
            if ref == series_uid:
                return Path(entry.path), first_seen, os.stat(entry.path).st_mtime
        time.sleep(0.01)
    raise TimeoutError(f"no SEG for the series at storescp after {timeout:.0f} s")


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


# -- Triton Inference Server ----------------------------------------------------------------------------------

#: ``tests/triton_server.py`` serves a model package with PyTriton's ``tritonserver`` (CPU)
TRITON_SERVER_SCRIPT = REPO / "tests" / "triton_server.py"
TRITON_MODEL_NAME = "ct-test"


def triton_python() -> str:
    """The interpreter that runs PyTriton, or skip with the reason."""
    path = os.environ.get("EDGE_TRITON_PYTHON") or str(Path.home() / "venv-triton" / "bin" / "python")
    if not Path(path).is_file():
        _skip(f"no PyTriton interpreter at {path} (run scripts/triton-setup or set EDGE_TRITON_PYTHON)")
    probe = subprocess.run(
        [path, "-c", "import pytriton.triton, onnxruntime, numpy"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if probe.returncode != 0:
        _skip(f"{path} cannot import pytriton/onnxruntime: {probe.stderr.strip().splitlines()[-1:]}")
    return path


class TritonServer:
    """``tests/triton_server.py`` in a subprocess, on free loopback ports."""

    def __init__(
        self,
        workdir: Path,
        package_dir: Path,
        *,
        model_name: str = TRITON_MODEL_NAME,
        max_batch_size: int = 4,
        access_token: str | None = None,
        ports: tuple[int, int, int] | None = None,
        timeout: float = 180.0,
        threads: int = 1,
    ):
        python = triton_python()
        workdir.mkdir(parents=True, exist_ok=True)
        self.grpc_port, self.http_port, self.metrics_port = ports or (free_port(), free_port(), free_port())
        self.url = f"127.0.0.1:{self.grpc_port}"
        self.model_name = model_name
        self.log_path = workdir / "triton.log"
        self._log = open(self.log_path, "ab")
        cmd = [
            python,
            str(TRITON_SERVER_SCRIPT),
            "--package",
            str(package_dir),
            "--model-name",
            model_name,
            "--grpc-port",
            str(self.grpc_port),
            "--http-port",
            str(self.http_port),
            "--metrics-port",
            str(self.metrics_port),
            "--max-batch-size",
            str(max_batch_size),
            "--threads",
            str(threads),
        ]
        if access_token:
            cmd += ["--access-token", access_token]
        # PYTHONPATH etc. from the test interpreter must not leak into the server's
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=workdir, env=env, start_new_session=True
        )
        try:
            self._wait_ready(timeout)
        except Exception:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        import tritonclient.grpc as grpcclient

        with grpcclient.InferenceServerClient(self.url) as client:
            while time.monotonic() < end:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the Triton server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
                try:
                    if client.is_model_ready(self.model_name, client_timeout=2.0):
                        return
                except Exception:  # not listening yet: ask again until the timeout
                    pass
                time.sleep(0.25)
        raise TimeoutError(f"Triton model not ready after {timeout} s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # the script stops tritonserver and PyTriton's proxy processes on SIGTERM
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        self._log.close()


# -- Orthanc with its DICOMweb plugin ------------------------------------------------------------------------

#: where Debian's ``orthanc`` and ``orthanc-dicomweb`` packages install the server and the plugin
ORTHANC_BINARY = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def orthanc_programs() -> tuple[str, str]:
    """Orthanc's binary and its DICOMweb plugin, or skip with the packages to install."""
    binary = str(ORTHANC_BINARY) if ORTHANC_BINARY.exists() else shutil.which("Orthanc")
    plugin = DICOMWEB_PLUGIN if DICOMWEB_PLUGIN.exists() else None
    if plugin is None and shutil.which("dpkg"):
        listed = subprocess.run(["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True, timeout=30)
        plugin = next((Path(p) for p in listed.stdout.splitlines() if p.endswith("DicomWeb.so")), None)
    if binary is None or plugin is None:
        _skip("Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb)")
    return binary, str(plugin)


class Orthanc:
    """Orthanc as a PACS that speaks DICOMweb: its own storage in ``folder``, free HTTP and DICOM ports, the
    DICOMweb plugin at ``/dicom-web``; ``dicomweb_servers`` ({name: base URL}) are the servers its STOW-RS
    client may send to (``POST /dicom-web/servers/<name>/stow``), with ``dicomweb_token`` as their bearer
    token. With ``users`` ({name: password}) its HTTP side asks for basic authentication (the REST calls here
    use the first user). Construction returns once its REST API and the plugin answer; :meth:`stop` ends it."""

    def __init__(
        self,
        folder: Path,
        *,
        dicomweb_servers: dict[str, str] | None = None,
        dicomweb_token: str | None = None,
        users: dict[str, str] | None = None,
        timeout: float = 60.0,
    ):
        binary, plugin = orthanc_programs()
        folder.mkdir(parents=True, exist_ok=True)
        self.http_port, self.dicom_port = free_port(), free_port()
        config = {
            "Name": "edge-test",
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(users),
            "RegisteredUsers": users or {},
            "Plugins": [plugin],
            "DicomWeb": {
                "Enable": True,
                "Root": "/dicom-web/",
                "Servers": {
                    name: {"Url": url, "HttpHeaders": {"Authorization": f"Bearer {dicomweb_token}"}}
                    if dicomweb_token
                    else [url]
                    for name, url in (dicomweb_servers or {}).items()
                },
            },
        }
        self._auth = None
        if users:
            import base64

            self._auth = "Basic " + base64.b64encode(":".join(next(iter(users.items()))).encode()).decode()
        self.config_path = folder / "orthanc.json"
        self.config_path.write_text(json.dumps(config, indent=1))
        self.log_path = folder / "orthanc.log"
        with open(self.log_path, "ab") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [binary, str(self.config_path)],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=folder,
                env=dcmtk_env(),  # Orthanc's DICOM side is DCMTK
                start_new_session=True,
            )
        try:
            self._wait_ready(timeout)
        except Exception:
            self.stop()
            print(self.log()[-3000:], file=sys.stderr)
            raise

    def _wait_ready(self, timeout: float) -> None:
        wait_port(self.http_port, timeout, self.proc)
        end = time.monotonic() + timeout
        while True:
            try:
                self.get("/dicom-web/studies")
                return
            except (OSError, RuntimeError):
                if time.monotonic() > end or self.proc.poll() is not None:
                    raise
                time.sleep(0.1)

    @property
    def dicomweb_url(self) -> str:
        """The base URL of its DICOMweb API (STOW-RS posts to ``/studies`` below it)."""
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    def request(self, method: str, path: str, body: bytes | dict | None = None, content_type: str = "") -> Any:
        """One REST call; the decoded JSON answer (None when empty). An HTTP error raises RuntimeError."""
        raw = self.raw(method, path, body, content_type)
        return json.loads(raw) if raw.strip() else None

    def raw(self, method: str, path: str, body: bytes | dict | None = None, content_type: str = "") -> bytes:
        """One REST call; the body of the answer as it came. An HTTP error raises RuntimeError."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", content_type or "application/json")
        if self._auth is not None:
            request.add_header("Authorization", self._auth)
        try:
            with urllib.request.urlopen(request, timeout=120) as r:
                return bytes(r.read())
        except urllib.error.HTTPError as exc:
            with exc:
                raise RuntimeError(f"Orthanc {method} {path}: HTTP {exc.code}: {exc.read()[:500]!r}") from exc

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: bytes | dict | None = None, content_type: str = "") -> Any:
        return self.request("POST", path, body, content_type)

    def upload(self, paths: list[Path]) -> str:
        """Store files through the REST API; the Orthanc ID of the series of the last one."""
        answer: Any = None
        for path in paths:
            answer = self.post("/instances", path.read_bytes(), "application/dicom")
        return str(answer["ParentSeries"])

    def instances(self) -> dict[str, str]:
        """Every instance it holds as {SOP Instance UID: SOP Class UID}, asked through DICOMweb QIDO-RS."""
        found = self.get("/dicom-web/instances?includefield=00080016") or []
        return {item["00080018"]["Value"][0]: item["00080016"]["Value"][0] for item in found}

    def instance_file(self, sop_uid: str) -> bytes:
        """The file Orthanc keeps for one SOP Instance UID (``/tools/lookup``, then ``/instances/<id>/file``)."""
        [found] = [r for r in self.post("/tools/lookup", sop_uid.encode(), "text/plain") if r["Type"] == "Instance"]
        return self.raw("GET", f"/instances/{found['ID']}/file")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.proc, 30, group=True)


# -- a syslog receiver (audit messages) ----------------------------------------------------------------------


class SyslogReceiver:
    """A syslog receiver: UDP datagrams, or TCP with octet counting (RFC 6587); keeps every message."""

    def __init__(self, transport: str):
        self.transport = transport
        kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
        self.sock = socket.socket(socket.AF_INET, kind)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.messages: list[bytes] = []
        self.got = threading.Semaphore(0)
        if transport == "tcp":
            self.sock.listen(1)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if self.transport == "udp":
            while True:
                try:
                    data, _ = self.sock.recvfrom(65536)
                except OSError:
                    return
                self._keep(data)
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        buffer = b""
        with conn:
            while chunk := conn.recv(65536):
                buffer += chunk
                while b" " in buffer and len(buffer) >= (n := int(buffer.split(b" ", 1)[0])) + buffer.index(b" ") + 1:
                    start = buffer.index(b" ") + 1
                    self._keep(buffer[start : start + n])
                    buffer = buffer[start + n :]

    def _keep(self, message: bytes) -> None:
        self.messages.append(message)
        self.got.release()

    def wait(self, count: int) -> list[bytes]:
        for _ in range(count):
            assert self.got.acquire(timeout=10), f"{len(self.messages)} of {count} messages arrived"
        return self.messages

    def close(self) -> None:
        self.sock.close()
