"""Online accuracy (deploy/accuracy.py) equals an offline computation on the same forecasts and
actuals, per model version (a serving and a shadow version scored on the same live traffic)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from prometheus_client import generate_latest

from deploy.accuracy import METRIC_NAMES, OnlineAccuracy

STEP = 60.0
T0 = 1_732_600_000.0


def make_forecast(sid: str, version: str, ts: float, mean: float, w80: float, w95: float) -> dict:
    return {
        "schema_version": 1, "series_id": sid, "ts": ts, "horizon": 1,
        "target_ts": [ts + STEP], "mean": [mean], "std": [w80 / 1.2816],
        "lower": {"80": [mean - w80], "95": [mean - w95]},
        "upper": {"80": [mean + w80], "95": [mean + w95]},
        "model_version": version, "emitted_at": ts,
    }  # fmt: skip


def test_online_scores_equal_the_offline_computation() -> None:
    rng = np.random.default_rng(7)
    n_series, n_steps, window = 12, 150, 500
    versions = {"serving": 0.3, "shadow": 0.8}  # forecast noise: the shadow is worse
    y = np.cumsum(rng.normal(size=(n_series, n_steps)), axis=1) + 50.0
    fc = {  # version -> (mean, w80, w95), each (series, step)
        v: (y + rng.normal(scale=s, size=y.shape),
            np.abs(rng.normal(0.6, 0.2, y.shape)), np.abs(rng.normal(1.2, 0.3, y.shape)))
        for v, s in versions.items()
    }  # fmt: skip
    for v in fc:
        fc[v] = (fc[v][0], fc[v][1], fc[v][1] + fc[v][2])  # 95 % wider than 80 %

    acc = OnlineAccuracy(window=window)
    online_order: list[tuple[str, float, bool, bool]] = []
    for k in range(n_steps):
        for s in range(n_series):
            sid = f"s{s}"
            for sc in acc.observe_actual(sid, T0 + k * STEP, float(y[s, k])):
                online_order.append((sc.version, sc.abs_error, sc.inside["80"], sc.inside["95"]))
            for v, (mean, w80, w95) in fc.items():
                f = make_forecast(sid, v, T0 + k * STEP, mean[s, k], w80[s, k], w95[s, k])
                acc.observe_forecast(f)
                if k % 10 == 3:
                    acc.observe_forecast(f)  # an at-least-once repeat changes nothing
                    older = make_forecast(sid, v, T0 + (k - 1) * STEP, 0.0, 0.1, 0.2)
                    acc.observe_forecast(older)  # an older forecast never replaces a newer one

    # Offline: forecast made at step k is answered by the actual at step k + 1.
    text = generate_latest(acc.registry).decode()
    for v, (mean, w80, w95) in fc.items():
        actual = y[:, 1:]
        m, a80, a95 = mean[:, :-1], w80[:, :-1], w95[:, :-1]
        err = np.abs(actual - m)
        in80 = (m - a80 <= actual) & (actual <= m + a80)
        in95 = (m - a95 <= actual) & (actual <= m + a95)
        # the same pairs in the order they were scored (step-major, then series)
        order = [(err[s, k], in80[s, k], in95[s, k]) for k in range(n_steps - 1)
                 for s in range(n_series)]  # fmt: skip
        assert [(e, i8, i9) for vv, e, i8, i9 in online_order if vv == v] == order

        last = order[-window:]
        summary = acc.summary(v)
        assert summary.points == window
        assert summary.mae == pytest.approx(math.fsum(e for e, _, _ in last) / window, rel=1e-12)
        assert summary.coverage["80"] == sum(i for _, i, _ in last) / window
        assert summary.coverage["95"] == sum(i for _, _, i in last) / window

        # The cumulative counters give the all-time numbers (what PromQL rate ratios use).
        total = err.size
        assert sample(text, "eventcast_online_scored_total", v) == total
        assert sample(text, "eventcast_online_abs_error_total", v) == pytest.approx(
            float(err.sum()), rel=1e-9
        )
        assert sample(text, "eventcast_online_interval_hits_total", v, 'level="80"') == in80.sum()
        assert sample(text, "eventcast_online_interval_hits_total", v, 'level="95"') == in95.sum()
        assert sample(text, "eventcast_online_mae", v) == pytest.approx(summary.mae, rel=1e-12)

    # the shadow version's worse forecasts show up as a higher MAE
    assert acc.summary("shadow").mae > acc.summary("serving").mae
    assert acc.versions() == ["serving", "shadow"]
    assert acc.pending == n_series * 2  # the last forecasts wait for their next actual


def sample(text: str, name: str, version: str, extra: str = "") -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and f'version="{version}"' in line and extra in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{{version={version}}} not exported")


def test_pending_forecasts_are_bounded_and_bad_input_is_refused() -> None:
    acc = OnlineAccuracy(window=10, max_pending=5)
    for i in range(8):
        acc.observe_forecast(make_forecast(f"s{i}", "v", T0, 1.0, 0.5, 1.0))
    assert acc.pending == 5  # the least recently updated series were dropped
    assert acc.observe_actual("s0", T0 + STEP, 1.0) == []  # s0 was dropped
    assert len(acc.observe_actual("s7", T0 + STEP, 1.2)) == 1
    assert acc.observe_actual("s6", T0, 1.0) == []  # not after the forecast: not its answer
    assert acc.observe_actual("s6", T0 + STEP, math.nan) == []
    with pytest.raises(ValueError, match="not a forecast object"):
        acc.observe_forecast({"series_id": "x"})
    names = {m.name for m in acc.registry.collect()}
    assert {n.removesuffix("_total") for n in METRIC_NAMES} == names
