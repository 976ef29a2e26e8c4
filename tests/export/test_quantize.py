"""INT8 by explicit quantisation (``export/quantize.py``): the QDQ package loads and runs in the runtime's
ONNX Runtime runner on the CPU, and its gate reports Dice against FP32 through the sliding window."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from edge_runtime.imaging.volume import Volume  # noqa: E402
from edge_runtime.inference.package import ModelPackage  # noqa: E402
from edge_runtime.inference.pipeline import segment  # noqa: E402
from edge_runtime.inference.runner import load_runner  # noqa: E402
from export.engine import count_qdq_nodes  # noqa: E402
from export.onnx import export_onnx  # noqa: E402
from export.package import write_package  # noqa: E402
from export.quantize import PhantomCalibrationReader, QuantizeOptions, quantize_package  # noqa: E402
from phantom import make_phantom  # noqa: E402
from tests.export.fixtures import TINY_MANIFEST as MANIFEST  # noqa: E402
from tests.export.fixtures import TinySegNet  # noqa: E402

OPTIONS = QuantizeOptions(calibration_volumes=2, windows_per_volume=6, volume_shape=(32, 64, 64))


def phantom_volume(shape=(24, 48, 48), spacing=(5.0, 6.0, 6.0), seed=5) -> Volume:  # noqa: ANN001
    ph = make_phantom(shape, spacing, rng=seed)
    return Volume(
        array=ph.hu, spacing=spacing, positions=np.arange(shape[0]) * spacing[0], origin=np.zeros(3),
        row_direction=np.array([1.0, 0, 0]), column_direction=np.array([0, 1.0, 0]), datasets=[], regular=True,
    )


@pytest.fixture(scope="module")
def fp32(tmp_path_factory: pytest.TempPathFactory) -> ModelPackage:
    tmp = tmp_path_factory.mktemp("fp32")
    # the TorchScript exporter: ten times faster than torch.export for this test's purpose
    path = export_onnx(TinySegNet().eval(), tmp / "x" / "model.onnx", example_shape=(1, 1, 16, 32, 32),
                       exporter="torchscript")
    return write_package(tmp / "pkg", path, MANIFEST)


def test_calibration_reader_feeds_normalised_patches(fp32: ModelPackage) -> None:
    reader = PhantomCalibrationReader(fp32, volumes=2, windows_per_volume=5, seed=1, shape=(32, 64, 64))
    batches = []
    while (item := reader.get_next()) is not None:
        batches.append(item["image"])
    assert len(batches) == len(reader) == 10
    assert all(b.shape == (1, 1, 16, 32, 32) and b.dtype == np.float32 for b in batches)
    values = np.concatenate([b.ravel() for b in batches])
    assert -1.0 <= values.min() < -0.9 and 0.0 < values.max() <= 1.0  # HU / 1024, clipped: air and tissue
    reader.rewind()
    assert np.array_equal(reader.get_next()["image"], batches[0])


def test_quantized_package_runs_on_the_cpu_runner_and_reports_dice(fp32: ModelPackage, tmp_path: Path) -> None:
    int8, report = quantize_package(fp32.root, tmp_path / "int8", OPTIONS)
    assert count_qdq_nodes(int8.model_path) > 0 and count_qdq_nodes(fp32.model_path) == 0
    assert int8.name == "tiny-seg-int8" and int8.algorithm_version == "0.0.1-int8"
    quant = int8.manifest["quantization"]
    assert quant["format"] == "QDQ" and quant["weights"] == "int8 symmetric, per channel"
    assert quant["from"] == {"package": "tiny-seg 0.0.1", "model_sha256": fp32.model_sha256}
    # the gate: Dice of INT8 against FP32 per label on a phantom not used for calibration
    assert report.passed, report.markdown()
    assert report.atol is None and [d.label for d in report.segmentation] == [1, 2]
    assert all(d.dice >= OPTIONS.min_dice for d in report.segmentation)
    assert "phantom 2000" in report.segmentation[0].volume
    assert json.loads((int8.root / "parity.json").read_text())["min_dice"] == OPTIONS.min_dice
    assert {"parity.json", "parity.md"} <= set(int8.manifest["files"])
    # runs where FP32 runs: the runtime's ONNX Runtime runner on the CPU, whole-volume segmentation
    volume = phantom_volume()
    with load_runner(int8, "onnxruntime", "cpu") as runner:
        labels_int8 = segment(volume, int8, runner).labels
    with load_runner(fp32, "onnxruntime", "cpu") as runner:
        labels_fp32 = segment(volume, fp32, runner).labels
    assert labels_int8.shape == volume.array.shape
    assert np.mean(labels_int8 == labels_fp32) > 0.98
