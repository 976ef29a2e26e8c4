"""``edge-runtime status``: the series in a spool and what became of them, read from its SQLite index."""

from __future__ import annotations

from pathlib import Path

from edge_runtime.spool.store import Spool


def print_status(spool_dir: Path) -> int:
    """Print one line per series (short hash, state, instances, reason) and the outbox counts."""
    spool = Spool(spool_dir, min_free_bytes=0)
    try:
        rows = spool.all_series()
        print(f"{'series':<14}{'state':<12}{'instances':>10}  reason")
        for r in rows:
            print(f"{r.key_hash:<14}{r.state.value:<12}{r.instance_count:>10}  {r.reason or ''}")
        counts = spool.outbox_counts()
        failed = counts.get("failed", 0)  # refused for good by a DICOMweb server (the reason is in the row)
        print(
            f"outbox: {counts.get('pending', 0)} pending, {counts.get('sent', 0)} sent"
            + (f", {failed} refused for good" if failed else "")
        )
    finally:
        spool.close()
    return 0
