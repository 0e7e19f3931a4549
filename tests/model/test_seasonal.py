"""The per-series seasonal state (model/seasonal.py): recursion, warm-up, phases from time,
codec, and the per-model coefficient fit (pure logic, plus the real taylor data for the fit)."""

from __future__ import annotations

import numpy as np
import pytest

from model.seasonal import (
    MAX_SEASON,
    SeasonalSpec,
    SeasonalState,
    fit_coefficients,
    run_series,
)

DAY, WEEK = 48, 336
SPACING = 1800.0


def two_seasons(n: int, noise: float = 0.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Half-hourly: 100 + a daily sine + a weekend dip, from a Monday 00:00 (a step multiple of
    the week, so phase 0 of both seasons)."""
    rng = np.random.default_rng(seed)
    steps = np.arange(n) + 1000 * WEEK
    day = 10 * np.sin(2 * np.pi * (steps % DAY) / DAY)
    weekend = np.where(steps % WEEK >= 5 * DAY, -8.0, 0.0)
    return steps * SPACING, 100 + day + weekend + rng.normal(0, noise, n)


def spec(alpha: float = 0.1, gammas: tuple[float, float] = (0.1, 0.1)) -> SeasonalSpec:
    return SeasonalSpec((DAY, WEEK), SPACING, alpha, gammas)


def test_a_noiseless_two_season_signal_is_learnt_in_its_warm_up_week() -> None:
    ts, y = two_seasons(3 * WEEK)
    s = SeasonalState(spec())
    for t, v in zip(ts[:WEEK], y[:WEEK], strict=True):
        assert not s.ready
        s.update(t, v)
    assert s.ready and s.n == WEEK
    ahead = ts[WEEK : 2 * WEEK]
    np.testing.assert_allclose(s.forecast(ahead), y[WEEK : 2 * WEEK], atol=1e-9)
    for t, v in zip(ts[WEEK:], y[WEEK:], strict=True):  # the recursion keeps it exact
        s.update(t, v)
    np.testing.assert_allclose(s.forecast(ts[-WEEK:] + WEEK * SPACING), y[-WEEK:], atol=1e-9)


def test_phases_come_from_time_so_a_gap_does_not_shift_the_seasons() -> None:
    ts, y = two_seasons(4 * WEEK)
    keep = np.ones(len(ts), bool)
    keep[WEEK + 100 : WEEK + 190] = False  # 45 hours missing
    s = SeasonalState(spec())
    for t, v in zip(ts[keep], y[keep], strict=True):
        s.update(t, v)
    np.testing.assert_allclose(s.forecast(ts[-DAY:] + WEEK * SPACING), y[-DAY:], atol=1e-9)
    assert s.n == int(keep.sum())


def test_warm_up_waits_for_every_phase_of_the_longest_season() -> None:
    ts, y = two_seasons(2 * WEEK)
    s = SeasonalState(spec())
    for t, v in zip(ts[: WEEK - 1], y[: WEEK - 1], strict=True):
        s.update(t, v)
    s.update(ts[WEEK], y[WEEK])  # skips one phase: still warming up
    assert not s.ready
    np.testing.assert_array_equal(s.seasonal(ts[:5]), np.zeros(5))
    s.update(ts[WEEK + 1], y[WEEK + 1])
    assert not s.ready  # the missing phase is still missing within the last cycle


def test_state_round_trips_through_its_blob_in_both_phases() -> None:
    ts, y = two_seasons(2 * WEEK, noise=1.0)
    sp = spec(0.3, (0.2, 0.05))
    s = SeasonalState(sp)
    for t, v in zip(ts[:100], y[:100], strict=True):
        s.update(t, v)
    again = SeasonalState.decode(sp, s.encode())
    assert not again.ready and again.encode() == s.encode()
    for t, v in zip(ts[100:], y[100:], strict=True):
        s.update(t, v)
        again.update(t, v)
    assert s.ready and again.encode() == s.encode()
    assert len(s.encode()) == 37 + 8 * (DAY + WEEK)  # header, then the indices (keep=0)
    with pytest.raises(ValueError):
        SeasonalState.decode(sp, s.encode()[:-8])
    with pytest.raises(ValueError):
        SeasonalState.decode(SeasonalSpec((DAY,), SPACING, 0.1, (0.1,)), s.encode())
    with pytest.raises(ValueError, match="another model"):  # same seasons, other coefficients
        SeasonalState.decode(spec(0.3, (0.2, 0.1)), s.encode())


def test_back_undoes_the_last_updates_exactly_and_survives_the_blob() -> None:
    """A redelivered record's window is forecast again from the state as it was then: ``back(k)``
    equals a state that stopped k points earlier, bit for bit, also after a round trip through
    the blob Redis stores; before the warm-up ended it is the plain path (None)."""
    ts, y = two_seasons(WEEK + 200, noise=2.0, seed=3)
    sp, keep = spec(0.3, (0.2, 0.05)), 48
    s = SeasonalState(sp, keep)
    for t, v in zip(ts, y, strict=True):
        s.update(t, v)
    blob = s.encode()
    assert len(blob) == 37 + 8 * (DAY + WEEK) + 8 * 4 * keep
    loaded = SeasonalState.decode(sp, blob, keep)
    for k in (0, 1, 17, keep):
        ref = SeasonalState(sp)
        for t, v in zip(ts[: len(ts) - k], y[: len(y) - k], strict=True):
            ref.update(t, v)
        for state in (s, loaded):
            then = state.back(k)
            assert then is not None and then.n == ref.n and then.level == ref.level
            for a, b in zip(then.idx, ref.idx, strict=True):
                np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError):
        s.back(keep + 1)
    young = SeasonalState(sp, keep)
    for t, v in zip(ts[: WEEK + 3], y[: WEEK + 3], strict=True):
        young.update(t, v)
    assert young.back(3) is not None and young.back(4) is None  # ready at point WEEK
    assert SeasonalState.decode(sp, blob, 10).back(10) is not None  # fewer kept: the newest
    with pytest.raises(ValueError):
        SeasonalState.decode(sp, blob, 10).back(11)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"seasons": (WEEK, DAY)},
        {"seasons": (DAY, MAX_SEASON + 1), "gammas": (0.1, 0.1)},
        {"gammas": (0.1,)},
        {"alpha": 0.0},
        {"spacing_s": 0.0},
    ],
)
def test_a_bad_spec_is_refused(kwargs: dict) -> None:
    args = {"seasons": (DAY, WEEK), "spacing_s": SPACING, "alpha": 0.1, "gammas": (0.1, 0.1)}
    with pytest.raises(ValueError):
        SeasonalSpec(**(args | kwargs))


def test_the_fit_runs_the_same_recursion_as_the_state() -> None:
    """A one-point grid: the fit's error equals the error of SeasonalState's own forecasts."""
    ts, y = two_seasons(3 * WEEK, noise=2.0, seed=4)
    got, mae, _ = fit_coefficients([(ts, y)], (DAY, WEEK), SPACING, 6, alphas=(0.3,), gammas=(0.2,))
    assert (got.alpha, got.gammas) == (0.3, (0.2, 0.2))
    s = SeasonalState(got)
    errs = []
    for i, (t, v) in enumerate(zip(ts, y, strict=True)):
        if s.ready:
            errs.extend(np.abs(s.forecast(ts[i : i + 6]) - y[i : i + 6]))
        s.update(t, v)
    assert mae == pytest.approx(float(np.mean(errs)), rel=1e-9)


def test_the_fit_chooses_coefficients_for_the_horizon_on_real_demand() -> None:
    """taylor (half-hourly demand): fitted for the next step the level follows the data (large α);
    fitted for a day ahead it barely moves (small α) — what the hybrid needs at h24."""
    from train.datasets import load_dataset

    d = load_dataset("taylor")
    n = int(len(d) * 0.7)
    data = [(d["ts"].to_numpy()[:n], d["value"].to_numpy(float)[:n])]
    one, mae1, _ = fit_coefficients(data, (DAY, WEEK), SPACING, 1)
    day, mae48, _ = fit_coefficients(data, (DAY, WEEK), SPACING, 24)
    assert one.alpha >= 0.3 and day.alpha <= 0.1, (one, day)
    assert mae1 < mae48


def test_the_trainer_and_the_worker_compute_the_same_window_inputs() -> None:
    """run_series (the trainer, every point at once) equals a state fed point by point with
    window_inputs called per window (the worker), and adding the offsets back onto the adjusted
    window's continuation gives the data on a noiseless signal."""
    ts, y = two_seasons(2 * WEEK + 60, noise=0.5, seed=2)
    sp = spec(0.2, (0.1, 0.2))
    ready, adjusted, offsets, levels = run_series(sp, ts, y, 48, 4)
    s = SeasonalState(sp)
    for i, (t, v) in enumerate(zip(ts, y, strict=True)):
        s.update(t, v)
        assert ready[i] == (i >= 47 and s.ready)
        if ready[i]:
            a, o = s.window_inputs(ts[i - 47 : i + 1], y[i - 47 : i + 1], 4)
            np.testing.assert_array_equal(adjusted[i], a)
            np.testing.assert_array_equal(offsets[i], o)
            assert levels[i] == s.level
        else:
            assert np.isnan(levels[i])  # the plain path: the newest value stands in
    assert ready.sum() == len(y) - WEEK + 1
    clean_ts, clean = two_seasons(2 * WEEK)
    _, adj, off, lev = run_series(spec(), clean_ts, clean, 48, 3)
    i = WEEK + 10
    # noiseless: the adjusted window is flat (at the level: 100 less the weekend dip's weekly
    # mean, which the weekly indices carry), and level + offsets = the next points
    level = adj[i][0]
    assert level == pytest.approx(100.0 - 8.0 * 2 / 7)
    assert lev[i] == pytest.approx(level)  # the state's level is the flat window's
    np.testing.assert_allclose(adj[i], np.full(48, level), atol=1e-9)
    np.testing.assert_allclose(level + off[i], clean[i + 1 : i + 4], atol=1e-9)


def test_warm_up_ends_when_the_last_cycle_of_steps_is_complete_whatever_the_gaps() -> None:
    """The O(1) warm-up rule (a run of consecutive steps as long as the longest season) ends the
    warm-up at the same point as the definition: every phase's newest step within the last
    cycle. Random step sequences with repeats (two points in one step) and gaps, and a round trip
    through the blob mid-warm-up."""
    rng = np.random.default_rng(7)
    sp = SeasonalSpec((3, 12), 60.0, 0.2, (0.1, 0.1))
    for trial in range(200):
        jumps = rng.choice([0, 1, 1, 1, 1, 1, 2, 5], size=80)
        steps = 1000 + np.cumsum(jumps)
        ts = steps * 60.0 + rng.uniform(-20, 20, len(steps)) * (jumps > 0)
        ts = np.maximum.accumulate(ts + np.arange(len(ts)) * 1e-6)  # strictly increasing
        s = SeasonalState(sp)
        newest = np.full(12, -1)
        for i, t in enumerate(ts):
            step = round(t / 60.0)
            newest[step % 12] = step
            want = newest.min() >= 0 and newest.max() - newest.min() < 12
            if i == 40 and not s.ready:
                s = SeasonalState.decode(sp, s.encode())
            s.update(float(t), 1.0)
            if s.ready:
                assert want, (trial, i)
                break
            assert not want, (trial, i)
