"""The shipped JSON Schemas (deploy/schemas/) against real messages.

A real worker (``stream.worker.Worker``, in a thread of this process) reads real events from
Kafka and writes forecasts and dead-letter records; every forecast message must validate against
``forecast.schema.json``, every accepted input event against ``event.schema.json``, and the
originals of events refused for their content must not. The HTTP answer validates against
``predict-response.schema.json``.
"""

from __future__ import annotations

import math
import warnings
from datetime import timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deploy.http.app import create_app
from deploy.http.settings import ServeSettings
from deploy.schemas import NAMES, schema, validator
from model.registry import ModelRegistry
from stream.decode import Event, decode_event
from tests.helpers.kafka import consume_all, produce
from tests.helpers.worker import ThreadWorker

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

T0 = 1_732_600_000.0


def test_schemas_are_valid_draft_2020_12() -> None:
    from jsonschema import Draft202012Validator

    for name in NAMES:
        Draft202012Validator.check_schema(schema(name))
        assert schema(name)["$id"].endswith(f"/{name}.schema.json")


def events(n_series: int, n: int) -> list[tuple[str, bytes]]:
    out = []
    for i in range(n):
        for s in range(n_series):
            ts: Any = T0 + 300.0 * i
            if i % 3 == 1:  # some events carry RFC 3339 times
                from datetime import UTC, datetime

                ts = datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")
            doc = {"series_id": f"s{s}", "ts": ts, "value": 10.0 * s + math.sin(i / 5)}
            out.append((f"s{s}", orjson.dumps(doc)))
    return out


BAD_CONTENT = [
    ("s0", b'{"series_id": "s0", "value": 1.0}'),  # schema: no ts
    ("s0", b'{"series_id": "s0", "ts": "2024-11-26T10:00:00", "value": 1.0}'),  # no offset
    ("s0", b'{"series_id": "s0", "ts": 1.0, "value": "high"}'),  # schema: value type
    ("s0", b'{"series_id": "s0", "ts": 1.0, "value": NaN}'),  # non_finite
    ("s0", b'{"series_id": "s0", "ts": 1.0, "value": 1e999}'),  # non_finite
    ("s0", b"[1, 2, 3]"),  # schema: not an object
]


@pytest.mark.integration
def test_real_worker_messages_match_the_schemas(
    stack: Any, topics: Any, redis_url: str, tiny_model_dir: Path
) -> None:
    good = events(3, 52)  # 5 forecasts per series
    produce(stack.bootstrap, topics.input, good + BAD_CONTENT)
    w = ThreadWorker([
        "start", "--bootstrap-servers", stack.bootstrap, "--redis-url", redis_url,
        "--model-dir", str(tiny_model_dir), "--input-topic", topics.input,
        "--output-topic", topics.output, "--dlq-topic", topics.dlq,
        "--group-id", f"g-{topics.input}", "--threads", "1", "--metrics-port", "0",
    ]).start()  # fmt: skip
    try:
        forecasts = consume_all(stack.bootstrap, topics.output, expected=15, timeout=90, idle=20)
        dead = consume_all(stack.bootstrap, topics.dlq, expected=len(BAD_CONTENT), timeout=60)
    finally:
        w.stop()

    fv, ev = validator("forecast"), validator("event")
    assert len(forecasts) == 15
    for r in forecasts:
        doc = orjson.loads(r.value)
        errors = [e.message for e in fv.iter_errors(doc)]
        assert not errors, errors
        h = doc["horizon"]
        assert all(
            len(a) == h
            for a in (
                doc["target_ts"],
                doc["mean"],
                doc["std"],
                *doc["lower"].values(),
                *doc["upper"].values(),
            )
        )
        assert r.key.decode() == doc["series_id"]
        assert doc["source"]["topic"] == topics.input
    for _key, value in good:
        assert ev.is_valid(orjson.loads(value))
    assert sorted(r.value for r in dead) == sorted(v for _, v in BAD_CONTENT)
    reasons = {r.headers["error.reason"] for r in dead}
    assert reasons <= {"schema", "non_finite"}
    for r in dead:
        try:
            doc = orjson.loads(r.value)
        except orjson.JSONDecodeError:
            continue  # NaN / 1e999: not even standard JSON, so no schema can accept it
        assert not ev.is_valid(doc), r.value


def test_http_answer_matches_predict_response_schema(tiny_model_dir: Path) -> None:
    body = {"series_id": "s1", "ts": [T0 + 60.0 * i for i in range(48)],
            "values": [float(i % 7) for i in range(48)]}  # fmt: skip
    app = create_app(ServeSettings(model_dir=tiny_model_dir, device="cpu", threads=1),
                     ModelRegistry(tiny_model_dir))  # fmt: skip
    with TestClient(app) as c:
        doc = c.post("/predict", json=body).json()
    assert [e.message for e in validator("predict-response").iter_errors(doc)] == []
    assert not validator("forecast").is_valid(doc)  # a topic message needs `source`
    doc["source"] = {"topic": "events", "partition": 0, "offset": 1}
    assert validator("forecast").is_valid(doc)
    assert not validator("predict-response").is_valid(doc)


# The event schema and the worker's decoder agree on generated events.
numbers = st.floats(allow_nan=False, allow_infinity=False, width=64)
# RFC 3339 offsets are whole minutes (the decoder also takes Python's ±HH:MM:SS; the schema does
# not, which is stricter than the worker on purpose).
offsets = st.integers(-23 * 60 - 59, 23 * 60 + 59).map(lambda m: timezone(timedelta(minutes=m)))
# The schema checks the year of the written date-time (1900-2199), the decoder the instant: they
# differ only within a day of the two boundaries, where the offset decides, so those days are
# left out.
rfc3339 = (
    st.datetimes(timezones=offsets)
    .filter(
        lambda d: (
            (d.month, d.day) not in ((1, 1), (12, 31)) or d.year not in (1899, 1900, 2199, 2200)
        )
    )
    .map(lambda d: d.isoformat())
)
naive = st.datetimes().map(lambda d: d.isoformat(timespec="seconds"))


@given(
    sid=st.text(min_size=1, max_size=300),
    ts=numbers | rfc3339 | naive | st.booleans() | st.none(),
    value=numbers | st.text(max_size=3) | st.none() | st.booleans(),
    drop=st.sampled_from([None, "ts", "value"]),
)
@settings(max_examples=300, deadline=None)
def test_event_schema_agrees_with_the_decoder(
    sid: str, ts: Any, value: Any, drop: str | None
) -> None:
    doc = {"series_id": sid, "ts": ts, "value": value}
    if drop:
        del doc[drop]
    raw = orjson.dumps(doc)
    decoded = decode_event(sid.encode(), raw, max_bytes=1 << 20)
    assert validator("event").is_valid(doc) == isinstance(decoded, Event), (doc, decoded)
