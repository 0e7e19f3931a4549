"""Decoding and validation of input events (CONTRACT.md, "Input events").

:func:`decode_event` turns one Kafka record's key and value bytes into an :class:`Event`, or a
:class:`Rejection` whose ``reason`` is one of the dead-letter words of CONTRACT.md. It never
raises on bad input: the worker sends rejections to the dead-letter topic and keeps going.
Per-series checks that need state (``late``, ``duplicate``, ``series_limit``) belong to the
window store, not here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import orjson

MAX_SERIES_ID_CHARS = 256
# The model computes in float32 (largest ~3.4e38); values beyond this bound would overflow on the
# way to a forecast, so they are rejected as `non_finite` like NaN and infinity.
MAX_ABS_VALUE = 1e30

# The dead-letter reasons of CONTRACT.md, in one place.
REASONS = (
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
)


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
    wrong for a human reading the dead-letter topic."""

    reason: str
    message: str


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
        ts = float(raw)  # type: ignore[arg-type]
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
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError:
        # orjson refuses NaN/Infinity literals and overflowing numbers; the standard library
        # accepts them, so such events are reported as `non_finite` rather than `invalid_json`.
        return json.loads(value)


def decode_event(
    key: bytes | None,
    value: bytes | None,
    *,
    max_bytes: int = 65536,
    required_features: Sequence[str] = (),
) -> Event | Rejection:
    """Validate one record; return the :class:`Event` or the first :class:`Rejection` found.

    Checks, in order: value size (``too_large``), key present (``missing_key``), JSON object
    (``invalid_json``; a non-object JSON value is ``schema``), ``series_id`` a 1–256 character
    string equal to the key (``schema`` / ``key_mismatch``), ``ts`` and ``value`` present and of
    the right type (``schema``) and finite (``non_finite``), every required feature present
    (``missing_feature``) as a finite number. Features not required are ignored.
    """
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
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError
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
    if _is_number(raw_ts) and not math.isfinite(raw_ts):
        return Rejection("non_finite", "ts is not finite")
    try:
        ts = parse_timestamp(raw_ts)
    except ValueError as exc:
        return Rejection("schema", str(exc)[:300])

    if "value" not in doc:
        return Rejection("schema", "missing field value")
    raw_value = doc["value"]
    if not _is_number(raw_value):
        return Rejection("schema", f"value must be a number, got {type(raw_value).__name__}")
    val = float(raw_value)
    if not math.isfinite(val):
        return Rejection("non_finite", "value is not finite")
    if abs(val) > MAX_ABS_VALUE:
        return Rejection("non_finite", f"value {val:g} is beyond ±{MAX_ABS_VALUE:g}")

    raw_features = doc.get("features")
    if raw_features is not None and not isinstance(raw_features, dict):
        return Rejection("schema", "features must be an object of name -> number")
    features: dict[str, float] = {}
    for name in required_features:
        if raw_features is None or name not in raw_features:
            return Rejection("missing_feature", f"missing feature {name!r}")
        f = raw_features[name]
        if not _is_number(f):
            return Rejection("schema", f"feature {name!r} must be a number")
        fv = float(f)
        if not math.isfinite(fv) or abs(fv) > MAX_ABS_VALUE:
            return Rejection("non_finite", f"feature {name!r} is not finite or beyond ±1e30")
        features[name] = fv
    return Event(series_id, ts, val, features)
