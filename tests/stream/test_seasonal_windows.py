"""The worker's seasonal state (a model with seasons): the windows it gathers carry the same
seasonal parts the trainer computes (one code path), a redelivered record's window gets exactly
what it got the first time, and the state travels in the series blob (pure logic)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import orjson
import pytest

from model.seasonal import SeasonalSpec, run_series
from stream.settings import LimitSettings
from stream.windows import PartitionWindows

SPACING = 300.0
SPEC = SeasonalSpec((5, 24), SPACING, 0.3, (0.2, 0.1))
T, H = 12, 3


def rec(offset: int, key: str, ts: float, value: float) -> SimpleNamespace:
    doc = {"ts": ts, "value": value}
    return SimpleNamespace(offset=offset, key=key.encode(), value=orjson.dumps(doc), timestamp=0)


def windows(spec: SeasonalSpec | None = SPEC, history: int = 6) -> PartitionWindows:
    return PartitionWindows(
        "t", 0, sequence_length=T, features=(), limits=LimitSettings(window_history=history),
        seasonal=spec, horizon=H,
    )  # fmt: skip


def series(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    i = np.arange(n)
    ts = 1_700_000_000.0 + SPACING * i
    return ts, 50 + 5 * np.sin(2 * np.pi * i / 24) + (i % 5) + rng.normal(0, 0.5, n)


def interleaved(n: int) -> tuple[list[SimpleNamespace], dict[str, tuple[np.ndarray, np.ndarray]]]:
    data = {f"s{k}": series(n, k) for k in range(3)}
    recs = []
    for i in range(n):
        for sid, (ts, y) in data.items():
            recs.append(rec(len(recs), sid, float(ts[i]), float(y[i])))
    return recs, data


def test_gathered_windows_carry_the_trainers_seasonal_parts() -> None:
    """Applied in batches of odd sizes, every window's parts equal :func:`run_series`'s for the
    same point: warm-up rows on the plain path (zeros), the others the trainer's numbers exactly."""
    recs, data = interleaved(80)
    pw = windows()
    got: dict[tuple[str, float], tuple[bool, np.ndarray, np.ndarray, float]] = {}
    for lo in range(0, len(recs), 7):
        res = pw.apply(recs[lo : lo + 7])
        w = res.windows
        if len(w) == 0:  # the first points: still warming up
            continue
        assert w.seasonal is not None
        for r, sid in enumerate(w.series):
            got[(sid, w.ts[r, -1])] = (
                bool(w.seasonal.ready[r]), w.values[r] - w.seasonal.past[r],
                w.seasonal.ahead[r], float(w.seasonal.level[r]),
            )  # fmt: skip
    plain = seasonal = 0
    for sid, (ts, y) in data.items():
        ready, adjusted, offsets, levels = run_series(SPEC, ts, y, T, H)
        for i in range(T - 1, len(y)):
            r, a, o, lv = got[(sid, ts[i])]
            assert r == ready[i], (sid, i)
            if r:
                np.testing.assert_array_equal(a, adjusted[i])
                np.testing.assert_array_equal(o, offsets[i])
                assert lv == levels[i]
                seasonal += 1
            else:
                np.testing.assert_array_equal(a, y[i - T + 1 : i + 1])
                np.testing.assert_array_equal(o, np.zeros(H))
                assert np.isnan(lv) and np.isnan(levels[i])
                plain += 1
    assert plain and seasonal  # both paths were met


def test_coalesced_windows_carry_the_parts_of_their_newest_point() -> None:
    """``--emit latest``: a series' later point in the batch replaces its window; the parts are
    those of the point kept (the trainer's), whether the batch gathers them at its end or a
    next point of the series came first."""
    recs, data = interleaved(80)
    pw = windows()
    expect = {sid: run_series(SPEC, ts, y, T, H) for sid, (ts, y) in data.items()}
    checked = 0
    for lo in range(0, len(recs), 8):
        w = pw.apply(recs[lo : lo + 8], latest=True).windows
        assert len(set(w.series)) == len(w)  # one window per series
        if len(w) == 0:
            continue
        assert w.seasonal is not None
        for r, sid in enumerate(w.series):
            i = int(np.searchsorted(data[sid][0], w.ts[r, -1]))
            ready, adjusted, offsets, levels = expect[sid]
            assert bool(w.seasonal.ready[r]) == ready[i]
            if ready[i]:
                np.testing.assert_array_equal(w.values[r] - w.seasonal.past[r], adjusted[i])
                np.testing.assert_array_equal(w.seasonal.ahead[r], offsets[i])
                assert float(w.seasonal.level[r]) == levels[i]
                checked += 1
    assert checked


def test_a_redelivered_window_gets_the_parts_it_got_first_also_after_a_restore() -> None:
    recs, _ = interleaved(60)
    pw = windows()
    first = pw.apply(recs).windows
    assert first.seasonal is not None
    by_offset = {int(o): r for r, o in enumerate(first.offsets)}
    again = pw.apply(recs[-15:]).windows  # the last 5 points of each series, redelivered
    restored = windows()
    for sid in pw.series():
        restored.load_series(sid, pw.encode(sid))
    restored.applied = pw.applied
    after_restore = restored.apply(recs[-15:]).windows
    for w in (again, after_restore):
        assert w.seasonal is not None and len(w) == 15 and w.seasonal.ready.all()
        for r, o in enumerate(w.offsets.tolist()):
            f = by_offset[o]
            np.testing.assert_array_equal(w.seasonal.past[r], first.seasonal.past[f])
            np.testing.assert_array_equal(w.seasonal.ahead[r], first.seasonal.ahead[f])
            assert w.seasonal.level[r] == first.seasonal.level[f]


def test_the_blob_holds_the_state_of_the_serving_models_recursion_only() -> None:
    recs, _ = interleaved(40)
    pw = windows()
    pw.apply(recs)
    blob = pw.encode("s0")
    with pytest.raises(ValueError, match="seasonal state"):
        windows(spec=None).load_series("s0", blob)  # a model without seasons
    other = SeasonalSpec((5, 24), SPACING, 0.5, (0.2, 0.1))
    with pytest.raises(ValueError, match="another model"):
        windows(spec=other).load_series("s0", blob)
    plain = windows(spec=None)
    plain.apply(recs)
    with pytest.raises(ValueError, match="no seasonal state"):
        windows().load_series("s0", plain.encode("s0"))
    with pytest.raises(ValueError):
        windows().load_series("s0", blob[:-8])  # cut short
