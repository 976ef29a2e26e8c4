"""``edge-export`` subcommands ``package``, ``engine`` and ``quantize``.

``add_commands(subparsers)`` adds them to ``edge-export``'s subparsers (``export.cli``), each with its handler as
``func``; a handler takes the parsed ``argparse.Namespace`` and returns the exit status (0 done, 1 the gate or the
build failed, 2 the request cannot be served: bad source, missing dependency, missing SNOMED codes ...).

``package``: a trained model (one of four sources) -> ONNX -> model package, behind the parity gate::

    edge-export package --factory mod:fn [--kwargs JSON] [--state-dict F] | --torchscript F
                        | --monai-bundle DIR | --nnunet DIR [--fold 0] --out DIR
                        [--name N --version V --labels-json F --target-spacing z y x --patch z y x
                         --overlap O --ct-window L U MEAN STD --atol A --min-dice D ...]

The package is built in a staging folder beside ``--out``; it becomes ``--out`` only when the gate passes.
A failed gate leaves it as ``<out>.rejected`` with ``parity.md`` saying what failed, and exits 1.

``engine PACKAGE --precision fp32|fp16|int8``: a TensorRT engine in the package (needs a GPU and TensorRT).
``quantize PACKAGE --out DIR``: an INT8 (QDQ) package, gated by Dice against FP32.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edge_runtime.errors import ExportError, StartupError
from export.domain import DomainError, apply_override, base_domain, nnunet_domain

log = logging.getLogger(__name__)

#: colours for labels that bring none (the 3D Slicer generic anatomy palette, roughly)
PALETTE = [
    [128, 174, 128], [241, 214, 145], [177, 122, 101], [111, 184, 210], [216, 101, 79], [221, 130, 101],
    [144, 238, 144], [192, 104, 88], [220, 245, 20], [78, 63, 0], [255, 250, 220], [230, 220, 70],
]


class CommandError(ExportError):
    """A request that cannot be served; the message lists every problem found."""


def add_commands(subparsers: Any) -> None:
    """Add ``package``, ``engine`` and ``quantize`` to ``edge-export``'s subparsers."""
    _add_package_parser(subparsers)
    _add_engine_parser(subparsers)
    _add_quantize_parser(subparsers)


# ---------------------------------------------------------------------------------------------------
# parsers
# ---------------------------------------------------------------------------------------------------


def _triple(kind: Callable[[str], Any]) -> dict[str, Any]:
    return {"nargs": 3, "type": kind, "metavar": ("Z", "Y", "X")}


def _spacing_value(text: str) -> float | None:
    if text.lower() in ("none", "native", "-"):
        return None
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"spacing must be positive, got {text}")
    return value


