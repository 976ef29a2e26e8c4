"""``edge-export default-model``: the package that ships with the runtime (``edge_runtime/models/default``).

Two models can fill it: the trained phantom U-Net (the default: ``phantom_unet.pt`` beside this module, written by
``python -m export.models.train_phantom_unet``), whose manifest comes from the recipe stored in its checkpoint, or
the hand-made lung/bone threshold module (``--kind threshold``, no training). Both go through the same export path
as any other model (ONNX, package, parity gate), and their labels are ``phantom.LABELS``, SNOMED CT coded.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.extras import require
from export.domain import phantom_domain
from phantom import LABELS

#: the trained phantom U-Net's weights, architecture and training recipe (written by ``train_phantom_unet``)
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "phantom_unet.pt"

_ORGAN = {"value": "91772007", "scheme": "SCT", "meaning": "Organ"}
_TISSUE = {"value": "85756007", "scheme": "SCT", "meaning": "Tissue"}

#: SNOMED CT category, anatomy code and display colour of each ``phantom.LABELS`` name
_ANATOMY: dict[str, tuple[dict[str, str], str, list[int]]] = {
    "lung": (_ORGAN, "39607008", [197, 165, 145]),
    "liver": (_ORGAN, "10200004", [221, 130, 101]),
    "spleen": (_ORGAN, "78961009", [157, 108, 162]),
    "kidney": (_ORGAN, "64033007", [185, 102, 83]),
    "bone": (_TISSUE, "272673000", [241, 214, 145]),
}


def coded_label(value: int, name: str) -> dict[str, Any]:
    """The manifest label for the ``phantom.LABELS`` name ``name`` at label ``value``, SNOMED CT coded."""
    category, code, color = _ANATOMY[name]
    meaning = name.capitalize()
    return {
        "value": value,
        "name": meaning,
        "category": category,
        "type": {"value": code, "scheme": "SCT", "meaning": meaning},
        "color": color,
    }


#: labels of the threshold module: lung and bone, numbered 1 and 2
THRESHOLD_LABELS = [coded_label(1, "lung"), coded_label(2, "bone")]

#: labels of the phantom U-Net: the values of ``phantom.LABELS``
PHANTOM_LABELS = [coded_label(value, name) for value, name in LABELS.items()]
#: Body Part Examined values of a torso from the lungs to the kidneys, what the phantoms draw
PHANTOM_BODY_PARTS = ["CHEST", "ABDOMEN", "CHESTABDOMEN", "CHESTABDPELVIS", "TRUNK"]
PHANTOM_DOMAIN_NOTE = (
    "What the phantom training covered (training.json: data.fov_z_mm, fov_xy_mm, fine_slice_mm, fine_pixel_mm, "
    "target_spacing; held-out phantom spacings): synthetic CT torsos, original axial images, no patient scans. "
    "A series outside it is refused unless the site sets out_of_domain = \"mark\"."
)

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
                "'python -m export.models.train_phantom_unet --out DIR' (or use --kind threshold)",
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
            "(the phantom package), to segment lung, liver, spleen, kidney and bone. It has never seen a "
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
        "domain": {"notes": PHANTOM_DOMAIN_NOTE, **phantom_domain(recipe, PHANTOM_BODY_PARTS)},
        "confidence": {"low": 0.5, "flag_below": 0.7},
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
    """Export the threshold module to ``out``, checked for parity on random and phantom windows; the exit status."""
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
        "labels": THRESHOLD_LABELS,
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


def add_default_model_parser(subparsers: Any) -> None:
    """Add ``default-model`` to ``edge-export``'s subparsers."""
    p = subparsers.add_parser("default-model", help="build the bundled CT package")
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
        help=f"trained U-Net checkpoint from train_phantom_unet (default: {DEFAULT_CHECKPOINT.name} in export/models)",
    )
    p.set_defaults(func=run_default_model)


def run_default_model(args: argparse.Namespace) -> int:
    return build_default_model(args.out, kind=args.kind, checkpoint=args.checkpoint)
