"""Benchmark the result writers on a CT-sized result: encode time and bytes of each format against the
third-party path that would otherwise write it, in the same run.

The case is ``bench_seg``'s: 500 in-memory CT headers (512 x 512, no pixel data) and a label map of 117
ellipsoids (:func:`benchmarks.bench_seg.make_labels`). Rows:

* BINARY SEG: ``encode_binary_seg`` against highdicom ``build_seg`` (as ``bench_seg``);
* LABELMAP SEG: ``build_labelmap_seg`` *is* highdicom (one row, with BINARY beside it for size);
* FRACTIONAL SEG: ``encode_fractional_seg`` against highdicom (``highdicom_fractional_seg``, which needs the
  probabilities as float32 (slices, rows, columns, segments)). Per-class probabilities of 117 classes on this
  grid are 15.5 GB of uint8 (and highdicom's float copy four times that), more than this machine has, so this
  row uses its own, smaller case: ``--fractional-shape`` (default 125 x 512 x 512) with ``--fractional-labels``
  classes (default 13, an abdominal organ model), probabilities from that label map smoothed in-plane;
* RTSTRUCT: ``build_rtstruct`` against rt-utils (``RTStruct.add_roi`` per label, OpenCV contours, then
  ``save``), on the same headers;
* overlays + KOS: ``build_overlays`` (ours only; nothing else writes them).

Each of ours is the median of ``--repeats`` runs; each anchor runs ``--anchor-repeats`` times (default 1: they are
slow). Times are encode + write to a file on tmpfs where there is one. Prints a Markdown table and writes it to
``benchmarks/results/writers.md`` with the raw figures in ``writers.json``. Usage::

    python -m benchmarks.writers [--shape 500 512 512] [--labels 117] [--repeats 3] [--skip rtutils]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import highdicom
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from scipy import ndimage

from benchmarks.bench_seg import SPACING, frames_of, make_labels, make_package, make_sources
from benchmarks.report import write_results
from edge_runtime.dicom import write_atomic
from edge_runtime.imaging.volume import Volume
from edge_runtime.results.overlay import build_overlays
from edge_runtime.results.rtstruct import build_rtstruct
from edge_runtime.results.seg import build_seg
from edge_runtime.results.seg_binary import encode_binary_seg
from edge_runtime.results.seg_fractional import encode_fractional_seg, highdicom_fractional_seg
from edge_runtime.results.seg_labelmap import build_labelmap_seg
from edge_runtime.results.series_result import SeriesResult

Writer = Callable[[Path], Any]


def make_volume(shape: tuple[int, int, int]) -> Volume:
    """Header-only sources (``bench_seg``'s) with a CT-like array for the overlays to window."""
    sources = make_sources(shape)
    return Volume(
        array=np.zeros(shape, np.int16),
        spacing=SPACING,
        positions=np.arange(shape[0]) * SPACING[0],
        origin=np.array([-200.0, -200.0, -300.0]),
        row_direction=np.array([1.0, 0, 0]),
        column_direction=np.array([0, 1.0, 0]),
        datasets=sources,
        regular=True,
    )


def make_probabilities(labels: np.ndarray, n_labels: int) -> np.ndarray:
    """uint8 (classes, slices, rows, columns): each label's mask smoothed in-plane (sigma 1 pixel), zero away
    from it as a softmax rounded to 8 bits is; class 0 the rest."""
    probabilities = np.zeros((n_labels + 1, *labels.shape), np.uint8)
    for value, box in enumerate(ndimage.find_objects(labels, max_label=n_labels), start=1):
        if box is None:
            continue
        grown = tuple(slice(max(s.start - 3, 0), min(s.stop + 3, n)) for s, n in zip(box, labels.shape, strict=True))
        grown = (box[0], *grown[1:])
        soft = ndimage.gaussian_filter((labels[grown] == value).astype(np.float32), sigma=(0, 1.0, 1.0))
        probabilities[value][grown] = np.round(soft * 255)
    probabilities[0] = 255 - probabilities[1:].max(axis=0)
    return probabilities


def save(ds: Dataset, path: Path) -> Path:
    if isinstance(ds, highdicom.seg.Segmentation):
        ds.save_as(path, enforce_file_format=True)
        return path
    return write_atomic(path, ds)


def timed(write: Writer, folder: Path, name: str, repeats: int) -> tuple[list[float], int, Path]:
    """Seconds of each run (encode + write), the bytes written by the last, and its path."""
    times: list[float] = []
    path = folder / name
    for i in range(repeats):
        for old in folder.glob(f"{name}*"):
            old.unlink()
        t0 = time.perf_counter()
        written = write(path.with_name(f"{name}-{i}.dcm"))
        times.append(time.perf_counter() - t0)
        paths = written if isinstance(written, list) else [written]
        path = paths[0]
    size = sum(p.stat().st_size for p in folder.glob(f"{name}*"))
    return times, size, path


def rtutils_writer(volume: Volume, labels: np.ndarray, values: list[int]) -> Writer:
    """rt-utils writing the same ROIs from the same headers (its masks are (rows, columns, slices))."""
    from rt_utils.ds_helper import create_rtstruct_dataset  # type: ignore[import-untyped]
    from rt_utils.rtstruct import RTStruct  # type: ignore[import-untyped]

    def write(path: Path) -> Path:
        structure_set = RTStruct(volume.datasets, create_rtstruct_dataset(volume.datasets))
        for value in values:
            mask = labels == value
            if mask.any():
                structure_set.add_roi(mask=np.moveaxis(mask, 0, -1), name=f"Structure {value}")
        structure_set.save(str(path))
        return path

    return write


def table_row(row: dict[str, Any], case: str) -> str:
    """One Markdown row: medians, sizes, the anchor's speed ratio and whether both wrote the same frames."""
    med = statistics.median(row["ours_s"])
    anchor_s = statistics.median(row["anchor_s"]) if "anchor_s" in row else None
    anchor_mb = f"{row['anchor_bytes'] / 1e6:.1f}" if "anchor_bytes" in row else ""
    frames = f" ({row['frames']} frames)" if "frames" in row else ""
    same = {True: "yes", False: "NO"}.get(row.get("same_frames"), "")  # type: ignore[arg-type]
    cells = [
        row["format"],
        case + frames,
        f"{med:.2f}",
        f"{row['ours_bytes'] / 1e6:.1f}",
        row["anchor"],
        "" if anchor_s is None else f"{anchor_s:.2f}",
        anchor_mb,
        "" if anchor_s is None else f"{anchor_s / med:.1f}x",
        same,
    ]
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[500, 512, 512], metavar=("Z", "Y", "X"))
    ap.add_argument("--labels", type=int, default=117)
    ap.add_argument("--fractional-shape", type=int, nargs=3, default=[125, 512, 512], metavar=("Z", "Y", "X"))
    ap.add_argument("--fractional-labels", type=int, default=13)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--anchor-repeats", type=int, default=1)
    ap.add_argument("--skip", nargs="*", default=[], choices=["highdicom-binary", "highdicom-fractional", "rtutils"])
    ap.add_argument("--no-write", action="store_true", help="print only; leave benchmarks/results alone")
    args = ap.parse_args(argv)
    shape = (int(args.shape[0]), int(args.shape[1]), int(args.shape[2]))
    fshape = (int(args.fractional_shape[0]), int(args.fractional_shape[1]), int(args.fractional_shape[2]))

    volume = make_volume(shape)
    labels = make_labels(shape, args.labels)
    package = make_package(args.labels)
    values = [label.value for label in package.labels]
    fvolume = make_volume(fshape)
    flabels = make_labels(fshape, args.fractional_labels)
    fpackage = make_package(args.fractional_labels)
    probabilities = make_probabilities(flabels, args.fractional_labels)
    result = SeriesResult(volume, labels, package, uid_seed="bench")
    fresult = SeriesResult(fvolume, flabels, fpackage, uid_seed="bench", probabilities=probabilities)

    def overlays(path: Path) -> list[Path]:
        made = build_overlays(result)
        paths = [write_atomic(path.with_name(f"{path.stem}-{i}.dcm"), ds) for i, ds in enumerate(made.images)]
        return [*paths, write_atomic(path.with_name(f"{path.stem}-kos.dcm"), made.selection)]

    # (format, case, ours, anchor name, anchor) ; anchor None: ours is the only writer
    rows: list[tuple[str, str, Writer, str, Writer | None]] = [
        (
            "BINARY SEG",
            "main",
            lambda p: save(encode_binary_seg(result), p),
            "highdicom `build_seg`",
            None if "highdicom-binary" in args.skip else lambda p: save(build_seg(result), p),
        ),
        (
            "LABELMAP SEG",
            "main",
            lambda p: save(build_labelmap_seg(result), p),
            "(ours is highdicom's)",
            None,
        ),
        (
            "FRACTIONAL SEG",
            "fractional",
            lambda p: save(encode_fractional_seg(fresult), p),
            "highdicom (float32 input)",
            None if "highdicom-fractional" in args.skip else lambda p: save(highdicom_fractional_seg(fresult), p),
        ),
        (
            "RTSTRUCT",
            "main",
            lambda p: save(build_rtstruct(result), p),
            "rt-utils 1.2.7 `add_roi` + `save`",
            None if "rtutils" in args.skip else rtutils_writer(volume, labels, values),
        ),
        ("overlays + KOS", "main", overlays, "(none)", None),
    ]

    shm = Path("/dev/shm")
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else None) as tmp:
        folder = Path(tmp)
        target = "tmpfs" if str(folder).startswith(str(shm)) else "a temporary folder"
        for fmt, case, ours, anchor_name, anchor in rows:
            ours(folder / "warm-up.dcm")  # imports, first-touch allocations
            for old in folder.glob("warm-up*"):
                old.unlink()
            ours_s, ours_bytes, ours_path = timed(ours, folder, "ours", args.repeats)
            row: dict[str, Any] = {
                "format": fmt,
                "case": case,
                "ours_s": ours_s,
                "ours_bytes": ours_bytes,
                "anchor": anchor_name,
            }
            if fmt.endswith("SEG"):
                row["frames"] = int(pydicom.dcmread(ours_path, stop_before_pixels=True).NumberOfFrames)
            if anchor is not None:
                anchor_s, anchor_bytes, anchor_path = timed(anchor, folder, "anchor", args.anchor_repeats)
                row.update(anchor_s=anchor_s, anchor_bytes=anchor_bytes)
                if fmt != "RTSTRUCT":
                    row["same_frames"] = frames_of(ours_path)[:2] == frames_of(anchor_path)[:2] and (
                        pydicom.dcmread(ours_path).PixelData == pydicom.dcmread(anchor_path).PixelData
                        if fmt == "FRACTIONAL SEG"
                        else frames_of(ours_path)[2] == frames_of(anchor_path)[2]
                    )
                for old in folder.glob("anchor*"):
                    old.unlink()
            for old in folder.glob("ours*"):
                old.unlink()
            results.append(row)
            print(fmt, {k: v for k, v in row.items() if k not in ("format",)}, flush=True)

    cases = {
        "main": f"{shape[0]} x {shape[1]} x {shape[2]}, {args.labels} labels",
        "fractional": f"{fshape[0]} x {fshape[1]} x {fshape[2]}, {args.fractional_labels} classes",
    }
    lines = [
        f"Result writers, encode + write to a file on {target}; {os.cpu_count()} CPU(s), Python "
        f"{platform.python_version()}, numpy {np.__version__}, pydicom {pydicom.__version__}, highdicom "
        f"{highdicom.__version__}. Ours: median of {args.repeats}; anchors: median of {args.anchor_repeats}.",
        "",
        "| format | case | ours (s) | ours (MB) | anchor | anchor (s) | anchor (MB) | speed-up | same frames |",
        "|---|---|---:|---:|---|---:|---:|---:|---|",
    ]
    lines += [table_row(row, cases[row["case"]]) for row in results]
    lines += ["", f"Command: `python -m benchmarks.writers {' '.join(sys.argv[1:] if argv is None else argv)}`"]
    table = "\n".join(lines) + "\n"
    print(table)
    if not args.no_write:
        write_results(
            "writers",
            table,
            {
                "rows": results,
                "cases": cases,
                "written_to": target,
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "numpy": np.__version__,
                "pydicom": pydicom.__version__,
                "highdicom": highdicom.__version__,
                "platform": platform.platform(),
            },
        )
    return 0 if all(row.get("same_frames", True) for row in results) else 1


if __name__ == "__main__":
    sys.exit(main())
