"""What the latency benchmarks share beyond the peers of ``tests.peers``: the phantom series, the senders,
the service with its start-up and memory probes, CPU and RSS probes, the service's stage timeline, and the
child processes a benchmark must stop when it is interrupted.

Everything talks DICOM over loopback with real peers (``tests.peers``): DCMTK ``storescu``/``storescp`` (by
absolute path and with ``TCP_NODELAY=1``) and the service as ``python -m edge_runtime serve`` in a subprocess.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from benchmarks.report import RESULTS
from tests.peers import ServiceProcess, free_port, stop_process, storescu, wait_port

#: the baseline's series: 512 x 512, 0.977 mm pixels (500 mm field of view), 1.0 mm slice step
SPACING = (1.0, 500 / 512, 500 / 512)
#: the service's own stages, in order (``results.timings.stages``)
STAGES = ("load", "preprocess", "inference", "postprocess", "seg", "measurements")
#: table labels of the part of a timeline that the service's spool records
STAGE_LABELS = {
    "completion_wait": "completion wait (last ack → job started)",
    "load": "decode + assembly (`load`)",
    "preprocess": "preprocessing (resample + window)",
    "inference": "inference (network + window blending)",
    "postprocess": "post-processing (argmax + back to source grid)",
    "seg": "SEG encoding + write (`seg`)",
    "measurements": "measurements + SR (`measurements`)",
    "publish": "publish (measurements.json, spool transaction)",
}


def add_service_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of the end-to-end benchmarks that choose the model, the phantom and the service's options."""
    ap.add_argument("--model", type=Path, default=None, help="model package (default: the bundled one)")
    ap.add_argument("--size", type=int, default=512, help="rows and columns of the phantom's slices")
    ap.add_argument("--seed", type=int, default=0, help="phantom seed")
    ap.add_argument("--threads", type=int, default=None, help="--threads for the service")
    ap.add_argument("--serve-arg", action="append", default=[], help="extra argument for `serve` (repeatable)")


# -- series --------------------------------------------------------------------------------------------


def base_series(
    slices: int, size: int = 512, seed: int = 0, scratch: Path | None = None, purpose: str = "latency bench"
) -> Path:
    """A phantom CT series (``phantom``), cached in benchmarks/results/series.

    With ``scratch``, a series missing from the cache is written there instead (the cache is left alone).
    """
    name = f"ct{size}x{size}x{slices}-s{seed}"
    cached = RESULTS / "series" / name
    if (cached / ".complete").exists():
        return cached
    folder = cached if scratch is None else scratch / name
    if scratch is not None and folder.exists():
        return folder
    from phantom import make_phantom, write_series

    if folder.exists():
        shutil.rmtree(folder)
    t0 = time.perf_counter()
    ph = make_phantom((slices, size, size), SPACING, rng=seed)
    write_series(ph.hu, ph.spacing, folder, series_description=f"{purpose} {slices}", rng=seed)
    if scratch is None:
        (folder / ".complete").write_text(
            json.dumps({"slices": slices, "size": size, "seed": seed, "spacing": SPACING})
        )
    print(f"wrote series {folder} in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return folder


def series_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix == ".dcm")


def with_new_uids(files: list[Path]) -> Iterator[tuple[Path, pydicom.Dataset]]:
    """Each file read back under new Study/Series/SOP/Frame-of-Reference UIDs: to the service, a new series
    with the same pixels."""
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for p in files:
        ds = pydicom.dcmread(p)
        sop = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SOPInstanceUID = sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        yield p, ds


@dataclass
class SeriesCopy:
    folder: Path
    files: list[Path]
    study_uid: str
    series_uid: str
    nbytes: int


def fresh_copy(src: Path, dst: Path) -> SeriesCopy:
    """A copy of the series in ``src`` under new UIDs (:func:`with_new_uids`), written to ``dst``."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    files: list[Path] = []
    study = series = ""
    for p, ds in with_new_uids(series_files(src)):
        ds.save_as(dst / p.name, enforce_file_format=True)
        files.append(dst / p.name)
        study, series = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
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


def timed_storescu(files: list[Path], port: int, called_ae: str, timeout: float = 600) -> SendResult:
    """DCMTK storescu (``tests.peers.storescu``), one association, full speed, timed on this host's clock."""
    t0 = time.time()
    out = storescu(port, files, called_ae, check=False, timeout=timeout)
    t1 = time.time()
    return SendResult(t0, t1, out.returncode, (out.stdout + out.stderr)[-2000:])


