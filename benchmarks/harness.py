"""Shared pieces of ``latency.py`` and ``anchors.py``: the test series, the service, the PACS, the sender.

Everything talks DICOM over loopback with real peers: DCMTK ``storescu``/``storescp`` (always by absolute
path and with ``TCP_NODELAY=1``: Debian's DCMTK leaves Nagle's algorithm on otherwise, 30x slower) and the
service as ``python -m edge_runtime serve`` in a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
PYTHON = sys.executable
STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
#: the baseline's series: 512 x 512, 0.977 mm pixels (500 mm field of view), 1.0 mm slice step
SPACING = (1.0, 500 / 512, 500 / 512)


def dcmtk_env() -> dict[str, str]:
    return dict(os.environ, TCP_NODELAY="1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 90.0, proc: subprocess.Popen | None = None) -> None:
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


# -- series --------------------------------------------------------------------------------------------


def base_series(slices: int, size: int = 512, seed: int = 0) -> Path:
    """A phantom CT series (``phantom``), written once and cached in benchmarks/results/series."""
    folder = RESULTS / "series" / f"ct{size}x{size}x{slices}-s{seed}"
    done = folder / ".complete"
    if done.exists():
        return folder
    from phantom import make_phantom, write_series

    if folder.exists():
        shutil.rmtree(folder)
    t0 = time.perf_counter()
    ph = make_phantom((slices, size, size), SPACING, rng=seed)
    write_series(ph.hu, ph.spacing, folder, series_description=f"latency bench {slices}", rng=seed)
    done.write_text(json.dumps({"slices": slices, "size": size, "seed": seed, "spacing": SPACING}))
    print(f"wrote base series {folder} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return folder


def series_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix == ".dcm")


@dataclass
class SeriesCopy:
    folder: Path
    files: list[Path]
    study_uid: str
    series_uid: str
    nbytes: int


def fresh_copy(src: Path, dst: Path) -> SeriesCopy:
    """The same pixels under new Study/Series/SOP/Frame-of-Reference UIDs (a new series to the service)."""
    import pydicom
    from pydicom.uid import generate_uid

    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    files = []
    for p in series_files(src):
        ds = pydicom.dcmread(p)
        sop = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SOPInstanceUID = sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        out = dst / p.name
        ds.save_as(out, enforce_file_format=True)
        files.append(out)
    return SeriesCopy(dst, files, study, series, sum(f.stat().st_size for f in files))


# -- senders -------------------------------------------------------------------------------------------


@dataclass
class SendResult:
    started: float  # epoch: sender launched (first instance goes out a few ms later)
    finished: float  # epoch: sender exited (the last instance was acknowledged before the release)
    returncode: int
    output: str = ""

    @property
    def wall(self) -> float:
        return self.finished - self.started


def storescu(files: list[Path], port: int, called_ae: str, timeout: float = 600) -> SendResult:
    """DCMTK storescu, one association, full speed."""
    cmd = [STORESCU, "-aec", called_ae, "-aet", "SCANNER", "127.0.0.1", str(port), *map(str, files)]
    t0 = time.time()
    out = subprocess.run(cmd, env=dcmtk_env(), capture_output=True, text=True, timeout=timeout)
    t1 = time.time()
    return SendResult(t0, t1, out.returncode, (out.stdout + out.stderr)[-2000:])


def paced_store(files: list[Path], port: int, called_ae: str, rate: float) -> SendResult:
    """One association, ``rate`` instances per second like a scanner reconstructing slice by slice.

    DCMTK storescu cannot pace inside one association, so this sender is pynetdicom (one C-STORE per
    ``1/rate`` s, from the raw file bytes); at scanner rates its own speed does not matter.
    """
    import pydicom
    from pynetdicom import AE

    ae = AE(ae_title="SCANNER")
    sop_classes = {str(pydicom.dcmread(files[0], stop_before_pixels=True).SOPClassUID)}
    for sc in sop_classes:
        ae.add_requested_context(sc, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    t0 = time.time()
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    if not assoc.is_established:
        return SendResult(t0, time.time(), 1, "association not established")
    bad = 0
    start = time.perf_counter()
    for i, f in enumerate(files):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        status = assoc.send_c_store(str(f))
        if getattr(status, "Status", None) != 0:
            bad += 1
    assoc.release()
    return SendResult(t0, time.time(), 1 if bad else 0, f"{bad} failed")


# -- receivers -----------------------------------------------------------------------------------------


class DcmtkSCP:
    """DCMTK storescp writing every object to ``folder`` (the PACS), TCP_NODELAY=1."""

    def __init__(self, folder: Path, ae_title: str = "PACS", port: int | None = None):
        self.folder = folder
        self.ae_title = ae_title
        self.port = port or free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [STORESCP, "-od", str(folder), "-aet", ae_title, str(self.port)],
            env=dcmtk_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port, 20, self.proc)

    @property
    def address(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class MinimalSCP:
    """``benchmarks/minimal_scp.py``: pynetdicom, raw bytes to files, nothing else."""

    def __init__(self, folder: Path, ae_title: str = "MIN", max_pdu: int = 131072):
        self.folder = folder
        self.ae_title = ae_title
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                PYTHON,
                str(HERE / "minimal_scp.py"),
                str(folder),
                str(self.port),
                "--ae-title",
                ae_title,
                "--max-pdu",
                str(max_pdu),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port, 30, self.proc)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def wait_for_seg(folder: Path, seen: set[str], series_uid: str, timeout: float) -> tuple[Path, float, float]:
    """Poll ``folder`` for a new SEG that references ``series_uid``.

    Returns (path, first seen epoch, mtime epoch): the mtime is when storescp finished writing the file.
    DCMTK names files ``<modality prefix>.<SOP Instance UID>`` ("SG." for Segmentation Storage, "SR3." for
    Comprehensive 3D SR), so the poll is a directory listing; only new files are opened, and files that are
    not a SEG of this series are remembered in ``seen``.
    """
    import pydicom

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
                if str(ds.SOPClassUID) != SEG_SOP_CLASS:
                    continue
                ref = str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID)
            except Exception:
                continue
            if ref == series_uid:
                return Path(entry.path), first_seen, os.stat(entry.path).st_mtime
        time.sleep(0.01)
    raise TimeoutError(f"no SEG for the series after {timeout} s")


# -- the service ---------------------------------------------------------------------------------------


class Service:
    """``python -m edge_runtime serve`` in a subprocess, with its own spool, output and log."""

    def __init__(self, workdir: Path, *args: str, ae_title: str = "EDGE"):
        self.workdir = workdir
        if workdir.exists():
            shutil.rmtree(workdir)
        workdir.mkdir(parents=True)
        self.port = free_port()
        self.http_port = free_port()
        self.ae_title = ae_title
        self.spool = workdir / "spool"
        self.output = workdir / "out"
        self.log_path = workdir / "service.log"
        self._log = open(self.log_path, "ab")
        cmd = [
            PYTHON,
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
        self.cmd = cmd
        self.t_launch = time.time()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=workdir)
        self.pid = self.proc.pid
        try:
            wait_port(self.port, 120, self.proc)
        except Exception:
            self.stop()
            print(self.log_path.read_text(errors="replace")[-3000:], file=sys.stderr)
            raise
        end = time.monotonic() + 120
        while time.monotonic() < end:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/readyz", timeout=5) as r:
                    if r.status == 200:
                        break
            except Exception:
                time.sleep(0.05)
        self.t_ready = time.time()

    @property
    def startup_s(self) -> float:
        return self.t_ready - self.t_launch

    def reset_peak(self) -> bool:
        """Reset VmHWM (``echo 5 > /proc/PID/clear_refs``), so the next read is this run's peak."""
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def memory(self) -> dict[str, float]:
        return proc_memory(self.pid)

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.spool / 'index.sqlite3'}?mode=ro", uri=True, timeout=10)

    def record(self, series_uid: str, timeout: float = 60.0) -> dict:
        """The spool's rows for one series once its result is published and both files are sent."""
        end = time.monotonic() + timeout
        last = None
        while time.monotonic() < end:
            con = self.db()
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
                        "SELECT id, timings, created FROM results WHERE series_id=? ORDER BY id DESC", (sid,)
                    ).fetchone()
                    if res is not None:
                        out = con.execute(
                            "SELECT path, state, sent FROM outbox WHERE result_id=?", (res[0],)
                        ).fetchall()
                        last = {
                            "instances": count,
                            "first_received": first,
                            "last_received": last_rx,
                            "timings": json.loads(res[1]),
                            "created": res[2],
                            "outbox": {Path(p).name: {"state": s, "sent": t} for p, s, t in out},
                        }
                        if out and all(s == "sent" for _, s, _ in out):
                            return last
            finally:
                con.close()
            time.sleep(0.05)
        raise TimeoutError(f"series not published and sent after {timeout} s (last seen: {last})")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def proc_memory(pid: int) -> dict[str, float]:
    """VmHWM / VmRSS of a process in MiB (from /proc; psutil's children too when psutil is installed)."""
    out: dict[str, float] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "VmPeak"):
                out[key] = int(value.split()[0]) / 1024
    except OSError:
        pass
    try:
        import psutil

        children = psutil.Process(pid).children(recursive=True)
        out["children_rss"] = sum(c.memory_info().rss for c in children) / 2**20
    except Exception:
        pass
    return out


