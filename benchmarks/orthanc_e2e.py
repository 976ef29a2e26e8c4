"""Orthanc as the PACS, end to end: Orthanc sends a CT series to the service, the SEG and SR land back in Orthanc.

Real peers over loopback, no mocks:

1. installs the Debian package ``orthanc`` when ``/usr/sbin/Orthanc`` is missing (``apt-get install -y
   orthanc``; the package does not start a daemon here) and runs ``Orthanc CONFIG.json`` as a subprocess with
   a generated configuration in a temporary folder: its own storage and index, free HTTP and DICOM ports,
   AE title ``ORTHANC``, the service as DICOM modality ``edge``, no authentication, no plugins. Every key
   written is first checked against the default configuration that this Orthanc version prints
   (``Orthanc --config=FILE``); a key the version does not know is left out and named in the report.
   Orthanc (Debian's build links the system DCMTK) gets ``TCP_NODELAY=1`` in its environment, like DCMTK's
   tools: Debian's DCMTK leaves Nagle's algorithm on otherwise (``--orthanc-nagle`` leaves it on);
2. starts the service (``python -m edge_runtime serve --destination ORTHANC@127.0.0.1:<Orthanc DICOM port>
   --http-port 0``) with its spool and output in the same temporary folder, and checks the route with a
   C-ECHO from Orthanc (``POST /modalities/edge/echo``);
3. per run, uploads a 512 x 512 x N phantom CT series (``phantom``, the same cached series as
   ``benchmarks.latency``: ``benchmarks/results/series/``) to Orthanc with new Study/Series/SOP UIDs (``POST
   /instances``, one per file) BEFORE the clock starts; then times

   - ``t0``: ``POST /modalities/edge/store`` with the Orthanc series ID, synchronous (Orthanc's C-STORE SCU
     job; the call returns once the job is done: hop 1 acknowledged at the REST client);
   - the service's own record in its spool (``series.first_received/last_received``, ``results.timings``
     {stages, started, published}, ``outbox.sent`` = C-STORE-RSP from Orthanc, i.e. stored there);
   - the SEG and the SR present in Orthanc: ``GET /studies/<id>`` polled every ``--poll`` s on one
     keep-alive connection until a new series of Modality SEG (and one of SR) with its instance appears
     (hop 2). The SEG found is checked against ``measurements.json`` (same SOP Instance UID).

All clocks are this host's ``time.time()``. Timeline of a run (seconds, consecutive):

    hop 1: Orthanc → service  t0 (store request) → last instance acknowledged by the service
                              (its ``last_received``: commit, then C-STORE-RSP)
    completion wait           last ack → job started (association released + complete stack, else quiet period)
    load … measurements       the service's stages (``results.timings``)
    publish                   rest of the job until published (measurements.json, spool transaction)
    hop 2: service → Orthanc  published → the SEG's C-STORE-RSP back at the service (stored in Orthanc)
    visible in REST           SEG stored → seen by the REST poll (poll interval + Orthanc's REST latency)

Headlines: store request → SEG in Orthanc (REST), last instance acknowledged → SEG in Orthanc (REST).
Outputs ``benchmarks/results/<tag>.md`` (printed) and ``<tag>.json``; ``--tag`` defaults to ``orthanc``.
Examples::

    python -m benchmarks.orthanc_e2e                           # 512x512x100, bundled model, 3 runs
    python -m benchmarks.orthanc_e2e --slices 100 300 --runs 3
    python -m benchmarks.orthanc_e2e --model benchmarks/results/spleen-unet --slices 300 --tag orthanc-spleen
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from benchmarks import harness
from benchmarks.harness import STAGE_LABELS, STAGES, adopt, machine_busy, process_cpu, release
from benchmarks.report import RESULTS, command, fmt, machine, pct, write_results
from tests.peers import ServiceProcess, free_port, wait_port

ORTHANC = "/usr/sbin/Orthanc"
TIMELINE = ("hop1", "completion_wait", *STAGES, "publish", "hop2")
LABELS = {
    "hop1": "hop 1: Orthanc → service (store request → last instance acknowledged)",
    **STAGE_LABELS,
    "hop2": "hop 2: service → Orthanc (published → SEG in Orthanc, seen over REST)",
}
DERIVED = {
    "store_to_seg_rest": ("**store request → SEG in Orthanc (REST)**", True),
    "last_ack_to_seg_rest": ("**last instance acknowledged → SEG in Orthanc (REST)**", True),
    "store_to_sr_rest": ("store request → SR in Orthanc (REST)", False),
    "store_to_seg_rsp": ("store request → SEG's C-STORE-RSP recorded by the service (`outbox.sent`)", False),
    "seg_rest_to_rsp": ("SEG seen over REST → its C-STORE-RSP recorded by the service (< 0: poll lag)", False),
    "store_rest_returned": ("store request → Orthanc's store job returned (hop 1 acknowledged over REST)", False),
    "store_to_first_received": ("store request → first instance stored at the service", False),
    "receive_span": ("receive span at the service (first → last instance stored)", False),
    "last_ack_to_rest_returned": ("last instance acknowledged → store job returned (release, job bookkeeping)",
                                  False),
    "job_total": ("job total (service `total`: load … measurements)", False),
    "orthanc_cpu_s": ("Orthanc CPU seconds during the run", False),
    "service_cpu_s": ("service CPU seconds during the run", False),
    "foreign_cores": ("noise: cores busy with other processes during the run", False),
}

# -- Orthanc -------------------------------------------------------------------------------------------


def ensure_orthanc() -> str:
    if not Path(ORTHANC).exists() and not shutil.which("Orthanc"):
        print("Orthanc missing: apt-get install -y orthanc", file=sys.stderr, flush=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        prefix = [] if os.geteuid() == 0 else ["sudo"]
        subprocess.run([*prefix, "apt-get", "install", "-y", "orthanc"], check=True, env=env)
    return ORTHANC if Path(ORTHANC).exists() else str(shutil.which("Orthanc"))


def orthanc_known_keys(binary: str, folder: Path) -> tuple[set[str], str]:
    """Configuration keys this Orthanc version documents (its printed default configuration), and its version."""
    path = folder / "orthanc-default.json"
    subprocess.run([binary, f"--config={path}"], check=True, capture_output=True, timeout=60)
    text = path.read_text(errors="replace")
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60)
    version = (out.stdout or out.stderr).splitlines()[0].split()[-1] if (out.stdout or out.stderr) else "?"
    return set(re.findall(r'"([A-Za-z][A-Za-z0-9]*)"\s*:', text)), version


class Orthanc:
    """``Orthanc CONFIG.json`` in a subprocess, with its own storage, index and ports; REST over urllib."""

    def __init__(self, binary: str, folder: Path, service_port: int, service_aet: str, nagle: bool,
                 extra: dict[str, object]):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        known, self.version = orthanc_known_keys(binary, folder)
        self.http_port, self.dicom_port = free_port(), free_port()
        wanted: dict[str, object] = {
            "Name": "edge-bench",
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "index"),
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "DicomServerEnabled": True,
            "DicomPort": self.dicom_port,
            "DicomAet": "ORTHANC",
            "DicomCheckCalledAet": False,
            "DicomModalities": {"edge": [service_aet, "127.0.0.1", service_port]},
            "DicomModalitiesInDatabase": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [],
            "KeepAlive": True,
            "TcpNoDelay": True,          # HTTP server (CivetWeb)
            "DicomTcpNoDelay": True,     # DICOM, only in versions that have it (not 1.10)
            "SaveJobs": False,
            "WebDavEnabled": False,
            "StorageCompression": False,
            "LogExportedResources": False,
            "ExecuteLuaEnabled": False,
            "StableAge": 60,             # irrelevant: no stable-series hooks here
            **extra,
        }
        self.config = {k: v for k, v in wanted.items() if k in known}
        self.skipped_keys = sorted(k for k in wanted if k not in known)
        self.config_path = folder / "orthanc.json"
        self.config_path.write_text(json.dumps(self.config, indent=1))
        env = dict(os.environ)
        if nagle:
            env.pop("TCP_NODELAY", None)
        else:
            env["TCP_NODELAY"] = "1"  # DCMTK (dcmnet) inside Orthanc: disable Nagle on DICOM sockets
        self.env_tcp_nodelay = env.get("TCP_NODELAY")
        self.log = folder / "orthanc.log"
        with open(self.log, "ab") as fh:  # the child keeps its own descriptor
            self.proc = adopt(subprocess.Popen([binary, str(self.config_path)], stdout=fh, stderr=subprocess.STDOUT,
                                               cwd=folder, env=env))
        self.pid = self.proc.pid
        try:
            wait_port(self.http_port, 60, self.proc)
            end = time.monotonic() + 60
            while True:
                try:
                    self.system = self.get("/system")
                    break
                except (OSError, urllib.error.URLError):
                    if time.monotonic() > end:
                        raise
                    time.sleep(0.1)
            wait_port(self.dicom_port, 30, self.proc)
        except Exception:
            print(self.log.read_text(errors="replace")[-3000:], file=sys.stderr)
            raise

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def request(self, method: str, path: str, body: bytes | dict | None = None, *,
                content_type: str = "application/json", timeout: float = 600) -> object:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:2000]
            raise RuntimeError(f"Orthanc {method} {path}: HTTP {exc.code}: {detail}") from exc
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            return raw.decode(errors="replace")

    def get(self, path: str) -> object:
        return self.request("GET", path)

    def post(self, path: str, body: bytes | dict | None = None, **kw: object) -> object:
        return self.request("POST", path, body, **kw)  # type: ignore[arg-type]

    def stop(self) -> None:
        release(self.proc)


class Poller:
    """Polls ``GET /studies/<id>`` on one keep-alive connection until series of the wanted modalities appear."""

    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.requests = 0

    def get(self, path: str) -> object:
        for attempt in (0, 1):
            try:
                self.conn.request("GET", path)
                resp = self.conn.getresponse()
                body = resp.read()
                self.requests += 1
                if resp.status != 200:
                    raise RuntimeError(f"GET {path}: HTTP {resp.status}")
                return json.loads(body)
            except (http.client.HTTPException, ConnectionError):
                self.conn.close()
                if attempt:
                    raise
        raise AssertionError

    def wait(self, study: str, known: set[str], modalities: tuple[str, ...], interval: float,
             timeout: float) -> dict[str, dict]:
        """{modality: {"seen": epoch, "series": id, "instance": id}} once every modality has an instance."""
        found: dict[str, dict] = {}
        checked = set(known)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            series = self.get(f"/studies/{study}")["Series"]  # type: ignore[index]
            now = time.time()
            for sid in series:
                if sid in checked:
                    continue
                info = self.get(f"/series/{sid}")
                modality = info["MainDicomTags"].get("Modality", "")  # type: ignore[index]
                if not info["Instances"]:  # type: ignore[index]
                    continue  # not yet: look again next round
                checked.add(sid)
                if modality in modalities and modality not in found:
                    found[modality] = {"seen": now, "series": sid, "instance": info["Instances"][0]}  # type: ignore[index]
            if all(m in found for m in modalities):
                return found
            time.sleep(interval)
        raise TimeoutError(f"Orthanc has {sorted(found)} of {modalities} after {timeout} s")

    def close(self) -> None:
        self.conn.close()


# -- series --------------------------------------------------------------------------------------------


def fresh_instances(files: list[Path]) -> tuple[str, str, list[bytes]]:
    """The same pixels under new Study/Series/SOP/Frame-of-Reference UIDs, as encoded files."""
    study = series = ""
    blobs = []
    for _, ds in harness.with_new_uids(files):
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        blobs.append(buf.getvalue())
        study, series = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
    return study, series, blobs


def cpu_state(*pids: int) -> tuple[float, ...]:
    """CPU-seconds of each process (without children), then the machine's busy CPU-seconds and the epoch."""
    return (*(process_cpu(pid, children=False) for pid in pids), machine_busy(), time.time())


