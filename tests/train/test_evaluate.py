"""Metrics, baselines and the held-out report: definitions and identical scoring points."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from model.config import ModelConfig
from model.network import ForecastNet
from train import baselines, metrics
from train.data import TEST, SeriesArrays
from train.evaluate import evaluate, held_out, net_forecast


def test_metric_definitions_on_hand_computed_values() -> None:
    y = np.array([[1.0, 2.0], [3.0, 4.0]])
    f = np.array([[2.0, 2.0], [3.0, 2.0]])
    assert metrics.mae(y, f) == pytest.approx(0.75)
    assert metrics.mase(y, f, np.array([0.5, 1.0])) == pytest.approx((2 + 0 + 0 + 2) / 4)
    assert metrics.smape(y, f) == pytest.approx(200 / 4 * (1 / 3 + 0 + 0 + 2 / 6))
    assert metrics.smape(np.zeros((1, 1)), np.zeros((1, 1))) == 0.0
    # A perfect median with a tight spread: the quantile loss is small but positive.
    q = np.stack([y + (lv - 0.5) for lv in metrics.QUANTILE_LEVELS], axis=-1)
    w = metrics.wql(y, q)
    manual = np.mean([
        2 * metrics.pinball(y, q[..., i], lv).sum() / np.abs(y).sum()
        for i, lv in enumerate(metrics.QUANTILE_LEVELS)
    ])  # fmt: skip
    assert w == pytest.approx(manual) and w > 0
    assert metrics.coverage(y, y - 1, y + 0.5) == 1.0
    s = metrics.score(y, f, np.ones(2))
    assert s["wql"] is None and s["coverage_80"] is None and s["coverage_95"] is None


def test_season_inference() -> None:
    assert baselines.infer_season(3600) == 24
    assert baselines.infer_season(1800) == 48
    assert baselines.infer_season(300) == 288
    assert baselines.infer_season(86400) == 7
    assert baselines.infer_season(7 * 86400) == 52  # weekly: a year
    assert baselines.infer_season(31 * 86400) == 12  # monthly: a year
    assert baselines.infer_season(3 * 86400) == 1  # no calendar season assumed


def _seasonal_arrays(n: int = 600, noise: float = 0.1, seed: int = 0) -> SeriesArrays:
    rng = np.random.default_rng(seed)
    k = np.arange(n)
    values = 10 + 3 * np.sin(2 * np.pi * k / 24) + noise * rng.standard_normal(n)
    df = pd.DataFrame({"series_id": "s", "ts": 3600.0 * k, "value": values})
    return SeriesArrays.from_frame(df)


def test_baselines_are_what_they_claim() -> None:
    arr = _seasonal_arrays(noise=0.0)
    v = np.asarray(arr.values)
    starts = arr.window_starts(48, 30, TEST)
    p = baselines.persistence(v, starts, 48, 30)
    assert (p == v[starts + 47][:, None]).all()
    sn = baselines.seasonal_naive(v, starts, 48, 30, 24)
    targets = v[starts[:, None] + 48 + np.arange(30)]
    np.testing.assert_allclose(sn, targets, atol=1e-9)  # a pure daily cycle: exact
    ar = baselines.LinearAR.fit(np.stack([v[s : s + 48] for s in starts[:50]]),
                                np.stack([v[s + 48 : s + 78] for s in starts[:50]]))  # fmt: skip
    out = ar.predict(np.stack([v[s : s + 48] for s in starts]))
    assert out["mean"].shape == (len(starts), 30) and out["quantiles"].shape[-1] == 9


def test_report_scores_every_method_on_identical_points() -> None:
    arr = _seasonal_arrays()
    cfg = ModelConfig(hidden_size=16, num_layers=1, attention_heads=2, horizon=4, dropout=0.0)
    net = ForecastNet(cfg)
    report, ho, fc = evaluate(net, arr, cfg, version="v1")
    assert set(report) >= {"version", "points", "horizon", "metrics"}
    assert report["version"] == "v1" and report["horizon"] == 4
    assert report["points"] == ho.windows * 4 == ho.y.size
    assert set(report["metrics"]) == {"model", "persistence", "seasonal_naive", "linear_ar"}
    for name, m in report["metrics"].items():
        assert set(m) == {"mae", "mase", "smape", "wql", "coverage_80", "coverage_95"}
        if name in ("persistence", "seasonal_naive"):
            assert m["wql"] is None and m["coverage_80"] is None and m["coverage_95"] is None
        else:
            assert 0 <= m["coverage_80"] <= m["coverage_95"] <= 1
        assert len(report["per_step_mae"][name]) == 4
        # per-step MAEs average to the overall MAE: the same points
        assert np.mean(report["per_step_mae"][name]) == pytest.approx(m["mae"])
    json.dumps(report, allow_nan=False)  # strict JSON
    # The model's intervals come from its own distribution, in order.
    assert (fc["lower_95"] <= fc["lower_80"]).all() and (fc["upper_80"] <= fc["upper_95"]).all()
    q = fc["quantiles"]
    assert (np.diff(q, axis=-1) >= 0).all()
    np.testing.assert_allclose(q[..., 4], fc["mean"], rtol=1e-6)
    # The linear AR fits a clean daily cycle far better than persistence.
    assert report["metrics"]["linear_ar"]["mae"] < report["metrics"]["persistence"]["mae"]
    assert report["quality"]["best_naive"] == "seasonal_naive"


def test_student_t_quantiles_are_wider_in_the_tails() -> None:
    arr = _seasonal_arrays()
    cfg = ModelConfig(hidden_size=16, num_layers=1, attention_heads=2, distribution="student_t")
    ho = held_out(arr, cfg)
    fc = net_forecast(ForecastNet(cfg), ho.x[:20])
    half80 = fc["upper_80"] - fc["mean"]
    # The 0.9 quantile is the upper end of the central 80 % interval.
    np.testing.assert_allclose(fc["quantiles"][..., 8] - fc["mean"], half80, rtol=2e-3)


def test_long_season_drops_windows_without_history_for_everyone() -> None:
    arr = _seasonal_arrays(n=400)
    cfg = ModelConfig(hidden_size=16, num_layers=1, attention_heads=2)
    short = held_out(arr, cfg, season=24)
    long = held_out(arr, cfg, season=330)
    assert long.windows < short.windows  # same rule for all methods
    assert set(long.starts) <= set(short.starts)


def test_peers_score_on_the_same_windows_as_every_method() -> None:
    from train.peers import PeerSettings, mstl_seasons, peer_rows

    arr = _seasonal_arrays(n=700)
    cfg = ModelConfig(hidden_size=16, num_layers=1, attention_heads=2, horizon=4, dropout=0.0)
    report, ho, _ = evaluate(ForecastNet(cfg), arr, cfg, peers=PeerSettings(origins=6))
    peers = report["peers"]
    rows = peer_rows(ho.windows, 6)
    assert peers["windows"] == len(rows) == 6 and peers["of_windows"] == ho.windows
    assert peers["points"] == 6 * 4
    assert set(peers["metrics"]) == {"model", "persistence", "seasonal_naive", "linear_ar",
                                     "autoets", "mstl"}  # fmt: skip
    assert peers["models"]["autoets"]["season_length"] == 24
    assert peers["models"]["mstl"]["season_length"] == [24, 168] == mstl_seasons(3600.0)
    for name, m in peers["metrics"].items():
        assert m["mae"] is not None, (name, m)
        assert np.mean(peers["per_step_mae"][name]) == pytest.approx(m["mae"])
        if name in ("autoets", "mstl"):
            assert 0 <= m["coverage_80"] <= m["coverage_95"] <= 1 and m["wql"] > 0
    # The baselines on the subsample are the full report's methods restricted to those rows.
    sn = baselines.seasonal_naive(np.asarray(arr.values), ho.starts[rows], 48, 4, 24)
    assert peers["metrics"]["seasonal_naive"]["mae"] == pytest.approx(metrics.mae(ho.y[rows], sn))
    # A clean daily cycle: the seasonal peers beat persistence.
    assert peers["metrics"]["autoets"]["mae"] < peers["metrics"]["persistence"]["mae"]
    json.dumps(report, allow_nan=False)
    # Off by default in evaluate() (the retrain's path): no peers, no statsforecast.
    plain, _, _ = evaluate(ForecastNet(cfg), arr, cfg)
    assert "peers" not in plain


def test_peer_rows_and_seasons() -> None:
    from train.peers import mstl_seasons, peer_rows

    assert list(peer_rows(5, 10)) == [0, 1, 2, 3, 4]
    r = peer_rows(1000, 4)
    assert list(r) == [0, 333, 666, 999]
    assert mstl_seasons(1800.0) == [48, 336] and mstl_seasons(86400.0) == [7, 365]
    assert mstl_seasons(7 * 86400.0) == [52] and mstl_seasons(3 * 86400.0) == []


def test_commands_default_matches_peers_default() -> None:
    from train.commands import DEFAULT_PEER_ORIGINS, EvaluateOptions
    from train.peers import DEFAULT_ORIGINS

    assert DEFAULT_PEER_ORIGINS == DEFAULT_ORIGINS
    assert EvaluateOptions.model_fields["peer_origins"].default == DEFAULT_ORIGINS
