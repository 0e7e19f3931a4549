"""Interval calibration: one scale factor fitted on the validation split, applied in the graph."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from model.network import Z80, Z95, ForecastNet
from tests.helpers.tiny_model import tiny_config
from train.calibrate import calibrate_intervals, fit_interval_scale
from train.data import VAL, EventDataModule, SeriesArrays
from train.evaluate import net_forecast


def _coverage(y: np.ndarray, fc: dict[str, np.ndarray], level: str) -> float:
    return float(np.mean((y >= fc[f"lower_{level}"]) & (y <= fc[f"upper_{level}"])))


@pytest.mark.parametrize("true_sd", [0.5, 1.5])
def test_gaussian_errors_give_the_sd_ratio_and_target_coverage(true_sd: float) -> None:
    """Intervals built for sd 1 on errors of sd 0.5 (too wide) or 1.5 (too narrow): the factor
    is the ratio and both coverages land on target on a synthetic validation set."""
    rng = np.random.default_rng(0)
    y = true_sd * rng.standard_normal((20_000, 3))
    mean = np.zeros_like(y)
    half = {0.80: np.full_like(y, Z80), 0.95: np.full_like(y, Z95)}
    s, info = fit_interval_scale(y, mean, half)
    assert s == pytest.approx(true_sd, rel=0.03)
    assert info["after"]["coverage_80"] == pytest.approx(0.80, abs=0.01)
    assert info["after"]["coverage_95"] == pytest.approx(0.95, abs=0.01)
    assert abs(info["before"]["coverage_80"] - 0.80) > 0.1


def test_heavy_tails_get_both_levels_within_the_tolerance() -> None:
    """Student-t (df 4) errors with Gaussian intervals: no single factor hits both levels
    exactly; the fitted one keeps both within DESIGN.md's ±5 points."""
    rng = np.random.default_rng(1)
    y = rng.standard_t(4, (30_000, 1))
    half = {0.80: np.full_like(y, Z80), 0.95: np.full_like(y, Z95)}
    s, info = fit_interval_scale(y, np.zeros_like(y), half)
    e80, e95 = info["exact_factors"]["coverage_80"], info["exact_factors"]["coverage_95"]
    assert min(e80, e95) <= s <= max(e80, e95) and e80 != pytest.approx(e95, rel=0.05)
    assert abs(info["after"]["coverage_80"] - 0.80) <= 0.05
    assert abs(info["after"]["coverage_95"] - 0.95) <= 0.05


@pytest.mark.parametrize("true_sd", [0.5, 1.5])
def test_widen_mode_applies_only_factors_above_one_and_off_applies_none(true_sd: float) -> None:
    """The default mode (``widen``): intervals too narrow on validation (errors of sd 1.5 for
    intervals built for sd 1) are widened by the fitted factor; intervals too wide (sd 0.5) are
    left as they are, the fitted factor recorded beside the one applied. ``off``: factor 1."""
    rng = np.random.default_rng(2)
    y = true_sd * rng.standard_normal((20_000, 2))
    half = {0.80: np.full_like(y, Z80), 0.95: np.full_like(y, Z95)}
    s, info = fit_interval_scale(y, np.zeros_like(y), half, "widen")
    assert info["mode"] == "widen" and info["fitted_scale"] == pytest.approx(true_sd, rel=0.03)
    assert s == (pytest.approx(true_sd, rel=0.03) if true_sd > 1 else 1.0)
    assert info["after"] == (info["before"] if true_sd < 1 else info["after"])
    s_off, off = fit_interval_scale(y, np.zeros_like(y), half, "off")
    assert s_off == 1.0 and off["fitted"] is False and off["mode"] == "off"
    with pytest.raises(ValueError, match="calibration mode"):
        fit_interval_scale(y, np.zeros_like(y), half, "narrow")


def test_the_bootstrap_widens_more_when_the_validation_stretch_is_uneven() -> None:
    """Validation rows in time order whose error scale drifts from block to block (a calm and a
    rough spell): the point fit averages them, the 90 % bootstrap factor lies above it, and
    widen applies that one. Homogeneous errors: the two agree within a few per cent."""
    rng = np.random.default_rng(3)
    rows = 4000
    sd = np.repeat(rng.choice([0.6, 1.6], 20), rows // 20)[:, None]  # per block of 200 rows
    y = sd * rng.standard_normal((rows, 2))
    half = {0.80: np.full_like(y, Z80), 0.95: np.full_like(y, Z95)}
    s, info = fit_interval_scale(y, np.zeros_like(y), half, "widen", confidence=0.9)
    assert info["upper_scale"] > 1.05 * info["fitted_scale"] and s == info["upper_scale"]
    q10, q50, q90 = info["bootstrap_factor_q10_q50_q90"]
    assert q10 < q50 < q90 == pytest.approx(info["upper_scale"])
    even = 1.3 * rng.standard_normal((rows, 2))
    s2, info2 = fit_interval_scale(even, np.zeros_like(even), half, "widen", confidence=0.9)
    assert info2["upper_scale"] == pytest.approx(info2["fitted_scale"], rel=0.04)
    assert s2 == pytest.approx(1.3, rel=0.05)


def test_calibration_flag_is_checked() -> None:
    from model.errors import ConfigError
    from train.settings import TrainingSettings

    assert TrainingSettings().calibration == "widen"
    with pytest.raises(ConfigError, match="--calibration"):
        TrainingSettings(calibration="sometimes")


def test_too_few_points_leave_the_scale_alone() -> None:
    y = np.ones((3, 2))
    s, info = fit_interval_scale(y, y, {0.80: y, 0.95: y})
    assert s == 1.0 and info["fitted"] is False


def test_calibrate_intervals_sets_the_scale_in_the_network_and_its_config() -> None:
    """An untrained net's intervals are arbitrary; after calibration the validation windows are
    covered at ≈ 80 % / 95 % by the network's own outputs (the scale is in the graph) and a net
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
    new, info = calibrate_intervals(net, dm, cfg, mode="fit")
    assert info["fitted"] and info["windows"] == len(x) and info["points"] == y.size
    assert new.interval_scale == pytest.approx(info["scale"], rel=1e-5) and new.interval_scale != 1
    assert net.config == new and new.replace(interval_scale=1.0) == cfg
    after = net_forecast(net, x)
    np.testing.assert_allclose(after["mean"], before["mean"], rtol=1e-6)
    assert _coverage(y, after, "80") == pytest.approx(0.80, abs=0.03)
    assert _coverage(y, after, "95") == pytest.approx(0.95, abs=0.03)
    assert info["after"]["coverage_80"] == pytest.approx(_coverage(y, after, "80"), abs=0.005)
    rebuilt = ForecastNet(new).eval()
    rebuilt.load_state_dict(net.state_dict())
    again = net_forecast(rebuilt, x)
    np.testing.assert_allclose(again["upper_95"], after["upper_95"], rtol=1e-5)