# -- one run -------------------------------------------------------------------------------------------


def one_run(orthanc: Orthanc, service: ServiceProcess, files: list[Path], index: int, poll: float,
            timeout: float) -> dict:
    study_uid, series_uid, blobs = fresh_instances(files)
    t_up = time.perf_counter()
    study_id = series_id = None
    for blob in blobs:
        r = orthanc.post("/instances", blob, content_type="application/dicom")
        if not isinstance(r, dict) or r.get("Status") not in ("Success", "AlreadyStored"):
            raise RuntimeError(f"upload to Orthanc failed: {r}")
        study_id, series_id = r["ParentStudy"], r["ParentSeries"]
    upload_s = time.perf_counter() - t_up
    nbytes = sum(len(b) for b in blobs)
    del blobs
    info = orthanc.get(f"/series/{series_id}")
    if len(info["Instances"]) != len(files):  # type: ignore[index]
        raise RuntimeError(f"Orthanc holds {len(info['Instances'])} of {len(files)} instances")  # type: ignore[index]
    known = set(orthanc.get(f"/studies/{study_id}")["Series"])  # type: ignore[index]
    poller = Poller(orthanc.http_port)
    poller.get("/system")  # open the keep-alive connection before the clock starts
    time.sleep(1.0)  # let the upload's writes settle
    cpu0 = cpu_state(orthanc.pid, service.pid, os.getpid())

    t0 = time.time()
    job = orthanc.post("/modalities/edge/store", {"Resources": [series_id], "Synchronous": True},
                       timeout=timeout)
    t_store = time.time()
    try:
        found = poller.wait(study_id, known, ("SEG", "SR"), poll, timeout)  # type: ignore[arg-type]
    finally:
        poller.close()
    cpu1 = cpu_state(orthanc.pid, service.pid, os.getpid())
    ours = sum(cpu1[i] - cpu0[i] for i in range(3))
    foreign = max(0.0, (cpu1[3] - cpu0[3] - ours) / (cpu1[4] - cpu0[4]))
    if not isinstance(job, dict) or job.get("FailedInstancesCount", 0) or job.get("InstancesCount") != len(files):
        raise RuntimeError(f"Orthanc's store job did not send every instance: {job}")

    rec = service.record(series_uid, timeout=60)
    tm = rec["timings"]
    stages, published = tm["stages"], tm["published"]
    seg_sent = rec["outbox"]["seg.dcm"]["sent"]
    sr_sent = rec["outbox"].get("sr.dcm", {}).get("sent")
    seg_seen, sr_seen = found["SEG"]["seen"], found["SR"]["seen"]
    ack = rec["last_received"]

    # the SEG in Orthanc is ours for this series: same SOP Instance UID as measurements.json
    measurements = json.loads((Path(rec["directory"]) / "measurements.json").read_text())
    seg_info = orthanc.get(f"/instances/{found['SEG']['instance']}")
    seg_uid = seg_info["MainDicomTags"]["SOPInstanceUID"]  # type: ignore[index]
    if seg_uid != measurements.get("seg_sop_instance_uid"):
        raise RuntimeError("the SEG in Orthanc is not the one the service wrote for this series")
    tags = orthanc.get(f"/instances/{found['SEG']['instance']}/simplified-tags")
    ref = tags.get("ReferencedSeriesSequence", [{}])[0].get("SeriesInstanceUID")  # type: ignore[union-attr]
    if ref != series_uid:
        raise RuntimeError(f"the SEG in Orthanc references another series ({ref})")

    durations = {"hop1": ack - t0, **harness.service_durations(tm, ack)}
    durations["hop2"] = seg_seen - published
    derived = {
        "store_to_seg_rest": seg_seen - t0,
        "last_ack_to_seg_rest": seg_seen - ack,
        "store_to_sr_rest": sr_seen - t0,
        "store_to_seg_rsp": seg_sent - t0,
        "seg_rest_to_rsp": seg_sent - seg_seen,
        "store_rest_returned": t_store - t0,
        "store_to_first_received": rec["first_received"] - t0,
        "receive_span": ack - rec["first_received"],
        "last_ack_to_rest_returned": t_store - ack,
        "job_total": stages.get("total"),
        "orthanc_cpu_s": cpu1[0] - cpu0[0],
        "service_cpu_s": cpu1[1] - cpu0[1],
        "foreign_cores": foreign,
    }
    return {
        "index": index, "instances": rec["instances"], "series_bytes": nbytes, "upload_s": upload_s,
        "t0": t0, "durations": durations, "derived": derived, "windows": measurements.get("windows"),
        "orthanc_job": job, "seg_bytes": seg_info.get("FileSize"),  # type: ignore[union-attr]
        "sr_sent": sr_sent,
        "poll_requests": poller.requests, "stages_raw": stages, "outbox": rec["outbox"],
        "load_avg": os.getloadavg(),
    }


