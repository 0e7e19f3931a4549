"""Held-out replay of the worker's online interval calibration (``report["online_calibration"]``).

The worker can widen or narrow each series' intervals by what the stream has shown so far
(``--interval-calibration online``, :mod:`stream.calibration`). This module replays the held-out
part of a data set through the *same* rule (one :class:`stream.calibration.OnlineCalibrator`, fed
through :meth:`~stream.calibration.OnlineCalibrator.calibrate_batch` as the worker feeds it) and
scores the intervals it publishes beside the model's own (static) ones.

The replay, as the worker would see the held-out part:

- One calibrator for the whole data set, as if every series were in one input partition. Its
  state starts empty: each series' first held-out point is a new series (index 0), which starts
  from the partition prior; the prior starts at factor 1 and learns from every series' scores.
- Each held-out window is a forecast made at its *origin*, the newest input point (flat index
  ``start + T - 1``): that point is an accepted point, observed just before the forecast, and the
  model's forecast on the window is the row calibrated at its offset.
- Points between two held-out origins of a series: when the next origin is ``d`` points after the
  previous one, the points fed in between are the previous window's first ``min(d, H)`` targets
  (for consecutive windows, ``d = 1``, that is just the next origin). The points further than
  ``H`` after the previous origin and before the next one (the rest of a gap: windows dropped for
  a missing season of history, or a time gap that ends a segment) are not fed; the next origin
  follows. This is exact: every step-``h`` score the rule applies pairs a forecast with its real
  step-``h`` actual, and a forecast is only ever scored by its own ``H`` targets, so points past
  those would change nothing but the point count. What the replay lacks against a live worker is
  the scores of forecasts made at points that are not held-out origins (the worker forecasts
  every point); in a gap-free held-out part there are none.
- All points of all series are fed in time order (ties by series number, then position), the
  offset of each being its rank in that order; the series' state is kept across gaps, as the
  worker keeps it (it does not restart a series on a time gap).

Scores (:func:`train.metrics.score` on the same (W, H) points for both): MAE, MASE and sMAPE
(equal for both: the rule changes no mean), the weighted quantile loss, coverage at 80 % and 95 %,
and the mean width of each interval. For the calibrated forecast's quantiles the model's quantile
offsets from its mean are scaled, per side, by the factor the rule applied to that side's 80 %
half-width: ``q_online = mean + (q_model − mean) · (half80_online / half80_model)`` (levels below
0.5 by the lower half, above by the upper, the median unchanged). The 0.1 and 0.9 quantiles are
then exactly the calibrated 80 % bounds, and the inner levels move with them as the rule treats
the whole forecast distribution: a scale around the mean. (The 95 % bounds are no level of the
loss, 0.025 and 0.975, so they enter the coverage and width only.)

``quarters``: the held-out windows in replay (time) order cut into four contiguous parts of
(near) equal window counts, each scored alone; the first holds the rule's warm-up from the prior.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from model.predictor import Forecast
from stream.calibration import (
    DELAY_POWER,
    LEVEL_RATE,
    LEVELS,
    LOG_FACTOR_RANGE,
    PRIOR_RATE,
    RATE,
    OnlineCalibrator,
)
from train.metrics import QUANTILE_LEVELS, score

if TYPE_CHECKING:
    from train.evaluate import HeldOut

QUARTERS = 4
INTERVAL_KEYS = ("lower_80", "upper_80", "lower_95", "upper_95")
_CLAMP_TOL = 1e-4  # a log-factor this close to a clamp bound counts as "at the clamp"


def replay_events(
    ho: HeldOut,
) -> tuple[list[tuple[int, str, int, float]], np.ndarray, list[str], np.ndarray]:
    """The held-out part as the worker would see it (module docstring): ``(points, rows,
    row_series, row_offsets)`` — the accepted points ``(offset, series_id, index_in_series,
    value)`` in offset order, and for each forecast, in replay order, its window number, its
    series id and the offset of its origin point."""
    t, h = ho.config.sequence_length, ho.config.horizon
    arrays = ho.arrays
    values = np.asarray(arrays.values)
    times = np.asarray(arrays.ts)
    origin = ho.starts.astype(np.int64) + t - 1
    # Flat indices are series-major and in time order within a series: consecutive sorted
    # origins of one series are a series' consecutive held-out origins.
    o = np.sort(origin)
    o_series = np.searchsorted(arrays.starts, o, side="right") - 1
    pair = o_series[1:] == o_series[:-1]
    first = o[:-1][pair] + 1  # the previous origin's targets: its first min(d, H)
    count = np.minimum(np.diff(o)[pair], h)
    step = np.arange(int(count.sum()), dtype=np.int64) - np.repeat(np.cumsum(count) - count, count)
    fed = np.unique(np.concatenate([o, np.repeat(first, count) + step]))
    ser = np.searchsorted(arrays.starts, fed, side="right") - 1
    _, head, n = np.unique(ser, return_index=True, return_counts=True)
    pos = np.arange(len(fed), dtype=np.int64) - np.repeat(head, n)  # 0: the series' first point
    order = np.lexsort((fed, times[fed]))  # time, then series and position (flat order)
    offset_of = np.empty(len(fed), np.int64)
    offset_of[order] = np.arange(len(fed), dtype=np.int64)
    ids = arrays.ids
    points = [
        (int(offset_of[k]), ids[int(ser[k])], int(pos[k]), float(values[fed[k]]))
        for k in order.tolist()
    ]
    row_off = offset_of[np.searchsorted(fed, origin)]
    rows = np.argsort(row_off, kind="stable")
    return points, rows, [ids[int(ho.series[r])] for r in rows.tolist()], row_off[rows]


def online_forecasts(
    ho: HeldOut, fc: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Replay the held-out part through one :class:`~stream.calibration.OnlineCalibrator` and
    return ``(calibrated, step1_factors, order)``: the calibrated forecast arrays by window (the
    keys of ``fc`` that the rule changes: ``lower_80 … upper_95``, ``std``, ``quantiles``, plus
    ``mean``), each window's step-1 factors (W, L; the mean of its two sides') and the windows
    in replay order (W,)."""
    points, rows, row_series, row_offsets = replay_events(ho)
    h = ho.config.horizon
    model = Forecast.from_outputs(
        [fc[k][rows] for k in ("mean", "std", "lower_80", "upper_80", "lower_95", "upper_95")]
    )
    cal = OnlineCalibrator(h, max(h, 1))
    got, f1 = cal.calibrate_batch(points, row_series, row_offsets, model)
    w = len(rows)
    out: dict[str, np.ndarray] = {"mean": fc["mean"]}
    factors = np.empty((w, len(LEVELS)), np.float64)
    factors[rows] = f1
    for lv in LEVELS:
        for side, bounds in (("lower", got.lower), ("upper", got.upper)):
            arr = np.empty((w, h), np.float64)
            arr[rows] = bounds[lv]
            out[f"{side}_{lv}"] = arr
    std = np.empty((w, h), np.float64)
    std[rows] = got.std
    out["std"] = std
    if "quantiles" in fc:
        out["quantiles"] = scaled_quantiles(fc, out)
    return out, factors, rows


