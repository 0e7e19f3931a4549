"""Interval calibration: one factor per interval level, fitted on the validation split.

After training, the network's 80 % and 95 % intervals are often too narrow or too wide, and not
always by the same amount: real errors are rarely exactly Gaussian (or Student-t), so an interval
that is right at 80 % can be too wide at 95 % or the reverse (measured: docs/training.md). Each
level therefore gets its own factor, by split conformal prediction: on the validation windows
(never seen in training) take each point's ratio ``|y - mean| / half-width`` of the level's
interval; the factor is the ``ceil((n + 1) · level)``-th smallest ratio, the smallest factor with
which at least ``level`` of the validation points (and, for data exchangeable with them, of
future points) fall inside the interval.

Both factors live in the model config and are applied in the network's graph, so the registry's
weights, the ONNX export, the canary and every predictor include them:

- ``interval_scale`` is multiplied by the 80 % factor: it scales the predictive scale, hence
  ``std`` and both intervals;
- ``tail_scale`` is set to (95 % factor) / (80 % factor): it scales the 95 % half-width on top.
  It never goes below ``TAIL_SCALE_MIN``, so the 95 % interval always contains the 80 % one.

Modes (``--calibration``):

- ``conformal`` (the default): the factors as fitted, widening or narrowing.
- ``widen``: each factor at least 1, i.e. intervals are only ever widened (for users who would
  rather over-cover than trust a narrowing fitted on one validation stretch).
- ``off``: no calibration (factors 1).

What calibration cannot fix: a held-out period or live traffic rougher than the validation
stretch (another season) is under-covered all the same; docs/training.md shows one such case.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from model.config import TAIL_SCALE_MIN, ModelConfig
from model.weights import forecast_net
from train.choices import CALIBRATION_MODES as MODES
from train.data import VAL, EventDataModule

log = logging.getLogger(__name__)

CALIBRATION_MAX_WINDOWS = 20_000
MIN_POINTS = 50  # fewer validation points than this: no calibration (factors 1)
FACTOR_RANGE = (0.1, 10.0)
LEVELS = (0.80, 0.95)


def conformal_factor(ratios: np.ndarray, level: float) -> float:
    """The split-conformal factor for ``level``: the ``ceil((n + 1) · level)``-th smallest of the
    ``n`` ratios (the largest when that rank exceeds ``n``)."""
    r = np.sort(np.asarray(ratios, np.float64))
    k = min(math.ceil((len(r) + 1) * level), len(r))
    return float(r[k - 1])


def level_ratios(
    y: np.ndarray, mean: np.ndarray, half_widths: dict[float, np.ndarray]
) -> dict[float, np.ndarray]:
    """Per level, ``|y - mean| / half_width`` of every point where all of them are finite and the
    half-widths positive: a point is covered at factor ``f`` when its ratio is ``<= f``.

    ``y``, ``mean`` (W, H) targets and forecasts; ``half_widths[level]`` (W, H) the current
    half-width of the central ``level`` interval.
    """
    err = np.abs(np.asarray(y, np.float64) - np.asarray(mean, np.float64)).ravel()
    hws = {lv: np.asarray(half_widths[lv], np.float64).ravel() for lv in LEVELS}
    ok = np.isfinite(err)
    for hw in hws.values():
        ok &= np.isfinite(hw) & (hw > 0)
    return {lv: err[ok] / hws[lv][ok] for lv in LEVELS}


def coverage(ratios: dict[float, np.ndarray], factors: dict[float, float]) -> dict[str, float]:
    """Share of the points covered at each level's factor (keys ``coverage_80``, ...)."""
    return {_key(lv): float(np.mean(ratios[lv] <= factors[lv])) for lv in LEVELS}


