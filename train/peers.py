"""statsforecast peers of ``worker evaluate``: AutoETS and MSTL on the held-out windows.

Only ``worker evaluate`` runs them (``--peer-origins``, default :data:`DEFAULT_ORIGINS`); the
retrain never does (it stays fast) and the worker never imports statsforecast.

For each series, each peer is fitted once on the series' training part (every point up to its
last training point, gaps ignored: the values are taken as consecutive) and then rolled forward
one forecast origin at a time **without refitting**: ``model.forward(y=history, h=H, level=[80,
95])`` applies the fitted parameters to the history up to the window's last input (AutoETS
re-runs its filter from the fitted initial state; MSTL re-decomposes the history, then forwards
its fitted trend model). The origins are the held-out windows of :mod:`train.evaluate` — all of
them, or an evenly spread subsample when there are more than ``--peer-origins`` — and every other
method (the network, the naive baselines, the linear AR) is scored again on exactly those
windows, so the side-by-side table compares identical (series, ts, step) points.

- AutoETS: ``AutoETS(season_length=m)`` with ``m`` the evaluation season (``--season``, or one
  day / week / year at the data's spacing, :func:`train.baselines.infer_season`) when ``m <= 24``;
  statsforecast's ETS has no seasonal state beyond 24, so for longer seasons it is non-seasonal
  (``season_length=1``) and the report says so.
- MSTL: ``MSTL(season_length=[...], trend_forecaster=AutoETS(model="ZZN"))`` with the data's
  seasons (:func:`mstl_seasons`: hourly 24 and 168, half-hourly 48 and 336, daily 7 and 365,
  weekly 52, monthly 12, ...), each kept only when the training part holds two full cycles and
  four cycles are at most 2 000 steps (a week of 5-minute data is left out). Its ``forward`` gets
  the last four cycles of the longest season, not the whole history (:data:`MSTL_CONTEXT_CYCLES`),
  with its trend model's initial level moved to that context's start (:meth:`_Peer.forward`).
- Intervals: statsforecast's own 80 % and 95 % ones. They are Gaussian (mean ± z·σ), so the
  quantiles 0.1 … 0.9 that the weighted quantile loss needs are those of the normal distribution
  whose 0.1 and 0.9 quantiles are the 80 % interval's ends (exact for these models' intervals).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from train import baselines
from train.data import TRAIN, SeriesArrays

if TYPE_CHECKING:
    from train.evaluate import HeldOut

log = logging.getLogger(__name__)

DEFAULT_ORIGINS = 300
METHODS = ("autoets", "mstl")
ETS_MAX_SEASON = 24
# MSTL re-decomposes its history at every origin: it gets the last 4 cycles of its longest season
# (STL needs 2), and seasons whose 4 cycles exceed 2 000 steps are left out (STL of 4 weeks of
# 5-minute data, period 2 016, takes ~20 s per origin on one core; a 24/168 pair on 672 ~0.15 s).
MSTL_CONTEXT_CYCLES = 4
MSTL_MAX_CONTEXT = 2_000
LEVELS = (80, 95)
HOUR, DAY = 3600.0, 86_400.0


@dataclass(frozen=True)
class PeerSettings:
    """``origins``: how many held-out windows (evenly spread) the peers forecast; 0 turns them
    off, a number >= the windows takes them all. ``methods``: which peers."""

    origins: int = DEFAULT_ORIGINS
    methods: tuple[str, ...] = METHODS


def mstl_seasons(spacing_s: float) -> list[int]:
    """The data's seasons in steps: a day and a week for sub-daily data, a week and a year for
    daily data, a year for weekly and monthly data; [] when none is known."""
    if not math.isfinite(spacing_s) or spacing_s <= 0:
        return []
    if spacing_s < DAY * 0.9:
        day = max(1, round(DAY / spacing_s))
        return [day, 7 * day] if day > 1 else [7 * day]
    if abs(spacing_s - DAY) <= 0.1 * DAY:
        return [7, 365]
    m = baselines.infer_season(spacing_s)
    return [m] if m > 1 else []


def peer_rows(windows: int, origins: int) -> np.ndarray:
    """Indices of the windows the peers forecast: all, or ``origins`` evenly spread ones."""
    if origins >= windows:
        return np.arange(windows)
    return np.unique(np.round(np.linspace(0, windows - 1, origins)).astype(np.int64))


def _series_parts(arrays: SeriesArrays, i: int) -> tuple[int, int, np.ndarray]:
    """``(start, train_end, values)`` of series ``i``: flat start index, the exclusive end of its
    training part relative to the start, and its values."""
    s, n = int(arrays.starts[i]), int(arrays.lengths[i])
    spl = np.asarray(arrays.split)[s : s + n]
    train = np.flatnonzero(spl == TRAIN)
    end = int(train[-1]) + 1 if len(train) else 0
    return s, end, np.asarray(arrays.values, dtype=np.float64)[s : s + n]


def _gaussian(mean: np.ndarray, lo80: np.ndarray, hi80: np.ndarray) -> np.ndarray:
    """(…, 9) quantiles at train.metrics.QUANTILE_LEVELS of the normal distribution with this
    mean whose 0.1 / 0.9 quantiles are the 80 % interval's ends."""
    std = np.maximum((hi80 - lo80) / (2.0 * baselines.Z80), 0.0)
    return baselines.gaussian_quantiles(mean, std)