def cpu_snapshot(pid: int) -> tuple[float, float, float]:
    """(wall, busy CPU-seconds of the whole machine, CPU-seconds of ``pid`` and its waited children)."""
    tick = os.sysconf("SC_CLK_TCK")
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    vals = [int(v) for v in fields]
    busy = sum(vals) - vals[3] - (vals[4] if len(vals) > 4 else 0)  # minus idle and iowait
    try:
        st = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        own = sum(int(v) for v in st[11:15])  # utime stime cutime cstime
    except OSError:
        own = 0
    return time.time(), busy / tick, own / tick


def foreign_cpu(before: tuple[float, float, float], after: tuple[float, float, float]) -> float:
    """Average number of cores busy with anything but ``pid`` between two snapshots (noise indicator)."""
    wall = after[0] - before[0]
    return max(0.0, ((after[1] - before[1]) - (after[2] - before[2])) / wall) if wall > 0 else 0.0


class RssSampler:
    """Samples a process's RSS every ``period`` s in a thread (for the memory panel of the timeline)."""

    def __init__(self, pid: int, period: float = 0.05):
        self.pid = pid
        self.period = period
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        path = Path(f"/proc/{self.pid}/statm")
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.is_set():
            try:
                rss = int(path.read_text().split()[1]) * page / 2**20
            except (OSError, IndexError, ValueError):
                return
            self.samples.append((time.time(), rss))
            self._stop.wait(self.period)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# -- statistics ----------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return float(np.percentile(vals, q))


def median(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def machine() -> dict[str, object]:
    import platform

    info: dict[str, object] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_avg_start": os.getloadavg(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        info["mem_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (OSError, ValueError):
        pass
    try:
        info["git_head"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        info["edge_runtime_dirty"] = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "edge_runtime"], cwd=REPO, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        )
    except (OSError, subprocess.SubprocessError):
        pass
    for mod in ("numpy", "onnxruntime", "pydicom", "pynetdicom", "highdicom"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            pass
    return info


def fmt(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"
