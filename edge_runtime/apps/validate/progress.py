"""Progress of a validation run on stderr: a bar on a terminal, one line per case in a log."""

from __future__ import annotations

import sys
import time
from typing import IO


class Progress:
    """``\\r[####    ] 3/8 cases  12.3 s`` on a terminal; one line per case otherwise."""

    def __init__(self, total: int, stream: IO[str] | None = None, *, width: int = 24):
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.t0 = time.perf_counter()
        try:
            self.tty = bool(self.stream.isatty())
        except (AttributeError, ValueError):
            self.tty = False
        self._last = 0

    def start(self, done: int, name: str) -> None:
        if self.tty:
            self._bar(done, f"  {name}")

    def done(self, done: int, name: str, outcome: str) -> None:
        elapsed = time.perf_counter() - self.t0
        if self.tty:
            self._bar(done, "")
        else:
            self.stream.write(f"[{done}/{self.total}] {name}: {outcome} ({elapsed:.1f} s)\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def _bar(self, done: int, tail: str) -> None:
        filled = int(round(self.width * done / self.total)) if self.total else self.width
        text = (
            f"[{'#' * filled}{' ' * (self.width - filled)}] {done}/{self.total} cases  "
            f"{time.perf_counter() - self.t0:.1f} s{tail}"
        )
        pad = max(0, self._last - len(text))
        self._last = len(text)
        self.stream.write("\r" + text + " " * pad)
        self.stream.flush()
