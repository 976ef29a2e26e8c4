"""Drift: are the series the service sees still like those the model package was checked on?

The package carries a reference (manifest section ``"drift_reference"``, written by ``edge-export
drift-reference``): per feature of a series, a binned summary of the reference population. Features (see
:func:`series_features`): intensity percentiles inside the body (5th, 50th, 95th), slice and pixel spacing, the
scanner (manufacturer and model), and, of the output, each segment's volume and the mean confidence of the
chosen label over the foreground (when the pipeline computes it).

The service keeps the features of the last ``drift_window`` series (:class:`DriftMonitor`, persisted as a JSON
file in the spool folder, so a restart keeps the window) and compares the window with the reference.

Which statistic and why. The **population stability index** (PSI = sum over bins of (a - e) ln(a / e), a and e
the window's and the reference's share of a bin) is the primary measure: it works on binned summaries that fit
in a manifest, costs nothing to compute, reads the same for every feature, and has conventional thresholds
(below 0.1 stable, 0.1-0.25 watch, above 0.25 shifted). Bins are the reference's quintiles plus one bin below
its minimum and one above its maximum, so a value never seen at export (a spacing the model was not checked
on) lands in a bin of its own. Both sides are smoothed with half a count per bin.

PSI alone misleads on the small samples a device sees: with B bins, N series in the window and M in the
reference, its expected value without any drift is about (B - 1)(1/N + 1/M): 0.22 for 7 bins, N = 50 and
M = 60, and 0.6 for N = M = 20, past the conventional thresholds by chance alone. So a level is reached only when
a test says the difference is also unlikely to be chance: the **two-sample Kolmogorov-Smirnov test** for numeric
features (against the reference sample kept in the manifest, up to :data:`MAX_SAMPLE` order statistics) and a
chi-square goodness-of-fit test for the scanner mix. ``watch`` needs PSI >= 0.1 and p < 0.05, ``alarm`` needs
PSI >= 0.25 and p < 0.01, each p divided by the number of features tested (Bonferroni: a dozen tests after
every series would otherwise raise a level by chance every few series), and neither is given before the window
holds ``min_series`` series.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from edge_runtime.imaging.volume import Volume
    from edge_runtime.inference.package import ModelPackage

log = logging.getLogger(__name__)

REFERENCE_VERSION = 1
#: PSI levels: the conventional thresholds
PSI_WATCH, PSI_ALARM = 0.1, 0.25
#: significance the test must reach for each level
P_WATCH, P_ALARM = 0.05, 0.01
LEVELS = ("ok", "watch", "alarm")
#: reference values kept per numeric feature for the KS test (order statistics when there are more)
MAX_SAMPLE = 200
#: inner bin edges: the reference's quintiles
QUANTILES = (0.2, 0.4, 0.6, 0.8)
#: CT voxels above this (HU) are inside the body; other modalities: above a tenth of the 99.5th percentile
CT_BODY_HU = -500.0

Features = dict[str, "float | str"]


# -- the reference, as the manifest carries it ---------------------------------------------------------------


@dataclass(frozen=True)
class NumericReference:
    """Bins of one numeric feature: below ``low``, ``[low, edges...]``, above ``high``; ``expected`` share per bin."""

    low: float
    high: float
    edges: tuple[float, ...]
    expected: tuple[float, ...]
    sample: tuple[float, ...]
    n: int

    def bin_of(self, values: np.ndarray) -> np.ndarray:
        inner = 1 + np.searchsorted(np.asarray(self.edges), values, side="right")
        return np.where(values < self.low, 0, np.where(values > self.high, len(self.edges) + 2, inner))

    @property
    def bins(self) -> int:
        return len(self.edges) + 3


@dataclass(frozen=True)
class CategoricalReference:
    """Share of each category in the reference; anything else counts as ``other``."""

    expected: Mapping[str, float]
    n: int


@dataclass(frozen=True)
class DriftReference:
    """The manifest's ``"drift_reference"`` section, parsed."""

    numeric: Mapping[str, NumericReference]
    categorical: Mapping[str, CategoricalReference]
    series: int
    source: str
    fingerprint: str

    @property
    def features(self) -> list[str]:
        return [*self.numeric, *self.categorical]


