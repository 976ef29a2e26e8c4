"""Compressed pixel data is decoded in a child process, so a decoder that crashes costs one series, not the service.

JPEG, JPEG-LS and JPEG 2000 decoders are native code, fuzzed into crashes and infinite loops in every stack
that ships them. The child has a memory ceiling (``RLIMIT_AS``) and each call a time limit; a crash, a kill
or a timeout becomes :class:`DecoderFailed` and the next call gets a fresh child. Native (uncompressed)
pixel data never needs a decoder and is read in-process.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.dicom import NATIVE_SYNTAXES
from edge_runtime.errors import DecoderFailed

DEFAULT_MEMORY_LIMIT = 4 * 1024**3
DEFAULT_TIMEOUT = 120.0


def needs_isolation(transfer_syntax: str | None) -> bool:
    return transfer_syntax is not None and str(transfer_syntax) not in NATIVE_SYNTAXES


class IsolatedDecoder:
    def __init__(self, memory_limit: int = DEFAULT_MEMORY_LIMIT, timeout: float = DEFAULT_TIMEOUT):
        self.memory_limit = memory_limit
        self.timeout = timeout
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def _get_pool(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    max_workers=1,
                    mp_context=multiprocessing.get_context("forkserver"),
                    initializer=_limit_memory,
                    initargs=(self.memory_limit,),
                )
            return self._pool

    def _reset(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            for process in list(getattr(pool, "_processes", {}).values()):
                process.kill()  # a child stuck in a decoder loop does not stop on its own
            pool.shutdown(wait=False, cancel_futures=True)

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` in the child; its result must pickle."""
        future = self._get_pool().submit(fn, *args)
        try:
            return future.result(timeout=self.timeout)
        except BrokenProcessPool as exc:
            self._reset()
            raise DecoderFailed("the decoder process died (crash or memory limit)") from exc
        except FutureTimeout as exc:
            self._reset()
            raise DecoderFailed(f"decoding took longer than {self.timeout:.0f} s") from exc
        except MemoryError as exc:
            raise DecoderFailed("the decoder ran out of memory") from exc

    def pixels(self, path: Path) -> np.ndarray:
        """The decoded (not rescaled) pixel array of a file."""
        return self.run(_pixel_array, str(path))

    def close(self) -> None:
        self._reset()


def _limit_memory(limit: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _pixel_array(path: str) -> np.ndarray:
    import pydicom

    return pydicom.dcmread(path).pixel_array


_shared: IsolatedDecoder | None = None
_shared_lock = threading.Lock()


def shared_decoder() -> IsolatedDecoder:
    """One decoder child per process (created on first use)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = IsolatedDecoder()
        return _shared
