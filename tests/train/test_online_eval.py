"""The held-out replay of online interval calibration (train/online_eval.py): it corrects a
model whose intervals are too narrow, and it is exactly the worker's rule fed in time order."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from model.config import ModelConfig
from model.network import ForecastNet
from model.predictor import Forecast
from stream.calibration import LEVELS, OnlineCalibrator, apply_factors
from train.data import SeriesArrays
from train.evaluate import HeldOut, evaluate, held_out
from train.metrics import QUANTILE_LEVELS
from train.online_eval import online_calibration_report, online_forecasts, summary_lines
from train.settings import SplitSettings

Z = {0.8: 1.2815516, 0.95: 1.959964}
QZ = np.array([-1.2815516, -0.8416212, -0.5244005, -0.2533471, 0.0,
               0.2533471, 0.5244005, 0.8416212, 1.2815516])  # fmt: skip


def walk_arrays(
    n_series: int, length: int, *, seed: int, gap_at: int | None = None, test_fraction: float = 0.4
) -> SeriesArrays:
    """Hourly random walks (unit steps, series of different levels); ``gap_at``: a 10-hour time
    gap in series 0 at that position (a new segment: held-out windows missing around it)."""
    rng = np.random.default_rng(seed)
    frames = []
    for s in range(n_series):
        ts = 3600.0 * np.arange(length) + 1800.0 * s  # series interleave in time
        if gap_at is not None and s == 0:
            ts[gap_at:] += 10 * 3600.0
        values = 100.0 * s + np.cumsum(rng.normal(0, 1, length))
        frames.append(pd.DataFrame({"series_id": f"s{s}", "ts": ts, "value": values}))
    return SeriesArrays.from_frame(
        pd.concat(frames, ignore_index=True), settings=SplitSettings(test_fraction=test_fraction)
    )


def walk_forecast(ho: HeldOut, model_std: float) -> dict[str, np.ndarray]:
    """Persistence with Gaussian intervals of std ``model_std · sqrt(h)`` (the walk's true one
    times ``model_std``), as :func:`train.evaluate.net_forecast` returns them."""
    t, h = ho.config.sequence_length, ho.config.horizon
    last = np.asarray(ho.arrays.values)[ho.starts + t - 1]
    mean = np.repeat(last[:, None], h, axis=1)
    std = np.broadcast_to(model_std * np.sqrt(np.arange(1, h + 1)), mean.shape).copy()
    return {
        "mean": mean, "std": std,
        "lower_80": mean - Z[0.8] * std, "upper_80": mean + Z[0.8] * std,
        "lower_95": mean - Z[0.95] * std, "upper_95": mean + Z[0.95] * std,
        "quantiles": mean[..., None] + std[..., None] * QZ,
    }  # fmt: skip


def config(h: int) -> ModelConfig:
    return ModelConfig(sequence_length=8, hidden_size=8, num_layers=1, attention_heads=1,
                       horizon=h, calendar=False)  # fmt: skip


@pytest.mark.parametrize("h", [1, 3])
def test_intervals_twice_too_narrow_are_corrected_online(h: int) -> None:
    """The model's intervals are half the width they need: static coverage is far below 80 %
    and 95 %; the replayed online calibration is within 3 points of both, overall."""
    arr = walk_arrays(2, 10_000, seed=4)
    ho = held_out(arr, config(h), season=1)
    fc = walk_forecast(ho, 0.5)
    block = online_calibration_report(ho, fc)
    st, on = block["static"], block["online"]
    assert st["coverage_80"] < 0.55 and st["coverage_95"] < 0.70, st
    assert abs(on["coverage_80"] - 0.80) <= 0.03, on
    assert abs(on["coverage_95"] - 0.95) <= 0.03, on
    assert on["width_80"] > 1.6 * st["width_80"]  # about twice as wide
    assert on["wql"] < st["wql"]  # honest intervals lose less
    assert on["mae"] == st["mae"]  # the mean is not touched
    assert len(block["quarters"]) == 4
    assert sum(q["windows"] for q in block["quarters"]) == ho.windows
    for q in block["quarters"][1:]:  # after the warm-up, every quarter
        assert abs(q["online"]["coverage_80"] - 0.80) <= 0.05, q
    json.dumps(block, allow_nan=False)


def test_quantiles_follow_the_80_percent_bounds() -> None:
    """The calibrated 0.1 / 0.9 quantiles are the calibrated 80 % bounds; the median is the mean."""
    arr = walk_arrays(1, 3000, seed=2)
    ho = held_out(arr, config(2), season=1)
    fc = walk_forecast(ho, 0.5)
    on, _, _ = online_forecasts(ho, fc)
    q = on["quantiles"]
    np.testing.assert_allclose(q[..., 0], on["lower_80"], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(q[..., 8], on["upper_80"], rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(q[..., QUANTILE_LEVELS.index(0.5)], fc["mean"])
    assert (np.diff(q, axis=-1) >= 0).all()


def independent_replay(ho: HeldOut, fc: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The replay written out point by point: walk every held-out point of every series in time
    order; feed it when it is an origin or one of the ``H`` targets of its series' previous
    origin; after feeding an origin, calibrate that window's forecast."""
    t, h = ho.config.sequence_length, ho.config.horizon
    arr = ho.arrays
    origin_row = {int(s) + t - 1: r for r, s in enumerate(ho.starts.tolist())}
    lo = min(origin_row)
    flat = sorted(range(lo, len(arr)), key=lambda p: (arr.ts[p], p))
    series_of = np.searchsorted(arr.starts, np.arange(len(arr)), side="right") - 1
    last_origin: dict[int, int] = {}
    fed: dict[int, int] = {}
    cal = OnlineCalibrator(h, 4)
    out = {k: np.full((ho.windows, h), np.nan) for k in ("lower_80", "upper_80", "lower_95",
                                                         "upper_95")}  # fmt: skip
    offset = 0
    for p in flat:
        s = int(series_of[p])
        prev = last_origin.get(s)
        is_origin = p in origin_row and ho.series[origin_row[p]] == s
        if not is_origin and (prev is None or not prev < p <= prev + h):
            continue
        name = arr.ids[s]
        cal.observe(name, fed.get(s, 0), offset, float(arr.values[p]))
        fed[s] = fed.get(s, 0) + 1
        if is_origin:
            r = origin_row[p]
            last_origin[s] = p
            one = Forecast.from_outputs([fc[k][r : r + 1] for k in (
                "mean", "std", "lower_80", "upper_80", "lower_95", "upper_95")])  # fmt: skip
            theta = cal.calibrate(name, offset, one.mean[0], [one.lower[lv][0] for lv in LEVELS],
                                  [one.upper[lv][0] for lv in LEVELS])  # fmt: skip
            got = apply_factors(one, np.exp(theta)[None])
            for lv in LEVELS:
                out[f"lower_{lv}"][r] = got.lower[lv][0]
                out[f"upper_{lv}"][r] = got.upper[lv][0]
        offset += 1
    return out


