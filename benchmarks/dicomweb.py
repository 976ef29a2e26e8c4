"""Receiving a series by STOW-RS against receiving it by C-STORE, into the same listener and spool.

One process holds the service's ingest as it runs in ``serve``: a :class:`~edge_runtime.ingest.listener.Listener`
on a spool in a scratch folder, and the :class:`~edge_runtime.ingest.stow.StowReceiver` beside it. For each run,
a copy of a phantom CT series under new UIDs (``benchmarks.harness.fresh_copy``) is sent

* by C-STORE: DCMTK ``storescu``, one association, every file (``harness.timed_storescu``);
* by STOW-RS: the service's own client (:func:`edge_runtime.egress.stow.post`), the files in its batches
  (:func:`edge_runtime.egress.stow.batches`: up to 16 objects per request), one request at a time.

Both end when the last instance is durable in the spool (fsynced and indexed) and acknowledged. Reported per
path: the median wall time, instances per second and MB/s over ``--runs`` runs (paths alternate within a run).
Prints a Markdown table and writes ``benchmarks/results/dicomweb.md`` with the raw figures in ``dicomweb.json``::

    python -m benchmarks.dicomweb [--slices 300] [--size 512] [--runs 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks import harness
from benchmarks.report import command, fmt, machine, median, table_head, write_results
from edge_runtime.egress.destination import StowTarget
from edge_runtime.egress.stow import batches, post
from edge_runtime.ingest.listener import Listener, ListenerConfig
from edge_runtime.ingest.stow import StowReceiver
from edge_runtime.spool import Spool
from tests.peers import free_port


def stow_send(port: int, files: list[Path]) -> float:
    """Seconds to send ``files`` by STOW-RS, batch after batch; raises if an instance was not stored."""
    target = StowTarget(f"http://127.0.0.1:{port}")
    t0 = time.perf_counter()
    for batch in batches(files):
        response = post(target, [files[i].read_bytes() for i in batch], timeout=120)
        if response.status != 200:
            raise RuntimeError(f"STOW-RS answered {response.reason}")
    return time.perf_counter() - t0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)

    source = harness.base_series(args.slices, args.size, purpose="dicomweb bench")
    times: dict[str, list[float]] = {"C-STORE (storescu)": [], "STOW-RS (16 per request)": []}
    nbytes = 0
    with tempfile.TemporaryDirectory(prefix="edge-dicomweb-") as scratch:
        work = Path(scratch)
        spool = Spool(work / "spool", min_free_bytes=0)
        config = ListenerConfig(ae_title="EDGE", host="127.0.0.1", port=free_port(), modalities=("CT",))
        listener = Listener(config, spool)
        listener.start()
        receiver = StowReceiver(listener, 0)
        receiver.start()
        try:
            for run in range(args.runs):
                for name in times:
                    copy = harness.fresh_copy(source, work / f"series-{run}-{len(times[name])}-{name[:4]}")
                    nbytes = copy.nbytes
                    if name.startswith("C-STORE"):
                        sent = harness.timed_storescu(copy.files, listener.port, "EDGE")
                        if sent.returncode != 0:
                            raise RuntimeError(f"storescu failed: {sent.output}")
                        times[name].append(sent.wall)
                    else:
                        times[name].append(stow_send(receiver.port, copy.files))
                    stored = spool.find_series("EDGE", copy.study_uid, copy.series_uid)
                    if stored is None or stored.instance_count != len(copy.files):
                        raise RuntimeError(f"{name}: the spool holds {stored} of {len(copy.files)} instances")
        finally:
            receiver.stop()
            listener.stop()
            spool.close()

    lines = [
        f"Receiving a {args.slices}-slice {args.size}x{args.size} CT ({nbytes / 1e6:.0f} MB) into the listener's "
        f"spool, median of {args.runs} runs:",
        "",
        *table_head("path", "wall s", "instances/s", "MB/s"),
    ]
    rows = {}
    for name, values in times.items():
        wall = median(values)
        rows[name] = {"wall_s": values, "median_s": wall}
        rate = None if not wall else args.slices / wall
        mbs = None if not wall else nbytes / 1e6 / wall
        lines.append(f"| {name} | {fmt(wall)} | {fmt(rate, 0)} | {fmt(mbs, 0)} |")
    lines += ["", f"`{command('dicomweb', argv)}`"]
    markdown = "\n".join(lines)
    print(markdown)
    write_results("dicomweb", markdown, {"args": vars(args), "bytes": nbytes, "paths": rows, "machine": machine()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
