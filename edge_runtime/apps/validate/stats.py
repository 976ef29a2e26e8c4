"""Statistics of the validation report: a summary per label and metric, with a bootstrap CI of the mean."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np


def _as_floats(values: Iterable[float] | np.ndarray) -> np.ndarray:
    return np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64).ravel()


def bootstrap_ci(
    values: Iterable[float] | np.ndarray,
    *,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float] | None:
    """Percentile bootstrap confidence interval of the mean of the finite ``values``.

    ``resamples`` resamples of size n drawn with replacement (numpy ``default_rng(seed)``, so the result
    is reproducible), their means, and the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2``
    percentiles of those (linear interpolation). Non-finite values are dropped first. ``None`` when no
    finite value is left; ``(x, x)`` for a single value.
    """
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    x = _as_floats(values)
    x = x[np.isfinite(x)]
    n = x.size
    if n == 0:
        return None
    if n == 1:
        return float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    means = np.empty(resamples, dtype=np.float64)
    chunk = max(1, (1 << 22) // n)  # bounds the index matrix to ~32 MB
    for start in range(0, resamples, chunk):
        m = min(chunk, resamples - start)
        means[start : start + m] = x[rng.integers(0, n, size=(m, n))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.percentile(means, [100.0 * alpha, 100.0 * (1.0 - alpha)])
    return float(low), float(high)


def summarize(
    values: Iterable[float] | np.ndarray, *, resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> dict[str, Any]:
    """n (finite values), n_nan, n_inf, mean, median, std, min, max, ci_low, ci_high of ``values``.

    Statistics are over the finite values only; they are ``None`` when there is none (``std`` also for a
    single value).
    """
    x = _as_floats(values)
    finite = x[np.isfinite(x)]
    out: dict[str, Any] = {
        "n": int(finite.size),
        "n_nan": int(np.isnan(x).sum()),
        "n_inf": int(np.isinf(x).sum()),
        "mean": None,
        "median": None,
        "std": None,
        "min": None,
        "max": None,
        "ci_low": None,
        "ci_high": None,
    }
    if finite.size:
        out.update(
            mean=float(finite.mean()),
            median=float(np.median(finite)),
            std=float(finite.std(ddof=1)) if finite.size > 1 else None,
            min=float(finite.min()),
            max=float(finite.max()),
        )
        ci = bootstrap_ci(finite, resamples=resamples, confidence=confidence, seed=seed)
        if ci is not None:
            out["ci_low"], out["ci_high"] = ci
    return out
