"""Held-out evaluation: the network beside persistence, seasonal naive and a linear AR model.

The held-out set is every test window (all ``H`` targets in the last ``test_fraction`` of their
series, see :mod:`train.data`) for which the seasonal naive forecast is defined, i.e. one season
of gap-free history exists before each target. Every method is scored on exactly these windows,
so on identical (series, ts, step) points. The report is the JSON of docs/contract.md
(``version, points, horizon, metrics{model, persistence, seasonal_naive}``) with more fields:
``linear_ar`` in ``metrics``, MAE per forecast step, ratios against the best naive method and
the quality targets of docs/design.md.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view
from torch import nn

from model.config import ModelConfig
from model.errors import ConfigError
from model.network import outputs_from_params, student_t_quantile
from model.weights import forecast_net
from train import baselines
from train.data import TEST, TRAIN, SeriesArrays, WindowSet
from train.metrics import QUANTILE_LEVELS, per_step_mae, score

log = logging.getLogger(__name__)

# docs/design.md "Forecast quality targets": MAE ratio to the better naive baseline, coverage band.
MAE_RATIO_TARGET = {1: 0.9, "multi": 0.7}
COVERAGE_TOLERANCE = 0.05
AR_MAX_WINDOWS = 200_000
_Z = {lv: float(torch.distributions.Normal(0, 1).icdf(torch.tensor(lv))) for lv in QUANTILE_LEVELS}


@dataclass
class HeldOut:
    """The held-out windows of one data set for one model shape."""

    arrays: SeriesArrays
    config: ModelConfig
    season: int
    starts: np.ndarray  # (W,) flat start index of each window
    x: np.ndarray  # (W, T, C) float32 model inputs
    y: np.ndarray  # (W, H) float64 targets
    ts: np.ndarray  # (W, T + H) float64 times of inputs and targets
    series: np.ndarray  # (W,) series number
    scale: np.ndarray  # (W,) MASE scale of each window's series

    @property
    def windows(self) -> int:
        return len(self.starts)


def resolve_season(arrays: SeriesArrays, season: int | None) -> int:
    """``season`` if given (>= 1), else one day (or week) at the data's median spacing."""
    if season is not None:
        if season < 1:
            raise ConfigError(f"--season: must be >= 1, got {season}")
        return int(season)
    return baselines.infer_season(float(np.median(arrays.spacing)))


def held_out(arrays: SeriesArrays, config: ModelConfig, season: int | None = None) -> HeldOut:
    """The held-out windows (see module docstring).

    Raises ConfigError when no test window has a full season of history (series too short, or
    ``--season`` too long for them).
    """
    m = resolve_season(arrays, season)
    t, h = config.sequence_length, config.horizon
    starts = arrays.window_starts(t, h, TEST)
    if len(starts) == 0:
        raise ConfigError(
            f"--data: no held-out window: the last {arrays.settings.test_fraction:.0%} of each "
            f"series must hold {h} gap-free points after {t} points of history"
        )
    valid = baselines.seasonal_valid(arrays, starts, t, h, m)
    if not valid.any():
        raise ConfigError(
            f"--season: no held-out window has {m} steps of gap-free history for the seasonal "
            "naive baseline; pass a shorter --season"
        )
    dropped = int((~valid).sum())
    if dropped:
        log.info("%d held-out windows lack a season of history and are not scored", dropped)
    starts = starts[valid]
    ws = WindowSet(arrays, starts, config)
    x, y, ts = ws.arrays_for(np.arange(len(starts)))
    series = np.searchsorted(arrays.starts, starts, side="right") - 1
    scale = baselines.naive_scale(arrays, m)[series]
    return HeldOut(arrays, config, m, starts, x, y.astype(np.float64), ts, series, scale)


@torch.no_grad()
def net_forecast(net: nn.Module, x: np.ndarray, batch: int = 1024) -> dict[str, np.ndarray]:
    """The network's forecasts for windows ``x`` (W, T, C): ``mean, std, lower_80, upper_80,
    lower_95, upper_95`` (W, H) and ``quantiles`` (W, H, 9) at levels 0.1 … 0.9, from its own
    Gaussian or Student-t distribution. Runs on the CPU in float32, in eval mode."""
    inner = forecast_net(net)
    was_training = inner.training
    device = next(inner.parameters()).device
    inner.eval()
    parts: dict[str, list[np.ndarray]] = {}
    try:
        for i in range(0, len(x), batch):
            xb = torch.from_numpy(np.ascontiguousarray(x[i : i + batch])).to(device)
            p = inner.params(xb)
            outs = outputs_from_params(p)
            mean, width = outs[0], p.scale * p.unit
            qs = []
            for lv in QUANTILE_LEVELS:
                if p.df is None:
                    z = torch.full_like(mean, _Z[lv])
                elif lv == 0.5:
                    z = torch.zeros_like(mean)
                else:
                    upper = max(lv, 1 - lv)
                    tq = student_t_quantile(p.df, 2 * (1 - upper), abs(_Z[lv]))
                    z = tq if lv > 0.5 else -tq
                qs.append(mean + width * z)
            names = ("mean", "std", "lower_80", "upper_80", "lower_95", "upper_95")
            for name, o in zip(names, outs, strict=True):
                parts.setdefault(name, []).append(o.float().cpu().numpy())
            parts.setdefault("quantiles", []).append(torch.stack(qs, -1).float().cpu().numpy())
    finally:
        inner.train(was_training)
    h = inner.config.horizon
    return {
        k: (np.concatenate(v) if v else np.zeros((0, h))).astype(np.float64)
        for k, v in parts.items()
    }


