from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from edge_runtime.package import DEFAULT_PACKAGE, ModelPackage
from edge_runtime.runner import BackendUnavailable, RunnerError, load_runner


@pytest.fixture(scope="module")
def package() -> ModelPackage:
    return ModelPackage.load(DEFAULT_PACKAGE)


def test_onnxruntime_cpu_runs_the_bundled_model(package: ModelPackage) -> None:
    with load_runner(package, "onnxruntime", "cpu", threads=1) as runner:
        x = np.full((2, 1, 16, 32, 32), -0.8, dtype=np.float32)  # lung-like HU everywhere
        x[1] = 0.5  # bone
        out = runner.infer(x)
        assert out.shape == (2, package.num_classes, 16, 32, 32)
        labels = out.argmax(axis=1)
        assert (labels[0] == 1).all() and (labels[1] == 2).all()
        assert "CPUExecutionProvider" in runner.describe()


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="this machine has CUDA")
def test_missing_gpu_provider_is_an_error_not_a_cpu_fallback(package: ModelPackage) -> None:
    with pytest.raises(
        BackendUnavailable, match="Requested provider was: CUDAExecutionProvider, but available"
    ):
        load_runner(package, "onnxruntime", "cuda")


def test_unknown_backend_names_the_available_ones(package: ModelPackage) -> None:
    with pytest.raises(BackendUnavailable, match="available backends are: onnxruntime"):
        load_runner(package, "tvm")


def test_runner_checks_inputs_once(package: ModelPackage) -> None:
    runner = load_runner(package, threads=1)
    with pytest.raises(RunnerError, match="float32"):
        runner.infer(np.zeros((1, 1, 8, 8, 8), dtype=np.float64))
    with pytest.raises(RunnerError, match="expected"):
        runner.infer(np.zeros((1, 2, 8, 8, 8), dtype=np.float32))
