"""The ``validate`` subcommand: its arguments, its exit status, and ``python -m edge_runtime.apps.validate``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge_runtime.apps.validate.configs import configs_from_lists
from edge_runtime.apps.validate.run import run_validation
from edge_runtime.errors import MissingDependencyError, PackageError, RunnerError, ValidationError


def add_parser(subparsers: Any) -> None:
    """Add the ``validate`` subcommand to ``edge-runtime``'s subparsers."""
    p = subparsers.add_parser(
        "validate",
        help="offline validation against reference SEGs or label volumes",
        description="Segment every series under FOLDER that has a reference (DICOM SEG, or reference.npz in "
        "the series folder) with one or two model configurations and write report.json, report.md and box "
        "plots to --out. --model, --backend, --device, --threads and --triton-url may each be given once "
        "(shared) or twice (configurations A and B).",
    )
    p.add_argument("folder", type=Path, help="folder of DICOM series and references (searched recursively)")
    p.add_argument("--out", type=Path, required=True, help="folder for report.json, report.md and the plots")
    p.add_argument("--model", type=Path, action="append", help="model package directory (default: bundled)")
    p.add_argument("--backend", action="append", help="inference backend (default onnxruntime)")
    p.add_argument("--device", action="append", help="cpu, cuda or tensorrt (default cpu)")
    p.add_argument("--threads", type=int, action="append", help="inference threads (default: one per core)")
    p.add_argument("--triton-url", action="append", help="Triton gRPC endpoint for --backend triton")
    p.add_argument("--irregular-spacing", choices=("resample", "refuse"), default="resample", help="geometry policy")
    p.add_argument("--bootstrap", type=int, default=2000, metavar="N", help="bootstrap resamples (default 2000)")
    p.add_argument("--confidence", type=float, default=0.95, help="confidence level (default 0.95)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--workers", type=int, default=0, help="threads for the metrics (default: up to 4 cores)")
    p.add_argument("--no-surface", action="store_true", help="skip Hausdorff, HD95 and ASSD (faster)")
    p.add_argument("--no-plots", action="store_true", help="write no PNG box plots")
    p.set_defaults(func=cmd_validate)


def cmd_validate(args: argparse.Namespace) -> int:
    """Run ``edge-runtime validate``; 0 ok, 1 some case failed, 2 bad arguments or nothing to validate."""
    from edge_runtime.imaging.geometry import GeometryPolicy

    problem = _argument_problem(args)
    if problem:
        return _fail(problem)
    try:
        configs = configs_from_lists(args.model, args.backend, args.device, args.threads, args.triton_url)
    except ValidationError as exc:
        return _fail(str(exc))
    workers = args.workers or max(1, min(4, os.cpu_count() or 1))
    try:
        report = run_validation(
            args.folder,
            configs,
            args.out,
            policy=GeometryPolicy(irregular_spacing=args.irregular_spacing),
            resamples=args.bootstrap,
            confidence=args.confidence,
            seed=args.seed,
            surface=not args.no_surface,
            workers=workers,
            plots=not args.no_plots,
        )
    except ValidationError as exc:
        return _fail(str(exc))
    except (PackageError, RunnerError, MissingDependencyError) as exc:
        return _fail(f"cannot load the model: {exc}")
    _print_summary(report, Path(args.out))
    counts = report["counts"]
    if counts["evaluated"] == 0:
        if counts["failed"]:
            return 1
        return _fail("no case could be evaluated (see the skipped cases above and in the report)")
    return 1 if counts["failed"] else 0


def _fail(message: str) -> int:
    print(f"edge-runtime validate: {message}", file=sys.stderr)
    return 2


def _argument_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the numeric arguments or the folder, if anything."""
    if args.bootstrap < 1:
        return f"--bootstrap must be >= 1, got {args.bootstrap}"
    if not 0 < args.confidence < 1:
        return f"--confidence must be in (0, 1), got {args.confidence}"
    if args.workers < 0:
        return f"--workers must be >= 0, got {args.workers}"
    if not Path(args.folder).is_dir():
        return f"{args.folder} is not a folder"
    return None


def _print_summary(report: dict[str, Any], out: Path) -> None:
    """The counts, where the reports are, and every skipped and failed case, on stderr."""
    counts = report["counts"]
    print(
        f"{counts['evaluated']} case(s) evaluated, {counts['skipped']} skipped, {counts['failed']} failed; "
        f"reports in {out / 'report.md'} and {out / 'report.json'}",
        file=sys.stderr,
    )
    if report.get("plots_note") and counts["evaluated"]:
        print(f"edge-runtime validate: {report['plots_note']}", file=sys.stderr)
    for s in report["skipped"]:
        print(f"  skipped {s['case']}: {s['reason']}", file=sys.stderr)
    for s in report["failed"]:
        print(f"  failed {s['case']}: {s['error']}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m edge_runtime.apps.validate ...``: the subcommand on its own."""
    parser = argparse.ArgumentParser(prog="edge-runtime")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["validate", *(sys.argv[1:] if argv is None else argv)])
    return cmd_validate(args)
