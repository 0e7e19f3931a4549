"""In-memory partition windows: ordering checks, limits, redelivery and the blob round trip."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import orjson

from stream.settings import LimitSettings
from stream.windows import PartitionWindows, decode_series


def rec(offset: int, key: str, ts: float, value: float, **features: float) -> SimpleNamespace:
    doc = {"ts": ts, "value": value, "features": features}
    return SimpleNamespace(offset=offset, key=key.encode(), value=orjson.dumps(doc), timestamp=0)


def windows(**limits: object) -> PartitionWindows:
    return PartitionWindows(
        "t",
        0,
        sequence_length=4,
        features=(),
        limits=LimitSettings(**{"window_history": 2, **limits}),
    )  # type: ignore[arg-type]


def test_forecast_windows_follow_each_accepted_event() -> None:
    pw = windows()
    res = pw.apply([rec(i, "a", i, 10 + i) for i in range(10)])
    assert res.accepted == 10 and res.warming == 3
    assert res.windows.offsets.tolist() == list(range(3, 10))
    # Each row is the window as it stood at its event, even after the ring wrapped (capacity 6).
    np.testing.assert_array_equal(res.windows.values[0], [10, 11, 12, 13])
    np.testing.assert_array_equal(res.windows.values[-1], [16, 17, 18, 19])
    assert pw.window("a")[0].tolist() == [4, 5, 6, 7, 8, 9]


def test_duplicate_late_and_redelivery() -> None:
    pw = windows()
    pw.apply([rec(i, "a", i, i) for i in range(6)])
    res = pw.apply([rec(6, "a", 5, 0), rec(7, "a", 2, 0)])
    assert [r.reason for _, r in res.rejected] == ["duplicate", "late"]
    # Redelivered records change nothing; the retained ones are forecast again, identically.
    before = pw.window("a")
    res = pw.apply([rec(o, "a", o, o) for o in range(0, 6)])
    assert res.redelivered == 6 and res.accepted == 0 and not res.rejected
    assert res.windows.offsets.tolist() == [3, 4, 5]  # offsets 0..2 were warming
    np.testing.assert_array_equal(res.windows.values[-1], [2, 3, 4, 5])
    for a, b in zip(before, pw.window("a"), strict=False):
        np.testing.assert_array_equal(a, b)


def test_series_cap_and_idle_ttl_in_event_time() -> None:
    pw = windows(max_series_per_partition=3, series_ttl=100)
    res = pw.apply([rec(0, "a", 0, 1), rec(1, "b", 50, 1), rec(2, "c", 60, 1), rec(3, "d", 70, 1)])
    assert [r.reason for _, r in res.rejected] == ["series_limit"]
    # b alone runs ahead: the clock (newest ts of every series but the lead) stays at c's 60.
    res = pw.apply([rec(4, "b", 200, 1), rec(5, "d", 71, 1)])
    assert [r.reason for _, r in res.rejected] == ["series_limit"] and pw.max_ts == 60
    # c follows: the clock is 200, so a (0 < 200 - 100) is idle and forgotten, and d fits.
    res = pw.apply([rec(6, "c", 201, 1), rec(7, "d", 202, 1)])
    assert not res.rejected and sorted(pw.series()) == ["b", "c", "d"] and pw.max_ts == 201
    snap = pw.snapshot()
    assert "a" in snap.delete and snap.applied == 7


def test_one_series_far_ahead_cannot_make_the_others_idle() -> None:
    """A producer's unit mistake that slips through (record timestamps as wrong as the event
    times) moves one series far ahead; every other series of the partition keeps its window."""
    pw = windows(series_ttl=3600)
    pw.apply([rec(i * 3 + j, s, 1000.0 + i, i) for i in range(6) for j, s in enumerate("abc")])
    pw.apply([rec(100, "a", 1_700_000_000.0, 1)])  # a jumps ~54 years ahead
    res = pw.apply([rec(101 + j, s, 1006.0, 6) for j, s in enumerate("bc")])
    assert not res.rejected and res.windows.series == ["b", "c"]
    assert len(pw.window("b")[0]) == 6 and len(pw.window("c")[0]) == 6  # nothing forgotten
    assert pw.max_ts == 1006.0
    # The clock is the same after a reload from the stored blobs (Redis), whatever the order.
    again = windows(series_ttl=3600)
    for sid in ("c", "a", "b"):
        again.load_series(sid, pw.encode(sid))
    assert again.max_ts == pw.max_ts


def test_future_events_are_refused_against_the_record_timestamp() -> None:
    pw = PartitionWindows(
        "t", 0, sequence_length=4, features=(), limits=LimitSettings(window_history=2),
        max_future_skew=300.0,
    )  # fmt: skip

    def at(offset: int, key: bytes, ts: int, record_ms: int) -> SimpleNamespace:
        value = b'{"ts": %d, "value": 1}' % ts
        return SimpleNamespace(offset=offset, key=key, value=value, timestamp=record_ms)

    now_ms = 1_700_000_000_000
    # 299 s ahead: accepted; 301 s: `future`; no record timestamp (-1): only the fixed range.
    res = pw.apply([at(0, b"a", 1700000299, now_ms), at(1, b"a", 1700000301, now_ms),
                    at(2, b"b", 1800000000, -1)])  # fmt: skip
    assert [(r.offset, why.reason) for r, why in res.rejected] == [(1, "future")]
    assert pw.max_ts == 1700000299.0  # the refused event never moved the clock


def test_emit_latest_coalesces_per_series() -> None:
    pw = windows()
    res = pw.apply(
        [rec(i, s, i, i) for i in range(20) for s in ("x",)]
        + [rec(20 + i, "y", i, i) for i in range(6)],
        latest=True,
    )
    assert sorted(zip(res.windows.series, res.windows.offsets.tolist(), strict=True)) == [
        ("x", 19),
        ("y", 25),
    ]


def test_blob_round_trip_with_features() -> None:
    pw = PartitionWindows(
        "t", 1, sequence_length=3, features=("f", "g"), limits=LimitSettings(window_history=1)
    )
    pw.apply([rec(i, "a", i, i, f=-i, g=2 * i) for i in range(6)])
    snap = pw.snapshot(full=True)
    off, _, _, feat = decode_series(snap.set["a"], 2)
    assert off.tolist() == [2, 3, 4, 5] and feat[:, 1].tolist() == [4, 6, 8, 10]
    other = PartitionWindows(
        "t", 1, sequence_length=3, features=("f", "g"), limits=LimitSettings(window_history=1)
    )
    other.load_series("a", snap.set["a"])
    other.applied = pw.applied
    res = other.apply([rec(6, "a", 6, 6, f=-6, g=12)])
    np.testing.assert_array_equal(res.windows.features["g"][0], [8, 10, 12])


def test_an_unexpected_error_in_admission_becomes_a_marked_rejection() -> None:
    """The last resort of apply(): a record that makes admission raise (here a record object
    whose timestamp cannot be read) is refused as `schema`, marked unexpected (the worker counts
    it), and the records after it are applied as usual."""

    class Broken:
        offset, key, value = 1, b"a", b'{"ts": 2, "value": 1}'

        @property
        def timestamp(self) -> int:
            raise RuntimeError("no timestamp")

    pw = windows()
    res = pw.apply([rec(0, "a", 1, 1), Broken(), rec(2, "a", 3, 1)])  # type: ignore[list-item]
    assert res.accepted == 2 and pw.applied == 2
    [(bad, why)] = res.rejected
    assert bad.offset == 1 and why.reason == "schema" and why.unexpected
    assert "RuntimeError" in why.message
    assert pw.window("a")[1].tolist() == [1.0, 3.0]
