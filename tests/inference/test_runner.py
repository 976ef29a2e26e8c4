from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from edge_runtime.inference.package import DEFAULT_PACKAGE, ModelPackage
from edge_runtime.inference.runner import BackendUnavailable, RunnerError, load_runner


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


@pytest.fixture(scope="module")
def package() -> ModelPackage:
    return ModelPackage.load(DEFAULT_PACKAGE)


def test_onnxruntime_cpu_runs_the_bundled_model(package: ModelPackage) -> None:
    """One window of a phantom at the model's own grid: the bundled U-Net finds each organ in it."""
    from phantom import make_phantom

    phantom = make_phantom((96, 160, 160), package.target_spacing, rng=123)
    pz, py, px = package.patch_size
    # a window around the kidneys, which also holds liver, spleen, spine and the lung bases
    z = int(np.argmax((phantom.labels == 4).sum(axis=(1, 2))))
    z0 = min(max(z - pz // 2, 0), phantom.hu.shape[0] - pz)
    box = (slice(z0, z0 + pz), slice(32, 32 + py), slice(32, 32 + px))
    hu, truth = phantom.hu[box], phantom.labels[box]
    norm = package.normalization
    x = ((np.clip(hu, norm.lower, norm.upper) - norm.mean) / norm.std).astype(np.float32)[None, None]
    with load_runner(package, "onnxruntime", "cpu", threads=1) as runner:
        out = runner.infer(np.concatenate([x, x]))
        assert out.shape == (2, package.num_classes, pz, py, px)
        np.testing.assert_array_equal(out[0], out[1])
        labels = out[0].argmax(axis=0)
        present = [v for v in np.unique(truth) if v and (truth == v).sum() > 1000]
        assert len(present) >= 3, "the window should hold several organs"
        for v in present:
            assert _dice(labels == v, truth == v) > 0.8, package.labels[v - 1].name
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
