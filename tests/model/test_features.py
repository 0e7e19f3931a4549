from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from model.config import ModelConfig
from model.errors import ConfigError, InputError
from model.features import build_inputs, target_times


def _ts(start: dt.datetime, n: int, step: float = 3600.0) -> np.ndarray:
    return start.timestamp() + step * np.arange(n, dtype=np.float64)


def test_channel_layout_and_calendar_values() -> None:
    cfg = ModelConfig(features=("temp", "load"))
    # Monday 2024-01-01 00:00 UTC: day phase 0 and week phase 0.
    ts = _ts(dt.datetime(2024, 1, 1, tzinfo=dt.UTC), 48)[None, :]
    values = np.arange(48, dtype=np.float64)[None, :]
    feats = {"load": np.full((1, 48), 2.0), "temp": np.full((1, 48), 1.0), "other": np.zeros(3)}
    x = build_inputs(ts, values, feats, cfg)
    assert x.shape == (1, 48, 7) and x.dtype == np.float32 and x.flags.c_contiguous
    np.testing.assert_array_equal(x[0, :, 0], values[0])
    np.testing.assert_allclose(x[0, 0, 1:5], [0.0, 1.0, 0.0, 1.0], atol=1e-6)
    # 06:00 -> a quarter day: sin 1, cos 0.
    np.testing.assert_allclose(x[0, 6, 1:3], [1.0, 0.0], atol=1e-6)
    # Tuesday 2024-01-02 12:00 (36 h later) is 1.5 days into the week.
    phase = 2 * np.pi * 1.5 / 7
    np.testing.assert_allclose(x[0, 36, 3:5], [np.sin(phase), np.cos(phase)], atol=1e-6)
    # Exogenous features in config order, not mapping order.
    assert (x[0, :, 5] == 1.0).all() and (x[0, :, 6] == 2.0).all()


def test_year_channels_follow_the_day_and_week_ones_and_are_not_normalised() -> None:
    """``calendar_year``: sin/cos of the year phase right after the four calendar channels (or
    right after the value without them), features after; the network leaves them unnormalised."""
    from model.network import ForecastNet

    ts = np.stack([_ts(dt.datetime(2024, 1, 1, tzinfo=dt.UTC), 48),
                   _ts(dt.datetime(2024, 7, 2, 3, tzinfo=dt.UTC), 48)])  # fmt: skip
    feats = {"temp": np.full((2, 48), 3.0)}
    for calendar, col in ((True, 5), (False, 1)):
        cfg = ModelConfig(calendar=calendar, calendar_year=True, features=("temp",))
        x = build_inputs(ts, np.ones((2, 48)), feats, cfg)
        assert x.shape == (2, 48, col + 3) and cfg.input_size == col + 3
        np.testing.assert_allclose(x[0, 0, col : col + 2], [0.0, 1.0], atol=2e-3)  # 1 January
        np.testing.assert_allclose(x[1, 0, col : col + 2], [0.0, -1.0], atol=2e-2)  # mid-year
        assert (x[:, :, col + 2] == 3.0).all()
        mask = ForecastNet(cfg).norm_mask.tolist()
        assert mask == [1.0] + [0.0] * (col + 1) + [1.0]


def test_without_calendar_and_batch() -> None:
    cfg = ModelConfig(calendar=False)
    ts = np.tile(_ts(dt.datetime(2024, 5, 1, tzinfo=dt.UTC), 48), (3, 1))
    x = build_inputs(ts, np.ones((3, 48)), None, cfg)
    assert x.shape == (3, 48, 1)


def test_missing_feature_is_named() -> None:
    cfg = ModelConfig(features=("temp",))
    ts = _ts(dt.datetime(2024, 1, 1, tzinfo=dt.UTC), 48)[None, :]
    with pytest.raises(InputError, match="temp"):
        build_inputs(ts, np.ones((1, 48)), {}, cfg)
    with pytest.raises(ValueError, match="temp"):  # InputError is a ValueError ...
        build_inputs(ts, np.ones((1, 48)), None, cfg)
    with pytest.raises(ConfigError):  # ... and a ConfigError
        build_inputs(ts, np.ones((1, 48)), {"temp": np.ones((1, 47))}, cfg)


@pytest.mark.parametrize(
    ("ts_shape", "v_shape", "bad"),
    [((1, 48), (48,), None), ((1, 47), (1, 48), None), ((1, 48), (1, 48), "nan")],
)
def test_bad_arrays(ts_shape: tuple[int, ...], v_shape: tuple[int, ...], bad: str | None) -> None:
    values = np.ones(v_shape)
    if bad:
        values[0, 3] = np.nan
    with pytest.raises(InputError):
        build_inputs(np.ones(ts_shape), values, None, ModelConfig())


def test_target_times_use_median_spacing() -> None:
    ts = np.array([[0.0, 60.0, 120.0, 300.0, 360.0], [0.0, 1.0, 2.0, 3.0, 4.0]])
    out = target_times(ts, 3)
    np.testing.assert_array_equal(out, [[420.0, 480.0, 540.0], [5.0, 6.0, 7.0]])
    assert out.dtype == np.float64
    with pytest.raises(InputError):
        target_times(ts[:, :1], 1)


def test_fast_on_large_batches() -> None:
    import time

    cfg = ModelConfig(features=("a",))
    rng = np.random.default_rng(0)
    ts = 1.7e9 + np.cumsum(rng.uniform(1, 10, (4096, 48)), axis=1)
    v = rng.standard_normal((4096, 48))
    t = time.perf_counter()
    x = build_inputs(ts, v, {"a": v}, cfg)
    target_times(ts, 12)
    assert x.shape == (4096, 48, 6)
    # ~200k points: a few ms when vectorised; generous bound for a shared CI machine.
    assert time.perf_counter() - t < 1.0


def test_the_level_channel_is_last_and_the_newest_value_stands_in_on_the_plain_path() -> None:
    """A hybrid's last channel is the seasonal state's level, constant over the window; a window
    on the plain path (NaN, or no level at all: HTTP, shadow) gets its newest value instead; an
    infinite level or one of the wrong shape is refused."""
    cfg = ModelConfig(features=("f",), seasons=(24,), season_gammas=(0.1,), season_spacing_s=3600.0)
    ts = np.tile(_ts(dt.datetime(2024, 5, 1, tzinfo=dt.UTC), 48), (2, 1))
    values = np.stack([np.arange(48.0), 10.0 + np.arange(48.0)])
    feats = {"f": np.zeros((2, 48))}
    x = build_inputs(ts, values, feats, cfg, np.array([3.5, np.nan]))
    assert x.shape == (2, 48, 7) and cfg.input_size == 7
    assert (x[0, :, 6] == 3.5).all() and (x[1, :, 6] == 57.0).all()
    assert (x[:, :, 5] == 0.0).all()  # the feature stays where it was
    plain = build_inputs(ts, values, feats, cfg)
    assert (plain[0, :, 6] == 47.0).all() and (plain[1, :, 6] == 57.0).all()
    with pytest.raises(InputError, match="level"):
        build_inputs(ts, values, feats, cfg, np.array([np.inf, 1.0]))
    with pytest.raises(InputError, match="level"):
        build_inputs(ts, values, feats, cfg, np.array([1.0]))
    no_level = cfg.replace(season_level=False)
    assert build_inputs(ts, values, feats, no_level, np.array([3.5, 1.0])).shape == (2, 48, 6)
