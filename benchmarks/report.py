"""Statistics and output shared by the benchmarks: percentiles, number formatting, Markdown tables, the
machine's description, and the ``benchmarks/results/<name>.md`` / ``.json`` pair every script writes."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
#: where every benchmark writes (git-ignored)
RESULTS = Path(__file__).resolve().parent / "results"


def pct(values: Sequence[float | None], q: float) -> float | None:
    """The ``q``-th percentile (numpy's linear interpolation) of the values that are not None."""
    vals = [v for v in values if v is not None]
    return float(np.percentile(vals, q)) if vals else None


def median(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def fmt(v: float | None, digits: int = 2) -> str:
    """A figure for a table cell: fixed digits, an en dash for a missing one."""
    return "–" if v is None else f"{v:.{digits}f}"


def table_head(*columns: str, left: int = 1) -> list[str]:
    """The header and alignment rows of a Markdown table: the first ``left`` columns (names) left-aligned,
    the rest (figures) right-aligned."""
    align = ["---" if i < left else "---:" for i in range(len(columns))]
    return ["| " + " | ".join(columns) + " |", "|" + "|".join(align) + "|"]


def cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo (None where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine() -> dict[str, object]:
    """What a figure depends on: CPUs, memory, load, Python, the commit and the libraries' versions."""
    info: dict[str, object] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_avg_start": os.getloadavg(),
    }
    cpu = cpu_model()
    if cpu:
        info["cpu"] = cpu
    try:
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


def command(module: str, argv: Sequence[str] | None) -> str:
    """The command line that reproduces a run: ``python -m benchmarks.<module> ARGS``."""
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join([Path(sys.executable).as_posix(), "-m", f"benchmarks.{module}", *args])


def write_results(name: str, markdown: str, data: Any, folder: Path = RESULTS) -> Path:
    """``<folder>/<name>.md`` (the printed table) and ``<name>.json`` (the raw figures); the .md path."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.md").write_text(markdown if markdown.endswith("\n") else markdown + "\n", encoding="utf-8")
    (folder / f"{name}.json").write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")
    return folder / f"{name}.md"
