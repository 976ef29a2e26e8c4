"""``edge-export package --nnunet DIR --folds F [F ...]``: an nnU-Net v2 trained-model folder as a package that the
runtime segments with nnU-Net's whole predictor pipeline, behind the nnU-Net parity gate.

The package holds one ONNX model, the mean of the chosen folds' networks, and the manifest's ``"nnunet"``
section with every pipeline option (:mod:`edge_runtime.inference.nnunet.settings`). A cascade stage
(``--configuration 3d_cascade_fullres``) also holds its previous stage (``3d_lowres``, from the same results folder
or ``--previous-stage``) as a package of its own in ``previous_stage/``, listed with its hash. The gate
(:mod:`export.nnunet_parity`) runs nnunetv2's ``nnUNetPredictor`` and the package on phantom CTs and on the DICOM
series given with ``--parity-series``; the package is published only when it passes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.errors import StartupError
from export.commands import CommandError, _Staging, export_domain, resolve_labels

#: field of view of the phantom CTs of the gate (mm, z y x), sampled at 0.8x the model's spacing (so both
#: pipelines resample) and capped at this many voxels
PHANTOM_FOV_MM = (200.0, 360.0, 360.0)
MAX_PHANTOM_VOXELS = 4_000_000


def add_nnunet_arguments(p: argparse.ArgumentParser) -> None:
    """The options of the nnU-Net pipeline package (``--folds`` selects it)."""
    g = p.add_argument_group("nnU-Net pipeline (with --nnunet --folds: nnU-Net's whole predictor in the runtime)")
    g.add_argument("--folds", nargs="+", metavar="F",
                   help="folds to ensemble (e.g. 0 1 2 3 4, or all); selects nnU-Net's pipeline and its parity gate")
    g.add_argument("--no-mirroring", action="store_true", help="test-time mirroring off (faster; the gate reports "
                   "the Dice this costs against nnU-Net with mirroring)")
    g.add_argument("--tile-step-size", type=float, default=0.5, help="nnU-Net's tile step (default 0.5)")
    g.add_argument("--parity-series", type=Path, action="append", default=[], metavar="DIR",
                   help="a DICOM series folder for the nnU-Net gate (repeatable), beside the phantom CTs")
    g.add_argument("--postprocessing", type=Path, metavar="PKL", help="nnU-Net's postprocessing.pkl (default: "
                   "crossval_results_folds_<folds>/postprocessing.pkl or postprocessing.pkl in the model folder)")
    g.add_argument("--no-postprocessing", action="store_true", help="record nnU-Net's post-processing switched "
                   "off (the gate then compares with nnU-Net without it)")
    g.add_argument("--max-probability-error", type=float, default=0.02,
                   help="largest softmax difference to nnU-Net allowed at any voxel (default 0.02)")
    g.add_argument("--channels", type=Path, metavar="FILE", help="JSON list of rules choosing each input "
                   "channel's series (the manifest's 'channels'); default: rules from dataset.json's channel_names "
                   "for a model of several channels")
    g.add_argument("--previous-stage", type=Path, metavar="DIR", help="a cascade stage's previous trained-model "
                   "folder (default: the <trainer>__<plans>__3d_lowres folder beside --nnunet)")


def run_nnunet_package(args: argparse.Namespace) -> int:
    from export.loaders.base import LoaderError
    from export.nnunet_source import load_nnunet_source

    try:
        source = load_nnunet_source(
            args.nnunet, [str(f) for f in args.folds], configuration=args.configuration,
            checkpoint=args.checkpoint_name, allow_pickle=args.allow_pickle, use_mirroring=not args.no_mirroring,
            tile_step_size=args.tile_step_size, postprocessing=args.postprocessing,
            use_postprocessing=not args.no_postprocessing, previous_stage=args.previous_stage,
        )
        volumes = gate_volumes(source, args)
        manifest = nnunet_manifest(source, args)
        stage = _Staging(args.out, args.overwrite)
    except (StartupError, LoaderError) as exc:
        print(f"edge-export package: {exc}", file=sys.stderr)
        return 2
    return _build(args, source, manifest, volumes, stage)


def nnunet_manifest(source: Any, args: argparse.Namespace) -> dict[str, Any]:
    from export.nnunet_channels import channels_section
    from export.nnunet_source import runtime_hints

    hints = runtime_hints(source)
    channel_names = source.dataset.get("channel_names", source.dataset.get("modality", {}))
    channels, modalities = channels_section(channel_names, args.channels, args.modality or hints["modalities"])
    labels = resolve_labels(source.num_classes, source.label_names, args.labels_json)
    name = args.name or str(source.dataset.get("name") or source.plans.get("dataset_name") or source.root.name)
    version = args.version or "0.1.0"
    folds = ", ".join(source.folds)
    return {
        "name": name,
        "version": version,
        "description": args.description or f"nnU-Net v2 {source.configuration}, folds {folds}, exported by edge-export "
        "with nnU-Net's predictor pipeline.",
        # a region model's sigmoid is the nnunet section's (regions); "activation" is the generic pipeline's
        "model": {"input": "image", "output": "logits", "input_channels": source.input_channels,
                  **({} if source.settings.regions else {"activation": "softmax"})},
        "series_filter": {"modalities": modalities},
        **({"channels": channels} if channels else {}),
        "preprocessing": {"target_spacing": hints["target_spacing"], "normalization": hints["normalization"]},
        "inference": {"patch_size": hints["patch_size"], "overlap": hints["overlap"], "blending": "gaussian",
                      "batch_size": args.batch_size or 2},
        "labels": labels,
        "algorithm": {"name": name, "version": version, "family": "artificial-intelligence"},
        "source": {"kind": "nnunet-v2", "folder": source.root.name, "configuration": source.configuration,
                   "folds": list(source.folds), "plans": source.plans.get("plans_name"),
                   **({"previous_stage": source.previous.root.name} if source.previous else {})},
        "nnunet": source.settings.to_dict(),
        "domain": export_domain(args, modalities),
    }


def gate_volumes(source: Any, args: argparse.Namespace) -> dict[str, tuple[np.ndarray, tuple[float, ...]]]:
    """Phantom CTs (``--parity-volumes``, ``--parity-shape``) and each ``--parity-series``, as
    ``(1, Z, Y, X)`` images in modality units with their ``(z, y, x)`` spacing."""
    from edge_runtime.imaging.volume import load_volume
    from export.nnunet_source import runtime_hints
    from phantom import make_phantom

    spacing = [float(s) if s else 1.0 for s in runtime_hints(source)["target_spacing"]]
    phantom_spacing = tuple(round(0.8 * s, 3) for s in spacing)
    if args.parity_shape:
        shape = tuple(int(v) for v in args.parity_shape)
    else:
        full = [f / s for f, s in zip(PHANTOM_FOV_MM, phantom_spacing, strict=True)]
        scale = min(1.0, (MAX_PHANTOM_VOXELS / float(np.prod(full))) ** (1 / 3))
        shape = tuple(max(8, int(round(n * scale))) for n in full)
    volumes: dict[str, tuple[np.ndarray, tuple[float, ...]]] = {}
    for i in range(args.parity_volumes):
        ph = make_phantom(shape, phantom_spacing, rng=i + 1)  # type: ignore[arg-type]
        name = f"phantom {i + 1} ({'x'.join(map(str, shape))} @ {'x'.join(f'{s:g}' for s in phantom_spacing)} mm)"
        volumes[name] = (np.repeat(ph.hu[None], source.image_channels, axis=0).astype(np.float32), phantom_spacing)
    for folder in args.parity_series:
        files = sorted(p for p in Path(folder).iterdir() if p.is_file()) if Path(folder).is_dir() else []
        if not files:
            raise CommandError(f"--parity-series {folder} is not a folder of DICOM files")
        try:
            vol = load_volume(files)
        except Exception as exc:  # VolumeError and what pydicom raises: one message for the user
            raise CommandError(f"--parity-series {folder}: {exc}") from exc
        image = np.repeat(vol.array[None], source.image_channels, axis=0).astype(np.float32)
        shape_text = "x".join(map(str, vol.array.shape))
        volumes[f"{Path(folder).name} ({shape_text} @ {'x'.join(f'{s:.3g}' for s in vol.spacing)} mm)"] = (
            image, tuple(float(s) for s in vol.spacing))
    if not volumes:
        raise CommandError("the nnU-Net gate needs volumes: --parity-volumes >= 1 or --parity-series DIR")
    return volumes


def _build(args: argparse.Namespace, source: Any, manifest: dict[str, Any], volumes: dict, stage: _Staging) -> int:
    from export.nnunet_parity import NnunetGateOptions, run_nnunet_gate
    from export.parity import write_report

    with stage.building():
        if source.previous is not None:  # the cascade's previous stage first: loading this package loads it
            previous = nnunet_manifest(source.previous, args)
            previous["name"] = f"{manifest['name']} {source.previous.configuration} stage"
            previous["description"] = (f"The {source.previous.configuration} stage of {manifest['name']}: its label "
                                       f"map is an input of {source.configuration}.")
            _write_stage(args, source.previous, previous, stage.dir / source.settings.previous_stage.package)
        package = _write_stage(args, source, manifest, stage.dir)
        options = NnunetGateOptions(min_dice=args.min_dice, max_probability_error=args.max_probability_error)
        report = run_nnunet_gate(source, package, volumes, options)
        write_report(report, stage.dir, title=f"nnUNetPredictor against the runtime: {package.identity}")  # type: ignore[arg-type]
    out = stage.settle(report, "edge-export package: nnU-Net parity gate failed; package set aside in {where} "
                               "(see parity.md there):")
    if out is None:
        return 1
    print(f"wrote {out} ({package.identity}); parity against nnUNetPredictor: {out / 'parity.md'}")
    return 0


def _write_stage(args: argparse.Namespace, source: Any, manifest: dict[str, Any], out: Path) -> Any:
    """One stage's ONNX model (the fold ensemble) and package in ``out``; a cascade stage's manifest lists its
    previous stage's manifest (written before) with its hash, so the two stay a pair."""
    from edge_runtime.inference.package import MANIFEST_NAME, ModelPackage, sha256_file
    from export.onnx import export_onnx_with_info
    from export.package import write_package

    with tempfile.TemporaryDirectory() as tmp:
        try:
            info = export_onnx_with_info(
                source.module, Path(tmp) / "model.onnx", example_shape=(1, source.input_channels, *source.window),
                opset=args.opset, simplify=not args.no_simplify,
            )
        except Exception as exc:  # torch.export / the exporters raise many types; one message for the user
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise CommandError(f"ONNX export failed: {type(exc).__name__}: {first}") from exc
        manifest["export"] = {"opset": info.opset, "exporter": info.exporter, "simplified": info.simplified,
                              "nodes": info.nodes_saved}
        extra = [info.path.with_name(info.path.name + ".data")] if info.external_data else []
        package = write_package(out, info.path, manifest, extra)
    stage = source.settings.previous_stage
    if stage is None:
        return package
    data = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))
    listed = f"{stage.package}/{MANIFEST_NAME}"
    data["files"][listed] = {"sha256": sha256_file(out / listed)}
    (out / MANIFEST_NAME).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return ModelPackage.load(out)
