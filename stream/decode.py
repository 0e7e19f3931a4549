"""Decoding and validation of input events (docs/contract.md, "Input events").

:func:`decode_event` turns one Kafka record's key and value bytes into an :class:`Event`, or a
:class:`Rejection` whose ``reason`` is one of the dead-letter words of the contract. It is total:
whatever the bytes, it returns one of the two and never raises (a hostile or buggy producer must
not be able to stop a worker, DESIGN invariant 4). Should an unforeseen exception still escape
the checks, a last-resort catch turns it into a ``schema`` rejection marked ``unexpected``, which
the worker counts separately (``eventcast_decode_unexpected``) so the bug is noticed; the fuzz
tests in ``tests/stream/test_fuzz.py`` assert it is never reached.

Per-series checks that need state (``late``, ``duplicate``, ``series_limit``) belong to the
window store, not here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, get_args

import orjson

MAX_SERIES_ID_CHARS = 256
# The model computes in float32 (largest ~3.4e38); values beyond this bound would overflow on the
# way to a forecast, so they are rejected as `non_finite` like NaN and infinity.
MAX_ABS_VALUE = 1e30
# The plausible range of an event time, fixed: historical data is welcome (the bundled co2 series
# starts in 1958, a negative epoch), but a time after 2200 is almost always milliseconds or
# microseconds sent as seconds (`future`), and one before 1900 a unit or sign mistake (`schema`).
MIN_TS = -2_208_988_800.0  # 1900-01-01T00:00:00Z
MAX_TS = 7_258_118_400.0  # 2200-01-01T00:00:00Z

# The dead-letter reasons of docs/contract.md, in one place.
Reason = Literal[
    "invalid_json",
    "schema",
    "non_finite",
    "too_large",
    "missing_key",
    "key_mismatch",
    "late",
    "duplicate",
    "series_limit",
    "missing_feature",
    "future",
    "model_output",
]
REASONS: tuple[str, ...] = get_args(Reason)


@dataclass(frozen=True, slots=True)
class Event:
    """A valid event: ``ts`` in epoch seconds (UTC), finite ``value``, and exactly the required
    features (other fields of the input are dropped)."""

    series_id: str
    ts: float
    value: float
    features: dict[str, float]


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why an event was refused: ``reason`` is one of :data:`REASONS`, ``message`` says what was
    wrong for a human reading the dead-letter topic. ``unexpected``: made by the last-resort catch
    of :func:`decode_event` (a bug to report, never a verdict on the event)."""

    reason: str
    message: str
    unexpected: bool = False


def _is_number(x: object) -> bool:
    # bool is an int subclass in Python but not a JSON number.
    return isinstance(x, int | float) and not isinstance(x, bool)


def parse_timestamp(raw: object) -> float:
    """Epoch seconds from a JSON ``ts``: a number (seconds, may be fractional) or an RFC 3339
    string with an offset or ``Z``.

    Raises ValueError for anything else: a string without an offset, an unparsable string, a
    boolean, a non-finite number, or another type.
    """
    if _is_number(raw):
        try:
            ts = float(raw)  # type: ignore[arg-type]
        except OverflowError:  # an integer beyond float range
            raise ValueError("ts is beyond float range") from None
        if not math.isfinite(ts):
            raise ValueError(f"ts is not finite: {raw!r}")
        return ts
    if isinstance(raw, str):
        text = raw.strip()
        if len(text) < 19 or text[10] not in "Tt ":
            # An RFC 3339 date-time starts with YYYY-MM-DDTHH:MM:SS (19 chars); reject bare dates
            # and numeric strings that fromisoformat would also accept.
            raise ValueError(f"ts {raw!r} is not an RFC 3339 date-time")
        if text[-1] in "zZ":
            text = text[:-1] + "+00:00"
        try:
            dt = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"ts {raw!r} is not an RFC 3339 date-time") from None
        if dt.tzinfo is None:
            raise ValueError(f"ts {raw!r} has no UTC offset (add Z or +HH:MM)")
        return dt.timestamp()
    raise ValueError(f"ts must be a number or an RFC 3339 string, got {type(raw).__name__}")


def _loads(value: bytes) -> object:
    """Parse a UTF-8 JSON document. Raises ValueError (``invalid_json``) or RecursionError.

    orjson is the fast path. It refuses NaN/Infinity literals and numbers beyond float range;
    the standard library accepts them, so such events are reported as ``non_finite`` rather than
    ``invalid_json``. The fallback decodes the bytes as UTF-8 itself (``json.loads`` on bytes
    would silently accept UTF-16 and UTF-32, which the contract does not), and parses every
    integer as a float: a few hundred digits become ``inf`` (rejected as ``non_finite``) instead
    of a Python int that overflows later, and 5,000 digits do not hit Python's int-parsing
    limit.
    """
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError:
        pass
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"the value is not UTF-8 (byte {exc.start})") from None
    return json.loads(text, parse_int=float)


