"""Benchmark the BINARY SEG encoders on a CT-sized result: highdicom (``edge_runtime.results.seg.build_seg``) as the
anchor against ``edge_runtime.results.seg_binary.encode_binary_seg``, in the same run.

Builds 500 in-memory CT headers (512 x 512, no pixel data: neither encoder reads source pixels) and a label
map with 117 labels (ellipsoids of log-uniform sizes and lengths spread over the volume, see
:func:`make_labels`), then times

* highdicom: ``build_seg(SeriesResult(...))`` + ``save_as(...)`` (slow: run ``--anchor-repeats`` times, default 1);
* ours: ``encode_binary_seg(SeriesResult(...))`` + ``pydicom.dcmwrite(...)`` (median of ``--repeats`` runs);

both writing to a file in a temporary folder, and checks that the two files hold the same frames (same
Dimension Index Values, referenced instances and pixel bits). Prints a Markdown table and writes it to
``benchmarks/results/seg.md``, with the raw figures in ``benchmarks/results/seg.json``. Usage::

    python -m benchmarks.bench_seg [--shape 500 512 512] [--labels 117] [--repeats 5] [--anchor-repeats 1]
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

import highdicom
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, generate_uid

from benchmarks.harness import paint_ellipsoid
from benchmarks.report import write_results
from edge_runtime.imaging.volume import Volume
from edge_runtime.inference.package import DEFAULT_PACKAGE, Code, Label, ModelPackage
from edge_runtime.results.seg import build_seg
from edge_runtime.results.seg_binary import encode_binary_seg
from edge_runtime.results.series_result import SeriesResult

hd_version = highdicom.__version__
SPACING = (1.25, 0.78, 0.78)  # (z, y, x) mm, a typical abdominal CT


def make_sources(shape: tuple[int, int, int], spacing: tuple[float, float, float] = SPACING) -> list[Dataset]:
    """Minimal single-frame CT headers of one series, in spatial order (no pixel data)."""
    nz, ny, nx = shape
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    base = Dataset()
    base.SOPClassUID = CTImageStorage
    base.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    base.Modality = "CT"
    base.Manufacturer = "bench"
    base.ManufacturerModelName = "synthetic"
    base.StudyDate, base.StudyTime = "20240101", "120000"
    base.AccessionNumber, base.ReferringPhysicianName = "", ""
    base.PatientName, base.PatientID, base.PatientBirthDate, base.PatientSex = "BENCH^SEG", "BENCH1", "", "O"
    base.StudyInstanceUID, base.SeriesInstanceUID, base.StudyID, base.SeriesNumber = study, series, "1", 2
    base.FrameOfReferenceUID, base.PositionReferenceIndicator = frame_of_reference, ""
    base.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    base.PixelSpacing = [spacing[1], spacing[2]]
    base.SliceThickness = spacing[0]
    base.Rows, base.Columns = ny, nx
    base.SamplesPerPixel, base.PhotometricInterpretation = 1, "MONOCHROME2"
    base.BitsAllocated, base.BitsStored, base.HighBit, base.PixelRepresentation = 16, 16, 15, 1
    out = []
    for k in range(nz):
        ds = Dataset()
        ds.update(base)
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [-200.0, -200.0, round(-300.0 + k * spacing[0], 4)]
        out.append(ds)
    return out


def make_labels(shape: tuple[int, int, int], n_labels: int, seed: int = 0) -> np.ndarray:
    """Label map of ellipsoids spread over the volume, extents roughly those of a whole-body model's classes
    on a chest-abdomen-pelvis CT: in-plane radii log-uniform 5-70 voxels (vessel to liver), lengths
    log-uniform 12-320 slices (vertebra to aorta or psoas); about 95 slices a label on average."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint8)
    radii_all = np.exp(rng.uniform(np.log(5), np.log(70), (n_labels, 3)))
    radii_all[:, 0] = np.exp(rng.uniform(np.log(6), np.log(160), n_labels))
    radii_all = np.minimum(radii_all, (np.array(shape) - 1) / 2)  # small test shapes
    order = np.argsort(-radii_all.prod(axis=1))  # large first, so small structures stay visible
    for index in order:
        paint_ellipsoid(labels, int(index) + 1, radii_all[index], rng)
    return labels


def make_package(n_labels: int) -> ModelPackage:
    """The default package with ``n_labels`` labels (values 1..n, SNOMED codes, varied colours)."""
    base = ModelPackage.load(DEFAULT_PACKAGE)
    rng = np.random.default_rng(1)
    labels = tuple(
        Label(v, f"Structure {v}", Code("91772007", "SCT", "Organ"), Code("39607008", "SCT", "Lung"),
              tuple(int(c) for c in rng.integers(0, 256, 3)))  # type: ignore[arg-type]
        for v in range(1, n_labels + 1)
    )
    fields = {f: getattr(base, f) for f in base.__dataclass_fields__}
    fields["labels"] = labels
    return ModelPackage(**fields)


def timed_writes(run: Callable[[Path], tuple[float, float]], repeats: int,
                 stem: Path) -> tuple[list[tuple[float, float]], Path]:
    """(encode s, write s) of each run, each writing a new file (the previous one removed untimed)."""
    times = []
    path = stem
    for i in range(repeats):
        if i:
            path.unlink()
        path = stem.with_name(f"{stem.name}-{i}.dcm")
        times.append(run(path))
    return times, path


