"""Interval calibration: a factor per level fitted on the validation split, applied in the graph."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from model.config import TAIL_SCALE_MIN
from model.export import random_windows
from model.network import Z80, Z95, ForecastNet
from tests.helpers.tiny_model import tiny_config
from train.calibrate import (
    apply_factors,
    calibrate_intervals,
    conformal_factor,
    fit_interval_factors,
    level_ratios,
)
from train.data import VAL, EventDataModule, SeriesArrays
from train.evaluate import net_forecast


def _coverage(y: np.ndarray, fc: dict[str, np.ndarray], level: str) -> float:
    return float(np.mean((y >= fc[f"lower_{level}"]) & (y <= fc[f"upper_{level}"])))


@pytest.mark.parametrize("true_sd", [0.5, 1.5])
def test_gaussian_errors_give_the_sd_ratio_and_target_coverage(true_sd: float) -> None:
    """Intervals built for sd 1 on errors of sd 0.5 (too wide) or 1.5 (too narrow): both level
    factors are the ratio and both coverages land on target on a synthetic validation set."""
    rng = np.random.default_rng(0)
    y = true_sd * rng.standard_normal((20_000, 3))
    half = {0.80: np.full_like(y, Z80), 0.95: np.full_like(y, Z95)}
    f, info = fit_interval_factors(level_ratios(y, np.zeros_like(y), half))
    assert f == {lv: pytest.approx(true_sd, rel=0.03) for lv in (0.80, 0.95)}
    assert info["after"]["coverage_80"] == pytest.approx(0.80, abs=0.002)
    assert info["after"]["coverage_95"] == pytest.approx(0.95, abs=0.002)
    assert abs(info["before"]["coverage_80"] - 0.80) > 0.1


def test_heavy_tails_get_a_factor_per_level() -> None:
    """Student-t (df 4) errors with Gaussian intervals: no single factor fits both levels (the
    95 % interval needs relatively more widening than the 80 % one); one factor per level puts
    each coverage on its target."""
    rng = np.random.default_rng(1)
    y = rng.standard_t(4, (30_000, 1))
    half = {0.80: np.full_like(y, Z80), 0.95: np.full_like(y, Z95)}
    f, info = fit_interval_factors(level_ratios(y, np.zeros_like(y), half))
    assert f[0.95] > 1.1 * f[0.80]
    assert info["after"]["coverage_80"] == pytest.approx(0.80, abs=0.002)
    assert info["after"]["coverage_95"] == pytest.approx(0.95, abs=0.002)


def test_conformal_factor_is_the_finite_sample_rank() -> None:
    """The ceil((n + 1) · level)-th smallest ratio: with n = 19 ratios 1..19 that is 16 at 80 %
    and 19 at 95 %; with n = 10 the rank 11 at 95 % is capped at the largest."""
    r = np.arange(19, 0, -1, dtype=float)  # unsorted on purpose
    assert conformal_factor(r, 0.80) == 16.0 and conformal_factor(r, 0.95) == 19.0
    assert conformal_factor(np.arange(1.0, 11.0), 0.95) == 10.0


@pytest.mark.parametrize("true_sd", [0.5, 1.5])
def test_widen_mode_applies_only_factors_above_one_and_off_applies_none(true_sd: float) -> None:
    """``widen``: intervals too narrow on validation (errors of sd 1.5 for intervals built for
    sd 1) are widened by the fitted factors; intervals too wide (sd 0.5) are left as they are,
    the fitted factors recorded beside the ones applied. ``off``: factors 1. Anything else: an
    error naming the modes."""
    rng = np.random.default_rng(2)
    y = true_sd * rng.standard_normal((20_000, 2))
    half = {0.80: np.full_like(y, Z80), 0.95: np.full_like(y, Z95)}
    f, info = fit_interval_factors(level_ratios(y, np.zeros_like(y), half), "widen")
    assert info["mode"] == "widen"
    assert info["fitted_factors"]["80"] == pytest.approx(true_sd, rel=0.03)
    expected = pytest.approx(true_sd, rel=0.03) if true_sd > 1 else 1.0
    assert f[0.80] == expected and f[0.95] == expected
    assert info["after"] == (info["before"] if true_sd < 1 else info["after"])
    f_off, off = fit_interval_factors(level_ratios(y, np.zeros_like(y), half), "off")
    assert f_off == {0.80: 1.0, 0.95: 1.0} and off["fitted"] is False and off["mode"] == "off"
    with pytest.raises(ValueError, match="calibration mode"):
        fit_interval_factors(level_ratios(y, np.zeros_like(y), half), "narrow")


def test_calibration_flag_is_checked() -> None:
    from model.errors import ConfigError
    from train.settings import TrainingSettings

    assert TrainingSettings().calibration == "conformal"
    with pytest.raises(ConfigError, match="--calibration"):
        TrainingSettings(calibration="fit")  # the single-factor mode of earlier versions


def test_too_few_points_or_non_finite_ones_leave_the_scales_alone() -> None:
    y = np.ones((3, 2))
    f, info = fit_interval_factors(level_ratios(y, y, {0.80: y, 0.95: y}))
    assert f == {0.80: 1.0, 0.95: 1.0} and info["fitted"] is False
    y = np.full((100, 1), np.nan)
    assert fit_interval_factors(level_ratios(y, y, {0.80: y, 0.95: y}))[1]["points"] == 0


def test_apply_factors_keeps_the_95_interval_around_the_80_one() -> None:
    """Factors 2 (80 %) and 1 (95 %) would put the 95 % interval inside the 80 % one: the tail
    scale is clipped at TAIL_SCALE_MIN, and the network's bounds stay nested."""
    cfg = tiny_config(horizon=2)
    new = apply_factors(cfg, {0.80: 2.0, 0.95: 1.0})
    assert new.interval_scale == 2.0 and new.tail_scale == TAIL_SCALE_MIN
    net = ForecastNet(new).eval()
    x = torch.from_numpy(random_windows(np.random.default_rng(0), 50, 48, cfg.input_size))
    with torch.no_grad():
        _, _, lo80, hi80, lo95, hi95 = net(x)
    assert bool((lo95 <= lo80).all() and (hi95 >= hi80).all())
    again = apply_factors(new, {0.80: 0.5, 0.95: 0.5})  # composes with what is already there
    assert again.interval_scale == 1.0 and again.tail_scale == TAIL_SCALE_MIN


