"""Fuzzing decoding and window admission (hypothesis): whatever a producer sends, each record
becomes an event or a rejection with a reason of the contract, nothing raises, and the
last-resort catch of :func:`stream.decode.decode_event` is never what answers.

Each test runs 10,000 examples in ``make test`` (``FUZZ_EXAMPLES`` overrides it for a longer
hunt); the database is off so a run never depends on an earlier one.
"""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream.decode import MAX_ABS_VALUE, MAX_TS, MIN_TS, REASONS, Event, Rejection, decode_event
from stream.settings import LimitSettings
from stream.windows import PartitionWindows

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "10000"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
ENCODINGS = ("utf-8", "utf-16", "utf-16-le", "utf-32", "utf-8-sig", "latin-1")

# Every JSON type, with the numbers a hostile producer picks: huge integers (hundreds of
# digits), floats at and beyond float32/float64 range, NaN and infinities.
numbers = st.one_of(
    st.integers(),
    st.integers(min_value=10**300, max_value=10**420),
    st.integers(min_value=-(10**420), max_value=-(10**300)),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e30, -1e30, 1.0001e30, 3.5e38, 1.8e308, 1e12, 1.7e9, -2.3e9, 7.3e9]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=40))
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
timestamps = st.one_of(
    json_values,
    numbers,
    st.datetimes().map(lambda d: d.isoformat() + st_choice(d)),
    st.sampled_from(["2026-11-30T12:00:00Z", "2026-11-30T12:00:00", "1958-03-29T00:00:00Z",
                     "2400-01-01T00:00:00+00:00", "9999-12-31T23:59:59Z"]),
)  # fmt: skip


def st_choice(d: Any) -> str:
    return "Z" if d.microsecond % 2 else ""


documents = st.fixed_dictionaries(
    {},
    optional={
        "series_id": st.one_of(st.just("s"), json_values),
        "ts": timestamps,
        "value": st.one_of(numbers, json_values),
        "features": st.one_of(
            st.dictionaries(st.sampled_from(["a", "b", "temp"]), st.one_of(numbers, json_values)),
            json_values,
        ),
        "extra": json_values,
    },
)


def to_bytes(doc: Any, encoding: str) -> bytes:
    # json.dumps writes NaN/Infinity and any integer, as a buggy producer's library might.
    text = json.dumps(doc, allow_nan=True, ensure_ascii=False)
    return text.encode(encoding, "replace")


def check(result: Event | Rejection) -> None:
    """The outcome is total and sane: a rejection names a contract reason and was not made by the
    last-resort catch; an event holds only finite numbers within the limits."""
    if isinstance(result, Rejection):
        assert result.reason in REASONS and result.message
        assert not result.unexpected, result.message
        return
    assert isinstance(result, Event)
    assert MIN_TS <= result.ts <= MAX_TS
    assert math.isfinite(result.value) and abs(result.value) <= MAX_ABS_VALUE
    assert all(math.isfinite(v) and abs(v) <= MAX_ABS_VALUE for v in result.features.values())


@FUZZ
@given(key=st.one_of(st.none(), st.binary(max_size=300)), value=st.one_of(st.none(), st.binary()))
def test_arbitrary_bytes(key: bytes | None, value: bytes | None) -> None:
    check(decode_event(key, value, required_features=("a",)))


@FUZZ
@given(doc=st.one_of(documents, json_values), encoding=st.sampled_from(ENCODINGS),
       record_ms=st.one_of(st.just(-1), st.integers(0, 2**62)))  # fmt: skip
def test_arbitrary_json_in_every_encoding(doc: Any, encoding: str, record_ms: int) -> None:
    value = to_bytes(doc, encoding)
    result = decode_event(
        b"s", value, required_features=("a",), record_ts_ms=record_ms, max_future_skew=300.0
    )
    check(result)
    if encoding in ("utf-16", "utf-16-le", "utf-32", "utf-8-sig"):
        # Only UTF-8 is accepted (a byte-order mark included): these never become events.
        assert isinstance(result, Rejection)
        assert result.reason in ("invalid_json", "too_large")


@FUZZ
@given(depth=st.integers(1, 70_000), opener=st.sampled_from(["[", '{"a":']))
def test_deep_nesting(depth: int, opener: str) -> None:
    check(decode_event(b"s", (opener * depth).encode()))


records = st.builds(
    SimpleNamespace,
    offset=st.just(0),
    key=st.one_of(st.sampled_from([b"a", b"b", b"c", b"d"]), st.none(), st.binary(max_size=8)),
    value=st.one_of(
        st.builds(to_bytes, documents, st.sampled_from(["utf-8", "utf-8", "utf-16"])),
        st.builds(
            lambda ts, v: json.dumps({"ts": ts, "value": v}).encode(),
            st.floats(-3e9, 8e9), st.floats(-2e30, 2e30),
        ),
        st.binary(max_size=64),
    ),
    timestamp=st.one_of(st.just(-1), st.integers(0, 2**53)),
)  # fmt: skip


@FUZZ
@given(recs=st.lists(records, max_size=20), ttl=st.sampled_from([0.0, 1.0, 3600.0]),
       max_series=st.integers(1, 3))  # fmt: skip
def test_window_admission(recs: list[SimpleNamespace], ttl: float, max_series: int) -> None:
    """Records through a partition's windows (decode, ordering, series cap, idle TTL, clock):
    every record is accepted or rejected with a reason, and the state survives its own
    encoding (what Redis stores)."""
    for i, r in enumerate(recs):
        r.offset = i
    pw = PartitionWindows(
        "t", 0, sequence_length=4, features=(), max_future_skew=300.0,
        limits=LimitSettings(max_series_per_partition=max_series, series_ttl=ttl, window_history=2),
    )  # fmt: skip
    res = pw.apply(recs)
    assert res.accepted + len(res.rejected) == len(recs)
    for _, rej in res.rejected:
        assert rej.reason in REASONS and not rej.unexpected, rej
    assert len(pw) <= max_series
    assert pw.applied == (len(recs) - 1 if recs else -1)
    # The windows reload from their stored form (Redis) to the same state and idle clock.
    again = PartitionWindows(
        "t", 0, sequence_length=4, features=(), limits=pw.limits, max_future_skew=300.0
    )
    for sid in pw.series():
        again.load_series(sid, pw.encode(sid))
    assert sorted(again.series()) == sorted(pw.series())
    assert again.max_ts == pw.max_ts or not pw.series()
