"""End-to-end latency of ``edge-runtime serve``: a CT series in over DICOM, the SEG out at a real PACS.

What it does, with real peers over loopback:

1. writes a 512 x 512 x N phantom CT series once (``phantom``; cached in
   ``benchmarks/results/series/``) and, before every run, a copy with new Study/Series/SOP UIDs;
2. starts DCMTK ``storescp -od`` (``TCP_NODELAY=1``) as the PACS and the service as a subprocess
   (``python -m edge_runtime serve --destination PACS@...``);
3. replays the series with DCMTK ``storescu`` at full speed (or, with ``--pace R``, R instances/s in one
   association, like a scanner), then waits for the SEG to land at the PACS and for the spool's outbox to
   record both result files as sent;
4. builds the timeline of each run from the sender's clock, the spool's index (``series`` first/last
   received, ``results.timings`` {stages, started, published}, ``outbox.sent``) and the SEG file's mtime at
   the PACS (when storescp finished writing it). All clocks are this host's ``time.time()``.

Runs: ``--cold C`` fresh service processes, each measured on its first series ("cold": first inference
in the process); the last process then takes ``--runs W`` more series ("warm": same process, new UIDs each
time). Peak memory is the service's VmHWM (/proc/PID/status), reset before each warm run
(``echo 5 > /proc/PID/clear_refs``), so a warm figure is that run's peak; the cold figure includes start-up.

Stages of the timeline (consecutive, seconds):

    receive           first instance sent (storescu launched) -> last instance acknowledged (the spool's
                      ``last_received``: the service commits, then answers; storescu exits after the release)
    completion wait   last acknowledged -> job started (series queued on evidence, or after --quiet-seconds)
    load              decode and assembly of the volume (service stage ``load``)
    preprocess        resample to the model grid + intensity window
    inference         sliding window: the network and the blending of the windows' outputs
    postprocess       argmax and mapping back to the source grid
    seg               DICOM SEG encoding and write (fsync)
    measurements      per-segment measurements + SR encoding and write
    publish           the rest of the job until published (measurements.json, the spool transaction)
    send              published -> SEG stored at the PACS (storescp finished writing the file)
    ack               SEG stored -> the outbox row marked sent (C-STORE-RSP back at the service)

Streaming (``--streaming on|off|both``): the service segments slab by slab while the series arrives (its
default), or only at completion; ``both`` runs one service of each, the runs interleaved (off, on, off, on ...)
so the machine's load falls on both alike, and writes one table side by side and one PNG per mode
(``<tag>-on.png``, ``<tag>-off.png``). Each run records what the service streamed (``measurements.json``).

Headline: last instance acknowledged -> SEG stored at the PACS. Outputs ``benchmarks/results/<tag>.json``,
``<tag>.md`` (printed) and ``<tag>.png`` (timeline and memory). Examples::

    python -m benchmarks.latency --slices 100 --runs 3                       # bundled model
    python -m benchmarks.latency --model benchmarks/results/spleen-unet --slices 300 --cold 1 --runs 2
    python -m benchmarks.latency --slices 300 --pace 20 --runs 1              # scanner-like 20 slices/s
    python -m benchmarks.latency --slices 300 --pace 10 --runs 3 --streaming both
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from benchmarks import harness
from benchmarks.harness import STAGE_LABELS, STAGES
from benchmarks.report import RESULTS, command, fmt, machine, pct, table_head, write_results
from tests.peers import StoreSCP, wait_for_seg

TIMELINE = ("receive", "completion_wait", *STAGES, "publish", "send", "ack")
LABELS = {
    "receive": "receive (sender launched → last instance stored + acknowledged)",
    **STAGE_LABELS,
    "send": "send (published → SEG stored at PACS)",
    "ack": "C-STORE-RSP (SEG stored → outbox sent)",
}
COLORS = {
    "receive": "#9e9e9e",
    "completion_wait": "#d9d9d9",
    "load": "#8c564b",
    "preprocess": "#e377c2",
    "inference": "#1f77b4",
    "postprocess": "#17becf",
    "seg": "#ff7f0e",
    "measurements": "#bcbd22",
    "publish": "#7f7f7f",
    "send": "#2ca02c",
    "ack": "#98df8a",
}


def one_run(
    service: harness.Service,
    pacs: StoreSCP,
    base: Path,
    work: Path,
    kind: str,
    index: int,
    pace: float,
    timeout: float,
) -> dict:
    copy = harness.fresh_copy(base, work / "send")
    time.sleep(1.0)  # let the copy's writes settle before the clock starts
    if kind == "warm":
        service.reset_peak()
    seen = set(os.listdir(pacs.folder))
    cpu0 = harness.cpu_snapshot(service.pid)
    with harness.RssSampler(service.pid) as sampler:
        if pace > 0:
            send = harness.paced_store(copy.files, service.port, service.ae_title, pace)
        else:
            send = harness.timed_storescu(copy.files, service.port, service.ae_title)
        if send.returncode != 0:
            raise RuntimeError(f"sender failed ({send.returncode}): {send.output}")
        seg_path, seg_seen, seg_stored = wait_for_seg(pacs.folder, seen, copy.series_uid, timeout)
        rec = service.record(copy.series_uid, timeout=60)
    cpu1 = harness.cpu_snapshot(service.pid)
    mem = service.memory()
    tm = rec["timings"]
    stages = tm["stages"]
    started, published = tm["started"], tm["published"]
    seg_sent = rec["outbox"].get("seg.dcm", {}).get("sent")
    # the last instance is acknowledged right after the service commits it (``last_received``); the sender
    # exits only after the release round trip, a few ms later
    ack = rec["last_received"]
    durations = {"receive": ack - send.started, **harness.service_durations(tm, ack)}
    durations["send"] = seg_stored - published
    durations["ack"] = (seg_sent - seg_stored) if seg_sent else None
    derived = {
        "last_ack_to_seg_stored": seg_stored - ack,
        "first_sent_to_seg_stored": seg_stored - send.started,
        "last_ack_to_seg_sent": (seg_sent - ack) if seg_sent else None,
        "server_receive_span": rec["last_received"] - rec["first_received"],
        "sender_wall": send.wall,
        "job_total": tm.get("completed", {}).get("stages", stages).get("total"),  # SEG first: total is step 2's
        "started_to_published": published - started,
    }
    derived["overhead_excl_inference_wait"] = (
        derived["last_ack_to_seg_stored"] - durations["inference"] - durations["completion_wait"]
    )
    derived["budget_inference_plus_1_5"] = durations["inference"] + 1.5
    derived["load_avg_1min"] = os.getloadavg()[0]
    data = result_record(service.output, seg_path)
    windows, streamed = data.get("windows"), data.get("streaming")
    return {
        "kind": kind,
        "index": index,
        "instances": rec["instances"],
        "bytes": copy.nbytes,
        "t0": send.started,
        "durations": durations,
        "derived": derived,
        "windows": windows,
        "streaming": streamed,
        "seg_bytes": seg_path.stat().st_size,
        "seg_first_seen_after_mtime": seg_seen - seg_stored,
        "memory_mib": mem,
        "rss_trace": [(round(t - send.started, 3), round(r, 1)) for t, r in sampler.samples],
        "stages_raw": stages,
        # cores busy with other processes during the run (storescu/storescp included): the noise indicator
        "foreign_cores": round(harness.foreign_cpu(cpu0, cpu1), 2),
        "service_cpu_s": round(cpu1[2] - cpu0[2], 2),
        "load_avg": os.getloadavg(),
    }


def result_record(output: Path, seg_path: Path, timeout: float = 30.0) -> dict:
    """The service's ``measurements.json`` for the SEG at ``seg_path``; it may be written after the SEG has left
    (the SEG is sent first), so wait for it a little. {} when it never shows."""
    deadline = time.monotonic() + timeout
    while True:
        for m in output.glob("*/measurements.json"):
            try:
                data = json.loads(m.read_text())
            except (OSError, ValueError):
                continue  # being written
            if data.get("seg_sop_instance_uid") and seg_path.name.endswith(data["seg_sop_instance_uid"]):
                return data
        if time.monotonic() > deadline:
            return {}
        time.sleep(0.2)


def percentiles(vals: list) -> dict:
    return {"n": len(vals), "p50": pct(vals, 50), "p95": pct(vals, 95), "p99": pct(vals, 99), "values": vals}


def summarize(runs: list[dict]) -> dict:
    out: dict[str, dict] = {}
    for group in ("cold", "warm"):
        rs = [r for r in runs if r["kind"] == group]
        if not rs:
            continue
        keys = list(TIMELINE) + list(rs[0]["derived"])
        g: dict[str, dict] = {}
        for k in keys:
            vals = [
                r["durations"].get(k, r["derived"].get(k)) if k in r["durations"] else r["derived"].get(k) for r in rs
            ]
            g[k] = percentiles([v for v in vals if v is not None])
        g["peak_rss_mib"] = percentiles([r["memory_mib"].get("VmHWM") for r in rs])
        g["foreign_cores"] = percentiles([r.get("foreign_cores") for r in rs])
        out[group] = g
    return out


def markdown(meta: dict, summary: dict) -> str:
    cold, warm = summary.get("cold", {}), summary.get("warm", {})
    nw = warm.get("receive", {}).get("n", 0)
    nc = cold.get("receive", {}).get("n", 0)
    lines = [
        f"### {meta['title']}",
        "",
        f"{meta['slices']} slices of 512x512 ({meta['series_mb']:.0f} MB), model `{meta['model']}` "
        f"({meta['windows']} windows), sender {meta['sender']}; {meta['cpus']} CPUs; cold = first series of a "
        f"fresh service process (n={nc}), warm = same process, new UIDs (n={nw}; p95/p99 interpolate between "
        f"{nw} values). Seconds.",
        "",
        *table_head("stage", "cold", "warm p50", "warm p95", "warm p99"),
    ]

    def row(label: str, key: str, group_c: dict, group_w: dict, digits: int = 3, bold: bool = False) -> None:
        c = group_c.get(key, {}).get("p50")
        w = group_w.get(key, {})
        cells = [fmt(c, digits), fmt(w.get("p50"), digits), fmt(w.get("p95"), digits), fmt(w.get("p99"), digits)]
        if bold:
            label, cells = f"**{label}**", [f"**{x}**" if x != "–" else x for x in cells]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    for k in TIMELINE:
        row(LABELS[k], k, cold, warm)
    row("last instance acknowledged → SEG stored at PACS", "last_ack_to_seg_stored", cold, warm, bold=True)
    row("first instance sent → SEG stored at PACS", "first_sent_to_seg_stored", cold, warm)
    row("everything after last ack except inference and completion wait", "overhead_excl_inference_wait", cold, warm)
    row("budget: inference + 1.5 s", "budget_inference_plus_1_5", cold, warm)
    row("job total (service `total`: load … measurements)", "job_total", cold, warm)
    row("receive span at the service (first → last instance stored)", "server_receive_span", cold, warm)
    row("sender wall time (storescu launch → exit, incl. release)", "sender_wall", cold, warm)
    row("peak RSS of the service, MiB (VmHWM; cold includes start-up)", "peak_rss_mib", cold, warm, digits=0)
    row(
        f"noise: cores busy with other processes during the run (of {meta['cpus']})",
        "foreign_cores",
        cold,
        warm,
        digits=2,
    )
    lines += [
        "",
        f"Service start-up (launch → /readyz 200): {fmt(meta.get('startup_s'))} s; SEG size {meta['seg_mb']:.1f} MB.",
    ]
    return "\n".join(lines)


def side_by_side(meta: dict, summary: dict[str, dict], runs: list[dict]) -> str:
    """The headline figures with and without streaming (warm runs; the ratio is on / off of the p50s)."""
    off, on = summary["off"].get("warm", {}), summary["on"].get("warm", {})
    n = on.get("receive", {}).get("n", 0)
    lines = [
        f"### {meta['title']}: streaming off and on, side by side",
        "",
        f"{meta['slices']} slices, {meta['windows']} windows; warm runs (n={n} per mode, interleaved off/on in one "
        f"invocation; p95 interpolates between {n} values); seconds unless marked.",
        "",
        *table_head("", "off p50", "off p95", "on p50", "on p95", "on/off (p50)"),
    ]
    rows = [
        ("**last instance acknowledged → SEG stored at PACS**", "last_ack_to_seg_stored", 2),
        ("completion wait (last ack → job started)", "completion_wait", 2),
        ("inference at completion (network + blending)", "inference", 2),
        ("job total (load … measurements)", "job_total", 2),
        ("first instance sent → SEG stored at PACS", "first_sent_to_seg_stored", 2),
        ("peak RSS of the service, MiB", "peak_rss_mib", 0),
        ("noise: cores busy with other processes", "foreign_cores", 2),
        ("noise: load average (1 min) at the end of the run", "load_avg_1min", 1),
    ]
    for label, key, digits in rows:
        a, b = off.get(key, {}), on.get(key, {})
        ratio = (b["p50"] / a["p50"]) if a.get("p50") and b.get("p50") is not None else None
        cells = [fmt(a.get("p50"), digits), fmt(a.get("p95"), digits), fmt(b.get("p50"), digits)]
        cells += [fmt(b.get("p95"), digits), fmt(ratio, 2)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    streamed = [r.get("streaming") or {} for r in runs if r["mode"] == "on" and r["kind"] == "warm"]
    lines += [
        "",
        "Streamed while arriving (warm runs, streaming on): "
        + ", ".join(
            f"{s.get('slabs_streamed', 0)}/{s.get('slabs_streamed', 0) + s.get('slabs_at_completion', 0)} slabs "
            f"({fmt(s.get('streamed_s'))} s)" + (f" [{s['reason']}]" if s.get("reason") else "")
            for s in streamed
        )
        + ".",
    ]
    return "\n".join(lines)


def plot(path: Path, meta: dict, runs: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, mx) = plt.subplots(
        2, 1, figsize=(14, 3 + 0.45 * len(runs) + 3), height_ratios=[len(runs) + 1, 3], constrained_layout=True
    )
    names = []
    for i, r in enumerate(runs):
        x = 0.0
        for k in TIMELINE:
            d = r["durations"].get(k) or 0.0
            if k == "completion_wait":
                x = r["durations"]["receive"]
            ax.barh(
                i,
                max(d, 0.0),
                left=x,
                color=COLORS[k],
                edgecolor="white",
                linewidth=0.3,
                label=LABELS[k] if i == 0 else None,
            )
            x += max(d, 0.0)
        names.append(f"{r['kind']} {r['index'] + 1}")
        total = r["derived"]["first_sent_to_seg_stored"]
        streamed = r.get("streaming") or {}
        note = (
            f"\n streamed {streamed['slabs_streamed']}/{streamed['slabs_streamed'] + streamed['slabs_at_completion']}"
            f" slabs while arriving ({streamed['streamed_s']:.0f} s of work)"
            if streamed.get("slabs_streamed")
            else ""
        )
        label = f" {r['derived']['last_ack_to_seg_stored']:.2f} s after last ack{note}"
        ax.text(total, i, label, va="center", fontsize=8)
    ax.set_xlim(0, 1.3 * max(r["derived"]["first_sent_to_seg_stored"] for r in runs))
    ax.set_yticks(range(len(runs)), names)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the first instance was sent")
    ax.set_title(meta["title"], fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    for r in runs:
        if r["rss_trace"]:
            t, m = zip(*r["rss_trace"], strict=True)
            mx.plot(t, m, label=f"{r['kind']} {r['index'] + 1}", linewidth=1)
    mx.set_xlabel("seconds since the first instance was sent")
    mx.set_ylabel("service RSS (MiB)")
    mx.legend(fontsize=7)
    mx.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def progress(r: dict) -> None:
    """One line per run on stderr, as it finishes."""
    d = r["durations"]
    print(
        f"streaming {r['mode']}, {r['kind']} {r['index'] + 1}: last ack -> SEG stored "
        f"{r['derived']['last_ack_to_seg_stored']:.2f} s (receive {d['receive']:.2f}, wait {d['completion_wait']:.2f}, "
        f"inference {d['inference']:.2f}; streamed {(r.get('streaming') or {}).get('slabs_streamed', 0)} slabs); "
        f"peak RSS {r['memory_mib'].get('VmHWM', 0):.0f} MiB",
        file=sys.stderr,
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_service_arguments(ap)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--runs", type=int, default=3, help="warm runs in the last service process")
    ap.add_argument("--cold", type=int, default=1, help="fresh service processes, each measured once")
    ap.add_argument("--pace", type=float, default=0.0, help="instances/s (0: DCMTK storescu at full speed)")
    ap.add_argument("--quiet-seconds", type=float, default=None)
    ap.add_argument("--early-completion", choices=("true", "false"), default=None)
    ap.add_argument(
        "--streaming",
        choices=("on", "off", "both"),
        default="on",
        help="segment while the series arrives (on, the service default), only at completion (off), or both "
        "side by side, runs interleaved",
    )
    ap.add_argument("--timeout", type=float, default=900.0, help="per run, seconds")
    ap.add_argument("--tag", default=None, help="output name in benchmarks/results (default from model/slices)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (spools, PACS, logs)")
    args = ap.parse_args(argv)

    from edge_runtime.inference.package import DEFAULT_PACKAGE, ModelPackage

    model_dir = (args.model or Path(DEFAULT_PACKAGE)).resolve()
    package = ModelPackage.load(model_dir)
    tag = args.tag or f"latency-{package.name}-{args.slices}" + (f"-pace{args.pace:g}" if args.pace else "")
    work = RESULTS / "work" / tag
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    base = harness.base_series(args.slices, args.size, args.seed)

    serve = ["--model", str(model_dir)]
    if args.threads:
        serve += ["--threads", str(args.threads)]
    if args.quiet_seconds is not None:
        serve += ["--quiet-seconds", str(args.quiet_seconds)]
    if args.early_completion:
        serve += ["--early-completion", args.early_completion]
    serve += args.serve_arg

    modes = ("off", "on") if args.streaming == "both" else (args.streaming,)
    pacs = StoreSCP(work / "pacs", fork=False)
    runs: list[dict] = []
    startups: list[float] = []
    hwm_ready: list[float] = []
    try:
        for c in range(max(1, args.cold)):
            services: dict[str, harness.Service] = {}
            try:
                for mode in modes:
                    flag = ["--streaming", "true" if mode == "on" else "false"]
                    services[mode] = harness.Service(
                        work / f"service{c}-{mode}", *serve, *flag, "--destination", pacs.address
                    )
                    startups.append(services[mode].startup_s)
                    hwm_ready.append(services[mode].memory().get("VmHWM", 0.0))
                plan = [("cold", c)] + ([("warm", w) for w in range(args.runs)] if c == args.cold - 1 else [])
                for kind, i in plan:
                    for mode, service in services.items():
                        try:
                            r = one_run(service, pacs, base, work, kind, i, args.pace, args.timeout)
                        except Exception:
                            print(service.log_path.read_text(errors="replace")[-4000:], file=sys.stderr)
                            raise
                        r["mode"] = mode
                        runs.append(r)
                        progress(r)
            finally:
                for service in services.values():
                    service.stop()
    finally:
        pacs.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    summary = {mode: summarize([r for r in runs if r["mode"] == mode]) for mode in modes}
    info = machine()
    meta = {
        "title": f"edge-runtime serve: {package.name}, 512x512x{args.slices} CT"
        + (f", paced {args.pace:g} instances/s" if args.pace else ", storescu full speed"),
        "tag": tag,
        "model": package.identity,
        "model_dir": str(model_dir),
        "slices": args.slices,
        "series_mb": runs[0]["bytes"] / 1e6,
        "windows": runs[0]["windows"],
        "sender": f"pynetdicom paced {args.pace:g}/s" if args.pace else "DCMTK storescu (TCP_NODELAY=1)",
        "cpus": os.cpu_count(),
        "startup_s": startups[0] if startups else None,
        "hwm_at_ready_mib": hwm_ready,
        "seg_mb": runs[0]["seg_bytes"] / 1e6,
        "command": command("latency", argv),
        "serve_args": serve,
        "machine": info,
        "load_avg_end": os.getloadavg(),
    }
    meta["modes"] = list(modes)
    parts = [] if len(modes) == 1 else [side_by_side(meta, summary, runs), ""]
    for mode in modes:
        title = meta["title"] + ("" if len(modes) == 1 else f", streaming {mode}")
        parts += [markdown({**meta, "title": title}, summary[mode]), ""]
    md = "\n".join(parts)
    write_results(tag, md, {"meta": meta, "summary": summary, "runs": runs})
    for mode in modes:
        name = tag if len(modes) == 1 else f"{tag}-{mode}"
        title = meta["title"] + ("" if len(modes) == 1 else f", streaming {mode}")
        try:
            plot(RESULTS / f"{name}.png", {**meta, "title": title}, [r for r in runs if r["mode"] == mode])
        except ImportError as exc:
            print(f"no PNG ({exc}); pip install matplotlib", file=sys.stderr)
    print(md)
    print(f"\nwrote {RESULTS / tag}.json, .md and the PNG timelines", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
