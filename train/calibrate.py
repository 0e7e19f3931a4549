"""Interval calibration: one scale factor per version, fitted on the validation split.

After training, the network's 80 % and 95 % intervals are often a little too narrow or too wide
(the Gaussian / Student-t shape is only an approximation). :func:`fit_interval_scale` finds the
factor ``s`` by which the predictive scale is multiplied so that the validation coverage of both
intervals is as close as possible to 80 % and 95 % (it minimises the larger of the two absolute
coverage errors). The factor becomes ``ModelConfig.interval_scale``, which the network applies in
its graph, so the registry's weights, the ONNX export, the canary and every predictor include it.

Modes (``--calibration``):

- ``widen`` (the default): the applied factor is the one that reaches the levels on validation
  *with 90 % confidence* (a block bootstrap over the validation windows, see
  :func:`fit_interval_scale`), and never below 1. The validation split is one stretch right after
  the training data; the held-out period and live traffic come later and may be rougher (another
  season), so a factor fitted to that one stretch — above all one that *narrows* the intervals —
  tends to under-cover afterwards (measured: docs/training.md). The bootstrap widens more when the
  validation evidence is short or uneven. Under-coverage is the costlier mistake for users of
  the intervals.
- ``fit``: the fitted factor as it is, narrowing included.
- ``off``: no calibration (factor 1).
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from model.config import ModelConfig
from model.weights import forecast_net
from train.data import VAL, EventDataModule
from train.settings import CALIBRATION_MODES as MODES

log = logging.getLogger(__name__)

CALIBRATION_MAX_WINDOWS = 20_000
MIN_POINTS = 50  # fewer validation points than this: no calibration (factor 1)
SCALE_RANGE = (0.1, 10.0)
LEVELS = (0.80, 0.95)
CONFIDENCE = 0.9  # widen: the factor that reaches the levels with this confidence (bootstrap)
BOOTSTRAP_BLOCKS = 20
BOOTSTRAP_RESAMPLES = 200


def _minimax_factor(r80: np.ndarray, r95: np.ndarray) -> tuple[float, list[float]]:
    """The factor minimising the larger coverage error of the two levels, and the factors that
    hit each level on its own. ``r80``/``r95``: sorted |error| / half-width of each point."""
    n = len(r80)
    exact = [float(np.quantile(r80, LEVELS[0])), float(np.quantile(r95, LEVELS[1]))]
    grid = np.unique(np.concatenate([np.linspace(min(exact), max(exact), 201), exact]))
    c80 = np.searchsorted(r80, grid, side="right") / n
    c95 = np.searchsorted(r95, grid, side="right") / n
    worst = np.maximum(np.abs(c80 - LEVELS[0]), np.abs(c95 - LEVELS[1]))
    return float(grid[int(np.argmin(worst))]), exact


def fit_interval_scale(
    y: np.ndarray,
    mean: np.ndarray,
    half_widths: dict[float, np.ndarray],
    mode: str = "fit",
    *,
    confidence: float | None = None,
    blocks: int = BOOTSTRAP_BLOCKS,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> tuple[float, dict[str, Any]]:
    """The factor ``s`` for the interval half-widths, and a summary.

    ``y``, ``mean`` (W, H) targets and forecasts, rows in time order; ``half_widths[level]``
    (W, H) > 0 the current half-width of the central ``level`` interval. Coverage at factor ``s``
    is the share of points with ``|y - mean| <= s · half_width``; the fitted factor minimises
    ``max_level |coverage(s) - level|`` (searched between the factors that hit each level
    exactly, where that optimum lies).

    ``confidence`` (e.g. 0.9): also resample the rows in ``blocks`` contiguous blocks (a block
    bootstrap: neighbouring windows share most of their points, so single rows are not
    independent) and report the ``confidence`` quantile of the refitted factor as
    ``upper_scale``: a factor that still reaches the levels on validation periods like the ones
    seen, with that confidence. Short or uneven validation data give a wide spread, long
    homogeneous data almost none. ``mode`` ``widen`` applies ``max(1, upper_scale)`` (the point
    fit when ``confidence`` is None); ``fit`` applies the point fit; ``off`` returns 1.
    """
    if mode not in MODES:
        raise ValueError(f"calibration mode must be one of {MODES}, got {mode!r}")
    y = np.asarray(y, np.float64)
    rows = y.shape[0] if y.ndim > 1 else len(y)
    err = np.abs(y - np.asarray(mean, np.float64)).reshape(rows, -1)
    ok = np.isfinite(err)
    hws = {}
    for lv in LEVELS:
        hw = np.asarray(half_widths[lv], np.float64).reshape(rows, -1)
        ok &= np.isfinite(hw) & (hw > 0)
        hws[lv] = hw
    n = int(ok.sum())
    before = {f"coverage_{round(lv * 100)}": None for lv in LEVELS}
    if n < MIN_POINTS or mode == "off":
        return 1.0, {"mode": mode, "scale": 1.0, "points": n, "fitted": False,
                     "before": before, "after": before}  # fmt: skip
    with np.errstate(divide="ignore", invalid="ignore"):
        r_rows = {lv: np.where(ok, err / hws[lv], np.inf) for lv in LEVELS}  # (W, H)
    r = {lv: np.sort(r_rows[lv][ok]) for lv in LEVELS}  # covered iff r <= s

    def cov(s: float) -> dict[float, float]:
        return {lv: float(np.searchsorted(r[lv], s, side="right") / n) for lv in LEVELS}

    fitted, exact = _minimax_factor(r[LEVELS[0]], r[LEVELS[1]])
    fitted = float(np.clip(fitted, *SCALE_RANGE))
    upper = None
    spread = None
    if confidence is not None and rows >= 2 * blocks:
        rng = np.random.default_rng(seed)
        edges = np.linspace(0, rows, blocks + 1).astype(int)
        chunks = [np.arange(a, b) for a, b in itertools.pairwise(edges)]
        factors = []
        for _ in range(resamples):
            pick = np.concatenate([chunks[i] for i in rng.integers(0, blocks, blocks)])
            keep = ok[pick]
            if keep.sum() < MIN_POINTS:
                continue
            f, _ = _minimax_factor(
                np.sort(r_rows[LEVELS[0]][pick][keep]), np.sort(r_rows[LEVELS[1]][pick][keep])
            )
            factors.append(f)
        if factors:
            upper = float(np.clip(np.quantile(factors, confidence), *SCALE_RANGE))
            spread = [float(np.quantile(factors, q)) for q in (0.1, 0.5, 0.9)]
    point = upper if upper is not None else fitted
    s = max(point, 1.0) if mode == "widen" else fitted
    c0, c1 = cov(1.0), cov(s)
    info = {
        "mode": mode,
        "scale": s,
        "fitted_scale": fitted,
        "upper_scale": upper,
        "confidence": confidence if upper is not None else None,
        "bootstrap_factor_q10_q50_q90": spread,
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
    factor, info = fit_interval_scale(
        y, fc["mean"], half, mode, confidence=CONFIDENCE if mode == "widen" else None, seed=seed
    )
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