def scaled_quantiles(fc: dict[str, np.ndarray], online: dict[str, np.ndarray]) -> np.ndarray:
    """The model's quantiles (W, H, 9) scaled around its mean by the rule's 80 % factor, per side
    (module docstring): the 0.1 and 0.9 quantiles become the calibrated 80 % bounds."""
    mean = fc["mean"]
    ratio = {}
    for side, sign in (("lower", -1.0), ("upper", 1.0)):
        model_half = sign * (fc[f"{side}_80"] - mean)
        online_half = sign * (online[f"{side}_80"] - mean)
        ratio[side] = np.divide(online_half, model_half, out=np.ones_like(mean),
                                where=model_half > 0)  # fmt: skip
    q = np.array(fc["quantiles"], np.float64, copy=True)
    for i, lv in enumerate(QUANTILE_LEVELS):
        if lv != 0.5:
            r = ratio["lower"] if lv < 0.5 else ratio["upper"]
            q[..., i] = mean + (q[..., i] - mean) * r
    return q


def score_block(
    y: np.ndarray, f: dict[str, np.ndarray], scale: np.ndarray, sel: np.ndarray | slice
) -> dict[str, Any]:
    """:func:`train.metrics.score` of the rows ``sel`` plus the mean width of each interval."""
    sub = {k: v[sel] for k, v in f.items()}
    out: dict[str, Any] = score(
        y[sel], sub["mean"], scale[sel], quantiles=sub.get("quantiles"),
        lower={"80": sub["lower_80"], "95": sub["lower_95"]},
        upper={"80": sub["upper_80"], "95": sub["upper_95"]},
    )  # fmt: skip
    for lv in LEVELS:
        width = float(np.mean(sub[f"upper_{lv}"] - sub[f"lower_{lv}"])) if y[sel].size else math.nan
        out[f"width_{lv}"] = width if math.isfinite(width) else None
    return out


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(float(ts), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def online_calibration_report(ho: HeldOut, fc: dict[str, np.ndarray]) -> dict[str, Any]:
    """``report["online_calibration"]``: the rule's constants, the ``static`` (model) and
    ``online`` (replayed) scores overall, the same per time quarter, and how the step-1 factors
    ended (mean factor per level, share of forecasts at a clamp bound)."""
    online, f1, order = online_forecasts(ho, fc)
    t = ho.config.sequence_length
    static = {k: fc[k] for k in ("mean", *INTERVAL_KEYS, "quantiles") if k in fc}
    quarters = []
    for part in np.array_split(order, QUARTERS):
        if not len(part):
            continue
        origin_ts = ho.ts[part, t - 1]
        quarters.append({
            "from": _iso(origin_ts.min()), "to": _iso(origin_ts.max()), "windows": len(part),
            "static": score_block(ho.y, static, ho.scale, part),
            "online": score_block(ho.y, online, ho.scale, part),
        })  # fmt: skip
    log_f = np.log(f1)
    lo, hi = LOG_FACTOR_RANGE
    return {
        "rule": {
            "rate": RATE,
            "rate_of_step_h": f"rate / h ** {DELAY_POWER}",
            "rate_of_level": dict(zip(LEVELS, LEVEL_RATE, strict=True)),
            "sides": "a factor per side (lower, upper), each aiming at half the level's misses",
            "levels": "the 95 % factor is the 80 % factor times a learnt ratio",
            "prior_rate": PRIOR_RATE,
            "factor_range": [math.exp(lo), math.exp(hi)],
            "replay": "one calibrator, held-out origins in time order, each series from the prior",
        },
        "windows": len(order),
        "static": score_block(ho.y, static, ho.scale, slice(None)),
        "online": score_block(ho.y, online, ho.scale, slice(None)),
        "quarters": quarters,
        "step1_factor": {
            lv: {
                "mean": float(np.mean(f1[:, i])),
                "last": float(f1[order[-1], i]),
                "at_clamp": float(
                    np.mean((log_f[:, i] <= lo + _CLAMP_TOL) | (log_f[:, i] >= hi - _CLAMP_TOL))
                ),
            }
            for i, lv in enumerate(LEVELS)
        },
    }


def summary_lines(block: dict[str, Any]) -> list[str]:
    """Human lines for ``worker evaluate``'s stderr: coverage, width and wQL, static vs online,
    overall and per quarter."""

    def fmt(m: dict[str, Any]) -> str:
        def pct(v: float | None) -> str:
            return "  -  " if v is None else f"{100 * v:5.1f}"

        def num(v: float | None) -> str:
            return "-" if v is None else f"{v:.4g}"

        return (f"cov80 {pct(m['coverage_80'])} cov95 {pct(m['coverage_95'])} "
                f"width80 {num(m['width_80'])} width95 {num(m['width_95'])} "
                f"wql {num(m['wql'])}")  # fmt: skip

    lines = [f"online interval calibration (rate {block['rule']['rate']}, "
             f"{block['windows']} held-out windows in time order):"]  # fmt: skip
    for name in ("static", "online"):
        lines.append(f"  {name:<7} all        {fmt(block[name])}")
    for i, q in enumerate(block["quarters"], 1):
        for name in ("static", "online"):
            lines.append(f"  {name:<7} quarter {i}  {fmt(q[name])}")
    return lines