def test_replay_equals_feeding_the_calibrator_directly() -> None:
    """Three interleaved series, one with a time gap (held-out windows missing around it): the
    module's replay gives exactly the bounds of an independent point-by-point loop."""
    arr = walk_arrays(3, 900, seed=11, gap_at=800)
    ho = held_out(arr, config(3), season=1)
    origins = ho.starts + 7
    s0 = origins[ho.series == 0]
    assert np.diff(s0).max() > 3  # the gap: the replay skips points past the H targets
    fc = walk_forecast(ho, 0.6)
    got, factors, order = online_forecasts(ho, fc)
    want = independent_replay(ho, fc)
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    assert not np.allclose(got["upper_80"], fc["upper_80"])  # the rule did move them
    assert sorted(order.tolist()) == list(range(ho.windows))
    assert factors.shape == (ho.windows, 2)


def test_evaluate_reports_static_and_online() -> None:
    """``evaluate()``'s report carries the block; its static scores are the model's own metrics
    (same points, same scorer) and the human lines name every quarter."""
    arr = walk_arrays(2, 600, seed=3)
    cfg = ModelConfig(hidden_size=8, num_layers=1, attention_heads=1, horizon=2, dropout=0.0)
    report, ho, _ = evaluate(ForecastNet(cfg), arr, cfg, season=1, linear_ar=False)
    block = report["online_calibration"]
    model = report["metrics"]["model"]
    for key in ("mae", "mase", "wql", "coverage_80", "coverage_95"):
        assert block["static"][key] == pytest.approx(model[key]), key
    assert block["online"]["mae"] == pytest.approx(model["mae"])
    assert block["windows"] == ho.windows
    assert [q["windows"] for q in block["quarters"]] == [
        len(p) for p in np.array_split(np.arange(ho.windows), 4)
    ]
    lines = summary_lines(block)
    assert sum("quarter" in line for line in lines) == 8
    json.dumps(report, allow_nan=False)
