"""``edge-export``: build model packages from PyTorch modules.

Commands:
  default-model --out DIR   build the bundled CT package from ``export.models.threshold``
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edge_runtime._deps import require

log = logging.getLogger("export")

DEFAULT_LABELS = [
    {
        "value": 1,
        "name": "Lung",
        "category": {"value": "91772007", "scheme": "SCT", "meaning": "Organ"},
        "type": {"value": "39607008", "scheme": "SCT", "meaning": "Lung"},
        "color": [197, 165, 145],
    },
    {
        "value": 2,
        "name": "Bone",
        "category": {"value": "85756007", "scheme": "SCT", "meaning": "Tissue"},
        "type": {"value": "272673000", "scheme": "SCT", "meaning": "Bone"},
        "color": [241, 214, 145],
    },
]


def build_default_model(out: Path) -> int:
    require("torch", feature="edge-export", extra="export")
    from edge_runtime.phantom import make_phantom

    from .models.threshold import HU_SCALE, ThresholdSegmenter
    from .onnx import export_onnx
    from .package import add_file, write_package
    from .parity import check_parity

    module = ThresholdSegmenter().eval()
    manifest = {
        "name": "ct-lung-bone-threshold",
        "version": "0.1.0",
        "description": (
            "Demonstration model: smoothed HU thresholds for lung and bone, built as a PyTorch module "
            "and exported to ONNX. Not a clinical model."
        ),
        "model": {"input": "image", "output": "logits", "input_channels": 1, "activation": "softmax"},
        "series_filter": {"modalities": ["CT"]},
        "preprocessing": {
            "target_spacing": [2.0, 1.5, 1.5],
            "normalization": {"kind": "ct_window", "lower": -1024, "upper": 1024, "mean": 0, "std": HU_SCALE},
        },
        "inference": {"patch_size": [48, 128, 128], "overlap": 0.25, "blending": "gaussian", "batch_size": 2},
        "labels": DEFAULT_LABELS,
        "algorithm": {"name": "ct-lung-bone-threshold", "version": "0.1.0", "family": "artificial-intelligence"},
        "source": {"kind": "module", "factory": "export.models.threshold:ThresholdSegmenter"},
    }
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(module, Path(tmp) / "model.onnx", example_shape=(1, 1, 48, 128, 128))
        package = write_package(out, onnx_path, manifest)
    phantom = make_phantom((48, 128, 128), (2.0, 1.5, 1.5), rng=0)
    realistic = (np.clip(phantom.hu, -1024, 1024) / HU_SCALE).astype(np.float32)[None, None]
    rng = np.random.default_rng(0)
    inputs = {
        "random": rng.uniform(-1, 1, (2, 1, 32, 64, 64)).astype(np.float32),
        "phantom": np.ascontiguousarray(realistic),
    }
    report = check_parity(module, str(package.model_path), inputs)
    (out / "parity.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    add_file(out, out / "parity.json")
    print(report.table())
    if not report.passed:
        print(f"parity gate failed (needed atol {report.needed_atol:.3g})", file=sys.stderr)
        return 1
    print(f"wrote {out} ({package.identity})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edge-export", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("default-model", help="build the bundled CT package")
    p.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "default-model":
        return build_default_model(args.out)
    return 2


if __name__ == "__main__":
    sys.exit(main())
