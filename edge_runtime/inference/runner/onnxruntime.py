"""ONNX Runtime backend: CPU by default; CUDA and TensorRT execution providers when asked for and present."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.errors import BackendUnavailable, RunnerError
from edge_runtime.inference.package import ModelPackage
from edge_runtime.inference.runner.base import Runner

log = logging.getLogger(__name__)

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


#: ``SessionTuning.optimization`` names of ONNX Runtime's graph optimisation levels
OPTIMIZATION_LEVELS = ("disabled", "basic", "extended", "all")


@dataclass(frozen=True)
class SessionTuning:
    """The session options that decide speed on the CPU. The defaults are what ``benchmarks.ort_ceiling``
    measured fastest for the bundled model on a 2-core machine; the other values are there to be measured
    against them. Spinning is off: ORT's idle threads otherwise spin between operators on cores that the
    listener, the decoder and other processes need, and with it on every window took 1.13x as long on a shared
    machine (4 of 4 alternating rounds); graph level ``all``, sequential mode and batch as the package says won
    or tied every comparison.

    ``threads``: intra-op threads (0: one per core). ``optimization``: the graph optimisation level; ``"all"``
    adds the CPU provider's layout transforms (NCHWc blocked convolutions) to the fusions of ``"extended"``.
    ``spinning``: whether idle intra-op threads spin (``session.intra_op.allow_spinning``) before sleeping.
    ``parallel``: ``ORT_PARALLEL`` execution mode (independent branches at once) instead of sequential.
    ``entries``: further session configuration entries (ONNX Runtime's ``session.*`` keys) as (key, value).
    """

    threads: int = 0
    optimization: str = "all"
    spinning: bool = False
    parallel: bool = False
    entries: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.optimization not in OPTIMIZATION_LEVELS:
            raise ValueError(f"optimization is {self.optimization!r}; allowed: {', '.join(OPTIMIZATION_LEVELS)}")

    def session_options(self) -> Any:
        """These settings as an ``onnxruntime.SessionOptions``."""
        import onnxruntime as ort

        level = ort.GraphOptimizationLevel
        options = ort.SessionOptions()
        options.graph_optimization_level = {
            "disabled": level.ORT_DISABLE_ALL,
            "basic": level.ORT_ENABLE_BASIC,
            "extended": level.ORT_ENABLE_EXTENDED,
            "all": level.ORT_ENABLE_ALL,
        }[self.optimization]
        options.intra_op_num_threads = self.threads or (os.cpu_count() or 1)
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        options.execution_mode = (
            ort.ExecutionMode.ORT_PARALLEL if self.parallel else ort.ExecutionMode.ORT_SEQUENTIAL
        )
        for key, value in self.entries:
            options.add_session_config_entry(key, value)
        options.log_severity_level = 3
        return options


class OnnxRuntimeRunner(Runner):
    name = "onnxruntime"

    def __init__(
        self,
        package: ModelPackage,
        *,
        device: str = "cpu",
        threads: int = 0,
        tuning: SessionTuning | None = None,
        model_path: os.PathLike[str] | str | None = None,
    ):
        """``tuning`` overrides the default session options (``threads`` overrides its thread count when given);
        ``model_path`` runs another graph with the package's contract (e.g. a quantised copy, for benchmarks)."""
        super().__init__(package)
        import onnxruntime as ort

        if device not in PROVIDERS:
            raise BackendUnavailable(
                f"Requested device was: {device!r}, but this backend knows: {', '.join(PROVIDERS)}"
            )
        wanted = PROVIDERS[device]
        available = ort.get_available_providers()
        if wanted not in available:
            raise BackendUnavailable(
                f"Requested provider was: {wanted}, but available providers are: {', '.join(available)}"
            )
        tuning = tuning or SessionTuning()
        if threads:
            tuning = replace(tuning, threads=threads)
        self.tuning = tuning
        providers = self._providers(wanted, available)
        path = Path(model_path) if model_path is not None else package.model_path
        try:
            self.session = ort.InferenceSession(str(path), tuning.session_options(), providers=providers)
        except Exception as exc:  # onnxruntime raises its own C++ exception types
            raise RunnerError(f"ONNX Runtime could not load {path.name}: {exc}") from exc
        got = self.session.get_providers()
        if got[0] != wanted:
            # ORT logs an error and quietly falls back to CPU when a GPU provider fails to initialise.
            raise BackendUnavailable(
                f"Requested provider was: {wanted}, but the session got: {', '.join(got)} "
                "(the provider failed to initialise; see ONNX Runtime's log)"
            )
        self.device = device
        self._check_signature()

    def _providers(self, wanted: str, available: list[str]) -> list:
        """The provider list: TensorRT with an engine cache, fp16 and profiles for the window shapes, then CUDA
        (for the nodes TensorRT rejects), then the CPU; CUDA then CPU; or the CPU alone."""
        if wanted == "CPUExecutionProvider":
            return [wanted]
        if wanted == "CUDAExecutionProvider":
            return [wanted, "CPUExecutionProvider"]
        patch = "x".join(str(v) for v in self.package.patch_size)
        name, channels = self.package.input_name, self.package.input_channels
        cache = self.package.root / "trt-cache"
        trt_options = {
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": "True",
            "trt_fp16_enable": "True",
            "trt_profile_min_shapes": f"{name}:1x{channels}x{patch}",
            "trt_profile_opt_shapes": f"{name}:{self.package.batch_size}x{channels}x{patch}",
            "trt_profile_max_shapes": f"{name}:{max(2, 2 * self.package.batch_size)}x{channels}x{patch}",
        }
        rest = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        return [(wanted, trt_options), *rest]

    def _check_signature(self) -> None:
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        problems = []
        if self.package.input_name not in inputs:
            problems.append(f"input {self.package.input_name!r} not in the model (it has {sorted(inputs)})")
        if self.package.output_name not in outputs:
            problems.append(f"output {self.package.output_name!r} not in the model (it has {sorted(outputs)})")
        else:
            shape = outputs[self.package.output_name].shape
            if len(shape) == 5 and isinstance(shape[1], int) and shape[1] != self.package.num_classes:
                problems.append(
                    f"the model outputs {shape[1]} channels; the manifest's labels need {self.package.num_classes}"
                )
        if problems:
            raise RunnerError("model does not match its manifest: " + "; ".join(problems))

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        (out,) = self.session.run([self.package.output_name], {self.package.input_name: batch})
        return np.asarray(out, dtype=np.float32)

    def describe(self) -> str:
        opts = self.session.get_session_options()
        t = self.tuning
        return (
            f"onnxruntime {self.session.get_providers()[0]} threads={opts.intra_op_num_threads} "
            f"optimization={t.optimization} spinning={'on' if t.spinning else 'off'} "
            f"{'parallel' if t.parallel else 'sequential'}"
        )
