"""Runners execute a model package on one backend behind one interface.

``load_runner(package, backend)`` returns a :class:`Runner`; ``runner.infer(batch)`` maps a float32 batch
``(N, C, Z, Y, X)`` to logits ``(N, K, Z, Y, X)``. Asking for a backend or execution provider that is not
available is an error (:class:`BackendUnavailable`), never a silent fallback to the CPU. The service opens its
runner from its configuration with :func:`open_runner`, where a fallback happens only when configured, and
loudly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from edge_runtime.errors import BackendUnavailable, EdgeRuntimeError, RunnerError
from edge_runtime.inference.package import ModelPackage
from edge_runtime.inference.runner.base import Runner
from edge_runtime.inference.runner.tensorrt.engine import PRECISIONS

if TYPE_CHECKING:
    from edge_runtime.config import RunnerSettings

log = logging.getLogger(__name__)

BACKENDS = ("onnxruntime", "triton", "tensorrt")
DEVICES = ("cpu", "cuda", "tensorrt")


def load_runner(package: ModelPackage, backend: str = "onnxruntime", device: str = "cpu", **options: Any) -> Runner:
    """Build the runner for ``backend`` on ``device``; fails loudly when either is not available here.

    Options go to the backend: ``threads`` for ONNX Runtime; ``url``, ``model_name``, ``timeout_s``,
    ``shared_memory`` ... for Triton (where the server's instance groups decide the device); ``precision``,
    ``engine``, ``rebuild`` for native TensorRT (pycuda, first GPU), whose engine is keyed by model, TensorRT
    version, GPU and precision. ``device`` applies to ONNX Runtime only. An nnU-Net cascade stage's runner carries
    its previous stage's, on the same backend and device.
    """
    if package.previous_stage is not None:
        from edge_runtime.inference.nnunet.cascade import CascadeRunner

        if backend == "triton":
            raise BackendUnavailable("an nnU-Net cascade package runs on onnxruntime or tensorrt; serving its two "
                                     "stages from Triton is not built")
        previous = load_runner(package.previous_stage, backend, device, **options)
        try:
            final = load_runner(replace(package, previous_stage=None), backend, device, **options)
            return CascadeRunner(package, final, previous)
        except BaseException:
            previous.close()
            raise
    if backend == "onnxruntime":
        from edge_runtime.inference.runner.onnxruntime import OnnxRuntimeRunner

        return OnnxRuntimeRunner(package, device=device, **options)
    if backend == "triton":
        from edge_runtime.inference.runner.triton import TritonRunner

        return TritonRunner(package, **options)
    if backend == "tensorrt":
        from edge_runtime.inference.runner.tensorrt.runner import TensorRTRunner

        return TensorRTRunner(package, **options)
    raise BackendUnavailable(f"Requested backend was: {backend!r}, but available backends are: {', '.join(BACKENDS)}")


def backend_options(package: ModelPackage, settings: RunnerSettings) -> dict[str, Any]:
    """The configuration's runner keys in the option names of the configured backend."""
    if settings.backend == "triton":
        return {
            "url": settings.triton_url,
            "model_name": settings.triton_model or package.name,
            "shared_memory": "system" if settings.triton_shared_memory else "none",
        }
    if settings.backend == "tensorrt":
        return {"precision": settings.precision, "rebuild": settings.rebuild_engine}
    return {"threads": settings.threads}


@dataclass(frozen=True)
class OpenedRunner:
    """The runner the service got, and why it is not the configured one when it fell back."""

    runner: Runner
    fallback_reason: str | None = None


def open_runner(package: ModelPackage, settings: RunnerSettings) -> OpenedRunner:
    """The configured runner; if it cannot start and a fallback backend is configured, that one on the CPU,
    logged as an error (and reported by ``/readyz``)."""
    try:
        return OpenedRunner(
            load_runner(package, settings.backend, settings.device, **backend_options(package, settings))
        )
    except (RunnerError, ImportError) as exc:
        if not settings.fallback_backend:
            if isinstance(exc, EdgeRuntimeError):
                raise
            # a backend library that is installed but does not load (e.g. a CUDA library missing on a Jetson)
            raise BackendUnavailable(f"the {settings.backend} backend cannot be loaded: {exc}") from exc
        log.error(
            "BACKEND FALLBACK: %s could not start (%s); running on %s CPU as configured",
            settings.backend,
            exc,
            settings.fallback_backend,
        )
        runner = load_runner(package, settings.fallback_backend, "cpu", threads=settings.threads)
        return OpenedRunner(runner, str(exc))


__all__ = [
    "BACKENDS",
    "DEVICES",
    "PRECISIONS",
    "BackendUnavailable",
    "OpenedRunner",
    "Runner",
    "RunnerError",
    "backend_options",
    "load_runner",
    "open_runner",
]