def frames_of(path: Path) -> tuple[list[tuple[int, ...]], list[str], bytes]:
    """(Dimension Index Values, referenced SOP Instance UID) of every frame, and the pixel bits (the
    padding after the last frame cleared)."""
    ds = pydicom.dcmread(path)
    index = [tuple(int(v) for v in f.FrameContentSequence[0].DimensionIndexValues)
             for f in ds.PerFrameFunctionalGroupsSequence]
    refs = [str(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
            for f in ds.PerFrameFunctionalGroupsSequence]
    n_bits = int(ds.NumberOfFrames) * int(ds.Rows) * int(ds.Columns)
    bits = ds.PixelData[: n_bits // 8]
    if n_bits % 8:
        bits += bytes([ds.PixelData[n_bits // 8] & ((1 << n_bits % 8) - 1)])
    return index, refs, bits


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[500, 512, 512], metavar=("Z", "Y", "X"))
    ap.add_argument("--labels", type=int, default=117)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--anchor-repeats", type=int, default=1)
    ap.add_argument("--no-write", action="store_true", help="print only; leave benchmarks/results alone")
    args = ap.parse_args(argv)
    shape = tuple(args.shape)

    t0 = time.perf_counter()
    sources = make_sources(shape)  # type: ignore[arg-type]
    labels = make_labels(shape, args.labels)  # type: ignore[arg-type]
    package = make_package(args.labels)
    volume = Volume(
        array=np.zeros(shape, np.int16), spacing=SPACING, positions=np.arange(shape[0]) * SPACING[0],
        origin=np.array([-200.0, -200.0, -300.0]), row_direction=np.array([1.0, 0, 0]),
        column_direction=np.array([0, 1.0, 0]), datasets=sources, regular=True,
    )
    result = SeriesResult(volume, labels, package, uid_seed="bench")
    setup_s = time.perf_counter() - t0

    shm = Path("/dev/shm")
    # tmpfs when there is one: the figures are the encoders', not the disk's write-back
    with tempfile.TemporaryDirectory(dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else None) as tmp:
        folder = Path(tmp)

        def ours(path: Path) -> tuple[float, float]:
            t0 = time.perf_counter()
            ds = encode_binary_seg(result)
            t1 = time.perf_counter()
            pydicom.dcmwrite(path, ds, enforce_file_format=True)
            return t1 - t0, time.perf_counter() - t1

        def anchor(path: Path) -> tuple[float, float]:
            t0 = time.perf_counter()
            seg = build_seg(result)
            t1 = time.perf_counter()
            seg.save_as(path, enforce_file_format=True)
            return t1 - t0, time.perf_counter() - t1

        ours(folder / "warm-up.dcm")  # imports, first-touch allocations
        (folder / "warm-up.dcm").unlink()
        ours_runs, ours_path = timed_writes(ours, args.repeats, folder / "ours")
        anchor_runs, hd_path = timed_writes(anchor, args.anchor_repeats, folder / "highdicom")

        a_index, a_refs, a_bits = frames_of(hd_path)
        b_index, b_refs, b_bits = frames_of(ours_path)
        same = a_index == b_index and a_refs == b_refs and a_bits == b_bits
        n_frames = len(b_index)
        sizes = {"highdicom": hd_path.stat().st_size, "ours": ours_path.stat().st_size}
        target = "tmpfs" if str(folder).startswith(str(shm)) else "a temporary folder"

    ours_times = [a + b for a, b in ours_runs]
    anchor_times = [a + b for a, b in anchor_runs]
    ours_s = statistics.median(ours_times)
    anchor_s = statistics.median(anchor_times)
    rows = [
        ("highdicom 0.28 `build_seg` + `save_as`", anchor_s, anchor_runs, sizes["highdicom"]),
        ("`encode_binary_seg` + `dcmwrite`", ours_s, ours_runs, sizes["ours"]),
    ]
    header = (
        f"BINARY SEG of a {shape[0]} x {shape[1]} x {shape[2]} label map with {args.labels} labels "
        f"({n_frames} non-empty frames), written to a file on {target}; {os.cpu_count()} CPU(s), "
        f"Python {platform.python_version()}, numpy {np.__version__}, pydicom {pydicom.__version__}, "
        f"highdicom {hd_version}.\n"
    )
    lines = [
        header,
        "| encoder | median s (build + write) | runs: build + write (s) | file MB | speed-up |",
        "|---|---:|---|---:|---:|",
    ]
    for name, med, runs, size in rows:
        detail = ", ".join(f"{a:.2f} + {b:.2f}" for a, b in runs)
        lines.append(f"| {name} | {med:.3f} | {detail} | {size / 1e6:.1f} | {anchor_s / med:.1f}x |")
    lines.append("")
    lines.append(f"Same frames, references and pixel bits in both files: {'yes' if same else 'NO'}.")
    table = "\n".join(lines) + "\n"
    print(table)
    if not args.no_write:
        write_results("seg", table, {
            "shape": list(shape), "labels": args.labels, "frames": n_frames, "setup_s": setup_s,
            "highdicom_s": anchor_times, "ours_s": ours_times, "highdicom_build_write_s": anchor_runs,
            "ours_build_write_s": ours_runs, "highdicom_median_s": anchor_s, "highdicom": hd_version,
            "written_to": target,
            "ours_median_s": ours_s, "speedup": anchor_s / ours_s, "file_bytes": sizes, "same_frames": same,
            "cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
            "pydicom": pydicom.__version__, "platform": platform.platform(),
        })
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
