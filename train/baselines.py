"""Reference forecasters scored beside the network on the very same windows.

- persistence: every step repeats the last observed value.
- seasonal naive: step ``k`` repeats the value one season earlier, ``y[t + k - m·⌈k/m⌉]`` — it may
  reach back beyond the model's input window, into the series' own history.
- linear autoregression: a ridge regression from the window's ``T`` values to its ``H`` targets,
  fitted on the training windows, in per-window normalised units (so one fit serves series of
  every scale, as the network does); Gaussian intervals from the training residuals of each step.

The season ``m`` (in steps) is one day at the data's spacing (24 for hourly, 48 for half-hourly,
288 for 5-minute data), a week for daily data, a year for weekly (52) and monthly (12) data, or
what ``--season`` says.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from train.data import TRAIN, SeriesArrays
from train.metrics import QUANTILE_LEVELS

DAY = 86_400.0
# Normal quantiles of QUANTILE_LEVELS (no scipy needed at run time).
_Z = {0.1: -1.2815515655446004, 0.2: -0.8416212335729143, 0.3: -0.5244005127080407,
      0.4: -0.2533471031357997, 0.5: 0.0, 0.6: 0.2533471031357997, 0.7: 0.5244005127080407,
      0.8: 0.8416212335729143, 0.9: 1.2815515655446004}  # fmt: skip
Z80, Z95 = 1.2815515655446004, 1.959963984540054


def gaussian_quantiles(mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(…, 9) quantiles at QUANTILE_LEVELS of normal distributions with this mean and std."""
    return np.stack([mean + _Z[lv] * std for lv in QUANTILE_LEVELS], axis=-1)


def infer_season(spacing_s: float) -> int:
    """Season length in steps for a series sampled every ``spacing_s`` seconds: one day for
    sub-daily data (rounded), a week (7) for daily data, a year for weekly (52) and monthly (12)
    data, otherwise 1 (no seasonality assumed)."""
    if not math.isfinite(spacing_s) or spacing_s <= 0:
        return 1
    if spacing_s < DAY * 0.9:
        return max(1, round(DAY / spacing_s))
    for spacing, season in ((DAY, 7), (7 * DAY, 52), (30.44 * DAY, 12)):
        if abs(spacing_s - spacing) <= 0.1 * spacing:
            return season
    return 1


def persistence(values: np.ndarray, starts: np.ndarray, t: int, h: int) -> np.ndarray:
    """(W, H): the last input value of each window, repeated."""
    last = np.asarray(values)[starts + t - 1]
    return np.repeat(last[:, None], h, axis=1)


def seasonal_sources(starts: np.ndarray, t: int, h: int, season: int) -> np.ndarray:
    """(W, H) flat indices the seasonal naive forecast copies for each target."""
    k = np.arange(1, h + 1)
    back = season * np.ceil(k / season).astype(np.int64)  # (H,)
    return starts[:, None] + t - 1 + k[None, :] - back[None, :]


def seasonal_valid(
    arrays: SeriesArrays, starts: np.ndarray, t: int, h: int, season: int
) -> np.ndarray:
    """(W,) True where every seasonal source lies in the window's own gap-free segment."""
    if len(starts) == 0:
        return np.zeros(0, dtype=bool)
    src = seasonal_sources(starts, t, h, season)
    seg = np.asarray(arrays.segment)
    ok = src >= 0
    safe = np.where(ok, src, 0)
    return np.all(ok & (seg[safe] == seg[starts + t - 1][:, None]), axis=1)


def seasonal_naive(
    values: np.ndarray, starts: np.ndarray, t: int, h: int, season: int
) -> np.ndarray:
    """(W, H) seasonal naive forecasts (sources must be valid, see :func:`seasonal_valid`)."""
    return np.asarray(values)[seasonal_sources(starts, t, h, season)]


def naive_scale(arrays: SeriesArrays, season: int) -> np.ndarray:
    """(S,) in-sample MAE of the seasonal naive forecast on each series' training part (the MASE
    denominator). Falls back to lag 1 when a series has no seasonal pair, and to 1.0 when that is
    zero too (a constant series), so the scale is always positive."""
    seg = np.asarray(arrays.segment)
    spl = np.asarray(arrays.split)
    vals = np.asarray(arrays.values)
    out = np.ones(arrays.n_series)
    for i, (s, n) in enumerate(zip(arrays.starts, arrays.lengths, strict=True)):
        v, g, p = vals[s : s + n], seg[s : s + n], spl[s : s + n]
        for lag in (season, 1):
            if n <= lag:
                continue
            ok = (g[lag:] == g[:-lag]) & (p[lag:] == TRAIN)
            if ok.any():
                scale = float(np.mean(np.abs(v[lag:] - v[:-lag])[ok]))
                if scale > 0:
                    out[i] = scale
                    break
    return out


@dataclass
class LinearAR:
    """Ridge regression of the normalised ``H`` targets on the normalised ``T`` window values."""

    coef: np.ndarray  # (T + 1, H), last row the intercept
    resid_std: np.ndarray  # (H,) training residual std, normalised units

    @staticmethod
    def _normalise(windows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        mu = windows.mean(axis=1, keepdims=True)
        sd = windows.std(axis=1, keepdims=True)
        sd = np.sqrt(sd**2 + 1e-8 * mu**2 + 1e-10)  # same floor idea as the network
        return (windows - mu) / sd, mu, sd

    @classmethod
    def fit(cls, inputs: np.ndarray, targets: np.ndarray, ridge: float = 1e-2) -> LinearAR:
        """``inputs`` (N, T) window values, ``targets`` (N, H). Needs N >= 1."""
        xn, mu, sd = cls._normalise(np.asarray(inputs, dtype=np.float64))
        yn = (np.asarray(targets, dtype=np.float64) - mu) / sd
        a = np.hstack([xn, np.ones((len(xn), 1))])
        reg = ridge * len(a) * np.eye(a.shape[1])
        reg[-1, -1] = 0.0  # no penalty on the intercept
        coef = np.linalg.solve(a.T @ a + reg, a.T @ yn)
        resid = yn - a @ coef
        return cls(coef, np.maximum(resid.std(axis=0), 1e-6))

    def predict(self, inputs: np.ndarray) -> dict[str, np.ndarray]:
        """Mean, std, 80/95 % bounds (each (N, H)) and quantiles (N, H, 9) for windows (N, T)."""
        xn, mu, sd = self._normalise(np.asarray(inputs, dtype=np.float64))
        a = np.hstack([xn, np.ones((len(xn), 1))])
        mean = (a @ self.coef) * sd + mu
        std = self.resid_std[None, :] * sd
        q = gaussian_quantiles(mean, std)
        return {
            "mean": mean,
            "std": std,
            "lower_80": mean - Z80 * std,
            "upper_80": mean + Z80 * std,
            "lower_95": mean - Z95 * std,
            "upper_95": mean + Z95 * std,
            "quantiles": q,
        }