def summarize(runs: list[dict]) -> dict:
    out: dict[str, dict] = {}
    for k in (*TIMELINE, *DERIVED):
        vals = [r["durations"][k] if k in r["durations"] else r["derived"].get(k) for r in runs]
        out[k] = {"n": len(vals), "p50": pct(vals, 50), "p95": pct(vals, 95), "values": vals}
    return out


def markdown(meta: dict, blocks: list[dict]) -> str:
    lines = [
        f"### {meta['title']}",
        "",
        f"Orthanc {meta['orthanc_version']} (Debian package, DCMTK {meta['dcmtk']}, SQLite index, plugins none, "
        f"TCP_NODELAY={meta['orthanc_tcp_nodelay'] or 'unset'} for its DCMTK) sends the series with its C-STORE "
        f"SCU (`POST /modalities/edge/store`, synchronous); the service sends the SEG and SR back to Orthanc's "
        f"DICOM port. Model `{meta['model']}`; {meta['cpus']} CPUs ({meta['machine'].get('cpu', '?')}); "
        f"REST poll every {meta['poll_s'] * 1000:.0f} ms. Each series is uploaded to Orthanc (`POST /instances`) "
        f"before the clock starts; every run has new UIDs. Warm service (first series of the process not "
        f"counted: {meta['warmup']} warm-up run(s)). Seconds; p95 interpolates between the runs' values.",
    ]
    for b in blocks:
        s, n = b["summary"], len(b["runs"])
        r0 = b["runs"][0]
        lines += [
            "",
            f"#### 512x512x{b['slices']} ({r0['series_bytes'] / 1e6:.0f} MB, {r0['instances']} instances, "
            f"{r0['windows']} windows, SEG {(r0['seg_bytes'] or 0) / 1e6:.1f} MB), n={n}",
            "",
            "| stage | p50 | p95 | runs |",
            "|---|---:|---:|---|",
        ]
        for k in TIMELINE:
            lines.append(f"| {LABELS[k]} | {fmt(s[k]['p50'], 3)} | {fmt(s[k]['p95'], 3)} | "
                         + ", ".join(fmt(v, 2) for v in s[k]["values"]) + " |")
        for k, (label, bold) in DERIVED.items():
            p50, p95 = fmt(s[k]["p50"], 3), fmt(s[k]["p95"], 3)
            vals = ", ".join(fmt(v, 2) for v in s[k]["values"])
            if bold:
                p50, p95 = f"**{p50}**", f"**{p95}**"
            lines.append(f"| {label} | {p50} | {p95} | {vals} |")
        if b.get("cold"):
            c = b["cold"]
            cd, cs = c["derived"], c["durations"]
            lines += ["", f"Warm-up (cold) run: store request → SEG in Orthanc {cd['store_to_seg_rest']:.2f} s, "
                          f"last ack → SEG {cd['last_ack_to_seg_rest']:.2f} s, inference {cs['inference']:.2f} s."]
        lines += ["", f"Upload of the series to Orthanc before the clock (`POST /instances`, not timed in the "
                      f"table): {r0['upload_s']:.1f} s."]
    lines += ["", f"Service start (launch → DICOM port open): {meta['service_startup_s']:.2f} s. Orthanc "
                  f"configuration keys not known to this version and left out: "
                  f"{', '.join(meta['orthanc_skipped_keys']) or 'none'}."]
    if meta.get("notes"):
        lines += ["", *[f"- {n}" for n in meta["notes"]]]
    return "\n".join(lines)