def test_calibrate_intervals_sets_the_scales_in_the_network_and_its_config() -> None:
    """An untrained net's intervals are arbitrary; after calibration the validation windows are
    covered at ≈ 80 % / 95 % by the network's own outputs (the scales are in the graph) and a net
    rebuilt from the new config and the same weights gives the same intervals."""
    rng = np.random.default_rng(0)
    k = np.arange(2000)
    values = 10 + 3 * np.sin(2 * np.pi * k / 24) + 0.5 * rng.standard_normal(len(k))
    arrays = SeriesArrays.from_frame(
        pd.DataFrame({"series_id": "s", "ts": 3600.0 * k, "value": values})
    )
    torch.manual_seed(0)
    cfg = tiny_config(horizon=2)
    net = ForecastNet(cfg).eval()
    dm = EventDataModule(arrays, cfg)
    x, y, _ = dm.sets[VAL].arrays_for(np.arange(len(dm.sets[VAL])))
    before = net_forecast(net, x)
    new, info = calibrate_intervals(net, dm, cfg)
    assert info["fitted"] and info["windows"] == len(x) and info["points"] == y.size
    f80, f95 = info["factors"]["80"], info["factors"]["95"]
    assert new.interval_scale == pytest.approx(f80, rel=1e-5) and new.interval_scale != 1
    assert new.tail_scale == pytest.approx(f95 / f80, rel=1e-5) and new.tail_scale != 1
    assert net.config == new and new.replace(interval_scale=1.0, tail_scale=1.0) == cfg
    after = net_forecast(net, x)
    np.testing.assert_allclose(after["mean"], before["mean"], rtol=1e-6)
    assert _coverage(y, after, "80") == pytest.approx(0.80, abs=0.01)
    assert _coverage(y, after, "95") == pytest.approx(0.95, abs=0.01)
    for level in ("80", "95"):
        measured = _coverage(y, after, level)
        assert info["after"][f"coverage_{level}"] == pytest.approx(measured, abs=0.005)
    rebuilt = ForecastNet(new).eval()
    rebuilt.load_state_dict(net.state_dict())
    again = net_forecast(rebuilt, x)
    np.testing.assert_allclose(again["upper_95"], after["upper_95"], rtol=1e-5)