class _Peer:
    """One peer method: its statsforecast model per series, and what the report says of it."""

    def __init__(self, name: str, spacing_s: float, season: int) -> None:
        self.name = name
        self.spacing_s = spacing_s
        self.season = season
        if name == "autoets":
            self.season_used = season if 1 < season <= ETS_MAX_SEASON else 1
            self.info: dict[str, Any] = {"model": "AutoETS", "season_length": self.season_used}
            if season > ETS_MAX_SEASON:
                self.info["note"] = (
                    f"the data's season {season} is over {ETS_MAX_SEASON}, which statsforecast's "
                    "ETS cannot model: non-seasonal"
                )
        elif name == "mstl":
            known = mstl_seasons(spacing_s)
            self.seasons = [m for m in known if MSTL_CONTEXT_CYCLES * m <= MSTL_MAX_CONTEXT]
            self.info = {"model": "MSTL", "season_length": list(self.seasons),
                         "trend_forecaster": "AutoETS(model='ZZN')"}  # fmt: skip
            if self.seasons:
                self.info["context"] = MSTL_CONTEXT_CYCLES * max(self.seasons)
            left_out = [m for m in known if m not in self.seasons]
            if left_out:
                self.info["note"] = (
                    f"seasons {left_out} left out: {MSTL_CONTEXT_CYCLES} cycles exceed "
                    f"{MSTL_MAX_CONTEXT} steps (STL too slow to re-decompose at every origin)"
                )
        else:
            raise ValueError(f"unknown peer {name!r} (known: {', '.join(METHODS)})")

    def model(self, n_train: int) -> tuple[Any, str | None]:
        """A fresh statsforecast model for a series with ``n_train`` training points, or
        ``(None, reason)`` when it cannot be fitted on them."""
        from statsforecast.models import MSTL, AutoETS

        if self.name == "autoets":
            m = self.season_used if n_train >= 2 * self.season_used + 4 else 1
            if n_train < 4:
                return None, f"{n_train} training points"
            return AutoETS(season_length=m), None
        seasons = [m for m in self.seasons if n_train >= 2 * m + 1]
        if not seasons:
            want = f"seasons {self.seasons}" if self.seasons else "a usable season"
            return None, f"{n_train} training points: not two full cycles of {want}"
        return MSTL(season_length=seasons, trend_forecaster=AutoETS(model="ZZN")), None

    def forward(self, model: Any, y: np.ndarray, h: int) -> dict[str, np.ndarray]:
        """``model.forward(y, h, level=[80, 95])`` with the fitted parameters. For MSTL, whose
        ``y`` is only the last cycles (:meth:`context`), its trend model's initial level is first
        moved to the mean of ``y``'s first cycle: the fitted one belongs to the start of the
        training part, and filtering from it would turn the jump into residuals that inflate the
        interval (co2: 80 % intervals ~7× wider than a forward over the whole history; with the
        start moved, within ~10 % of it). Smoothing parameters and the other states stay."""
        if self.name != "mstl":
            return dict(model.forward(y=y, h=h, level=list(LEVELS)))
        trend = model.trend_forecaster.model_
        fitted_par = trend["par"]
        par = np.array(fitted_par, dtype=np.float64)
        if len(par) > 4:  # alpha, beta, gamma, phi, then the initial level (forecast::ets order)
            par[4] = float(np.mean(y[: max(model.season_length)]))
        trend["par"] = par
        try:
            return dict(model.forward(y=y, h=h, level=list(LEVELS)))
        finally:
            trend["par"] = fitted_par

    def context(self, model: Any) -> int | None:
        """How much history ``forward`` gets (None: all of it)."""
        if self.name == "mstl":
            return MSTL_CONTEXT_CYCLES * max(model.season_length)
        return None


