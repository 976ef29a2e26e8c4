"""The runner interface: the base class checks inputs once; each backend implements only inference."""

from __future__ import annotations

import abc

import numpy as np

from edge_runtime.errors import RunnerError
from edge_runtime.inference.package import ModelPackage


class Runner(abc.ABC):
    """Runs one model package. Not thread-safe: one runner per inference thread."""

    name: str = "runner"

    def __init__(self, package: ModelPackage):
        self.package = package

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Logits ``(N, K, Z, Y, X)`` for a float32 batch ``(N, C, Z, Y, X)``."""
        self.check_batch(batch)
        return self.check_logits(batch, self._infer(np.ascontiguousarray(batch)))

    def check_batch(self, batch: np.ndarray) -> None:
        """Raise :class:`RunnerError` unless ``batch`` is float32 ``(N, C, Z, Y, X)`` with the model's channels."""
        if batch.dtype != np.float32:
            raise RunnerError(f"batch dtype is {batch.dtype}; runners take float32")
        if batch.ndim != 5 or batch.shape[1] != self.package.input_channels:
            raise RunnerError(f"batch shape is {batch.shape}; expected (N, {self.package.input_channels}, Z, Y, X)")

    def check_logits(self, batch: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """``logits`` if their shape is ``(N, K, Z, Y, X)`` for ``batch``; else :class:`RunnerError`."""
        expected = (batch.shape[0], self.package.num_classes, *batch.shape[2:])
        if logits.shape != expected:
            raise RunnerError(f"{self.name} returned shape {logits.shape}; expected {expected}")
        return logits

    @abc.abstractmethod
    def _infer(self, batch: np.ndarray) -> np.ndarray: ...

    def describe(self) -> str:
        """One line for logs: backend, device and anything that decides speed."""
        return self.name

    def ready(self) -> tuple[bool, str]:
        """Can this runner take work now? Local backends always can; a remote one asks its server."""
        return True, "local"

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release device resources."""

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