def _add_package_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "package",
        help="export a trained model (factory, TorchScript, MONAI bundle, nnU-Net) to a gated model package",
        description="Load a trained model, export it to ONNX and write a model package, behind a parity gate.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--factory", metavar="MOD:FN", help="importable callable returning a torch.nn.Module")
    src.add_argument("--torchscript", type=Path, metavar="FILE", help="TorchScript file (torch.jit.save)")
    src.add_argument("--monai-bundle", type=Path, metavar="DIR", help="MONAI bundle folder")
    src.add_argument("--nnunet", type=Path, metavar="DIR", help="nnU-Net v2 trained-model folder (plans.json ...)")
    src.add_argument("--totalsegmentator", type=Path, metavar="WEIGHTS",
                     help="TotalSegmentator weights folder (DatasetNNN_* nnU-Net results; --task picks the models)")
    p.add_argument("--kwargs", default=None, help="factory keyword arguments as JSON, or @FILE holding JSON")
    p.add_argument("--state-dict", type=Path, default=None, help="state dict file for --factory")
    p.add_argument("--fold", default="0", help="nnU-Net fold (0-4 or 'all'; default 0)")
    p.add_argument("--configuration", default="3d_fullres", help="nnU-Net configuration (default 3d_fullres)")
    p.add_argument("--checkpoint-name", default="checkpoint_final.pth", help="nnU-Net checkpoint file name")
    p.add_argument("--network-key", default="network_def", help="MONAI bundle network definition key")
    p.add_argument("--no-reorient", action="store_true",
                   help="MONAI: feed the network (z, y, x) windows as they are (no axis adapter)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read checkpoints with pickled objects (runs code from the file: trusted files only)")
    p.add_argument("--out", type=Path, required=True, help="package folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing package at --out")
    meta = p.add_argument_group("manifest (defaults: what the source says)")
    meta.add_argument("--name")
    meta.add_argument("--version")
    meta.add_argument("--description")
    meta.add_argument("--labels-json", type=Path, help="labels with SNOMED CT codes (manifest 'labels' format)")
    meta.add_argument("--input-channels", type=int)
    meta.add_argument("--modality", action="append", help="series modality to accept (repeatable; default CT)")
    meta.add_argument("--target-spacing", **_triple(_spacing_value), help="mm; 'none' keeps an axis native")
    meta.add_argument("--patch", **_triple(int), help="sliding-window patch size")
    meta.add_argument("--overlap", type=float)
    meta.add_argument("--blending", choices=("gaussian", "constant"))
    meta.add_argument("--batch-size", type=int)
    meta.add_argument(
        "--domain",
        type=Path,
        metavar="FILE",
        help="JSON object whose keys replace those of the filled-in 'domain' (what the model was validated on)",
    )
    norm = meta.add_mutually_exclusive_group()
    norm.add_argument("--ct-window", nargs=4, type=float, metavar=("LOWER", "UPPER", "MEAN", "STD"),
                      help="clip to [LOWER, UPPER] then (x - MEAN) / STD")
    norm.add_argument("--normalization", choices=("zscore", "none"))
    gate = p.add_argument_group("parity gate (PyTorch against ONNX Runtime)")
    gate.add_argument("--atol", type=float, default=1e-3, help="absolute logit tolerance (default 1e-3)")
    gate.add_argument("--rtol", type=float, default=1e-3, help="relative logit tolerance (default 1e-3)")
    gate.add_argument("--min-agreement", type=float, default=0.999, help="argmax agreement per window")
    gate.add_argument("--min-dice", type=float, default=0.99, help="Dice per label on phantom volumes")
    gate.add_argument("--parity-volumes", type=int, default=1, help="phantom volumes for the Dice check")
    gate.add_argument("--parity-shape", **_triple(int), help="phantom volume shape on the model grid")
    out = p.add_argument_group("ONNX")
    out.add_argument("--opset", type=int, default=18)
    out.add_argument("--no-simplify", action="store_true", help="skip onnxslim")
    from export.nnunet_command import add_nnunet_arguments  # here: that module builds on this one

    add_nnunet_arguments(p)
    from export.totalsegmentator import add_totalsegmentator_arguments

    add_totalsegmentator_arguments(p)
    p.set_defaults(func=run_package)


def _add_package_command(
    subparsers: Any, name: str, run: Callable[[argparse.Namespace], int], **texts: str
) -> argparse.ArgumentParser:
    """A command on an existing package folder (the positional ``package``), run by ``run``."""
    p: argparse.ArgumentParser = subparsers.add_parser(name, **texts)
    p.add_argument("package", type=Path)
    p.set_defaults(func=run)
    return p


def _add_engine_parser(subparsers: Any) -> None:
    p = _add_package_command(subparsers, "engine", run_engine,
                             help="build a TensorRT engine in a package (needs TensorRT and an NVIDIA GPU)",
                             description="Build model.<precision>.smXY.engine and its key file in a package folder.")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), required=True,
                   help="int8 needs a quantised package (edge-export quantize)")
    p.add_argument("--timing-cache", type=Path, default=None, help="default: tensorrt.smXY.timing-cache in the package")
    p.add_argument("--max-batch", type=int, default=None, help="largest batch of the profile (default 2x batch_size)")
    p.add_argument("--device", type=int, default=0, help="CUDA device index")
    p.add_argument("--workspace-gb", type=float, default=4.0)


