"""Runners execute a model package on one backend behind one interface.

``load_runner(package, backend)`` returns a :class:`Runner`; ``runner.infer(batch)`` maps a float32 batch
``(N, C, Z, Y, X)`` to logits ``(N, K, Z, Y, X)``. Asking for a backend or execution provider that is not
available is an error (:class:`BackendUnavailable`), never a silent fallback to the CPU.
"""

from __future__ import annotations

from edge_runtime.inference.package import ModelPackage
from edge_runtime.inference.runner.base import BackendUnavailable, Runner, RunnerError

BACKENDS = ("onnxruntime", "triton", "tensorrt")
DEVICES = ("cpu", "cuda", "tensorrt")


def load_runner(package: ModelPackage, backend: str = "onnxruntime", device: str = "cpu", **options: object) -> Runner:
    """Build the runner for ``backend`` on ``device``; fails loudly when either is not available here.

    Options go to the backend: ``threads`` for ONNX Runtime; ``url``, ``model_name``, ``timeout_s``,
    ``shared_memory`` ... for Triton (where the server's instance groups decide the device); ``precision``,
    ``engine``, ``rebuild`` for native TensorRT (pycuda, first GPU), whose engine is keyed by model, TensorRT
    version, GPU and precision. ``device`` applies to ONNX Runtime only.
    """
    if backend == "onnxruntime":
        from edge_runtime.inference.runner.onnxruntime import OnnxRuntimeRunner

        return OnnxRuntimeRunner(package, device=device, **options)  # type: ignore[arg-type]
    if backend == "triton":
        from edge_runtime.inference.runner.triton import TritonRunner

        return TritonRunner(package, **options)  # type: ignore[arg-type]
    if backend == "tensorrt":
        from edge_runtime.inference.runner.tensorrt.runner import TensorRTRunner

        return TensorRTRunner(package, **options)  # type: ignore[arg-type]
    raise BackendUnavailable(f"Requested backend was: {backend!r}, but available backends are: {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "DEVICES", "BackendUnavailable", "Runner", "RunnerError", "load_runner"]