def _number(what: str, raw: object) -> float | Rejection:
    """A finite float within ±:data:`MAX_ABS_VALUE` from a JSON number, or the rejection."""
    if not _is_number(raw):
        return Rejection("schema", f"{what} must be a number, got {type(raw).__name__}")
    try:
        x = float(raw)  # type: ignore[arg-type]
    except OverflowError:  # an integer beyond float range (orjson gives big ints as int)
        return Rejection("non_finite", f"{what} is beyond float range")
    if not math.isfinite(x):
        return Rejection("non_finite", f"{what} is not finite")
    if abs(x) > MAX_ABS_VALUE:
        return Rejection("non_finite", f"{what} {x:g} is beyond ±{MAX_ABS_VALUE:g}")
    return x


def decode_event(
    key: bytes | None,
    value: bytes | None,
    *,
    max_bytes: int = 65536,
    required_features: Sequence[str] = (),
    record_ts_ms: int | None = None,
    max_future_skew: float | None = None,
) -> Event | Rejection:
    """Validate one record; return the :class:`Event` or the first :class:`Rejection` found.

    Checks, in order: value size (``too_large``), key present (``missing_key``) and UTF-8 of at
    most 256 characters (``schema``), UTF-8 JSON object (``invalid_json``; a non-object JSON
    value is ``schema``), ``series_id`` a 1–256 character string equal to the key (``schema`` /
    ``key_mismatch``), ``ts`` present and an epoch number or RFC 3339 string with an offset
    (``schema``), finite (``non_finite``), before 2200 (``future``) and after 1900 (``schema``),
    and, when ``record_ts_ms`` (the Kafka record timestamp, ms; negative: none) and
    ``max_future_skew`` (seconds) are given, at most that far ahead of the record (``future``);
    ``value`` a finite number within ±1e30 (``schema`` / ``non_finite``); every required feature
    present (``missing_feature``) as such a number. Features not required are ignored.

    Never raises: an unforeseen exception becomes a ``schema`` rejection with ``unexpected`` set
    and the exception type in the message.
    """
    try:
        return _decode(key, value, max_bytes, required_features, record_ts_ms, max_future_skew)
    except Exception as exc:  # the last resort: count it, never let a record stop the worker
        return Rejection(
            "schema", f"unexpected {type(exc).__name__} while decoding: {exc}"[:300], True
        )


def _decode(
    key: bytes | None,
    value: bytes | None,
    max_bytes: int,
    required_features: Sequence[str],
    record_ts_ms: int | None,
    max_future_skew: float | None,
) -> Event | Rejection:
    if value is not None and len(value) > max_bytes:
        return Rejection("too_large", f"value is {len(value)} bytes, the limit is {max_bytes}")
    if not key:
        return Rejection("missing_key", "the record has no key (the series id)")
    try:
        series_id = key.decode("utf-8")
    except UnicodeDecodeError:
        return Rejection("schema", "the key is not valid UTF-8")
    if len(series_id) > MAX_SERIES_ID_CHARS:
        return Rejection("schema", f"the key is longer than {MAX_SERIES_ID_CHARS} characters")
    if value is None:
        return Rejection("invalid_json", "the record has no value")
    try:
        doc = _loads(value)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, not UTF-8, too deep
        return Rejection("invalid_json", f"not valid JSON: {exc}"[:300])
    if not isinstance(doc, dict):
        return Rejection("schema", f"expected a JSON object, got {type(doc).__name__}")

    sid = doc.get("series_id")
    if sid is not None:
        if not isinstance(sid, str) or not 1 <= len(sid) <= MAX_SERIES_ID_CHARS:
            return Rejection("schema", "series_id must be a string of 1 to 256 characters")
        if sid != series_id:
            return Rejection("key_mismatch", f"series_id {sid[:64]!r} differs from the key")

    if "ts" not in doc:
        return Rejection("schema", "missing field ts")
    raw_ts = doc["ts"]
    if _is_number(raw_ts):
        num = _number("ts", raw_ts)
        if isinstance(num, Rejection) and num.reason == "non_finite":
            return num
    try:
        ts = parse_timestamp(raw_ts)
    except ValueError as exc:
        return Rejection("schema", str(exc)[:300])
    if ts > MAX_TS:
        return Rejection(
            "future", f"ts {ts:.6g} is after 2200-01-01 (milliseconds sent as seconds?)"
        )
    if ts < MIN_TS:
        return Rejection("schema", f"ts {ts:.6g} is before 1900-01-01 (a unit or sign mistake?)")
    if max_future_skew is not None and record_ts_ms is not None and record_ts_ms >= 0:
        ahead = ts - record_ts_ms / 1000.0
        if ahead > max_future_skew:
            return Rejection(
                "future",
                f"ts is {ahead:.6g} s ahead of the record's Kafka timestamp "
                f"(--max-future-skew {max_future_skew:g} s)",
            )

    if "value" not in doc:
        return Rejection("schema", "missing field value")
    val = _number("value", doc["value"])
    if isinstance(val, Rejection):
        return val

    raw_features = doc.get("features")
    if raw_features is not None and not isinstance(raw_features, dict):
        return Rejection("schema", "features must be an object of name -> number")
    features: dict[str, float] = {}
    for name in required_features:
        if raw_features is None or name not in raw_features:
            return Rejection("missing_feature", f"missing feature {name!r}")
        fv = _number(f"feature {name!r}", raw_features[name])
        if isinstance(fv, Rejection):
            return fv
        features[name] = fv
    return Event(series_id, ts, val, features)
