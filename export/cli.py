"""``edge-export``: build model packages from PyTorch modules.

Commands:
  default-model --out DIR                  build the bundled CT package from the trained phantom U-Net
                                           (``export/models/phantom_unet.pt``, written by ``export.train``)
  default-model --kind threshold --out DIR the hand-made lung/bone threshold module (no training)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.extras import require

log = logging.getLogger("export")

#: the trained phantom U-Net's weights, architecture and training recipe (written by ``export.train``)
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "models" / "phantom_unet.pt"

_ORGAN = {"value": "91772007", "scheme": "SCT", "meaning": "Organ"}
_TISSUE = {"value": "85756007", "scheme": "SCT", "meaning": "Tissue"}

DEFAULT_LABELS = [
    {
        "value": 1,
        "name": "Lung",
        "category": _ORGAN,
        "type": {"value": "39607008", "scheme": "SCT", "meaning": "Lung"},
        "color": [197, 165, 145],
    },
    {
        "value": 2,
        "name": "Bone",
        "category": _TISSUE,
        "type": {"value": "272673000", "scheme": "SCT", "meaning": "Bone"},
        "color": [241, 214, 145],
    },
]

#: labels of the phantom U-Net: the values of ``phantom.LABELS``, SNOMED CT coded
PHANTOM_LABELS = [
    {
        "value": 1,
        "name": "Lung",
        "category": _ORGAN,
        "type": {"value": "39607008", "scheme": "SCT", "meaning": "Lung"},
        "color": [197, 165, 145],
    },
    {
        "value": 2,
        "name": "Liver",
        "category": _ORGAN,
        "type": {"value": "10200004", "scheme": "SCT", "meaning": "Liver"},
        "color": [221, 130, 101],
    },
    {
        "value": 3,
        "name": "Spleen",
        "category": _ORGAN,
        "type": {"value": "78961009", "scheme": "SCT", "meaning": "Spleen"},
        "color": [157, 108, 162],
    },
    {
        "value": 4,
        "name": "Kidney",
        "category": _ORGAN,
        "type": {"value": "64033007", "scheme": "SCT", "meaning": "Kidney"},
        "color": [185, 102, 83],
    },
    {
        "value": 5,
        "name": "Bone",
        "category": _TISSUE,
        "type": {"value": "272673000", "scheme": "SCT", "meaning": "Bone"},
        "color": [241, 214, 145],
    },
]

UNET_NAME = "phantom-ct-unet"
UNET_VERSION = "1.1.0"


def build_default_model(out: Path, kind: str = "unet", checkpoint: Path | None = None) -> int:
    """Build the bundled package: the trained phantom U-Net (default) or the threshold module."""
    if kind == "threshold":
        return build_threshold_model(out)
    if kind == "unet":
        require("torch", feature="edge-export", extra="export")
        ckpt = Path(checkpoint) if checkpoint is not None else DEFAULT_CHECKPOINT
        if not ckpt.is_file():
            print(
                f"edge-export: no trained checkpoint at {ckpt}; train one with "
                "'python -m export.train --out DIR' (or use --kind threshold)",
                file=sys.stderr,
            )
            return 1
        _package, report = build_unet_package(out, ckpt)
        print(report.markdown("Parity"))
        if not report.passed:
            print(f"parity gate failed (needed atol {report.needed_atol:.3g})", file=sys.stderr)
            return 1
        print(f"wrote {out} ({_package.identity})")
        return 0
    raise ValueError(f"unknown model kind {kind!r} (unet or threshold)")


def unet_manifest(recipe: dict[str, Any]) -> dict[str, Any]:
    """The package manifest of the phantom U-Net; geometry and normalisation come from its training recipe."""
    data = recipe["data"]
    norm = data["normalization"]
    inference = recipe["inference"]
    return {
        "name": UNET_NAME,
        "version": UNET_VERSION,
        "description": (
            "Demonstration model: a compact 3D U-Net trained on the CPU, only on synthetic CT torso phantoms "
            "(phantom), to segment lung, liver, spleen, kidney and bone. It has never seen a "
            "patient scan and is not a clinical model. Training recipe and held-out phantom Dice: training.json."
        ),
        "model": {"input": "image", "output": "logits", "input_channels": 1, "activation": "softmax"},
        "series_filter": {"modalities": ["CT"]},
        "preprocessing": {
            "target_spacing": [float(v) for v in data["target_spacing"]],
            "normalization": {
                "kind": "ct_window",
                "lower": norm["lower"],
                "upper": norm["upper"],
                "mean": norm["mean"],
                "std": norm["std"],
            },
        },
        "inference": {
            "patch_size": [int(v) for v in data["patch_size"]],
            "overlap": float(inference["overlap"]),
            "blending": "gaussian",
            "batch_size": int(inference["batch_size"]),
        },
        "labels": PHANTOM_LABELS,
        "algorithm": {"name": UNET_NAME, "version": UNET_VERSION, "family": "artificial-intelligence"},
        "source": {
            "kind": "checkpoint",
            "factory": "export.models.unet:UNet3D",
            "checkpoint": "export/models/phantom_unet.pt",
            "training": "training.json",
        },
    }


#: seeds of the parity gate's phantoms (windows and whole volumes): apart from training, validation and held-out
UNET_PARITY_SEED = 10_000_000


def build_unet_package(out: Path, checkpoint: Path, *, quiet: bool = True) -> tuple[Any, Any]:
    """Export a trained U-Net checkpoint to ``out``: model.onnx (BatchNorm folded), manifest, the parity gate's
    report (parity.json and parity.md: logits on random and phantom windows, per-label Dice over two whole phantom
    volumes through the sliding window) and training.json (the recipe stored in the checkpoint). Returns
    (package, parity report)."""
    import contextlib
    import io

    from export.models.unet import load_checkpoint
    from export.onnx import export_onnx
    from export.package import add_file, write_package
    from export.parity import GateOptions, run_gate, write_report

    model, ckpt = load_checkpoint(checkpoint)
    recipe = ckpt["recipe"]
    manifest = unet_manifest(recipe)
    patch = tuple(int(v) for v in recipe["data"]["patch_size"])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("parity.json", "parity.md", "training.json"):
        (out / stale).unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        sink = io.StringIO()
        with contextlib.redirect_stdout(sink):
            onnx_path = export_onnx(model.fused(), Path(tmp) / "model.onnx", example_shape=(1, 1, *patch))
        package = write_package(out, onnx_path, manifest)
    # reference: the trained module itself (BatchNorm not folded), so the check covers the folding too
    report = run_gate(model, package, GateOptions(volumes=2, seed=UNET_PARITY_SEED))
    write_report(report, out, title=f"Parity: {manifest['name']} {manifest['version']}")
    (out / "training.json").write_text(json.dumps(recipe, indent=2) + "\n", encoding="utf-8")
    add_file(out, out / "training.json")
    if not quiet:
        print(report.table())
    from edge_runtime.inference.package import ModelPackage

    return ModelPackage.load(out), report


def build_threshold_model(out: Path) -> int:
    require("torch", feature="edge-export", extra="export")
    from export.models.threshold import HU_SCALE, ThresholdSegmenter
    from export.onnx import export_onnx
    from export.package import add_file, write_package
    from export.parity import check_parity
    from phantom import make_phantom

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
    p.add_argument(
        "--kind",
        choices=("unet", "threshold"),
        default="unet",
        help="unet: the trained phantom U-Net (default); threshold: the hand-made lung/bone module",
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help=f"trained U-Net checkpoint from export.train (default: {DEFAULT_CHECKPOINT.name} in export/models)",
    )
    from export.commands import add_commands  # light: torch is imported only when a command runs
    from export.triton import add_triton_parser

    handlers = add_commands(sub)
    add_triton_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "default-model":
        return build_default_model(args.out, kind=args.kind, checkpoint=args.checkpoint)
    if args.command == "triton":
        return args.func(args)
    if args.command in handlers:
        return handlers[args.command](args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
