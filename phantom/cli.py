"""``python -m phantom``: write a phantom CT series, and optionally its reference SEG and arrays."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from phantom.generate import make_phantom
from phantom.reference_seg import write_reference_seg
from phantom.series import write_series


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m phantom OUT_DIR [options]``: write a phantom CT series (and its SEG)."""
    ap = argparse.ArgumentParser(
        prog="python -m phantom",
        description="Write a synthetic CT torso series, one file per slice, and its reference SEG.",
    )
    ap.add_argument("out_dir", type=Path, help="folder for the series files")
    ap.add_argument("--slices", type=int, default=100)
    ap.add_argument(
        "--size", type=int, nargs="+", default=[512], metavar="N", help="rows and columns (one value: square)"
    )
    ap.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        default=[1.0, 0.8, 0.8],
        metavar=("Z", "Y", "X"),
        help="voxel spacing in mm, (z, y, x)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-variety", action="store_true", help="canonical anatomy")
    ap.add_argument(
        "--with-seg",
        action="store_true",
        help="also write the reference DICOM SEG (default: OUT_DIR's sibling OUT_DIR_seg.dcm)",
    )
    ap.add_argument("--seg-path", type=Path, default=None, help="where to write the reference SEG")
    ap.add_argument("--npz", type=Path, default=None, help="also save hu, labels and spacing to this .npz")
    ap.add_argument("--shuffle", action="store_true", help="shuffle file names relative to spatial order")
    ap.add_argument("--instance-order", choices=("spatial", "reversed", "random"), default="spatial")
    ap.add_argument("--tilt", type=float, default=0.0, help="gantry tilt in degrees")
    ap.add_argument("--patient-id", default="PH0001")
    ap.add_argument("--patient-name", default="PHANTOM^CT")
    args = ap.parse_args(argv)

    if len(args.size) not in (1, 2):
        ap.error("--size takes one or two values")
    rows, cols = (args.size[0], args.size[0]) if len(args.size) == 1 else (args.size[0], args.size[1])
    out_dir: Path = args.out_dir
    seg_path: Path | None = args.seg_path
    if args.with_seg and seg_path is None:
        seg_path = out_dir.resolve().parent / f"{out_dir.resolve().name}_seg.dcm"
    if seg_path is not None and seg_path.resolve().parent == out_dir.resolve():
        ap.error("the SEG must not be written into the series folder")

    ph = make_phantom(
        (args.slices, rows, cols),
        (args.spacing[0], args.spacing[1], args.spacing[2]),
        rng=args.seed,
        variety=not args.no_variety,
    )
    rng = np.random.default_rng(args.seed)
    info = write_series(
        ph.hu,
        ph.spacing,
        out_dir,
        shuffle_files=args.shuffle,
        instance_number_order=args.instance_order,
        gantry_tilt_deg=args.tilt,
        patient_id=args.patient_id,
        patient_name=args.patient_name,
        rng=rng,
    )
    print(f"wrote {len(info.paths)} slices to {out_dir} (series {info.series_uid})")
    if seg_path is not None:
        write_reference_seg(info, ph.labels, seg_path)
        print(f"wrote reference SEG {seg_path}")
    if args.npz is not None:
        np.savez_compressed(args.npz, hu=ph.hu, labels=ph.labels, spacing=np.asarray(ph.spacing))
        print(f"wrote {args.npz}")
    return 0
