"""Interval calibration: one scale factor per version, fitted on the validation split.

After training, the network's 80 % and 95 % intervals are often a little too narrow or too wide
(the Gaussian / Student-t shape is only an approximation). :func:`fit_interval_scale` finds the
factor ``s`` by which the predictive scale is multiplied so that the validation coverage of both
intervals is as close as possible to 80 % and 95 % (it minimises the larger of the two absolute
coverage errors). The factor becomes ``ModelConfig.interval_scale``, which the network applies in
its graph, so the registry's weights, the ONNX export, the canary and every predictor include it.

Modes (``--calibration``):

- ``widen`` (the default): the fitted factor is applied only when it is above 1. The validation
  split is the stretch right after the training data, where the network is at its best; the
  held-out period and live traffic come later and see larger errors, so a factor that *narrows*
  the intervals there tends to under-cover afterwards (measured: docs/training.md), while a factor
  that widens them transfers. Under-coverage is the costlier mistake for users of the intervals.
- ``fit``: the fitted factor as it is, narrowing included.
- ``off``: no calibration (factor 1).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from model.config import ModelConfig
from model.weights import forecast_net
from train.data import VAL, EventDataModule

log = logging.getLogger(__name__)

CALIBRATION_MAX_WINDOWS = 20_000
MIN_POINTS = 50  # fewer validation points than this: no calibration (factor 1)
SCALE_RANGE = (0.1, 10.0)
LEVELS = (0.80, 0.95)
MODES = ("widen", "fit", "off")


def fit_interval_scale(
    y: np.ndarray,
    mean: np.ndarray,
    half_widths: dict[float, np.ndarray],
    mode: str = "fit",
) -> tuple[float, dict[str, Any]]:
    """The factor ``s`` for the interval half-widths, and a summary.

    ``y``, ``mean`` (W, H) targets and forecasts; ``half_widths[level]`` (W, H) > 0 the current
    half-width of the central ``level`` interval. Coverage at factor ``s`` is the share of points
    with ``|y - mean| <= s · half_width``; ``s`` minimises ``max_level |coverage(s) - level|``
    (searched between the factors that hit each level exactly, where that optimum lies).
    ``mode`` ``widen`` keeps ``s`` at 1 when the fit is below 1; ``off`` returns 1 (module doc).
    """
    if mode not in MODES:
        raise ValueError(f"calibration mode must be one of {MODES}, got {mode!r}")
    err = np.abs(np.asarray(y, np.float64) - np.asarray(mean, np.float64)).ravel()
    ok = np.isfinite(err)
    hws = {}
    for lv in LEVELS:
        hw = np.asarray(half_widths[lv], np.float64).ravel()
        ok &= np.isfinite(hw) & (hw > 0)
        hws[lv] = hw
    n = int(ok.sum())
    before = {f"coverage_{round(lv * 100)}": None for lv in LEVELS}
    if n < MIN_POINTS or mode == "off":
        return 1.0, {"mode": mode, "scale": 1.0, "points": n, "fitted": False,
                     "before": before, "after": before}  # fmt: skip
    r = {lv: err[ok] / hws[lv][ok] for lv in LEVELS}  # (N,) per level: covered iff r <= s

    def cov(s: float) -> dict[float, float]:
        return {lv: float(np.mean(r[lv] <= s)) for lv in LEVELS}

    exact = [float(np.quantile(r[lv], lv)) for lv in LEVELS]  # s hitting each level on its own
    lo, hi = min(exact), max(exact)
    grid = np.unique(np.concatenate([np.linspace(lo, hi, 201), exact]))

    def worst(s: float) -> float:
        c = cov(s)
        return max(abs(c[lv] - lv) for lv in LEVELS)

    fitted = float(np.clip(float(min(grid, key=worst)), *SCALE_RANGE))
    s = max(fitted, 1.0) if mode == "widen" else fitted
    c0, c1 = cov(1.0), cov(s)
    info = {
        "mode": mode,
        "scale": s,
        "fitted_scale": fitted,
        "points": n,
        "fitted": True,
        "exact_factors": dict(zip(("coverage_80", "coverage_95"), exact, strict=True)),
        "before": {f"coverage_{round(lv * 100)}": c0[lv] for lv in LEVELS},
        "after": {f"coverage_{round(lv * 100)}": c1[lv] for lv in LEVELS},
    }
    return s, info


@torch.no_grad()
def calibrate_intervals(
    net: nn.Module,
    dm: EventDataModule,
    config: ModelConfig,
    *,
    max_windows: int = CALIBRATION_MAX_WINDOWS,
    seed: int = 0,
    mode: str = "widen",
) -> tuple[ModelConfig, dict[str, Any]]:
    """Fit the interval scale on (at most ``max_windows`` random) validation windows and set it
    on ``net`` (an EventForecaster or ForecastNet) in place. Returns the new config (``config``
    with ``interval_scale`` multiplied by the fitted factor) and a summary for ``metrics.json``
    (``calibration``: mode, factor, points, validation coverage before and after). ``mode``:
    see the module docstring."""
    from train.evaluate import net_forecast

    ds = dm.sets[VAL]
    idx = np.arange(len(ds))
    if len(idx) > max_windows:
        idx = np.sort(np.random.default_rng(seed).choice(idx, max_windows, replace=False))
    x, y, _ = ds.arrays_for(idx)
    fc = net_forecast(net, x)
    half = {0.80: fc["upper_80"] - fc["mean"], 0.95: fc["upper_95"] - fc["mean"]}
    factor, info = fit_interval_scale(y, fc["mean"], half, mode)
    new = config.replace(interval_scale=round(config.interval_scale * factor, 6))
    set_config(net, new)
    info["interval_scale"] = new.interval_scale
    info["windows"] = len(idx)
    log.info(
        "interval calibration (%s) on %d validation windows: factor %.4g (fitted %s), "
        "coverage 80/95 %s -> %s", mode, len(idx), factor, info.get("fitted_scale"),
        info["before"], info["after"],
    )  # fmt: skip
    return new, info


def set_config(net: nn.Module, config: ModelConfig) -> None:
    """Give ``net`` (an EventForecaster or ForecastNet) a new config of the same architecture
    (only ``interval_scale`` may differ from the current one's graph-relevant fields)."""
    inner = forecast_net(net)
    inner.config = config
    if inner is not net:
        net.config = config  # type: ignore[assignment]
        hp = getattr(net, "hparams", None)
        if hp is not None and "config" in hp:
            hp["config"] = config.to_dict()