def _add_quantize_parser(subparsers: Any) -> None:
    p = _add_package_command(
        subparsers, "quantize", run_quantize,
        help="write an INT8 (QDQ) package from an FP32 package, gated by Dice against FP32",
        description="Post-training INT8 quantisation (ONNX Runtime quantize_static, QDQ) calibrated on phantoms.",
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--calibration-volumes", type=int, default=4)
    p.add_argument("--windows-per-volume", type=int, default=8)
    p.add_argument("--method", choices=("minmax", "percentile", "entropy"), default="minmax")
    p.add_argument("--per-tensor", action="store_true", help="per-tensor instead of per-channel weight scales")
    p.add_argument("--min-dice", type=float, default=0.90, help="Dice per label, INT8 against FP32")
    p.add_argument("--gate-volumes", type=int, default=1)
    p.add_argument("--parity-shape", **_triple(int), help="phantom volume shape on the model grid")


# ---------------------------------------------------------------------------------------------------
# package
# ---------------------------------------------------------------------------------------------------


def run_package(args: argparse.Namespace) -> int:
    from edge_runtime.extras import require

    try:
        require("torch", feature="edge-export package", extra="export")
        if args.totalsegmentator:  # TotalSegmentator's parts merged as it merges them, in one package
            from export.totalsegmentator import run_totalsegmentator_package

            return run_totalsegmentator_package(args)
        if args.nnunet and args.folds:  # nnU-Net's whole predictor pipeline, gated against nnUNetPredictor
            from export.nnunet_command import run_nnunet_package

            return run_nnunet_package(args)
        loaded = load_source(args)
        return _package(args, loaded)
    except StartupError as exc:  # a loader, command or missing-extra problem: the request cannot be served
        print(f"edge-export package: {exc}", file=sys.stderr)
        return 2


def load_source(args: argparse.Namespace) -> Any:
    from export import loaders

    if args.factory:
        kwargs = _read_kwargs(args.kwargs)
        return loaders.load_factory(args.factory, kwargs, args.state_dict, allow_pickle=args.allow_pickle)
    if args.kwargs or args.state_dict:
        raise CommandError("--kwargs and --state-dict go with --factory")
    if args.torchscript:
        return loaders.load_torchscript(args.torchscript)
    if args.monai_bundle:
        return loaders.load_monai_bundle(args.monai_bundle, network_key=args.network_key,
                                         reorient=not args.no_reorient, allow_pickle=args.allow_pickle)
    return loaders.load_nnunet(args.nnunet, fold=args.fold, configuration=args.configuration,
                               checkpoint=args.checkpoint_name, allow_pickle=args.allow_pickle)


def _read_kwargs(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text(encoding="utf-8")
        except OSError as exc:
            raise CommandError(f"cannot read --kwargs file: {exc}") from exc
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CommandError(f"--kwargs is not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise CommandError(f"--kwargs must be a JSON object, got {type(value).__name__}")
    return value


def probe_classes(module: Any, channels: int, patch: Sequence[int]) -> int:
    """Run one zero patch through ``module``: the number of output channels (and a shape check)."""
    import torch

    with torch.no_grad():
        try:
            out = module(torch.zeros((1, channels, *patch), dtype=torch.float32))
        except Exception as exc:  # a wrong channel count or patch size surfaces as whatever torch raises
            raise CommandError(
                f"the model does not run on a (1, {channels}, {', '.join(map(str, patch))}) patch: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            ) from exc
    if not isinstance(out, torch.Tensor):
        raise CommandError(
            f"the model returns a {type(out).__name__}; export needs one logits tensor (deep supervision off)"
        )
    if out.ndim != 5 or tuple(out.shape[2:]) != tuple(patch):
        raise CommandError(
            f"the model maps a patch {tuple(patch)} to {tuple(out.shape)}; it must return (N, K, *patch) logits "
            "(pick a patch size the network's down-sampling divides)"
        )
    return int(out.shape[1])


def build_manifest(args: argparse.Namespace, loaded: Any) -> tuple[dict[str, Any], int]:
    """The manifest from the source's hints and the command line (which wins); every problem at once."""
    hints = loaded.hints
    problems: list[str] = []
    channels = args.input_channels or loaded.input_channels or 1
    patch = list(args.patch) if args.patch else hints.get("patch_size")
    if patch is None:
        problems.append("patch size unknown: pass --patch Z Y X")
    if args.ct_window:
        lower, upper, mean, std = args.ct_window
        normalization: dict[str, Any] | None = {"kind": "ct_window", "lower": lower, "upper": upper,
                                                "mean": mean, "std": std}
    elif args.normalization:
        normalization = {"kind": args.normalization}
    else:
        normalization = hints.get("normalization")
    if normalization is None:
        problems.append("normalisation unknown: pass --ct-window LOWER UPPER MEAN STD or --normalization zscore|none")
    spacing = list(args.target_spacing) if args.target_spacing else hints.get("target_spacing")
    if spacing is None:
        log.warning("no target spacing: the model will run on each series' own grid")

    num_classes = None
    if patch is not None:
        num_classes = probe_classes(loaded.module, channels, patch)
        if loaded.num_classes is not None and loaded.num_classes != num_classes:
            problems.append(f"the source says {loaded.num_classes} output channels, the model gives {num_classes}")
    labels: list[dict[str, Any]] = []
    if num_classes is not None:
        try:
            labels = resolve_labels(num_classes, hints.get("label_names", {}), args.labels_json)
        except CommandError as exc:
            problems.append(str(exc))
    if problems:
        raise CommandError("cannot build the manifest:\n" + "\n".join(f"  - {p}" for p in problems))

    name = args.name or hints.get("name") or args.out.name
    version = args.version or hints.get("version") or "0.1.0"
    source = dict(hints.get("source", {}))
    manifest = {
        "name": name,
        "version": version,
        "description": args.description
        or hints.get("description")
        or f"Exported by edge-export from {source.get('kind', 'a model')}.",
        "model": {"input": "image", "output": "logits", "input_channels": channels, "activation": "softmax"},
        "series_filter": {"modalities": args.modality or hints.get("modalities") or ["CT"]},
        "preprocessing": {"target_spacing": spacing, "normalization": normalization},
        "inference": {
            "patch_size": [int(v) for v in patch],
            "overlap": args.overlap if args.overlap is not None else hints.get("overlap", 0.5),
            "blending": args.blending or hints.get("blending", "gaussian"),
            "batch_size": args.batch_size or hints.get("batch_size", 2),
        },
        "labels": labels,
        "algorithm": {"name": name, "version": version, "family": "artificial-intelligence"},
        "source": source,
    }
    manifest["domain"] = export_domain(args, manifest["series_filter"]["modalities"])
    if hints.get("notes"):
        manifest["notes"] = list(hints["notes"])
    return manifest, num_classes  # type: ignore[return-value]


def export_domain(args: argparse.Namespace, modalities: list[str]) -> dict[str, Any]:
    """The manifest's ``"domain"``: what the source says of its training data (:mod:`export.domain`), with
    ``--domain``'s keys over it."""
    try:
        nnunet = getattr(args, "nnunet", None)
        domain = nnunet_domain(nnunet, modalities) if nnunet else base_domain(modalities)
        return apply_override(domain, getattr(args, "domain", None))
    except DomainError as exc:
        raise CommandError(str(exc)) from exc


def resolve_labels(num_classes: int, names: dict[int, str], labels_json: Path | None) -> list[dict[str, Any]]:
    """Labels 1..K-1 with SNOMED CT codes: from ``labels_json`` (matched by value, else by the source's label
    name), named as the source names them. Fails listing every label without codes."""
    entries: list[dict[str, Any]] = []
    if labels_json is not None:
        try:
            data = json.loads(Path(labels_json).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise CommandError(f"cannot read --labels-json {labels_json}: {exc}") from exc
        data = data.get("labels", data) if isinstance(data, dict) else data
        if not isinstance(data, list) or not all(isinstance(e, dict) for e in data):
            raise CommandError("--labels-json must hold a list of label objects (or {\"labels\": [...]})")
        entries = data
    by_value = {e["value"]: e for e in entries if isinstance(e.get("value"), int)}
    by_name = {str(e["name"]).lower(): e for e in entries if isinstance(e.get("name"), str)}
    labels, missing = [], []
    for value in range(1, num_classes):
        source_name = names.get(value)
        entry = by_value.get(value) or (by_name.get(source_name.lower()) if source_name else None)
        name = source_name or (entry or {}).get("name")
        if entry is None or not all(_is_code(entry.get(k)) for k in ("category", "type")):
            missing.append(f"{value} {name!r}" if name else f"{value} (unnamed)")
            continue
        color = entry.get("color", PALETTE[(value - 1) % len(PALETTE)])
        labels.append({"value": value, "name": str(name or entry.get("name") or f"label {value}"),
                       "category": entry["category"], "type": entry["type"], "color": color})
    if missing:
        example = ('[{"value": 1, "name": "Spleen", "category": {"value": "91772007", "scheme": "SCT", '
                   '"meaning": "Organ"}, "type": {"value": "78961009", "scheme": "SCT", "meaning": "Spleen"}}]')
        where = f"in {labels_json}" if labels_json else "(no --labels-json given)"
        raise CommandError(
            f"{len(missing)} of {num_classes - 1} labels lack SNOMED CT codes {where}: {', '.join(missing)}. "
            f"Give them in --labels-json, e.g. {example}"
        )
    return labels


def _is_code(c: Any) -> bool:
    return isinstance(c, dict) and all(isinstance(c.get(k), str) and c.get(k) for k in ("value", "scheme", "meaning"))


class _Staging:
    """Build into ``.<out>.partial`` beside ``out``; publish as ``out`` or set aside as ``<out>.rejected``."""

    def __init__(self, out: Path, overwrite: bool):
        self.out = Path(out)
        if self.out.exists() and any(self.out.iterdir()) and not overwrite:
            raise CommandError(f"{self.out} exists and is not empty (pass --overwrite to replace it)")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.dir = self.out.with_name(f".{self.out.name}.partial")
        shutil.rmtree(self.dir, ignore_errors=True)
        self.rejected = self.out.with_name(f"{self.out.name}.rejected")

    def publish(self) -> Path:
        if self.out.exists():
            shutil.rmtree(self.out)
        self.dir.rename(self.out)
        shutil.rmtree(self.rejected, ignore_errors=True)
        return self.out

    def reject(self) -> Path:
        shutil.rmtree(self.rejected, ignore_errors=True)
        self.dir.rename(self.rejected)
        return self.rejected

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    @contextmanager
    def building(self) -> Iterator[Path]:
        """The build folder, removed when building it raises (the exception goes on to the command, which
        names it: a :class:`CommandError` is a one-line message and exit 2)."""
        try:
            yield self.dir
        except BaseException:
            self.discard()
            raise

    def settle(self, report: Any, failed: str) -> Path | None:
        """After the gate: print its table, then publish (returns ``out``) on a pass, or set the build aside and
        print ``failed`` (``{where}``: the folder it went to) with each failure (returns None)."""
        print(report.table())
        if report.passed:
            return self.publish()
        where = self.reject()
        print(failed.format(where=where), file=sys.stderr)
        for line in report.failures():
            print(f"  - {line}", file=sys.stderr)
        return None


def _package(args: argparse.Namespace, loaded: Any) -> int:
    from export.onnx import export_onnx_with_info
    from export.package import write_package
    from export.parity import GateOptions, run_gate, write_report

    manifest, _ = build_manifest(args, loaded)
    stage = _Staging(args.out, args.overwrite)
    patch = manifest["inference"]["patch_size"]
    channels = manifest["model"]["input_channels"]
    with stage.building():
        with tempfile.TemporaryDirectory() as tmp:
            try:
                info = export_onnx_with_info(
                    loaded.module, Path(tmp) / "model.onnx", example_shape=(1, channels, *patch),
                    opset=args.opset, simplify=not args.no_simplify,
                )
            except Exception as exc:  # torch.export / the exporters raise many types; one message for the user
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise CommandError(f"ONNX export failed: {type(exc).__name__}: {first}") from exc
            manifest["export"] = {
                "opset": info.opset, "exporter": info.exporter, "simplified": info.simplified,
                "nodes": info.nodes_saved, **({"note": info.note} if info.note else {}),
            }
            extra = [info.path.with_name(info.path.name + ".data")] if info.external_data else []
            package = write_package(stage.dir, info.path, manifest, extra)
        options = GateOptions(
            atol=args.atol, rtol=args.rtol, min_agreement=args.min_agreement, min_dice=args.min_dice,
            volumes=args.parity_volumes,
            volume_shape=tuple(args.parity_shape) if args.parity_shape else None,
        )
        report = run_gate(loaded.module, package, options)
        write_report(report, stage.dir, title=f"PyTorch against ONNX Runtime: {package.identity}")
    out = stage.settle(
        report, "edge-export package: parity gate failed; package set aside in {where} (see parity.md there):"
    )
    if out is None:
        return 1
    print(f"wrote {out} ({package.identity}); parity: {out / 'parity.md'}")
    return 0


# ---------------------------------------------------------------------------------------------------
# engine
# ---------------------------------------------------------------------------------------------------


def run_engine(args: argparse.Namespace) -> int:
    from edge_runtime.extras import MissingDependencyError
    from edge_runtime.inference.package import PackageError
    from edge_runtime.inference.runner.tensorrt.engine import EngineError
    from export.engine import build_package_engine

    try:
        path, info = build_package_engine(
            args.package, args.precision, timing_cache=args.timing_cache, max_batch=args.max_batch,
            device=args.device, workspace_gb=args.workspace_gb,
        )
    except (MissingDependencyError, PackageError) as exc:
        print(f"edge-export engine: {exc}", file=sys.stderr)
        return 2
    except EngineError as exc:
        print(f"edge-export engine: {exc}", file=sys.stderr)
        return 1
    key = info.key
    print(
        f"wrote {path} ({key.precision}, TensorRT {key.tensorrt_version}, {key.gpu_name} "
        f"sm {key.compute_capability}, {info.build_seconds:.1f} s)"
    )
    return 0


# ---------------------------------------------------------------------------------------------------
# quantize
# ---------------------------------------------------------------------------------------------------


def run_quantize(args: argparse.Namespace) -> int:
    from edge_runtime.extras import MissingDependencyError, require
    from edge_runtime.inference.package import PackageError
    from export.quantize import QuantizeOptions, quantize_package

    try:
        require("onnx", feature="edge-export quantize", extra="export")
        stage = _Staging(args.out, args.overwrite)
    except (CommandError, MissingDependencyError) as exc:
        print(f"edge-export quantize: {exc}", file=sys.stderr)
        return 2
    options = QuantizeOptions(
        calibration_volumes=args.calibration_volumes,
        windows_per_volume=args.windows_per_volume,
        method=args.method,
        per_channel=not args.per_tensor,
        min_dice=args.min_dice,
        gate_volumes=args.gate_volumes,
        volume_shape=tuple(args.parity_shape) if args.parity_shape else None,
    )
    try:
        with stage.building():
            package, report = quantize_package(args.package, stage.dir, options)
    except PackageError as exc:
        print(f"edge-export quantize: {exc}", file=sys.stderr)
        return 2
    out = stage.settle(report, "edge-export quantize: INT8 gate failed; package set aside in {where}:")
    if out is None:
        return 1
    print(f"wrote {out} ({package.identity}); Dice against FP32 >= {report.needed_min_dice:.4f}")
    return 0


if __name__ == "__main__":  # the commands' former entry point: the same commands through edge-export's main
    from export.cli import main

    sys.exit(main())
