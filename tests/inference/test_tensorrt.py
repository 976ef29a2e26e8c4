"""TensorRT engines and runner (``edge_runtime/inference/runner/tensorrt/``,
``export/engine.py``).

The pure-Python parts (engine keys and their mismatch messages, profile shapes, file names, refusals) run
everywhere. Building and running engines needs ``tensorrt``, ``pycuda`` and an NVIDIA GPU: those tests carry
the ``gpu`` marker and are skipped, with the reason, where any of the three is missing.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.inference.package import DEFAULT_PACKAGE, ModelPackage
from edge_runtime.inference.runner import BackendUnavailable
from edge_runtime.inference.runner.tensorrt import engine as engines
from edge_runtime.inference.runner.tensorrt.engine import EngineError, EngineInfo, EngineKey, EngineKeyMismatch


def _gpu_missing() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "tensorrt is not installed (it comes with JetPack or from NVIDIA's index)"
    try:
        import pycuda.driver as cuda

        cuda.init()
        if cuda.Device.count() == 0:
            return "no CUDA device"
    except Exception as exc:  # ImportError, pycuda's LogicError/RuntimeError without a driver
        return f"pycuda / CUDA not usable: {exc}"
    return None


GPU_MISSING = _gpu_missing()
needs_gpu = pytest.mark.skipif(GPU_MISSING is not None, reason=f"needs tensorrt, pycuda and a GPU: {GPU_MISSING}")

KEY = EngineKey("ab" * 32, "10.3.0", "Orin (nvgpu)", "8.7", "fp16")


def default_package() -> ModelPackage:
    return ModelPackage.load(DEFAULT_PACKAGE)


# ---------------------------------------------------------------------------------------------------
# CPU: keys, profiles, names, refusals
# ---------------------------------------------------------------------------------------------------


def test_engine_key_differences_name_each_part() -> None:
    assert KEY.differences(KEY) == []
    now = dataclasses.replace(KEY, tensorrt_version="10.7.0", gpu_name="NVIDIA L4", compute_capability="8.9")
    assert KEY.differences(now) == [
        "TensorRT version: engine built for '10.3.0', this package/machine has '10.7.0'",
        "GPU: engine built for 'Orin (nvgpu)', this package/machine has 'NVIDIA L4'",
        "compute capability: engine built for '8.7', this package/machine has '8.9'",
    ]
    other = dataclasses.replace(KEY, model_sha256="cd" * 32, precision="int8")
    lines = KEY.differences(other)
    assert lines[0].startswith("model sha256: engine built for 'abab") and lines[1].startswith("precision:")
    assert EngineKey.from_dict(KEY.to_dict()) == KEY
    with pytest.raises(EngineError, match="lacks gpu_name, precision"):
        EngineKey.from_dict({k: v for k, v in KEY.to_dict().items() if k not in ("gpu_name", "precision")})


def test_profile_shapes_come_from_the_manifest() -> None:
    package = default_package()
    c, patch, batch = package.input_channels, package.patch_size, package.batch_size
    shapes = engines.profile_shapes(package)
    assert shapes.min == (1, c, *patch) and shapes.opt == (batch, c, *patch) and shapes.max == (2 * batch, c, *patch)
    assert engines.profile_shapes(package, max_batch=batch + 1).max[0] == batch + 1
    with pytest.raises(EngineError, match="below the manifest's batch size"):
        engines.profile_shapes(dataclasses.replace(package, batch_size=4), max_batch=3)
    assert engines.profile_shapes(package).to_dict()["opt"] == [batch, c, *patch]


def test_engine_file_names(tmp_path: Path) -> None:
    engine = engines.engine_path(tmp_path, "int8", "8.7")
    assert engine.name == "model.int8.sm87.engine"
    assert engines.sidecar_path(engine).name == "model.int8.sm87.engine.json"
    assert engines.timing_cache_path(tmp_path, "9.0").name == "tensorrt.sm90.timing-cache"
    with pytest.raises(EngineError, match="precision is 'bf16'; allowed: fp32, fp16, int8"):
        engines.engine_path(tmp_path, "bf16", "8.7")


def fake_engine(tmp_path: Path, package: ModelPackage, key: EngineKey) -> Path:
    root = tmp_path / "pkg"
    shutil.copytree(package.root, root)
    engine = engines.engine_path(root, key.precision, key.compute_capability)
    engine.write_bytes(b"serialised engine")
    info = EngineInfo(key, engines.sha256_file(engine), "image", {}, 1.0, "2026-01-01T00:00:00Z")
    info.write(engines.sidecar_path(engine))
    return engine


def test_check_engine_refuses_saying_which_key_differs(tmp_path: Path) -> None:
    package = default_package()
    key = dataclasses.replace(KEY, model_sha256=package.model_sha256)
    engine = fake_engine(tmp_path, package, key)
    assert engines.check_engine(package, engine, key).key == key
    now = dataclasses.replace(key, tensorrt_version="10.7.0")
    with pytest.raises(EngineKeyMismatch) as err:
        engines.check_engine(package, engine, now)
    assert err.value.differences == ["TensorRT version: engine built for '10.3.0', this package/machine has '10.7.0'"]
    assert "Rebuild it" in str(err.value)
    # a package whose model changed since the engine was built
    with pytest.raises(EngineKeyMismatch, match="model sha256: engine built for"):
        engines.check_engine(package, engine, dataclasses.replace(key, model_sha256="0" * 64))
    # a damaged engine file
    engine.write_bytes(b"truncated")
    with pytest.raises(EngineKeyMismatch, match=r"engine file: sha256 .* \(corrupt or replaced\)"):
        engines.check_engine(package, engine, key)
    # no engine, no key file
    with pytest.raises(EngineError, match="build it with: edge-export engine .* --precision fp16"):
        engines.check_engine(package, engine.with_name("model.fp16.sm90.engine"), key)
    engines.sidecar_path(engine).unlink()
    with pytest.raises(EngineError, match="has no key file"):
        engines.check_engine(package, engine, key)
    (engine.parent / "bad.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(EngineError, match="not an engine key of format 1"):
        EngineInfo.read(engine.parent / "bad.json")


@pytest.mark.skipif(GPU_MISSING is None, reason="tensorrt and a GPU are present: the runner would start")
def test_runner_without_tensorrt_is_backend_unavailable_naming_the_extra() -> None:
    from edge_runtime.inference.runner.tensorrt.runner import TensorRTRunner

    with pytest.raises(BackendUnavailable, match=r"tensorrt.*edge-runtime\[tensorrt\]"):
        TensorRTRunner(default_package())


@pytest.mark.skipif(GPU_MISSING is None, reason="tensorrt and a GPU are present")
def test_engine_command_without_tensorrt_exits_2(capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("onnx")
    from export.cli import main

    assert main(["engine", str(DEFAULT_PACKAGE), "--precision", "fp16"]) == 2
    assert "edge-runtime[tensorrt]" in capsys.readouterr().err


def test_int8_needs_a_quantised_model_and_float_precisions_a_float_one(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from export.engine import check_model_for_precision

    package = default_package()
    with pytest.raises(EngineError, match="has no QuantizeLinear/DequantizeLinear nodes.*edge-export quantize"):
        check_model_for_precision(package, "int8")
    check_model_for_precision(package, "fp16")
    # a Q/DQ graph (what edge-export quantize writes) is int8 only
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, "z", "y", "x"])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1, "z", "y", "x"])
    scale = helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])
    zero = helper.make_tensor("zp", TensorProto.INT8, [], [0])
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["image", "s", "zp"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["logits"])],
        "qdq", [x], [y], [scale, zero],
    )
    root = tmp_path / "q"
    shutil.copytree(package.root, root)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(root / "q.onnx"))
    quantised = dataclasses.replace(package, model_path=root / "q.onnx")
    check_model_for_precision(quantised, "int8")
    with pytest.raises(EngineError, match=r"is quantised \(2 Q/DQ nodes\): build it with --precision int8"):
        check_model_for_precision(quantised, "fp16")


# ---------------------------------------------------------------------------------------------------
# GPU: build and run engines
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_packages(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelPackage, ModelPackage]:
    """An FP32 TinySegNet package and its INT8 (QDQ) package."""
    pytest.importorskip("torch")
    from export.onnx import export_onnx
    from export.package import write_package
    from export.quantize import QuantizeOptions, quantize_package
    from tests.export.fixtures import TINY_MANIFEST, TinySegNet

    tmp = tmp_path_factory.mktemp("trt")
    path = export_onnx(TinySegNet().eval(), tmp / "x" / "model.onnx", example_shape=(1, 1, 16, 32, 32),
                       exporter="torchscript")
    fp32 = write_package(tmp / "fp32", path, TINY_MANIFEST)
    int8, _ = quantize_package(fp32.root, tmp / "int8", QuantizeOptions(calibration_volumes=2, windows_per_volume=4,
                                                                        volume_shape=(32, 64, 64)))
    return fp32, int8


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("precision, atol", [("fp32", 1e-3), ("fp16", 5e-2)])
def test_engine_builds_runs_and_matches_onnxruntime(tiny_packages: tuple, precision: str, atol: float,
                                                    capsys: pytest.CaptureFixture) -> None:
    from edge_runtime.inference.runner.onnxruntime import OnnxRuntimeRunner
    from edge_runtime.inference.runner.tensorrt.runner import TensorRTRunner
    from export.engine import build_package_engine

    fp32, _ = tiny_packages
    engine, info = build_package_engine(fp32.root, precision)
    assert engine.is_file() and engines.sidecar_path(engine).is_file()
    assert info.key.precision == precision and info.key.model_sha256 == fp32.model_sha256
    assert info.profile["opt"] == [2, 1, 16, 32, 32] and info.profile["max"] == [4, 1, 16, 32, 32]
    assert "[TensorRT]" in capsys.readouterr().err  # the progress monitor printed
    assert engines.timing_cache_path(fp32.root, info.key.compute_capability).stat().st_size > 0
    batch = np.random.default_rng(0).uniform(-1, 1, (3, 1, 16, 32, 32)).astype(np.float32)
    with TensorRTRunner(fp32, precision=precision) as trt_runner, OnnxRuntimeRunner(fp32) as ort_runner:
        got = trt_runner.infer(batch)
        want = ort_runner.infer(batch)
        assert np.abs(got - want).max() < atol
        assert np.mean(got.argmax(1) == want.argmax(1)) > 0.99
        with pytest.raises(Exception, match="outside the engine's profile"):
            trt_runner.infer(np.zeros((5, 1, 16, 32, 32), np.float32))


@pytest.mark.gpu
@needs_gpu
def test_int8_engine_from_the_quantised_package(tiny_packages: tuple) -> None:
    from edge_runtime.inference.runner.onnxruntime import OnnxRuntimeRunner
    from edge_runtime.inference.runner.tensorrt.runner import TensorRTRunner
    from export.engine import build_package_engine
    from export.parity import label_agreement, phantom_volumes

    _, int8 = tiny_packages
    build_package_engine(int8.root, "int8")
    volumes = phantom_volumes(int8, [3000], (32, 64, 64))
    with TensorRTRunner(int8, precision="int8") as trt_runner, OnnxRuntimeRunner(int8) as ort_runner:
        dice = label_agreement(ort_runner, trt_runner, int8, volumes)
    assert all(d.dice > 0.9 for d in dice), dice


@pytest.mark.gpu
@needs_gpu
def test_runner_refuses_a_mismatched_engine_and_rebuilds_on_request(tiny_packages: tuple, tmp_path: Path) -> None:
    from edge_runtime.inference.runner import RunnerError
    from edge_runtime.inference.runner.tensorrt.runner import TensorRTRunner
    from export.engine import build_package_engine

    fp32, _ = tiny_packages
    root = tmp_path / "pkg"
    shutil.copytree(fp32.root, root)
    engine, info = build_package_engine(root, "fp16")
    side = engines.sidecar_path(engine)
    data = json.loads(side.read_text())
    data["key"]["tensorrt_version"] = "9.0.0"
    side.write_text(json.dumps(data))
    package = ModelPackage.load(root)
    with pytest.raises(RunnerError, match="TensorRT version: engine built for '9.0.0'"):
        TensorRTRunner(package, precision="fp16")
    with TensorRTRunner(package, precision="fp16", rebuild=True) as runner:
        assert runner.infer(np.zeros((1, 1, 16, 32, 32), np.float32)).shape == (1, 3, 16, 32, 32)
    assert json.loads(side.read_text())["key"]["tensorrt_version"] == info.key.tensorrt_version
