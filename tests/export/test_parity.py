"""The export parity gate (``export/parity.py``): per-window logits and per-label Dice through the runtime's
sliding window, PyTorch against ONNX Runtime; it passes for a faithful export and fails, saying what failed,
for a deliberately perturbed graph."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from edge_runtime.inference.package import ModelPackage  # noqa: E402
from export.onnx import export_onnx_with_info  # noqa: E402
from export.package import write_package  # noqa: E402
from export.parity import (  # noqa: E402
    GateOptions,
    ParityReport,
    TorchRunner,
    check_parity,
    run_gate,
    write_report,
)
from tests.export.fixtures import TINY_MANIFEST as MANIFEST  # noqa: E402
from tests.export.fixtures import TinySegNet  # noqa: E402

SMALL = GateOptions(volumes=1, volume_shape=(32, 64, 64))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, ModelPackage]:
    """TinySegNet exported once (dynamo exporter + onnxslim) into a package."""
    module = TinySegNet().eval()
    tmp = tmp_path_factory.mktemp("tiny")
    info = export_onnx_with_info(module, tmp / "export" / "model.onnx", example_shape=(1, 1, 16, 32, 32))
    assert info.opset >= 17 and info.exporter == "dynamo"
    package = write_package(tmp / "pkg", info.path, MANIFEST)
    return module, package


def perturbed(package: ModelPackage, out: Path) -> ModelPackage:
    """The same package with the head's class-2 ("bone") bias raised by 1.5 in the ONNX graph."""
    model = onnx.load(str(package.model_path))
    (init,) = [i for i in model.graph.initializer if i.name.endswith("head.bias")]
    bias = onnx.numpy_helper.to_array(init).copy()
    bias[2] += 1.5
    init.CopyFrom(onnx.numpy_helper.from_array(bias, init.name))
    path = out.parent / "perturbed.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return write_package(out, path, MANIFEST)


def test_export_graph_has_dynamic_named_axes_and_checks(tiny: tuple) -> None:
    _, package = tiny
    model = onnx.load(str(package.model_path))
    onnx.checker.check_model(model, full_check=True)
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 1, "z", "y", "x"]
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17


def test_gate_passes_for_a_faithful_export(tiny: tuple, tmp_path: Path) -> None:
    module, package = tiny
    report = run_gate(module, package, SMALL)
    assert report.passed, report.markdown()
    assert {r.input for r in report.results} == {"random", "phantom"}
    assert report.needed_atol < 1e-4
    assert [d.label for d in report.segmentation] == [1, 2]
    assert all(d.dice == 1.0 for d in report.segmentation)
    assert report.segmentation[0].reference_voxels > 1000  # the model segments something
    # stored in the package, hashed into its manifest
    import shutil

    copy = tmp_path / "pkg"
    shutil.copytree(package.root, copy)
    write_report(report, copy, title="t")
    again = ModelPackage.load(copy)
    assert {"parity.json", "parity.md"} <= set(again.manifest["files"])
    data = json.loads((copy / "parity.json").read_text())
    assert data["passed"] is True and data["min_dice"] == SMALL.min_dice and len(data["segmentation"]) == 2
    md = (copy / "parity.md").read_text()
    assert md.startswith("# t: PASSED") and "| phantom 1 (32x64x64 @ 5x6x6 mm) | 1 Lung | 1.0000 |" in md


def test_gate_fails_for_a_perturbed_graph_and_says_what_would_have_passed(tiny: tuple, tmp_path: Path) -> None:
    module, package = tiny
    bad = perturbed(package, tmp_path / "bad")
    report = run_gate(module, bad, SMALL)
    assert not report.passed
    assert 1.49 < report.needed_atol < 1.51  # exactly the bias shift, at the allowed rtol
    bone = [d for d in report.segmentation if d.name == "Bone"][0]
    assert bone.dice < SMALL.min_dice and bone.candidate_voxels > bone.reference_voxels
    assert report.needed_min_dice == min(d.dice for d in report.segmentation)
    failures = report.failures()
    assert any(f.startswith("input random: error 1.5") for f in failures)
    assert any("label 2 Bone: Dice" in f for f in failures)
    assert "## Failed checks" in report.markdown()
    # looser thresholds that the report says would have been needed do pass
    loose = GateOptions(atol=1.6, min_agreement=0.0, min_dice=report.needed_min_dice, volumes=1,
                        volume_shape=SMALL.volume_shape)
    assert run_gate(module, bad, loose).passed


def test_check_parity_keeps_its_signature(tiny: tuple) -> None:
    module, package = tiny
    x = np.random.default_rng(0).uniform(-1, 1, (1, 1, 16, 32, 32)).astype(np.float32)
    report = check_parity(module, str(package.model_path), {"random": x})
    assert isinstance(report, ParityReport) and report.passed
    assert report.rtol == 0.0 and report.segmentation == []
    assert set(report.to_dict()) >= {"passed", "atol", "min_argmax_agreement", "needed_atol", "results"}
    assert report.table().startswith("| input | max abs error |")


def test_torch_runner_is_a_runner(tiny: tuple) -> None:
    module, package = tiny
    runner = TorchRunner(package, module)
    out = runner.infer(np.zeros((2, 1, 16, 32, 32), dtype=np.float32))
    assert out.shape == (2, 3, 16, 32, 32) and out.dtype == np.float32
    assert runner.describe().startswith("pytorch ")