def paced_store(files: list[Path], port: int, called_ae: str, rate: float) -> SendResult:
    """One association, ``rate`` instances per second like a scanner reconstructing slice by slice.

    DCMTK storescu cannot pace inside one association, so this sender is pynetdicom (one C-STORE per
    ``1/rate`` s, from the raw file bytes); at scanner rates its own speed does not matter.
    """
    from pynetdicom import AE

    ae = AE(ae_title="SCANNER")
    sop_classes = {str(pydicom.dcmread(files[0], stop_before_pixels=True).SOPClassUID)}
    for sc in sop_classes:
        ae.add_requested_context(sc, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
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


class MinimalSCP:
    """``python -m benchmarks.minimal_scp``: pynetdicom, raw bytes to files, nothing else."""

    def __init__(self, folder: Path, ae_title: str = "MIN", max_pdu: int = 131072):
        self.folder = folder
        self.ae_title = ae_title
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.minimal_scp",
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
        stop_process(self.proc, 10)


# -- the service ---------------------------------------------------------------------------------------


class Service(ServiceProcess):
    """``python -m edge_runtime serve`` in a fresh ``workdir``, ready (``/readyz`` 200) when constructed,
    with its start-up time and memory probes."""

    def __init__(self, workdir: Path, *args: str, ae_title: str = "EDGE"):
        if workdir.exists():
            shutil.rmtree(workdir)
        super().__init__(workdir, *args, ae_title=ae_title, start_timeout=120)
        self.t_ready = self.wait_ready(120)

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


def service_durations(timings: dict, ack: float) -> dict[str, float]:
    """The service's part of a timeline from its spool record (``results.timings``), seconds in order:
    ``completion_wait`` (last instance acknowledged at ``ack`` → job started), each of :data:`STAGES`, and
    ``publish`` (the rest of the job until published)."""
    stages, started, published = timings["stages"], timings["started"], timings["published"]
    durations = {"completion_wait": started - ack}
    for k in STAGES:
        durations[k] = stages.get(k, 0.0)
    durations["publish"] = published - started - sum(stages.get(k, 0.0) for k in STAGES)
    return durations


# -- probes --------------------------------------------------------------------------------------------


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


def machine_busy() -> float:
    """Busy CPU-seconds of the whole machine since boot (all but idle and iowait), from /proc/stat."""
    vals = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(vals) - vals[3] - (vals[4] if len(vals) > 4 else 0)) / os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int, children: bool = True) -> float:
    """CPU-seconds of ``pid`` (utime + stime; ``children``: plus those of its waited-for children)."""
    try:
        st = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(v) for v in st[11 : 15 if children else 13]) / os.sysconf("SC_CLK_TCK")


def cpu_snapshot(pid: int) -> tuple[float, float, float]:
    """(wall, busy CPU-seconds of the whole machine, CPU-seconds of ``pid`` and its waited children)."""
    return time.time(), machine_busy(), process_cpu(pid)


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


# -- child processes -----------------------------------------------------------------------------------

_children: list[subprocess.Popen] = []


def adopt(proc: subprocess.Popen) -> subprocess.Popen:
    """Remember a child process, to stop it with :func:`stop_children` (at exit, or on SIGTERM/SIGINT)."""
    _children.append(proc)
    return proc


def release(proc: subprocess.Popen, timeout: float = 30.0) -> int | None:
    """Stop an adopted child (SIGTERM, then SIGKILL) and forget it; its exit status."""
    code = stop_process(proc, timeout)
    if proc in _children:
        _children.remove(proc)
    return code


def stop_children() -> None:
    for proc in list(_children):
        release(proc, 10)


def stop_children_on_exit() -> None:
    """Stop every adopted child at exit and on SIGTERM/SIGINT (then exit with 128 + the signal)."""

    def on_signal(signum: int, _frame: object) -> None:
        stop_children()
        raise SystemExit(128 + signum)

    atexit.register(stop_children)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


# -- synthetic label maps ------------------------------------------------------------------------------


def paint_ellipsoid(labels: np.ndarray, value: int, radii: np.ndarray, rng: np.random.Generator) -> None:
    """Paint an axis-aligned ellipsoid of ``radii`` (voxels) with ``value``, centred at random inside
    ``labels`` (the centre drawn from ``rng``), over whatever is there."""
    shape = labels.shape
    centre = rng.uniform(radii, np.array(shape) - radii)
    lo = np.maximum(np.floor(centre - radii).astype(int), 0)
    hi = np.minimum(np.ceil(centre + radii).astype(int) + 1, shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    grid = np.ogrid[box]
    inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)) <= 1.0
    labels[box][inside] = value
