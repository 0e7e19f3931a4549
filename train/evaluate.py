"""Held-out evaluation: the network beside persistence, seasonal naive and a linear AR model.

The held-out set is every test window (all ``H`` targets in the last ``test_fraction`` of their
series, see :mod:`train.data`) for which the seasonal naive forecast is defined, i.e. one season
of gap-free history exists before each target. Every method is scored on exactly these windows,
so on identical (series, ts, step) points. When *no* test window has a season of history (short
data: 10 hours of minute data and a one-day season), the seasonal naive baseline is reported as
unavailable, with the reason, and every test window is scored: a baseline that cannot be computed
never stops a retrain. The report is the JSON of docs/contract.md
(``version, points, horizon, metrics{model, persistence, seasonal_naive}``) with more fields:
``linear_ar`` in ``metrics``, MAE per forecast step, ratios against the best available naive
method and the quality targets of docs/design.md, and (``peers``, opt-in) the statsforecast
models of :mod:`train.peers` on the same windows.

An unavailable method keeps its metrics object, every number ``null``, plus ``"available":
false`` and ``"reason"``; the report's ``unavailable`` map lists the same reasons by method.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from train.peers import PeerSettings

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
    # method -> why it has no forecast on these windows (e.g. no season of history)
    unavailable: dict[str, str] = field(default_factory=dict)
    # (W, H) added back onto the network's forecast (a model with seasons; zeros otherwise)
    offsets: np.ndarray | None = None

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

    Raises ConfigError when there is no test window at all. When no test window has a full season
    of history (series too short, or ``--season`` too long for them), every test window is kept
    and ``unavailable["seasonal_naive"]`` says why.
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
    unavailable: dict[str, str] = {}
    if not valid.any():
        unavailable["seasonal_naive"] = (
            f"no held-out window has {m} steps (one season) of gap-free history before its "
            f"targets; every one of the {len(starts)} held-out windows is scored without it "
            "(a shorter --season makes it available)"
        )
        log.warning("seasonal naive baseline unavailable: %s", unavailable["seasonal_naive"])
        valid[:] = True
    dropped = int((~valid).sum())
    if dropped:
        log.info("%d held-out windows lack a season of history and are not scored", dropped)
    starts = starts[valid]
    ws = WindowSet(arrays, starts, config)
    x, y, ts = ws.arrays_for(np.arange(len(starts)))
    series = np.searchsorted(arrays.starts, starts, side="right") - 1
    scale = baselines.naive_scale(arrays, m)[series]
    return HeldOut(arrays, config, m, starts, x, y.astype(np.float64), ts, series, scale,
                   unavailable, ws.offsets_for(np.arange(len(starts))))  # fmt: skip


def add_offsets(fc: dict[str, np.ndarray], offsets: np.ndarray | None) -> dict[str, np.ndarray]:
    """The forecast ``fc`` of :func:`net_forecast` moved by ``offsets`` (W, H): a model with
    seasons forecasts what the seasons leave, and its forecast is that plus their part."""
    if offsets is None or not np.any(offsets):
        return fc
    out = dict(fc)
    for k in ("mean", "lower_80", "upper_80", "lower_95", "upper_95"):
        out[k] = fc[k] + offsets
    if "quantiles" in fc:
        out["quantiles"] = fc["quantiles"] + offsets[..., None]
    return out


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


NAIVE = ("persistence", "seasonal_naive")
METRIC_KEYS = ("mae", "mase", "smape", "wql", "coverage_80", "coverage_95")


def unavailable_metrics(reason: str) -> dict[str, Any]:
    """The metrics object of a method that has no forecast: every number None, and why."""
    return {**dict.fromkeys(METRIC_KEYS), "available": False, "reason": reason}


def score_forecast(y: np.ndarray, f: dict[str, np.ndarray], scale: np.ndarray) -> dict[str, Any]:
    """:func:`train.metrics.score` of one method's forecast arrays (``mean``, and when it has them
    ``quantiles`` (W, H, 9) and ``lower_80 / upper_80 / lower_95 / upper_95``)."""
    has_iv = all(k in f for k in ("lower_80", "upper_80", "lower_95", "upper_95"))
    return score(
        y,
        f["mean"],
        scale,
        quantiles=f.get("quantiles"),
        lower={"80": f["lower_80"], "95": f["lower_95"]} if has_iv else None,
        upper={"80": f["upper_80"], "95": f["upper_95"]} if has_iv else None,
    )


def baseline_forecasts(
    arrays: SeriesArrays, ho: HeldOut, *, linear_ar: bool = True
) -> dict[str, dict[str, np.ndarray]]:
    """The reference forecasts on the held-out windows, by method (the unavailable ones left out):
    each a dict of (W, H) arrays as :func:`score_forecast` takes them."""
    t, h = ho.config.sequence_length, ho.config.horizon
    values = np.asarray(arrays.values)
    out: dict[str, dict[str, np.ndarray]] = {
        "persistence": {"mean": baselines.persistence(values, ho.starts, t, h)},
    }
    if "seasonal_naive" not in ho.unavailable:
        out["seasonal_naive"] = {
            "mean": baselines.seasonal_naive(values, ho.starts, t, h, ho.season)
        }
    if linear_ar:
        raw = values[ho.starts[:, None] + np.arange(t)]  # the raw windows (a model with
        out["linear_ar"] = fit_linear_ar(arrays, ho.config).predict(raw)  # seasons sees less)
    return out


def score_methods(
    y: np.ndarray,
    forecasts: dict[str, dict[str, np.ndarray]],
    scale: np.ndarray,
    unavailable: dict[str, str],
    rows: np.ndarray | None = None,
) -> tuple[dict[str, Any], dict[str, list[float] | None]]:
    """``(metrics, per_step_mae)`` of every method on the same points (``rows``: a subset of the
    windows, default all); an unavailable method gets :func:`unavailable_metrics`."""
    sel = slice(None) if rows is None else rows
    metrics: dict[str, Any] = {}
    steps: dict[str, list[float] | None] = {}
    for name, f in forecasts.items():
        sub = {k: v[sel] for k, v in f.items()}
        metrics[name] = score_forecast(y[sel], sub, scale[sel])
        steps[name] = per_step_mae(y[sel], sub["mean"])
    for name, reason in unavailable.items():
        metrics[name] = unavailable_metrics(reason)
        steps[name] = None
    return metrics, steps


def available(metrics: dict[str, Any], name: str) -> bool:
    m = metrics.get(name)
    return m is not None and m.get("available", True) and m.get("mae") is not None


def quality_check(report: dict[str, Any]) -> dict[str, Any]:
    """docs/design.md's table applied to a report: the model's MAE over the better *available*
    naive baseline's (≤ 0.9 at horizon 1, ≤ 0.7 beyond) and coverage within ±5 points of 80 %
    and 95 %. Persistence is always available."""
    m = report["metrics"]
    best_name = min((k for k in NAIVE if available(m, k)), key=lambda k: m[k]["mae"])
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
    unavailable = [k for k in NAIVE if not available(m, k)]
    if unavailable:
        out["naive_unavailable"] = unavailable
    if available(m, "linear_ar"):
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
    peers: PeerSettings | None = None,
    versus: dict[str, dict[str, np.ndarray]] | None = None,
) -> tuple[dict[str, Any], HeldOut, dict[str, np.ndarray]]:
    """Score ``net`` and the baselines on the held-out windows.

    Returns ``(report, held_out, model_forecasts)``; the report is JSON-able (no NaN: undefined
    numbers are None). Pass ``holdout`` to reuse windows already built for the same config;
    ``peers`` adds the statsforecast models (``report["peers"]``, see :mod:`train.peers`);
    ``versus``, other forecasts of the same windows by name (other versions, e.g. the plain
    network beside a hybrid), scored as methods.

    Every method's forecast is first a dict of (W, H) arrays (``forecasts[name]``, the model's
    under ``"model"``), then scored by :func:`score_methods` on the same rows.
    """
    ho = holdout if holdout is not None else held_out(arrays, config, season)
    t, h = config.sequence_length, config.horizon
    fc = add_offsets(net_forecast(net, ho.x), ho.offsets)
    forecasts = {
        "model": fc,
        **(versus or {}),
        **baseline_forecasts(arrays, ho, linear_ar=linear_ar),
    }
    metrics, steps = score_methods(ho.y, forecasts, ho.scale, ho.unavailable)
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
    if ho.unavailable:
        report["unavailable"] = dict(ho.unavailable)
    if peers is not None and peers.origins > 0:
        from train.peers import peer_report

        report["peers"] = peer_report(arrays, ho, forecasts, peers)
    # The worker's online interval calibration replayed on the held-out part (issue 17)
    from train.online_eval import online_calibration_report

    report["online_calibration"] = online_calibration_report(ho, fc)
    report["quality"] = quality_check(report)
    return report, ho, fc