def peer_forecasts(
    arrays: SeriesArrays, ho: HeldOut, rows: np.ndarray, name: str
) -> tuple[dict[str, np.ndarray] | None, dict[str, Any]]:
    """``(forecasts, info)`` of peer ``name`` on held-out windows ``rows``: forecast arrays
    (len(rows), H) as :func:`train.evaluate.score_forecast` takes them, or None with
    ``info["reason"]`` when the peer cannot forecast every one of these windows."""
    t, h = ho.config.sequence_length, ho.config.horizon
    peer = _Peer(name, float(np.median(arrays.spacing)), ho.season)
    info = dict(peer.info)
    k = len(rows)
    out = {key: np.full((k, h), np.nan) for key in ("mean", "lower_80", "upper_80",
                                                   "lower_95", "upper_95")}  # fmt: skip
    t0 = time.monotonic()
    fitted: dict[str, str] = {}
    fit_seconds = 0.0
    series_of_row = ho.series[rows]
    for i in np.unique(series_of_row):
        sid = str(arrays.ids[i])
        start, train_end, values = _series_parts(arrays, int(i))
        model, why = peer.model(train_end)
        if model is None:
            info["reason"] = f"series {sid}: {why}"
            return None, info
        f0 = time.monotonic()
        try:
            model.fit(values[:train_end])
        except Exception as exc:  # a peer that fails is reported, not fatal
            info["reason"] = f"series {sid}: fit failed: {type(exc).__name__}: {exc}"
            return None, info
        fit_seconds += time.monotonic() - f0
        fitted[sid] = _describe(model)
        ctx = peer.context(model)
        for r in np.flatnonzero(series_of_row == i):
            origin = int(ho.starts[rows[r]]) - start + t  # exclusive end of the history
            first = 0 if ctx is None else max(0, origin - ctx)
            try:
                fc = peer.forward(model, values[first:origin], h)
            except Exception as exc:  # as above
                info["reason"] = f"series {sid}: forward failed: {type(exc).__name__}: {exc}"
                return None, info
            out["mean"][r] = fc["mean"]
            for lv in LEVELS:
                out[f"lower_{lv}"][r] = fc[f"lo-{lv}"]
                out[f"upper_{lv}"][r] = fc[f"hi-{lv}"]
    if not all(np.isfinite(v).all() for v in out.values()):
        info["reason"] = "non-finite forecasts or intervals"
        return None, info
    out["quantiles"] = _gaussian(out["mean"], out["lower_80"], out["upper_80"])
    info["fitted"] = fitted
    info["seconds"] = {"fit": round(fit_seconds, 2),
                       "total": round(time.monotonic() - t0, 2)}  # fmt: skip
    return out, info


def _describe(model: Any) -> str:
    """The model statsforecast selected, e.g. ``ETS(A,Ad,A)`` or ``MSTL[24,168]+ETS(A,N,N)``."""
    inner = getattr(model, "model_", None)
    if isinstance(inner, dict) and "method" in inner:
        return str(inner["method"])
    trend = getattr(model, "trend_forecaster", None)
    if trend is not None:
        return f"MSTL{list(model.season_length)}+{_describe(trend)}"
    return type(model).__name__


def peer_report(
    arrays: SeriesArrays,
    ho: HeldOut,
    forecasts: dict[str, dict[str, np.ndarray]],
    settings: PeerSettings,
) -> dict[str, Any]:
    """The report's ``peers`` object: every method of ``forecasts`` (the network under
    ``model``, the baselines) and the peers, scored on the same windows."""
    from train.evaluate import score_methods

    rows = peer_rows(ho.windows, settings.origins)
    sub = {name: {k: v[rows] for k, v in f.items()} for name, f in forecasts.items()}
    unavailable = dict(ho.unavailable)
    models: dict[str, Any] = {}
    for name in settings.methods:
        log.info("peer %s on %d of %d held-out windows", name, len(rows), ho.windows)
        fc, info = peer_forecasts(arrays, ho, rows, name)
        models[name] = info
        if fc is None:
            unavailable[name] = info["reason"]
            log.warning("peer %s unavailable: %s", name, info["reason"])
        else:
            sub[name] = fc
            log.info("peer %s: %s", name, info["seconds"])
    metrics, steps = score_methods(ho.y[rows], sub, ho.scale[rows], unavailable)
    return {
        "windows": len(rows),
        "of_windows": ho.windows,
        "points": int(len(rows) * ho.config.horizon),
        "origins": "all held-out windows"
        if len(rows) == ho.windows
        else f"{len(rows)} evenly spread held-out windows (--peer-origins {settings.origins})",
        "models": models,
        "metrics": metrics,
        "per_step_mae": steps,
        "wql": "peers: from the normal quantiles their 80 % interval implies (statsforecast's "
        "ETS/MSTL intervals are Gaussian); naive baselines: none (no quantiles)",
    }
