"""Point and probabilistic forecast metrics on ``(windows, horizon)`` arrays (numpy only).

Every function takes targets ``y`` and forecasts of the same shape ``(W, H)`` and averages over
all ``W × H`` points, so two methods scored on the same windows are scored on identical
(series, ts, step) points. Definitions:

- MAE: mean |y − ŷ|.
- MASE: mean of |y − ŷ| / scale, the scale being each series' in-sample MAE of the seasonal naive
  forecast on its training part (Hyndman & Koehler 2006); < 1 beats that naive method in-sample.
- sMAPE: 200 · mean |y − ŷ| / (|y| + |ŷ|), in percent (0..200); a point with y = ŷ = 0 counts 0.
- wQL: weighted quantile loss over levels 0.1 … 0.9: for each level q,
  2 · Σ pinball_q(y, ŷ_q) / Σ |y|, then the mean over levels (as in GluonTS / Chronos).
- coverage_80 / coverage_95: share of points inside the central interval.
"""

from __future__ import annotations

import math

import numpy as np

QUANTILE_LEVELS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _check(y: np.ndarray, f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.float64)
    f = np.asarray(f, dtype=np.float64)
    if y.shape != f.shape:
        raise ValueError(f"forecast shape {f.shape} differs from target shape {y.shape}")
    return y, f


def mae(y: np.ndarray, f: np.ndarray) -> float:
    y, f = _check(y, f)
    return float(np.mean(np.abs(y - f))) if y.size else math.nan


def mase(y: np.ndarray, f: np.ndarray, scale: np.ndarray) -> float:
    """``scale``: (W,) or (W, 1) positive per-window scale (its series' in-sample naive MAE)."""
    y, f = _check(y, f)
    s = np.asarray(scale, dtype=np.float64).reshape(-1, 1)
    return float(np.mean(np.abs(y - f) / s)) if y.size else math.nan


def smape(y: np.ndarray, f: np.ndarray) -> float:
    y, f = _check(y, f)
    if not y.size:
        return math.nan
    den = np.abs(y) + np.abs(f)
    ratio = np.divide(np.abs(y - f), den, out=np.zeros_like(den), where=den > 0)
    return float(200.0 * np.mean(ratio))


def pinball(y: np.ndarray, q_forecast: np.ndarray, level: float) -> np.ndarray:
    """Elementwise pinball (quantile) loss of the ``level`` quantile forecast."""
    d = np.asarray(y, dtype=np.float64) - np.asarray(q_forecast, dtype=np.float64)
    return np.maximum(level * d, (level - 1.0) * d)


def wql(y: np.ndarray, quantiles: np.ndarray, levels: tuple[float, ...] = QUANTILE_LEVELS) -> float:
    """Weighted quantile loss; ``quantiles`` is (W, H, len(levels))."""
    y = np.asarray(y, dtype=np.float64)
    q = np.asarray(quantiles, dtype=np.float64)
    if q.shape != (*y.shape, len(levels)):
        raise ValueError(f"quantiles shape {q.shape}, expected {(*y.shape, len(levels))}")
    denom = float(np.abs(y).sum())
    if not y.size or denom == 0.0:
        return math.nan
    losses = [2.0 * float(pinball(y, q[..., i], lv).sum()) / denom for i, lv in enumerate(levels)]
    return float(np.mean(losses))


def coverage(y: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> float:
    y = np.asarray(y, dtype=np.float64)
    if not y.size:
        return math.nan
    return float(np.mean((y >= lower) & (y <= upper)))


def score(
    y: np.ndarray,
    mean: np.ndarray,
    scale: np.ndarray,
    *,
    quantiles: np.ndarray | None = None,
    lower: dict[str, np.ndarray] | None = None,
    upper: dict[str, np.ndarray] | None = None,
) -> dict[str, float | None]:
    """The metrics object of docs/contract.md for one method: ``mae, mase, smape, wql, coverage_80,
    coverage_95``; the last three are None when the method gives no quantiles / intervals."""
    out: dict[str, float | None] = {
        "mae": mae(y, mean),
        "mase": mase(y, mean, scale),
        "smape": smape(y, mean),
        "wql": wql(y, quantiles) if quantiles is not None else None,
        "coverage_80": None,
        "coverage_95": None,
    }
    if lower is not None and upper is not None:
        out["coverage_80"] = coverage(y, lower["80"], upper["80"])
        out["coverage_95"] = coverage(y, lower["95"], upper["95"])
    return {k: (None if v is None else _finite_or_none(v)) for k, v in out.items()}


def per_step_mae(y: np.ndarray, f: np.ndarray) -> list[float]:
    """MAE of each forecast step (length H)."""
    y, f = _check(y, f)
    return [float(v) for v in np.mean(np.abs(y - f), axis=0)]


def _finite_or_none(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None