def parse_drift_reference(node: Any, problems: list[str]) -> DriftReference | None:
    """The ``"drift_reference"`` section of a manifest (None when absent); problems are appended to ``problems``."""
    if node is None:
        return None
    where = "'drift_reference'"
    if not isinstance(node, dict) or node.get("version") != REFERENCE_VERSION:
        problems.append(f"{where} must be an object with \"version\": {REFERENCE_VERSION}")
        return None
    numeric: dict[str, NumericReference] = {}
    categorical: dict[str, CategoricalReference] = {}
    try:
        for name, item in dict(node.get("numeric", {})).items():
            numeric[name] = NumericReference(
                low=float(item["low"]),
                high=float(item["high"]),
                edges=tuple(float(v) for v in item["edges"]),
                expected=tuple(float(v) for v in item["expected"]),
                sample=tuple(float(v) for v in item["sample"]),
                n=int(item["n"]),
            )
            if len(numeric[name].expected) != numeric[name].bins or not numeric[name].sample:
                problems.append(f"{where}.numeric.{name}: 'expected' needs {numeric[name].bins} shares and a sample")
        for name, item in dict(node.get("categorical", {})).items():
            shares = {str(k): float(v) for k, v in item["expected"].items()}
            categorical[name] = CategoricalReference(shares, int(item["n"]))
    except (KeyError, TypeError, ValueError) as exc:
        problems.append(f"{where} is malformed: {type(exc).__name__}: {exc}")
        return None
    digest = hashlib.sha256(json.dumps(node, sort_keys=True).encode()).hexdigest()[:16]
    return DriftReference(numeric, categorical, int(node.get("series", 0)), str(node.get("source", "")), digest)


def _smoothed(counts: np.ndarray) -> np.ndarray:
    """Shares with half a count added to every bin, so that an empty bin has a finite logarithm."""
    counts = counts.astype(float) + 0.5
    return np.asarray(counts / counts.sum())


def build_reference(samples: Sequence[Mapping[str, float | str]], source: str) -> dict[str, Any]:
    """The ``"drift_reference"`` manifest section from the features of the reference series."""
    names = sorted({k for s in samples for k in s})
    numeric: dict[str, Any] = {}
    categorical: dict[str, Any] = {}
    for name in names:
        values = [s[name] for s in samples if name in s]
        if all(isinstance(v, str) for v in values):
            cats, counts = np.unique(np.asarray(values, dtype=str), return_counts=True)
            shares = {str(c): float(k) / len(values) for c, k in zip(cats, counts, strict=True)}
            categorical[name] = {"expected": shares, "n": len(values)}
            continue
        x = np.sort(np.asarray(values, dtype=float))
        edges = tuple(float(v) for v in np.unique(np.quantile(x, QUANTILES)))
        ref = NumericReference(float(x[0]), float(x[-1]), edges, (), (), len(x))
        bins = np.bincount(ref.bin_of(x), minlength=ref.bins)
        keep = np.unique(np.linspace(0, len(x) - 1, min(len(x), MAX_SAMPLE)).round().astype(int))
        numeric[name] = {
            "low": ref.low,
            "high": ref.high,
            "edges": list(edges),
            "expected": [round(float(v), 6) for v in _smoothed(bins)],
            "sample": [float(v) for v in x[keep]],
            "n": len(x),
        }
    return {
        "version": REFERENCE_VERSION,
        "series": len(samples),
        "source": source,
        "statistic": "PSI on quintile bins (+ out-of-range bins), gated by two-sample KS / chi-square",
        "numeric": numeric,
        "categorical": categorical,
    }


# -- what one series contributes -----------------------------------------------------------------------------


def series_features(
    volume: Volume, labels: np.ndarray, package: ModelPackage, confidence: np.ndarray | None = None
) -> Features:
    """The drift features of one segmented series (``labels`` and ``confidence`` on the source grid)."""
    # percentiles do not need every voxel: one in 32 (every other slice, every fourth row and column) gives the
    # same figures to within a HU or two and takes 0.3 s instead of 2 s on a 300 x 512 x 512 CT
    image = volume.array[::2, ::4, ::4]
    if volume.modality.upper() == "CT":
        body = image > CT_BODY_HU
    else:
        body = image > 0.1 * float(np.percentile(image, 99.5))
    inside = image[body] if body.any() else image.ravel()
    p05, p50, p95 = (float(v) for v in np.percentile(inside, (5, 50, 95)))
    ds = volume.datasets[0]
    scanner = " ".join(str(ds.get(k, "") or "").strip() for k in ("Manufacturer", "ManufacturerModelName")).strip()
    features: Features = {
        "intensity_p05": p05,
        "intensity_p50": p50,
        "intensity_p95": p95,
        "spacing_slice": float(volume.spacing[0]),
        "spacing_pixel": float(min(volume.spacing[1:])),
        "scanner": scanner or "unknown",
    }
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    counts = np.bincount(labels.ravel(), minlength=max((lab.value for lab in package.labels), default=0) + 1)
    for lab in package.labels:
        features[f"volume_ml.{lab.name.lower()}"] = round(float(counts[lab.value]) * voxel_ml, 3)
    if confidence is not None:
        foreground = labels > 0
        if foreground.any():
            features["confidence_mean"] = float(confidence[foreground].mean())
    return features


