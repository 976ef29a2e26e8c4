"""ONNX Runtime's session tuning: the defaults reach the session, other settings give the same logits.

The timing that chose the defaults is ``benchmarks.ort_ceiling``; here the bundled model runs a small input on a
real ONNX Runtime session with each setting.
"""

from __future__ import annotations

import numpy as np
import pytest

from edge_runtime.inference.package import DEFAULT_PACKAGE, ModelPackage
from edge_runtime.inference.runner.onnxruntime import OnnxRuntimeRunner, SessionTuning


@pytest.fixture(scope="module")
def package() -> ModelPackage:
    return ModelPackage.load(DEFAULT_PACKAGE)


def test_default_tuning_reaches_the_session(package: ModelPackage) -> None:
    with OnnxRuntimeRunner(package, threads=1) as runner:
        options = runner.session.get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        assert options.intra_op_num_threads == 1
        assert str(options.graph_optimization_level).endswith("ORT_ENABLE_ALL")
        assert str(options.execution_mode).endswith("ORT_SEQUENTIAL")
        assert "spinning=off" in runner.describe() and "optimization=all" in runner.describe()


def test_every_tuning_gives_the_same_logits(package: ModelPackage) -> None:
    x = np.random.default_rng(0).uniform(-2, 2, (2, 1, 16, 32, 32)).astype(np.float32)
    with OnnxRuntimeRunner(package, threads=1) as runner:
        reference = runner.infer(x)
    for tuning in (
        SessionTuning(threads=2, spinning=True),
        SessionTuning(threads=1, optimization="basic"),
        SessionTuning(threads=2, parallel=True, entries=(("session.dynamic_block_base", "4"),)),
    ):
        with OnnxRuntimeRunner(package, tuning=tuning) as runner:
            np.testing.assert_allclose(runner.infer(x), reference, rtol=1e-4, atol=1e-4, err_msg=str(tuning))


def test_an_unknown_optimization_level_is_refused() -> None:
    with pytest.raises(ValueError, match="optimization is 'fastest'; allowed: disabled, basic, extended, all"):
        SessionTuning(optimization="fastest")
