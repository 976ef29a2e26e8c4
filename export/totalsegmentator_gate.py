"""The gate of a TotalSegmentator package: its ONNX graph against the PyTorch networks it came from.

Both run the runtime's whole TotalSegmentator pipeline (reorientation, TotalSegmentator's resampling, every
part's nnU-Net pipeline, the merge) on the gate's volumes, one through :class:`~export.parity.TorchRunner`, one
through ONNX Runtime; the merged label maps must agree per label (Dice >= ``--min-dice``) and the logits on
windows within ``--atol``. What TotalSegmentator itself would give for the same weights is the test suite's
business (``tests/export/test_totalsegmentator.py`` checks the merge against TotalSegmentator's class maps).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from export.commands import _Staging


def build_and_gate(args: argparse.Namespace, source: Any, manifest: dict[str, Any], volumes: dict,
                   stage: _Staging) -> int:
    from edge_runtime.inference.runner.onnxruntime import OnnxRuntimeRunner
    from export.package import write_package
    from export.parity import TorchRunner, check_parity, label_dice, write_report
    from export.totalsegmentator import build_onnx, segment_array

    with stage.building():
        with tempfile.TemporaryDirectory() as tmp:
            info = build_onnx(source, Path(tmp), args)
            manifest["export"] = {"opset": info.opset, "exporter": info.exporter, "simplified": info.simplified,
                                  "nodes": info.nodes_saved}
            extra = [info.path.with_name(info.path.name + ".data")] if info.external_data else []
            package = write_package(stage.dir, info.path, manifest, extra)
        rng = np.random.default_rng(0)
        windows = {f"random window {i + 1}": rng.normal(0, 1, (1, len(source.parts), *source.window))
                   .astype(np.float32) for i in range(2)}
        report = check_parity(source.module, str(package.model_path), windows, input_name=package.input_name,
                              atol=args.atol, min_agreement=args.min_agreement, rtol=args.rtol)
        names = {lab.value: lab.name for lab in package.labels}
        reference, candidate = TorchRunner(package, source.module), OnnxRuntimeRunner(package)
        dice = []
        for name, (image, spacing) in volumes.items():
            maps = [segment_array(image[0], spacing, package, r) for r in (reference, candidate)]
            dice += label_dice(name, maps[0], maps[1], names, len(package.labels) + 1)
        report = dataclasses.replace(report, segmentation=dice, min_dice=args.min_dice)
        write_report(report, stage.dir, title=f"TotalSegmentator package, PyTorch against ONNX Runtime: "
                                              f"{package.identity}")
    out = stage.settle(report, "edge-export package: the TotalSegmentator package's gate failed; set aside in "
                               "{where} (see parity.md there):")
    if out is None:
        return 1
    print(f"wrote {out} ({package.identity}, {len(package.labels)} classes from {len(source.parts)} part(s))")
    return 0
