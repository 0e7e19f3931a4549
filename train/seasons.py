"""The retrain's seasonal memory: which seasons a model keeps per series, and their coefficients.

``--seasons auto`` takes the data's seasons from its median spacing — the ones the MSTL peer
models (:func:`train.peers.mstl_seasons`: a day and a week for sub-daily data, a week and a year
for daily data, a year for weekly and monthly data) — and keeps those the data can teach: at most
:data:`model.seasonal.MAX_SEASON` steps, and a longest season whose warm-up (one whole cycle)
leaves at least as many training windows as it takes, and one without gaps in some series (a
season no series can warm up is dropped, the longest first); of those, the shortest, then each
longer one only while it makes the smoother's forecast of the training split over the horizon
better (a season the data do not have, a week of temperatures, only carries last week's weather
into the forecast: :func:`best_subset`); then only when that forecast beats persistence by
:data:`MIN_GAIN` on the training split. ``--seasons 48,336`` names
them (kept whatever that comparison says). Either
way the smoothing coefficients are fitted on the training split, per model, for the model's
horizon (:func:`model.seasonal.fit_coefficients`); the result is stored in the version's config,
which the worker reads.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from model.config import ModelConfig
from model.errors import ConfigError
from model.seasonal import MAX_SEASON, SeasonalFit, fit_coefficients
from train.data import TRAIN, SeriesArrays

log = logging.getLogger(__name__)

# ``auto`` keeps the seasons only when their smoother's own forecast over the horizon is at least
# 20 % better than persistence on the training split. Taking the seasons out of the network's
# input adds their estimation noise to every window: where they explain little (sea-temp at h1,
# glucose, co2 at h1: ratios 1.15, 1.43, 0.89) the hybrid lost to the plain network on the
# held-out split; where they explain much (sf-temps, taylor, co2 at h24: 0.02–0.25) it won. The
# bound was read off those measurements (docs/training.md, "Seasonal memory").
MIN_GAIN = 0.8


def training_series(arrays: SeriesArrays) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(ts, values)`` of each series' training part, in time order."""
    split = np.asarray(arrays.split)
    out = []
    for s, n in zip(arrays.starts.tolist(), arrays.lengths.tolist(), strict=True):
        train = np.flatnonzero(split[s : s + n] == TRAIN)
        if len(train):
            part = slice(s, s + int(train[-1]) + 1)
            out.append((np.asarray(arrays.ts[part]), np.asarray(arrays.values[part])))
    return out


def learnable(seasons: list[int], series: list[tuple[np.ndarray, np.ndarray]]) -> list[int]:
    """The seasons a model can learn from these training series: each at most MAX_SEASON, and
    the longest series at least twice the longest season (one cycle to warm up, one to train)."""
    longest = max((len(v) for _, v in series), default=0)
    return [m for m in seasons if m <= MAX_SEASON and 2 * m <= longest]


def best_subset(
    series: list[tuple[np.ndarray, np.ndarray]], seasons: list[int], spacing: float, horizon: int
) -> tuple[SeasonalFit, list[dict[str, Any]]]:
    """The shortest of ``seasons`` alone, then with each longer one added in turn: the one of
    these whose fitted smoother has the least MAE over the horizon on the training series (the
    fewer seasons on a tie), every one scored on the same points (those after the warm-up of all
    of ``seasons``); and each one's fit, for ``metrics.json``. A longer season is thus kept only
    when it forecasts better than the shorter ones without it. ValueError when no series warms
    up all of ``seasons`` (a gap-free cycle of the longest)."""
    fits = [
        fit_coefficients(series, seasons[:k], spacing, horizon, warm_seasons=seasons)
        for k in range(1, len(seasons) + 1)
    ]
    best = min(fits, key=lambda f: f.mae)  # (the first of equals: the fewer seasons)
    tried = [{"seasons": list(f.spec.seasons), "smoother_mae": f.mae} for f in fits]
    return best, tried


def seasonal_config(
    arrays: SeriesArrays, config: ModelConfig, request: str | tuple[int, ...]
) -> tuple[ModelConfig, dict[str, Any]]:
    """``config`` with the requested seasons resolved and their coefficients fitted (unchanged
    for ``()``), and what ``metrics.json`` records of it."""
    if request == ():
        return config, {"seasons": [], "reason": "none requested (--seasons none, the default)"}
    from train.peers import mstl_seasons

    spacing = float(np.median(arrays.spacing))
    series = training_series(arrays)
    wanted = mstl_seasons(spacing) if request == "auto" else list(request)
    seasons = learnable(wanted, series)
    info: dict[str, Any] = {"requested": request, "data_seasons": wanted, "spacing_s": spacing}
    if request != "auto" and seasons != wanted:
        raise ConfigError(
            f"--seasons: {wanted} cannot be learnt from this data (each season at most "
            f"{MAX_SEASON} steps, and a training series twice the longest): use {seasons or 'none'}"
        )
    if not seasons:
        info.update(seasons=[], reason="no season the data can teach: the plain network")
        log.info("seasons: none (data seasons %s at spacing %gs)", wanted, spacing)
        return config, info
    start = time.monotonic()
    while True:
        try:
            if request == "auto":
                (spec, mae, persistence), tried = best_subset(
                    series, seasons, spacing, config.horizon
                )
                info["subsets"] = tried
            else:
                spec, mae, persistence = fit_coefficients(series, seasons, spacing, config.horizon)
            break
        except ValueError as exc:  # no series has a gap-free cycle of the longest season
            if request != "auto":
                raise ConfigError(f"--seasons: {seasons}: {exc}") from exc
            log.info("seasons %s: %s; trying without %d", seasons, exc, seasons[-1])
            info.setdefault("dropped", []).append({"season": seasons[-1], "why": str(exc)})
            seasons = seasons[:-1]
            if not seasons:
                info.update(seasons=[], reason="no season has a gap-free cycle in the training "
                            "split: the plain network")  # fmt: skip
                return config, info
    seasons = list(spec.seasons)
    info.update(
        seasons=seasons, alpha=spec.alpha, gammas=list(spec.gammas), smoother_mae=mae,
        persistence_mae=persistence, seconds=round(time.monotonic() - start, 1),
    )  # fmt: skip
    if request == "auto" and mae > MIN_GAIN * persistence:
        info.update(
            seasons=[],
            reason=f"the seasons' own forecast is not {1 - MIN_GAIN:.0%} better than persistence "
            f"on the training split ({mae:.6g} vs {persistence:.6g}): the plain network",
        )  # fmt: skip
        log.info("seasons: none (%s)", info["reason"])
        return config, info
    log.info(
        "seasons %s at spacing %gs: alpha %g, gammas %s (the smoother's own %d-step MAE %.6g on "
        "the training split)", seasons, spacing, spec.alpha, list(spec.gammas), config.horizon, mae,
    )  # fmt: skip
    return config.replace(
        seasons=list(spec.seasons), season_spacing_s=spacing, season_alpha=spec.alpha,
        season_gammas=list(spec.gammas),
    ), info  # fmt: skip
