"""Crash-safety soak (issue #4): SIGKILL the service at random points while several series are being pushed,
at least 20 times, then count: every acknowledged instance is in the spool, and each series has exactly one
SEG (and one SR) at the destination.

The pieces, all on loopback:

* the PACS: DCMTK ``storescp`` (``/usr/bin``, ``TCP_NODELAY=1``, ``+uf``: every received object is a file of
  its own, so a second delivery of the same object is seen, not overwritten), running throughout;
* the scanners: one thread per series with a pynetdicom SCU, so each acknowledged instance is known exactly
  (its SOP Instance UID is recorded when a C-STORE returns 0x0000). A series is sent in ``--associations``
  associations, one instance every ``--pace`` seconds (default: a series is on the wire for about twice the
  interval between series starts), 0.3-1 s between associations; when the service
  dies mid-association the scanner waits and sends again what was not acknowledged, like a modality does.
  The series carry ImagesInAcquisition (as CT scanners do), so a part of a series is never complete on
  evidence. Series start staggered over the kill phase (series ``i`` once ``i * kills / (series + 0.5)``
  kills are done), so at almost every kill two or three series are on the wire;
* the killer: starts ``python -m edge_runtime serve`` (fixed port, spool and output across restarts,
  ``--quiet-seconds 3``, ``--http-port 0``, each run's log kept as ``service-<n>.log`` in the work folder),
  SIGKILLs it and restarts it after a short random pause, ``--kills`` times. Each kill picks a mode (seeded):
  ``timer`` (uniform ``--min-up``..``--max-up`` s after the port opened), ``store`` (0-5 ms after a scanner
  began a C-STORE: between the spool's commit and the acknowledgement, or before; always the first kill),
  ``inference`` (0-0.4 s after the
  log says a series was completed or a job resumed: mid-segmentation), ``send`` (0-30 ms after the log says a
  result was published, or 0-10 ms after a new file lands at the PACS: mid-send, at times between the PACS's
  acknowledgement and the outbox commit), ``startup`` (0.05-0.6 s after the process started: mid-recovery).
  Triggered modes fall back to the timer. Where a kill really landed is read back at the kill (scanner
  associations open, C-STOREs in flight, series being processed, outbox rows pending in the spool index);
* the end: the service is started once more and left running until every series has its SEG and SR at the
  PACS and no new object arrived for ``quiet + 2`` s, then stopped with SIGTERM; then the counts:

  1. every acknowledged SOP Instance UID is in the spool index, its file exists, parses and holds that UID;
  2. per series, exactly one distinct SEG SOP Instance UID references it and its ReferencedInstanceSequence
     names every instance of the series; exactly one distinct SR;
  3. SEG files received in total: a second delivery of the same SOP Instance UID (a kill between the PACS's
     acknowledgement and the outbox commit) is allowed and reported as a duplicate delivery.

Prints a Markdown table and writes it to ``benchmarks/results/soak.md``, the raw figures (every kill,
every series) to ``benchmarks/results/soak.json``. Exit status 1 when any count is wrong. Usage::

    python -m benchmarks.soak [--kills 20] [--series 6] [--shape 40 128 128] [--seed 1] [--workdir DIR]

SIGKILL ends the process, not the machine: data in the page cache survives it, so this proves the
ordering of writes, commits and acknowledgements, not fsync against power loss.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pynetdicom
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE

from benchmarks.report import RESULTS, write_results
from edge_runtime.dicom import Comprehensive3DSRStorage, SegmentationStorage
from phantom import make_phantom, write_series
from tests.peers import SYSTEM_BIN, StoreSCP, free_port, referenced_series, serve_command

AE_TITLE = "EDGE"
MODES = ("timer", "store", "inference", "send", "startup")
MODE_WEIGHTS = (0.4, 0.2, 0.15, 0.15, 0.1)
COMPLETED = re.compile(r"complete on evidence|complete after|resuming \d+ interrupted job")


# -- series and scanners -------------------------------------------------------------------------------------


@dataclass
class Series:
    index: int
    study_uid: str
    series_uid: str
    sop_uids: list[str]
    datasets: list[Dataset]
    gate: int  # released once this many kills are done


class Ledger:
    """What the scanners know: acknowledged instances, and what is on the wire right now. Thread-safe."""

    def __init__(self, log_path: Path):
        self._lock = threading.Lock()
        self.acked: dict[str, dict[str, Any]] = {}  # SOP Instance UID -> series, time, service run
        self.associations_open = 0
        self.stores_in_flight = 0
        self.no_response = 0  # C-STOREs cut off by a kill: sent again
        self.cut: list[tuple[str, float]] = []  # (SOP Instance UID, when) of each
        self.refused: Counter[str] = Counter()  # non-success statuses
        self.connect_failures = 0
        self.associations = 0
        self.run = 0  # the service run the killer has started last
        self._log = open(log_path, "a", encoding="utf-8")  # noqa: SIM115

    def note(self, text: str) -> None:
        with self._lock:
            self._log.write(f"{time.time():.3f} run {self.run}: {text}\n")
            self._log.flush()

    def ack(self, series: int, uid: str) -> None:
        with self._lock:
            self.acked[uid] = {"series": series, "t": time.time(), "run": self.run}

    def add(self, name: str, delta: int) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + delta)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {
                "associations_open": self.associations_open,
                "stores_in_flight": self.stores_in_flight,
                "acked": len(self.acked),
            }

    def close(self) -> None:
        self._log.close()


class Scanner(threading.Thread):
    """Pushes one series, in several associations, until every instance is acknowledged once."""

    def __init__(
        self,
        series: Series,
        port: int,
        ledger: Ledger,
        stop: threading.Event,
        *,
        associations: int,
        pace: float,
        rng: random.Random,
    ):
        super().__init__(name=f"scanner-{series.index}", daemon=True)
        self.series, self.port, self.ledger = series, port, ledger
        self.stop, self.pace, self.rng = stop, pace, rng
        self.go = threading.Event()  # the gate: this series starts once so many kills are done
        self.done = threading.Event()
        n = len(series.datasets)
        bounds = [round(k * n / associations) for k in range(associations + 1)]
        self.chunks = [list(range(bounds[k], bounds[k + 1])) for k in range(associations) if bounds[k + 1] > bounds[k]]
        self.ae = AE(ae_title=f"SCANNER{series.index}")
        self.ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = 60
        self.ae.connection_timeout = 5

    def run(self) -> None:
        while not self.go.wait(0.2):
            if self.stop.is_set():
                return
        s = self.series
        self.ledger.note(f"series {s.index}: starting, {len(s.datasets)} instances in {len(self.chunks)} associations")
        for number, chunk in enumerate(self.chunks):
            pending = list(chunk)
            while pending and not self.stop.is_set():
                pending = self._push(pending)
                if pending:
                    time.sleep(0.2)  # the service is down (or refused): wait, then send the rest again
            if number + 1 < len(self.chunks):
                time.sleep(self.rng.uniform(0.3, 1.0))  # well under the quiet period
        self.ledger.note(f"series {s.index}: every instance acknowledged")
        self.done.set()

    def _push(self, pending: list[int]) -> list[int]:
        """One association: send ``pending`` in order; return what was not acknowledged."""
        s, ledger = self.series, self.ledger
        assoc = self.ae.associate("127.0.0.1", self.port, ae_title=AE_TITLE)
        if not assoc.is_established:
            ledger.add("connect_failures", 1)
            return pending
        ledger.add("associations", 1)
        ledger.add("associations_open", 1)
        left = list(pending)
        try:
            for k, index in enumerate(pending):
                if k:
                    time.sleep(self.pace)
                if self.stop.is_set() or not assoc.is_established:
                    break
                ledger.add("stores_in_flight", 1)
                try:
                    status = assoc.send_c_store(s.datasets[index])
                except (OSError, RuntimeError, ValueError) as exc:
                    status = None
                    ledger.note(f"series {s.index}: C-STORE raised {type(exc).__name__}: {exc}")
                finally:
                    ledger.add("stores_in_flight", -1)
                code = getattr(status, "Status", None)
                if code == 0x0000:
                    ledger.ack(s.index, s.sop_uids[index])
                    left.remove(index)
                    continue
                if code is None:
                    ledger.add("no_response", 1)
                    with ledger._lock:
                        ledger.cut.append((s.sop_uids[index], time.time()))
                    ledger.note(f"series {s.index}: instance {index} got no response (association lost)")
                    break
                with ledger._lock:
                    ledger.refused[f"0x{code:04X}"] += 1
                ledger.note(f"series {s.index}: instance {index} refused 0x{code:04X}")
                break
        finally:
            if assoc.is_established:
                assoc.release()
            ledger.add("associations_open", -1)
        return left


# -- the service and the PACS --------------------------------------------------------------------------------


class LogFollower:
    """New lines of a growing log file."""

    def __init__(self, path: Path):
        self.path = path
        self.pos = 0
        self.buf = ""

    def lines(self) -> list[str]:
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                f.seek(self.pos)
                data = f.read()
                self.pos = f.tell()
        except FileNotFoundError:
            return []
        self.buf += data
        *complete, self.buf = self.buf.split("\n")
        return complete


class Service:
    def __init__(self, workdir: Path, number: int, port: int, destination: str, quiet: float):
        self.number = number
        self.log_path = workdir / f"service-{number}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        cmd = serve_command(
            port,
            workdir / "spool",
            workdir / "out",
            "--destination",
            destination,
            "--quiet-seconds",
            str(quiet),
            "--min-free-mb",
            "64",
            ae_title=AE_TITLE,
        )
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=workdir, env=dict(os.environ, PYTHONUNBUFFERED="1")
        )
        self._follow = LogFollower(self.log_path)
        self.history: list[str] = []

    def new_lines(self) -> list[str]:
        lines = self._follow.lines()
        self.history += lines
        return lines

    def listening(self) -> bool:
        self.new_lines()
        return any("listening as" in line for line in self.history)

    def wait_listening(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.listening():
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0.02)
        return False

    def kill(self) -> int | None:
        """SIGKILL; the exit status it had already if it died on its own (None if we killed it)."""
        code = self.proc.poll()
        if code is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self._log.close()
        return code

    def terminate(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self._log.close()
                return -999
        self._log.close()
        return self.proc.returncode


class Pacs(StoreSCP):
    """DCMTK storescp, one file per received object (``+uf``: a second delivery is a file of its own)."""

    def __init__(self, folder: Path, log_path: Path):
        super().__init__(folder, "PACS", options=("+uf",), log=log_path)

    def count(self) -> int:
        return sum(1 for _ in os.scandir(self.folder))

    def objects(self, full: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
        """Parsed received objects (SOP class and UID, the series they reference) and unreadable file names."""
        found, bad = [], []
        for path in sorted(self.folder.iterdir()):
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=not full)
                sop_class = str(ds.SOPClassUID)
                item: dict[str, Any] = {"file": path.name, "class": sop_class, "uid": str(ds.SOPInstanceUID)}
                if sop_class in (SegmentationStorage, Comprehensive3DSRStorage):
                    item["series"] = referenced_series(ds)
                if sop_class == SegmentationStorage:
                    ref = ds.ReferencedSeriesSequence[0]
                    item["instances"] = sorted(str(i.ReferencedSOPInstanceUID) for i in ref.ReferencedInstanceSequence)
                    if full:
                        item["frames"] = int(ds.NumberOfFrames)
                        _ = len(ds.PixelData)
                found.append(item)
            except Exception:  # noqa: BLE001 - storescp may still be writing it; counted at the end
                bad.append(path.name)
        return found, bad


def spool_state(db: Path) -> dict[str, Any]:
    """Series states and pending outbox rows, read-only (between runs, or after the last)."""
    if not db.exists():
        return {"error": "no index yet"}
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            states = dict(con.execute("SELECT state, COUNT(*) FROM series GROUP BY state").fetchall())
            outbox = dict(con.execute("SELECT state, COUNT(*) FROM outbox GROUP BY state").fetchall())
        finally:
            con.close()
    except sqlite3.Error as exc:
        return {"error": str(exc)}
    return {"series": states, "outbox": outbox}


# -- the soak ------------------------------------------------------------------------------------------------


def make_series(
    folder: Path, count: int, shape: tuple[int, int, int], spacing: tuple[float, float, float], seed: int, kills: int
) -> list[Series]:
    out = []
    for i in range(count):
        phantom = make_phantom(shape, spacing, rng=seed * 1000 + i)
        info = write_series(
            phantom.hu,
            phantom.spacing,
            folder / f"series-{i}",
            patient_id=f"SOAK{i:03d}",
            patient_name=f"SOAK^{i}",
            series_number=i + 1,
            extra={"ImagesInAcquisition": shape[0]},
        )
        datasets: list[Dataset] = [pydicom.dcmread(p) for p in info.paths]
        gate = int(i * kills / (count + 0.5))
        out.append(Series(i, info.study_uid, info.series_uid, list(info.sop_instance_uids), datasets, gate))
    return out


def choose_deadline(
    service: Service,
    mode: str,
    up_at: float,
    rng: random.Random,
    args: argparse.Namespace,
    pacs: Pacs,
    ledger: Ledger,
) -> str:
    """Wait until it is time to kill; returns what set the time ('timer' or the trigger seen)."""
    deadline = up_at + (args.max_up if mode == "store" else rng.uniform(args.min_up, args.max_up))
    files = pacs.count()
    what = "timer"
    lines = list(service.history)  # "resuming N interrupted job(s)" comes before the port opens
    while True:
        now = time.monotonic()
        if now >= deadline or service.proc.poll() is not None:
            return what
        if what == "timer" and mode == "store":
            if ledger.stores_in_flight:
                deadline, what = min(deadline, now + rng.uniform(0.0, 0.005)), "C-STORE in flight"
        elif what == "timer" and mode == "inference":
            lines += service.new_lines()
            if any(COMPLETED.search(line) for line in lines):
                deadline, what = min(deadline, now + rng.uniform(0.0, 0.4)), "completion logged"
            lines.clear()
        elif what == "timer" and mode == "send":
            if pacs.count() > files:
                deadline, what = min(deadline, now + rng.uniform(0.0, 0.003)), "object at the PACS"
            elif any("segmented" in line for line in service.new_lines()):
                deadline, what = min(deadline, now + rng.uniform(0.0, 0.03)), "result published"
        time.sleep(0.001 if mode == "send" else 0.003)


def soak(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="edge-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if (workdir / "spool").exists() or (workdir / "pacs").exists():
        raise SystemExit(f"{workdir} already holds a soak; give a new --workdir")
    shape, spacing = tuple(args.shape), tuple(args.spacing)
    t_setup = time.perf_counter()
    series = make_series(workdir / "series", args.series, shape, spacing, args.seed, args.kills)
    n = shape[0]
    # a series is on the wire for about two release slots of service uptime: two or three at once
    slot = max(1.0, args.kills / (args.series + 0.5))
    mean_up = (args.min_up + args.max_up) / 2
    pace = args.pace if args.pace is not None else min(1.0, max(0.02, 2.0 * slot * mean_up / n))
    setup_s = time.perf_counter() - t_setup

    pacs = Pacs(workdir / "pacs", workdir / "storescp.log")
    port = free_port()
    ledger = Ledger(workdir / "scanners.log")
    stop = threading.Event()
    scanners = [
        Scanner(s, port, ledger, stop, associations=args.associations, pace=pace, rng=random.Random(args.seed + 17 * i))
        for i, s in enumerate(series)
    ]
    for sc in scanners:
        sc.start()
    kills: list[dict[str, Any]] = []
    unexpected: list[dict[str, Any]] = []
    problems: list[str] = []
    db = workdir / "spool" / "index.sqlite3"
    print(
        f"soak in {workdir}: {args.kills} kills, {args.series} series of {n} instances, pace {pace:.2f} s, "
        f"{args.associations} associations a series",
        file=sys.stderr,
    )
    t0 = time.perf_counter()
    number = 0
    consecutive_failures = 0
    service: Service | None = None
    try:
        while len(kills) < args.kills:
            number += 1
            ledger.run = number
            service = Service(workdir, number, port, pacs.address, args.quiet)
            for sc in scanners:
                if sc.series.gate <= len(kills):
                    sc.go.set()
            mode = rng.choices(MODES, MODE_WEIGHTS)[0] if kills else "store"  # the first: mid-C-STORE
            up_s = None
            if mode == "startup":
                time.sleep(rng.uniform(0.05, 0.6))
                trigger = "startup timer"
            else:
                if not service.wait_listening(args.start_timeout):
                    trigger = "never listened"
                else:
                    up_at = time.monotonic()
                    trigger = choose_deadline(service, mode, up_at, rng, args, pacs, ledger)
                    up_s = time.monotonic() - up_at
            on_wire = ledger.snapshot()
            listening = service.listening()
            died = service.kill()
            state = spool_state(db)
            record = {
                "run": number,
                "mode": mode,
                "trigger": trigger,
                "alive_s": round(time.monotonic() - service.started, 3),
                "up_s": None if up_s is None else round(up_s, 3),
                "listening": listening,
                **on_wire,
                "spool": state,
            }
            if died is not None or trigger == "never listened":
                record["exit_code"] = died
                unexpected.append(record)
                consecutive_failures += 1
                print(f"run {number}: the service exited on its own ({died}); see {service.log_path}", file=sys.stderr)
                if consecutive_failures >= 3:
                    problems.append(f"crash loop: {consecutive_failures} runs in a row ended on their own")
                    break
            else:
                consecutive_failures = 0
                kills.append(record)
                print(
                    f"kill {len(kills):2d} (run {number}, {mode}, {trigger}): {on_wire['associations_open']} "
                    f"association(s) open, {on_wire['stores_in_flight']} C-STORE in flight, spool {state}",
                    file=sys.stderr,
                )
            time.sleep(rng.uniform(args.min_pause, args.max_pause))
        kill_phase_s = time.perf_counter() - t0

        # the last run: left alone until every series has its results, then stopped cleanly
        number += 1
        ledger.run = number
        final = service = Service(workdir, number, port, pacs.address, args.quiet)
        for sc in scanners:
            sc.go.set()
        if not final.wait_listening(args.start_timeout):
            problems.append(f"the final run never listened (exit {final.proc.poll()}); see {final.log_path}")
        end = time.monotonic() + args.timeout
        last_count, last_change = -1, time.monotonic()
        complete = False
        while time.monotonic() < end:
            if final.proc.poll() is not None:
                problems.append(f"the final run exited on its own ({final.proc.returncode}); see {final.log_path}")
                break
            count = pacs.count()
            if count != last_count:
                last_count, last_change = count, time.monotonic()
            if all(sc.done.is_set() for sc in scanners):
                objects, _ = pacs.objects()
                have_seg = {u for o in objects if o["class"] == SegmentationStorage for u in o["series"]}
                have_sr = {u for o in objects if o["class"] == Comprehensive3DSRStorage for u in o["series"]}
                if all(s.series_uid in have_seg and s.series_uid in have_sr for s in series):
                    complete = True
                    if time.monotonic() - last_change >= args.quiet + 2.0:  # anything more on its way?
                        break
            time.sleep(0.5)
        if not complete:
            problems.append(f"timeout: not every series had its SEG and SR {args.timeout:.0f} s after the last kill")
        final_exit = final.terminate()
        if final_exit != 0:
            problems.append(f"the final run exited {final_exit} on SIGTERM; see {final.log_path}")
        wall_s = time.perf_counter() - t0
    finally:
        if service is not None and service.proc.poll() is None:  # interrupted: leave nothing running
            service.kill()
        stop.set()
        for sc in scanners:
            sc.join(10)
        ledger.close()
        pacs.stop()

    # -- counting ------------------------------------------------------------------------------------------
    total = sum(len(s.sop_uids) for s in series)
    acked = dict(ledger.acked)
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        indexed = {
            uid: (rel, series_uid, received)
            for uid, rel, series_uid, received in con.execute(
                "SELECT i.sop_uid, i.path, s.series_uid, i.received FROM instances i "
                "JOIN series s ON s.id = i.series_id"
            )
        }
        per_series_indexed = Counter(
            r[0] for r in con.execute("SELECT s.series_uid FROM instances i JOIN series s ON s.id = i.series_id")
        )
        final_states = dict(con.execute("SELECT state, COUNT(*) FROM series GROUP BY state").fetchall())
        final_outbox = dict(con.execute("SELECT state, COUNT(*) FROM outbox GROUP BY state").fetchall())
    finally:
        con.close()
    spool_root = workdir / "spool"
    lost: list[dict[str, Any]] = []
    found = 0
    for uid, where in acked.items():
        why = None
        if uid not in indexed:
            why = "not in the index"
        else:
            path = spool_root / indexed[uid][0]
            if not path.is_file():
                why = f"file missing: {indexed[uid][0]}"
            else:
                try:
                    ds = pydicom.dcmread(path)
                    _ = ds.pixel_array
                    if str(ds.SOPInstanceUID) != uid:
                        why = "file holds another instance"
                except Exception as exc:  # noqa: BLE001
                    why = f"file does not parse: {type(exc).__name__}: {exc}"
        if why is None:
            found += 1
        else:
            lost.append({"sop_uid": uid, **where, "why": why})

    # a C-STORE cut off by a kill after the spool had committed it: acknowledged later as a duplicate
    cut_but_stored = sum(1 for uid, t in ledger.cut if uid in indexed and indexed[uid][2] < t)

    objects, unreadable = pacs.objects(full=True)
    segs = [o for o in objects if o["class"] == SegmentationStorage]
    srs = [o for o in objects if o["class"] == Comprehensive3DSRStorage]
    per_series = []
    for s in series:
        mine = [o for o in segs if s.series_uid in o["series"]]
        distinct = sorted({o["uid"] for o in mine})
        covers = [sorted(set(o["instances"])) == sorted(s.sop_uids) for o in mine]
        sr_mine = [o for o in srs if s.series_uid in o["series"]]
        per_series.append(
            {
                "series": s.index,
                "instances": len(s.sop_uids),
                "acknowledged": sum(1 for w in acked.values() if w["series"] == s.index),
                "indexed": per_series_indexed.get(s.series_uid, 0),
                "seg_files": len(mine),
                "seg_distinct": len(distinct),
                "seg_covers_all_instances": bool(covers) and all(covers),
                "seg_instances_referenced": sorted({len(o["instances"]) for o in mine}),
                "sr_files": len(sr_mine),
                "sr_distinct": len({o["uid"] for o in sr_mine}),
            }
        )
    seg_distinct = len({o["uid"] for o in segs})
    sr_distinct = len({o["uid"] for o in srs})

    if len(kills) < args.kills:
        problems.append(f"only {len(kills)} of {args.kills} kills")
    if unexpected:
        problems.append(
            f"{len(unexpected)} run(s) ended on their own: "
            + ", ".join(f"run {u['run']} (exit {u.get('exit_code')})" for u in unexpected)
        )
    if len(acked) != total:
        problems.append(f"{len(acked)} of {total} instances acknowledged: the scanners did not finish")
    if lost:
        problems.append(f"{len(lost)} acknowledged instance(s) missing or damaged in the spool")
    for p in per_series:
        if p["seg_distinct"] != 1:
            problems.append(f"series {p['series']}: {p['seg_distinct']} distinct SEGs (expected exactly 1)")
        elif not p["seg_covers_all_instances"]:
            problems.append(
                f"series {p['series']}: its SEG references {p['seg_instances_referenced']} of "
                f"{p['instances']} instances"
            )
        if p["sr_distinct"] != 1:
            problems.append(f"series {p['series']}: {p['sr_distinct']} distinct SRs (expected exactly 1)")
        if p["indexed"] != p["instances"]:
            problems.append(f"series {p['series']}: {p['indexed']} instances indexed, {p['instances']} sent")
    tracebacks = {}
    for log_path in sorted(workdir.glob("service-*.log"), key=lambda p: int(p.stem.split("-")[1])):
        text = log_path.read_text(errors="replace")
        if "Traceback" in text or " ERROR " in text:
            tracebacks[log_path.name] = text.count("Traceback")

    landed = {
        "with an association open": sum(1 for k in kills if k["associations_open"]),
        "with a C-STORE in flight": sum(1 for k in kills if k["stores_in_flight"]),
        "with a series being segmented": sum(1 for k in kills if k["spool"].get("series", {}).get("processing")),
        "with results waiting in the outbox": sum(1 for k in kills if k["spool"].get("outbox", {}).get("pending")),
        "before the port opened": sum(1 for k in kills if not k["listening"]),
    }
    return {
        "ok": not problems,
        "problems": problems,
        "workdir": str(workdir),
        "kills": len(kills),
        "runs": number,
        "instances_total": total,
        "instances_acknowledged": len(acked),
        "instances_found": found,
        "lost": lost,
        "segs_expected": len(series),
        "segs_delivered_distinct": seg_distinct,
        "seg_files": len(segs),
        "seg_duplicate_deliveries": len(segs) - seg_distinct,
        "srs_delivered_distinct": sr_distinct,
        "sr_files": len(srs),
        "sr_duplicate_deliveries": len(srs) - sr_distinct,
        "unreadable_files_at_pacs": unreadable,
        "series": per_series,
        "kill_log": kills,
        "unexpected_exits": unexpected,
        "landed": landed,
        "modes": dict(Counter(k["mode"] for k in kills)),
        "scanners": {
            "associations": ledger.associations,
            "c_stores_without_response": ledger.no_response,
            "of_which_already_in_the_spool": cut_but_stored,
            "refused": dict(ledger.refused),
            "connection_attempts_refused": ledger.connect_failures,
        },
        "final_spool": {"series": final_states, "outbox": final_outbox},
        "logs_with_errors": tracebacks,
        "setup_s": setup_s,
        "kill_phase_s": kill_phase_s,
        "wall_s": wall_s,
        "config": {
            "kills": args.kills,
            "series": args.series,
            "shape": list(shape),
            "spacing": list(spacing),
            "quiet_seconds": args.quiet,
            "associations": args.associations,
            "pace_s": pace,
            "up_s": [args.min_up, args.max_up],
            "pause_s": [args.min_pause, args.max_pause],
            "seed": args.seed,
            "modes": dict(zip(MODES, MODE_WEIGHTS, strict=True)),
        },
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "pydicom": pydicom.__version__,
        "pynetdicom": pynetdicom.__version__,
        "platform": platform.platform(),
    }


def render(r: dict[str, Any]) -> str:
    c = r["config"]
    header = (
        f"SIGKILL soak: {r['kills']} kills while {c['series']} series of {c['shape'][0]} instances "
        f"({c['shape'][1]} x {c['shape'][2]}) were pushed by pynetdicom scanners ({c['associations']} associations "
        f"a series, one instance every {c['pace_s']:.2f} s), quiet period {c['quiet_seconds']:g} s, "
        f"seed {c['seed']}; DCMTK storescp as the PACS; {r['cpus']} CPU(s), Python {r['python']}, "
        f"pydicom {r['pydicom']}, pynetdicom {r['pynetdicom']}.\n"
    )
    lines = [
        header,
        "| kills | instances acknowledged | instances found | SEGs expected | SEGs delivered (distinct) "
        "| duplicate deliveries | wall time |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {r['kills']} | {r['instances_acknowledged']} of {r['instances_total']} | {r['instances_found']} "
        f"| {r['segs_expected']} | {r['segs_delivered_distinct']} | {r['seg_duplicate_deliveries']} "
        f"| {r['wall_s']:.0f} s |",
        "",
        "Per series: distinct SEGs "
        + ", ".join(str(p["seg_distinct"]) for p in r["series"])
        + "; each SEG references every instance of its series: "
        + ("yes" if all(p["seg_covers_all_instances"] for p in r["series"]) else "NO")
        + f". SRs delivered (distinct): {r['srs_delivered_distinct']} "
        f"({r['sr_duplicate_deliveries']} duplicate deliveries of the same object). "
        f"SEG files received: {r['seg_files']} ({r['seg_duplicate_deliveries']} duplicate deliveries of the same "
        "object, a kill between the PACS's acknowledgement and the outbox commit).",
        "",
        "Where the kills landed (state read at the kill; one kill can count in several rows): "
        + ", ".join(f"{v} {k}" for k, v in r["landed"].items())
        + ". Modes: "
        + ", ".join(f"{k} {v}" for k, v in sorted(r["modes"].items()))
        + f". Scanners: {r['scanners']['associations']} associations, "
        f"{r['scanners']['c_stores_without_response']} C-STOREs cut off without a response and sent again "
        f"({r['scanners']['of_which_already_in_the_spool']} of them already committed to the spool: "
        "acknowledged as duplicates on the second try).",
        "",
        "Result: " + ("every count right." if r["ok"] else "FAILED: " + "; ".join(r["problems"])),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--series", type=int, default=6)
    ap.add_argument("--shape", type=int, nargs=3, default=[40, 128, 128], metavar=("Z", "Y", "X"))
    ap.add_argument("--spacing", type=float, nargs=3, default=[2.5, 2.7, 2.7], metavar=("Z", "Y", "X"))
    ap.add_argument("--associations", type=int, default=3, help="associations a series is split over")
    ap.add_argument("--pace", type=float, help="seconds between instances (default: spread over the kill phase)")
    ap.add_argument("--quiet", type=float, default=3.0, help="the service's --quiet-seconds")
    ap.add_argument("--min-up", type=float, default=0.3, help="shortest time up before a timed kill (s)")
    ap.add_argument("--max-up", type=float, default=5.0, help="longest time up before a timed kill (s)")
    ap.add_argument("--min-pause", type=float, default=0.1, help="shortest pause before a restart (s)")
    ap.add_argument("--max-pause", type=float, default=1.0, help="longest pause before a restart (s)")
    ap.add_argument("--start-timeout", type=float, default=90.0, help="seconds for a run to open its port")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds after the last kill for every result")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workdir", type=Path, help="work folder, kept (default: a new temporary folder)")
    ap.add_argument("--results-dir", type=Path, default=RESULTS, help="where soak.md and soak.json go")
    ap.add_argument("--no-write", action="store_true", help="print only; leave the results folder alone")
    args = ap.parse_args(argv)
    if args.kills < 1 or args.series < 1 or args.associations < 1 or not 0 < args.min_up <= args.max_up:
        ap.error("--kills, --series and --associations must be >= 1, and 0 < --min-up <= --max-up")
    if not (SYSTEM_BIN / "storescp").exists():
        print(f"soak: {SYSTEM_BIN / 'storescp'} not found (apt-get install dcmtk)", file=sys.stderr)
        return 2
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # refused connections while the service is down
    result = soak(args)
    table = render(result)
    print(table)
    if result["lost"]:
        print("lost instances:", json.dumps(result["lost"][:20], indent=1), file=sys.stderr)
    print(f"work folder (service-<n>.log, scanners.log, spool, pacs): {result['workdir']}", file=sys.stderr)
    if not args.no_write:
        write_results("soak", table, result, args.results_dir)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