def dcmtk_version() -> str:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "libdcmtk17"], capture_output=True,
                             text=True, timeout=30)
        return out.stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_service_arguments(ap)
    ap.add_argument("--slices", type=int, nargs="+", default=[100], help="series lengths (e.g. 100 300)")
    ap.add_argument("--runs", type=int, default=3, help="measured runs per series length")
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured runs first (cold process)")
    ap.add_argument("--poll", type=float, default=0.01, help="REST poll interval, seconds")
    ap.add_argument("--orthanc-nagle", action="store_true",
                    help="do not set TCP_NODELAY=1 for Orthanc's DCMTK (Nagle's algorithm stays on)")
    ap.add_argument("--orthanc-option", action="append", default=[], metavar="KEY=JSON",
                    help='extra Orthanc configuration, e.g. MaximumPduLength=116794 (repeatable)')
    ap.add_argument("--timeout", type=float, default=600.0, help="per run, seconds")
    ap.add_argument("--tag", default="orthanc", help="output name in benchmarks/results")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (Orthanc, spool, logs)")
    args = ap.parse_args(argv)

    from edge_runtime.inference.package import DEFAULT_PACKAGE, ModelPackage

    model_dir = (args.model or Path(DEFAULT_PACKAGE)).resolve()
    package = ModelPackage.load(model_dir)
    extra = {}
    for opt in args.orthanc_option:
        key, _, value = opt.partition("=")
        extra[key] = json.loads(value)

    binary = ensure_orthanc()
    work = Path(tempfile.mkdtemp(prefix="orthanc-e2e-"))
    harness.stop_children_on_exit()

    serve = ["--model", str(model_dir)]
    if args.threads:
        serve += ["--threads", str(args.threads)]
    serve += args.serve_arg
    blocks: list[dict] = []
    notes: list[str] = []
    orthanc = service = None
    try:
        service_port = free_port()
        orthanc = Orthanc(binary, work / "orthanc", service_port, "EDGE", args.orthanc_nagle, extra)
        # the service binds the port given to Orthanc's modality entry
        destination = f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"
        service = ServiceProcess(work / "service", "--destination", destination, *serve, port=service_port,
                                 http_port=0, start_timeout=180)
        adopt(service.proc)
        echo_t = time.perf_counter()
        orthanc.post("/modalities/edge/echo", {})
        echo_s = time.perf_counter() - echo_t
        print(f"Orthanc {orthanc.version} on HTTP {orthanc.http_port} / DICOM {orthanc.dicom_port}; service on "
              f"{service.port}; C-ECHO Orthanc → service {echo_s * 1000:.0f} ms", file=sys.stderr, flush=True)
        for slices in args.slices:
            files = harness.series_files(harness.base_series(slices, args.size, args.seed, work / "series",
                                                             purpose="orthanc bench"))
            block: dict = {"slices": slices, "runs": [], "cold": None}
            plan = [("warmup", i) for i in range(args.warmup if not blocks else 0)]
            plan += [("run", i) for i in range(args.runs)]
            for kind, i in plan:
                try:
                    r = one_run(orthanc, service, files, i, args.poll, args.timeout)
                except Exception:
                    print(service.log()[-4000:], file=sys.stderr)
                    print(orthanc.log.read_text(errors="replace")[-2000:], file=sys.stderr)
                    raise
                r["kind"] = kind
                if kind == "warmup":
                    block["cold"] = r
                else:
                    block["runs"].append(r)
                d = r["derived"]
                print(f"{slices} slices {kind} {i + 1}: store → SEG in Orthanc {d['store_to_seg_rest']:.2f} s, "
                      f"last ack → SEG {d['last_ack_to_seg_rest']:.2f} s (hop 1 {r['durations']['hop1']:.2f}, "
                      f"wait {r['durations']['completion_wait']:.2f}, inference {r['durations']['inference']:.2f}, "
                      f"hop 2 {r['durations']['hop2']:.3f})", file=sys.stderr, flush=True)
            block["summary"] = summarize(block["runs"])
            blocks.append(block)
        log_text = service.log()
        for pattern in ("WARNING", "ERROR", "refus", "reject", "abort"):
            hits = [ln for ln in log_text.splitlines() if pattern.lower() in ln.lower()]
            if hits:
                notes.append(f"service log has {len(hits)} line(s) with {pattern!r}, e.g. `{hits[0][-200:]}`")
        olog = orthanc.log.read_text(errors="replace").split("Orthanc has started", 1)[-1]
        ohits = [ln for ln in olog.splitlines() if ln[:1] in ("E", "W")]  # after its start-up banner
        if ohits:
            notes.append(f"Orthanc log has {len(ohits)} warning/error line(s), e.g. `{ohits[0][-200:]}`")
    finally:
        if service is not None:
            service.stop()
        if orthanc is not None:
            orthanc.stop()
        harness.stop_children()
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    meta = {
        "title": f"Orthanc as the PACS, end to end: {package.name}, 512x512x"
                 + "/".join(str(b["slices"]) for b in blocks) + " CT",
        "tag": args.tag, "model": package.identity, "model_dir": str(model_dir),
        "orthanc_version": orthanc.version, "orthanc_config": orthanc.config,
        "orthanc_skipped_keys": orthanc.skipped_keys, "orthanc_tcp_nodelay": orthanc.env_tcp_nodelay,
        "dcmtk": dcmtk_version(), "poll_s": args.poll, "warmup": args.warmup, "cpus": os.cpu_count(),
        "service_startup_s": service.t_listening - service.t_launch, "service_cmd": service.cmd[1:],
        "echo_s": echo_s, "machine": machine(), "notes": notes,
        "command": command("orthanc_e2e", argv),
    }
    md = markdown(meta, blocks)
    write_results(args.tag, md, {"meta": meta, "blocks": blocks})
    print(md)
    print(f"\nwrote {RESULTS / args.tag}.md and .json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