def fit_linear_ar(arrays: SeriesArrays, config: ModelConfig, seed: int = 0) -> baselines.LinearAR:
    """The linear AR reference, fitted on (at most 200 000 random) training windows."""
    t, h = config.sequence_length, config.horizon
    starts = arrays.window_starts(t, h, TRAIN)
    if len(starts) == 0:
        raise ConfigError("--data: no training window to fit the linear AR reference")
    if len(starts) > AR_MAX_WINDOWS:
        starts = np.sort(np.random.default_rng(seed).choice(starts, AR_MAX_WINDOWS, replace=False))
    win = np.asarray(sliding_window_view(np.asarray(arrays.values), t + h)[starts])
    return baselines.LinearAR.fit(win[:, :t], win[:, t:])


def _with_intervals(y: np.ndarray, f: dict[str, np.ndarray], scale: np.ndarray) -> dict[str, Any]:
    return score(
        y,
        f["mean"],
        scale,
        quantiles=f["quantiles"],
        lower={"80": f["lower_80"], "95": f["lower_95"]},
        upper={"80": f["upper_80"], "95": f["upper_95"]},
    )


def quality_check(report: dict[str, Any]) -> dict[str, Any]:
    """docs/design.md's table applied to a report: the model's MAE over the better naive baseline's
    (≤ 0.9 at horizon 1, ≤ 0.7 beyond) and coverage within ±5 points of 80 % and 95 %."""
    m = report["metrics"]
    best_name = min(("persistence", "seasonal_naive"), key=lambda k: m[k]["mae"])
    best = m[best_name]["mae"]
    h = report["horizon"]
    target = MAE_RATIO_TARGET[1] if h == 1 else MAE_RATIO_TARGET["multi"]
    ratio = m["model"]["mae"] / best if best else math.inf
    c80, c95 = m["model"]["coverage_80"], m["model"]["coverage_95"]
    ok80 = c80 is not None and abs(c80 - 0.80) <= COVERAGE_TOLERANCE
    ok95 = c95 is not None and abs(c95 - 0.95) <= COVERAGE_TOLERANCE
    out = {
        "best_naive": best_name,
        "mae_ratio": ratio,
        "mae_ratio_target": target,
        "mae_ok": ratio <= target,
        "coverage_80_ok": ok80,
        "coverage_95_ok": ok95,
        "all_ok": ratio <= target and ok80 and ok95,
    }
    if "linear_ar" in m:
        out["mae_vs_linear_ar"] = m["model"]["mae"] / m["linear_ar"]["mae"]
    return out


def evaluate(
    net: nn.Module,
    arrays: SeriesArrays,
    config: ModelConfig,
    *,
    season: int | None = None,
    version: str | None = None,
    holdout: HeldOut | None = None,
    linear_ar: bool = True,
) -> tuple[dict[str, Any], HeldOut, dict[str, np.ndarray]]:
    """Score ``net`` and the baselines on the held-out windows.

    Returns ``(report, held_out, model_forecasts)``; the report is JSON-able (no NaN: undefined
    numbers are None). Pass ``holdout`` to reuse windows already built for the same config.
    """
    ho = holdout if holdout is not None else held_out(arrays, config, season)
    t, h = config.sequence_length, config.horizon
    values = np.asarray(arrays.values)
    fc = net_forecast(net, ho.x)
    metrics: dict[str, Any] = {
        "model": _with_intervals(ho.y, fc, ho.scale),
        "persistence": score(ho.y, baselines.persistence(values, ho.starts, t, h), ho.scale),
        "seasonal_naive": score(
            ho.y, baselines.seasonal_naive(values, ho.starts, t, h, ho.season), ho.scale
        ),
    }
    steps = {
        "model": per_step_mae(ho.y, fc["mean"]),
        "persistence": per_step_mae(ho.y, baselines.persistence(values, ho.starts, t, h)),
        "seasonal_naive": per_step_mae(
            ho.y, baselines.seasonal_naive(values, ho.starts, t, h, ho.season)
        ),
    }
    if linear_ar:
        ar = fit_linear_ar(arrays, config).predict(ho.x[:, :, 0].astype(np.float64))
        metrics["linear_ar"] = _with_intervals(ho.y, ar, ho.scale)
        steps["linear_ar"] = per_step_mae(ho.y, ar["mean"])
    report: dict[str, Any] = {
        "version": version,
        "points": int(ho.y.size),
        "horizon": h,
        "metrics": metrics,
        "windows": ho.windows,
        "series": len(np.unique(ho.series)),
        "sequence_length": t,
        "season": ho.season,
        "test_fraction": arrays.settings.test_fraction,
        "per_step_mae": steps,
    }
    # The worker's online interval calibration replayed on the held-out part (issue 17)
    from train.online_eval import online_calibration_report

    report["online_calibration"] = online_calibration_report(ho, fc)
    report["quality"] = quality_check(report)
    return report, ho, fc
