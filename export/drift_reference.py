"""``edge-export drift-reference``: record what a package's inputs and outputs look like, for drift monitoring.

The reference is the ``"drift_reference"`` section of the manifest (format and statistics:
:mod:`edge_runtime.quality.drift`). It is measured the way the service will measure: each reference series is
read by the runtime's own volume loader and segmented by the package through ONNX Runtime, and
:func:`edge_runtime.quality.drift.series_features` takes its features. The series are either real ones
(``--reference-series DIR``: every CT/MR image series under DIR, grouped by Series Instance UID, headers
read first) or phantoms at scanner geometry (``--phantoms N``), which is what the bundled demonstration
package records, since phantoms are all it was trained and checked on.

The manifest is rewritten with the one section replaced; file hashes are untouched (the manifest itself is not
hashed).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.imaging.volume import Volume, load_volume
from edge_runtime.inference.package import MANIFEST_NAME, ModelPackage
from edge_runtime.inference.pipeline import segment
from edge_runtime.inference.runner import Runner, load_runner
from edge_runtime.quality.drift import Features, build_reference, series_features

#: seeds of drift-reference phantoms (apart from training, validation and held-out seeds)
REFERENCE_SEED_BASE = 5_000_000


@dataclass(frozen=True)
class PhantomGeometry:
    """The range a phantom population is drawn from: in-plane size and pixel spacing, slice spacing, z extent."""

    rows: int
    pixel_mm: tuple[float, float]
    slice_mm: tuple[float, float]
    extent_mm: tuple[float, float]

    def draw(self, rng: np.random.Generator) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
        pixel = float(rng.uniform(*self.pixel_mm))
        step = float(rng.choice(np.arange(self.slice_mm[0], self.slice_mm[1] + 1e-6, 0.25)))
        slices = int(round(float(rng.uniform(*self.extent_mm)) / step))
        return (slices, self.rows, self.rows), (step, round(pixel, 3), round(pixel, 3))


#: scanner geometry, as the bundled model was trained and checked on (512 x 512 at 0.7-0.9 mm, 1-3 mm slices)
SCANNER_GEOMETRY = PhantomGeometry(rows=512, pixel_mm=(0.7, 0.9), slice_mm=(1.0, 3.0), extent_mm=(250.0, 400.0))
#: a small field of view, for quick runs (benchmarks): about a third of the inference of SCANNER_GEOMETRY
COMPACT_GEOMETRY = PhantomGeometry(rows=160, pixel_mm=(1.4, 1.6), slice_mm=(2.0, 3.0), extent_mm=(210.0, 230.0))
#: the scanner mix a phantom population is written with (fictitious names: phantoms come from no scanner)
PHANTOM_SCANNERS = (("Phantom", "Model A"), ("Phantom", "Model B"))

Transform = Callable[[np.ndarray, tuple[float, float, float]], np.ndarray]


def phantom_volumes(
    count: int,
    *,
    seed: int = REFERENCE_SEED_BASE,
    geometry: PhantomGeometry = SCANNER_GEOMETRY,
    transform: Transform | None = None,
    scanners: tuple[tuple[str, str], ...] = PHANTOM_SCANNERS,
) -> Iterator[Volume]:
    """``count`` phantom CTs written as DICOM and read back by the runtime's loader; ``transform(hu, spacing)``
    alters the HU before writing (a shifted population)."""
    from phantom import make_phantom, write_series

    for i in range(count):
        rng = np.random.default_rng(seed + i)
        shape, spacing = geometry.draw(rng)
        hu = make_phantom(shape, spacing, rng=seed + i).hu
        if transform is not None:
            hu = transform(hu, spacing)
        maker, model = scanners[(seed + i) % len(scanners)]
        with tempfile.TemporaryDirectory() as tmp:
            write_series(hu, spacing, tmp, extra={"Manufacturer": maker, "ManufacturerModelName": model})
            yield load_volume(sorted(Path(tmp).glob("*.dcm")))


def folder_volumes(folder: Path, modalities: tuple[str, ...]) -> Iterator[tuple[str, Volume]]:
    """Every image series under ``folder`` of one of ``modalities`` (name, volume); unreadable ones are skipped
    with a line on stderr."""
    import pydicom

    series: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (pydicom.errors.InvalidDicomError, OSError, ValueError):
            continue
        if str(ds.get("Modality", "")).upper() in modalities and "SeriesInstanceUID" in ds:
            series[str(ds.SeriesInstanceUID)].append(path)
    for paths in series.values():
        name = str(paths[0].parent.relative_to(folder)) or "."
        try:
            yield name, load_volume(paths)
        except Exception as exc:  # one unusable series (geometry, decoding) must not end the recording
            print(f"edge-export drift-reference: skipping {name}: {type(exc).__name__}: {exc}", file=sys.stderr)


def features_of(volumes: Iterator[Volume], package: ModelPackage, runner: Runner) -> list[Features]:
    """The drift features of each volume, segmented by ``package`` as the service does."""
    samples = []
    for volume in volumes:
        result = segment(volume, package, runner)
        samples.append(series_features(volume, result.labels, package, result.confidence))
    return samples


def write_reference(package_dir: Path, section: dict[str, Any]) -> None:
    """Replace the ``"drift_reference"`` section of the package's manifest, and check that it loads."""
    path = package_dir / MANIFEST_NAME
    manifest = json.loads(path.read_text(encoding="utf-8"))
    manifest["drift_reference"] = section
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    ModelPackage.load(package_dir)


def add_drift_reference_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "drift-reference",
        help="record a package's drift reference from phantoms or reference series",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("package", type=Path, help="model package folder (its manifest is updated)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--reference-series", type=Path, metavar="DIR", help="folder of reference image series")
    src.add_argument("--phantoms", type=int, metavar="N", help="N phantom CTs at scanner geometry")
    p.add_argument("--seed", type=int, default=REFERENCE_SEED_BASE, help="first phantom seed")
    p.add_argument("--compact", action="store_true", help="phantoms with a small field of view (quick runs)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (default: one per core)")
    p.set_defaults(func=run_drift_reference)


def run_drift_reference(args: argparse.Namespace) -> int:
    package = ModelPackage.load(args.package)
    runner = load_runner(package, "onnxruntime", "cpu", threads=args.threads)
    try:
        if args.reference_series is not None:
            named = list(folder_volumes(args.reference_series, package.modalities))
            samples = features_of(iter(v for _, v in named), package, runner)
            source = f"{len(samples)} reference series ({', '.join(n for n, _ in named[:5])}...)"
        else:
            geometry = COMPACT_GEOMETRY if args.compact else SCANNER_GEOMETRY
            samples = features_of(phantom_volumes(args.phantoms, seed=args.seed, geometry=geometry), package, runner)
            source = (
                f"{len(samples)} phantom CTs (seeds {args.seed}-{args.seed + args.phantoms - 1}, "
                f"{geometry.rows}x{geometry.rows} at {geometry.pixel_mm[0]}-{geometry.pixel_mm[1]} mm, "
                f"{geometry.slice_mm[0]}-{geometry.slice_mm[1]} mm slices, {geometry.extent_mm[0]:.0f}-"
                f"{geometry.extent_mm[1]:.0f} mm along z): edge-export drift-reference --phantoms {args.phantoms}"
            )
    finally:
        runner.close()
    if len(samples) < 10:
        print(f"edge-export drift-reference: {len(samples)} series; at least 10 are needed", file=sys.stderr)
        return 1
    write_reference(args.package, build_reference(samples, source))
    print(f"wrote the drift reference of {package.identity} from {source}")
    return 0