def fit_interval_factors(
    ratios: dict[float, np.ndarray], mode: str = "conformal"
) -> tuple[dict[float, float], dict[str, Any]]:
    """The factor for each level's half-width from :func:`level_ratios`, and a summary. With
    fewer than ``MIN_POINTS`` points, or mode ``off``, every factor is 1."""
    if mode not in MODES:
        raise ValueError(f"calibration mode must be one of {MODES}, got {mode!r}")
    n = len(ratios[LEVELS[0]])
    ones = dict.fromkeys(LEVELS, 1.0)
    if n < MIN_POINTS or mode == "off":
        none = {_key(lv): None for lv in LEVELS}
        return ones, {"mode": mode, "points": n, "fitted": False, "factors": _keyed(ones),
                      "before": none, "after": none}  # fmt: skip
    fitted = {lv: float(np.clip(conformal_factor(ratios[lv], lv), *FACTOR_RANGE)) for lv in LEVELS}
    factors = {lv: max(f, 1.0) for lv, f in fitted.items()} if mode == "widen" else dict(fitted)
    info = {
        "mode": mode,
        "points": n,
        "fitted": True,
        "fitted_factors": _keyed(fitted),
        "factors": _keyed(factors),
        "before": coverage(ratios, ones),
        "after": coverage(ratios, factors),
    }
    return factors, info


def _key(level: float) -> str:
    return f"coverage_{round(level * 100)}"


def _keyed(factors: dict[float, float]) -> dict[str, float]:
    return {str(round(lv * 100)): f for lv, f in factors.items()}


def apply_factors(config: ModelConfig, factors: dict[float, float]) -> ModelConfig:
    """``config`` with the level factors folded into ``interval_scale`` and ``tail_scale``
    (module docstring). ``tail_scale`` is clipped to ``[TAIL_SCALE_MIN, 1000]``."""
    f80, f95 = factors[LEVELS[0]], factors[LEVELS[1]]
    tail = float(np.clip(config.tail_scale * f95 / f80, TAIL_SCALE_MIN, 1e3))
    return config.replace(
        interval_scale=round(config.interval_scale * f80, 6), tail_scale=round(tail, 6)
    )


@torch.no_grad()
def calibrate_intervals(
    net: nn.Module,
    dm: EventDataModule,
    config: ModelConfig,
    *,
    max_windows: int = CALIBRATION_MAX_WINDOWS,
    seed: int = 0,
    mode: str = "conformal",
) -> tuple[ModelConfig, dict[str, Any]]:
    """Fit the level factors on (at most ``max_windows`` random) validation windows and set them
    on ``net`` (an EventForecaster or ForecastNet) in place. Returns the new config and a summary
    for ``metrics.json`` (``calibration``: mode, factors, points, validation coverage before and
    after, the new ``interval_scale`` and ``tail_scale``)."""
    from train.evaluate import add_offsets, net_forecast

    ds = dm.sets[VAL]
    idx = np.arange(len(ds))
    if len(idx) > max_windows:
        idx = np.sort(np.random.default_rng(seed).choice(idx, max_windows, replace=False))
    x, y, _ = ds.arrays_for(idx)
    fc = add_offsets(net_forecast(net, x), ds.offsets_for(idx))
    half = {0.80: fc["upper_80"] - fc["mean"], 0.95: fc["upper_95"] - fc["mean"]}
    ratios = level_ratios(y, fc["mean"], half)
    factors, info = fit_interval_factors(ratios, mode)
    new = apply_factors(config, factors)
    set_config(net, new)
    if info["fitted"]:  # coverage with the factors as applied (rounded, tail_scale clipped)
        f80 = new.interval_scale / config.interval_scale
        info["after"] = coverage(
            ratios, {0.80: f80, 0.95: f80 * new.tail_scale / config.tail_scale}
        )
    info.update(interval_scale=new.interval_scale, tail_scale=new.tail_scale, windows=len(idx))
    log.info(
        "interval calibration (%s) on %d validation windows: factors 80/95 %s, "
        "coverage %s -> %s", mode, len(idx), info["factors"], info["before"], info["after"],
    )  # fmt: skip
    return new, info


def set_config(net: nn.Module, config: ModelConfig) -> None:
    """Give ``net`` (an EventForecaster or ForecastNet) a new config of the same architecture
    (only the calibration fields may differ from the current one's graph-relevant fields)."""
    inner = forecast_net(net)
    inner.config = config
    if inner is not net:
        net.config = config  # type: ignore[assignment]
        hp = getattr(net, "hparams", None)
        if hp is not None and "config" in hp:
            hp["config"] = config.to_dict()
