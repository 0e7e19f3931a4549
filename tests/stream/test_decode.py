"""Event decoding and validation: each dead-letter reason of docs/contract.md needing no state."""

from __future__ import annotations

import math

import orjson
import pytest

from stream.decode import Event, Rejection, decode_event, parse_timestamp


def ok(key: bytes | None, doc: object, **kw: object) -> Event:
    ev = decode_event(key, orjson.dumps(doc), **kw)  # type: ignore[arg-type]
    assert isinstance(ev, Event), ev
    return ev


def reason(key: bytes | None, value: bytes | None, **kw: object) -> str:
    ev = decode_event(key, value, **kw)  # type: ignore[arg-type]
    assert isinstance(ev, Rejection), ev
    return ev.reason


def test_valid_event_with_epoch_and_rfc3339_times() -> None:
    ev = ok(b"s1", {"series_id": "s1", "ts": 1732612800.5, "value": 3})
    assert ev == Event("s1", 1732612800.5, 3.0, {})
    assert ok(b"s1", {"ts": "2024-11-26T09:20:00Z", "value": 1}).ts == 1732612800.0
    assert ok(b"s1", {"ts": "2024-11-26T10:20:00+01:00", "value": 1}).ts == 1732612800.0
    feats = ok(b"s", {"ts": 1, "value": 1, "features": {"a": 2, "b": 3}}, required_features=("a",))
    assert feats.features == {"a": 2.0}  # features the model does not use are dropped


@pytest.mark.parametrize(
    ("key", "value", "why"),
    [
        (b"s", b"{not json", "invalid_json"),
        (b"s", None, "invalid_json"),
        (b"s", b"[1, 2]", "schema"),
        (b"s", b'{"value": 1}', "schema"),
        (b"s", b'{"ts": 1}', "schema"),
        (b"s", b'{"ts": 1, "value": "3"}', "schema"),
        (b"s", b'{"ts": true, "value": 3}', "schema"),
        (b"s", b'{"ts": "2024-11-26T10:00:00", "value": 3}', "schema"),
        (b"s", b'{"ts": "yesterday", "value": 3}', "schema"),
        (b"s", b'{"ts": 1, "value": 3, "series_id": 7}', "schema"),
        (b"s", b'{"ts": 1, "value": NaN}', "non_finite"),
        (b"s", b'{"ts": 1, "value": Infinity}', "non_finite"),
        (b"s", b'{"ts": 1, "value": -Infinity}', "non_finite"),
        (b"s", b'{"ts": 1, "value": 1e999}', "non_finite"),
        (b"s", b'{"ts": 1, "value": 1.86e31}', "non_finite"),  # overflows float32 on the way
        (b"s", b'{"ts": NaN, "value": 1}', "non_finite"),
        (None, b'{"ts": 1, "value": 1}', "missing_key"),
        (b"", b'{"ts": 1, "value": 1}', "missing_key"),
        (b"s1", b'{"series_id": "s2", "ts": 1, "value": 1}', "key_mismatch"),
    ],
)
def test_bad_events_are_rejected_with_their_reason(
    key: bytes | None, value: bytes | None, why: str
) -> None:
    assert reason(key, value) == why


def test_size_and_features() -> None:
    big = orjson.dumps({"ts": 1, "value": 1, "pad": "x" * 2000})
    assert reason(b"s", big, max_bytes=1000) == "too_large"
    assert isinstance(decode_event(b"s", big, max_bytes=4000), Event)
    need = ("temp",)
    assert reason(b"s", b'{"ts": 1, "value": 1}', required_features=need) == "missing_feature"
    assert (
        reason(b"s", b'{"ts": 1, "value": 1, "features": {"x": 1}}', required_features=need)
        == "missing_feature"
    )
    assert (
        reason(b"s", b'{"ts": 1, "value": 1, "features": {"temp": NaN}}', required_features=need)
        == "non_finite"
    )
    assert (
        reason(b"s", b'{"ts": 1, "value": 1, "features": [1]}', required_features=need) == "schema"
    )


def test_parse_timestamp_rules() -> None:
    assert parse_timestamp(5) == 5.0
    assert parse_timestamp("1970-01-01T00:00:10.5Z") == 10.5
    for bad in ("1732612800", "2024-11-26", "2024-11-26T10:00:00", True, None, math.inf, [1]):
        with pytest.raises(ValueError):
            parse_timestamp(bad)
