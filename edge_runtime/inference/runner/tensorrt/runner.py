"""TensorRT backend: a serialised engine from the package folder, run with pycuda.

One CUDA stream, page-locked host buffers and device buffers sized once for the engine profile's largest batch,
TensorRT 10's tensor-address API (``set_tensor_address`` + ``execute_async_v3``) with asynchronous copies in
and out. Before loading, the engine's key (model sha256, TensorRT version, GPU, compute capability, precision)
is compared with the package and this machine: a mismatch is refused with every differing part named, or,
with ``rebuild=True``, the engine is rebuilt from the package's ONNX model (the builder beside this module,
:mod:`edge_runtime.inference.runner.tensorrt.engine`).

Needs ``tensorrt`` and ``pycuda`` (the ``tensorrt`` extra); without them the runner raises
:class:`BackendUnavailable`, never falls back to another backend.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.errors import BackendUnavailable, EngineError, MissingDependencyError, RunnerError
from edge_runtime.inference.package import ModelPackage
from edge_runtime.inference.runner.base import Runner
from edge_runtime.inference.runner.tensorrt import engine as engines

log = logging.getLogger(__name__)


class TensorRTRunner(Runner):
    """A model package's TensorRT engine on one GPU, checked against its key before it is loaded.

    Batches run one at a time on one stream; their size must lie in the engine profile's batch range.
    """

    name = "tensorrt"

    def __init__(
        self,
        package: ModelPackage,
        *,
        precision: str = "fp16",
        device: int = 0,
        engine: Path | str | None = None,
        rebuild: bool = False,
        max_batch: int | None = None,
    ):
        super().__init__(package)
        engines.check_precision(precision)
        try:
            trt = engines.import_tensorrt()
            cuda = engines.import_pycuda()
        except MissingDependencyError as exc:
            raise BackendUnavailable(f"Requested backend was: tensorrt, but it is not usable here: {exc}") from exc
        self._trt = trt
        self._cuda = cuda
        self.precision = precision
        try:
            cuda.init()
            count = cuda.Device.count()
        except cuda.Error as exc:
            raise BackendUnavailable(f"Requested backend was: tensorrt, but CUDA does not start: {exc}") from exc
        if device >= count:
            raise BackendUnavailable(
                f"Requested CUDA device was: {device}, but this machine has {count} CUDA device(s)"
            )
        self._ctx = cuda.Device(device).retain_primary_context()  # the context TensorRT's runtime API uses
        self._ctx.push()
        try:
            current = engines.current_key(package, precision, device)
            path = (
                Path(engine)
                if engine is not None
                else engines.engine_path(package.root, precision, current.compute_capability)
            )
            try:
                self.info = engines.check_engine(package, path, current)
            except EngineError as exc:
                if not rebuild:
                    raise RunnerError(str(exc)) from exc
                log.warning("rebuilding the TensorRT engine: %s", exc)
                path, self.info = engines.build_engine(
                    package, precision, device=device, max_batch=max_batch, out=path, progress=False
                )
            self.engine_file = path
            self._load(path)
        except BaseException:
            self._ctx.pop()
            self.close()  # frees what _load allocated before it failed
            raise
        self._ctx.pop()

    def _load(self, path: Path) -> None:
        trt, cuda = self._trt, self._cuda
        self._runtime = trt.Runtime(engines.tensorrt_logger())
        self._engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self._engine is None:
            raise RunnerError(f"TensorRT could not deserialise {path.name} (see its log)")
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        problems = []
        if self.package.input_name not in inputs:
            problems.append(f"input {self.package.input_name!r} not in the engine (it has {inputs})")
        if self.package.output_name not in outputs:
            problems.append(f"output {self.package.output_name!r} not in the engine (it has {outputs})")
        if len(inputs) != 1:
            problems.append(f"the engine has {len(inputs)} inputs; the runtime feeds one")
        if problems:
            raise RunnerError("engine does not match its manifest: " + "; ".join(problems))
        self._input, self._output = self.package.input_name, self.package.output_name
        self._context = self._engine.create_execution_context()
        min_shape, _, max_shape = self._engine.get_tensor_profile_shape(self._input, 0)
        self._max_shape = tuple(int(v) for v in max_shape)
        self._min_batch = int(min_shape[0])
        self._in_dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(self._input)))
        self._out_dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(self._output)))
        self._context.set_input_shape(self._input, self._max_shape)
        out_max = self._tensor_shape(self._output)
        self._stream = cuda.Stream()
        self._host_in = cuda.pagelocked_empty(int(np.prod(self._max_shape)), self._in_dtype)
        self._host_out = cuda.pagelocked_empty(int(np.prod(out_max)), self._out_dtype)
        self._dev_in = cuda.mem_alloc(self._host_in.nbytes)
        self._dev_out = cuda.mem_alloc(self._host_out.nbytes)
        self._context.set_tensor_address(self._input, int(self._dev_in))
        self._context.set_tensor_address(self._output, int(self._dev_out))
        # execute_async_v3 needs an address for every I/O tensor: outputs the manifest does not name (auxiliary
        # heads) get device buffers of their largest size, written by the engine and never read
        self._dev_unread: list[Any] = []
        for name in outputs:
            if name != self._output:
                dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
                buf = cuda.mem_alloc(max(1, int(np.prod(self._tensor_shape(name)))) * dtype.itemsize)
                self._dev_unread.append(buf)
                self._context.set_tensor_address(name, int(buf))
        log.info("loaded %s: max input %s, %s", path.name, self._max_shape, self.describe())

    def _tensor_shape(self, name: str) -> tuple[int, ...]:
        """The shape of ``name`` for the input shape set now; refuses shapes that depend on the data."""
        shape = tuple(int(v) for v in self._context.get_tensor_shape(name))
        if any(v < 0 for v in shape):
            raise RunnerError(f"the engine's tensor {name!r} has shape {shape}, which depends on the data")
        return shape

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        shape = batch.shape
        if shape[1:] != self._max_shape[1:] or not self._min_batch <= shape[0] <= self._max_shape[0]:
            raise RunnerError(
                f"batch shape {shape} is outside the engine's profile: batch {self._min_batch}..{self._max_shape[0]}"
                f" of {self._max_shape[1:]} (rebuild with another --max-batch or patch size)"
            )
        cuda = self._cuda
        self._ctx.push()
        try:
            if not self._context.set_input_shape(self._input, shape):
                raise RunnerError(f"TensorRT refused input shape {shape}")
            out_shape = self._tensor_shape(self._output)
            n_in, n_out = int(np.prod(shape)), int(np.prod(out_shape))
            host_in = self._host_in[:n_in]
            host_in[:] = batch.ravel()  # casts to the engine's input type if it is not float32
            host_out = self._host_out[:n_out]
            cuda.memcpy_htod_async(self._dev_in, host_in, self._stream)
            if not self._context.execute_async_v3(self._stream.handle):
                raise RunnerError("TensorRT execute_async_v3 failed (see its log)")
            cuda.memcpy_dtoh_async(host_out, self._dev_out, self._stream)
            self._stream.synchronize()
            return host_out.reshape(out_shape).astype(np.float32, copy=True)
        except cuda.Error as exc:
            raise RunnerError(f"CUDA error during inference: {exc}") from exc
        finally:
            self._ctx.pop()

    def describe(self) -> str:
        key = self.info.key
        return (
            f"tensorrt {key.tensorrt_version} {key.precision} on {key.gpu_name} (sm {key.compute_capability}) "
            f"engine={self.engine_file.name} max_batch={self._max_shape[0]}"
        )

    def close(self) -> None:
        """Free the GPU buffers, the execution context and the engine; safe to call twice.

        Everything that lives in the CUDA context goes while that context is current: the execution context
        before its engine, and the stream and page-locked buffers before the context is released."""
        ctx = getattr(self, "_ctx", None)
        if ctx is None:
            return
        ctx.push()
        try:
            buffers: list[Any] = [getattr(self, "_dev_in", None), getattr(self, "_dev_out", None)]
            for buf in buffers + getattr(self, "_dev_unread", []):
                if buf is not None:
                    buf.free()
            self._dev_in = self._dev_out = None
            self._dev_unread = []
            self._context = None
            self._engine = None
            self._stream = None
            self._host_in = self._host_out = None
        finally:
            ctx.pop()
            ctx.detach()
            self._ctx = None