# -- comparing a window with the reference -------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureDrift:
    """One feature of the window against the reference: PSI, the test's p-value, and the level they reach."""

    feature: str
    psi: float
    p_value: float
    series: int
    level: str


def compare(
    reference: DriftReference, window: Sequence[Mapping[str, float | str]], min_series: int
) -> list[FeatureDrift]:
    """PSI and test per feature of ``reference`` present in the window; features the window lacks are skipped."""
    from scipy.stats import chisquare, ks_2samp

    measured: list[tuple[str, float, float, int]] = []
    for name, num in reference.numeric.items():
        x = np.asarray([float(s[name]) for s in window if isinstance(s.get(name), (int, float))])
        if not len(x):
            continue
        actual = _smoothed(np.bincount(num.bin_of(x), minlength=num.bins))
        p = float(ks_2samp(x, np.asarray(num.sample)).pvalue)
        measured.append((name, _psi(actual, np.asarray(num.expected)), p, len(x)))
    for name, cat in reference.categorical.items():
        values = [str(s[name]) for s in window if name in s]
        if not values:
            continue
        keys = [*cat.expected, "other"]
        seen = np.asarray([sum(1 for v in values if (v if v in cat.expected else "other") == k) for k in keys])
        expected = _smoothed(np.asarray([cat.expected.get(k, 0.0) * cat.n for k in keys]))
        actual = _smoothed(seen)
        p = float(chisquare(seen, expected * len(values)).pvalue)
        measured.append((name, _psi(actual, expected), p, len(values)))
    # a dozen features are tested after every series: each test must pass its level's significance divided by
    # their number (Bonferroni), or chance alone would raise a level every few series
    tests = max(1, len(measured))
    return [_judged(name, psi, p, n, min_series, tests) for name, psi, p, n in measured]


def _psi(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def _judged(name: str, psi: float, p: float, n: int, min_series: int, tests: int) -> FeatureDrift:
    level = "ok"
    if n >= min_series and psi >= PSI_ALARM and p < P_ALARM / tests:
        level = "alarm"
    elif n >= min_series and psi >= PSI_WATCH and p < P_WATCH / tests:
        level = "watch"
    return FeatureDrift(name, round(psi, 4), p if math.isfinite(p) else 1.0, n, level)


# -- the rolling window ----------------------------------------------------------------------------------------


@dataclass
class DriftMonitor:
    """The features of the last ``window`` series, persisted at ``state_path``, compared after each series.

    A warning is logged when a feature reaches ``watch`` or ``alarm``; a line when it is back to ``ok``.
    A window recorded against another reference (another model) is discarded at start.
    """

    reference: DriftReference
    state_path: Path
    window: int = 50
    min_series: int = 20
    series: list[Features] = field(default_factory=list)
    levels: dict[str, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("drift window %s cannot be read (%s); starting an empty one", self.state_path, exc)
            return
        if isinstance(state, dict) and state.get("reference") == self.reference.fingerprint:
            self.series = [s for s in state.get("series", []) if isinstance(s, dict)][-self.window :]
            self.levels = {k: v for k, v in state.get("levels", {}).items() if v in LEVELS}
        else:
            log.info("drift window %s was kept for another reference; starting an empty one", self.state_path)

    def observe(self, features: Features, series: str = "") -> list[FeatureDrift]:
        """Add one series (named by its key hash in the log lines), persist the window, compare it."""
        from edge_runtime.dicom import write_atomic

        with self._lock:
            self.series = [*self.series, dict(features)][-self.window :]
            results = compare(self.reference, self.series, self.min_series)
            for r in results:
                before = self.levels.get(r.feature, "ok")
                if r.level != before:
                    self._log_change(r, before, series)
                self.levels[r.feature] = r.level
            state = {"reference": self.reference.fingerprint, "levels": self.levels, "series": self.series}
            write_atomic(self.state_path, json.dumps(state))
        return results

    def evaluate(self) -> list[FeatureDrift]:
        with self._lock:
            return compare(self.reference, self.series, self.min_series)

    def _log_change(self, r: FeatureDrift, before: str, series: str) -> None:
        what = (
            f"drift {before} -> {r.level}: {r.feature} PSI {r.psi:.3f} (p {r.p_value:.2g}) over the last "
            f"{r.series} series against the package's reference (after series {series or '?'})"
        )
        if LEVELS.index(r.level) > LEVELS.index(before):
            log.warning(what)
        else:
            log.info(what)
