"""Poison records end to end: one worker, a one-partition topic (so a stall would block every
record behind it), every class of hostile or buggy record between good events, and the good
events produced with every compression codec Kafka producers use (kcat -z).

What each class must get (docs/contract.md, "Dead-letter topic"):

| poison | reason |
|---|---|
| an integer of 400 digits in ``value``, ``ts`` or a feature | ``non_finite`` |
| ``ts`` in milliseconds (after 2200) | ``future`` |
| ``ts`` an hour ahead of its Kafka record timestamp | ``future`` |
| UTF-16 and UTF-32 JSON, Latin-1 bytes | ``invalid_json`` |
| 60,000 nested brackets | ``invalid_json`` |
| 5 MB once decompressed (5 KB gzip on the broker) | ``too_large``: value cut, size + sha256 |
| a 5,000-byte key | ``schema``: key cut, size + sha256 headers |
| a series whose values make the model overflow float32 | ``model_output``, no forecast |
| NaN, a boolean ts, a key mismatch, no key | ``non_finite``, ``schema``, ``key_mismatch``, |
| | ``missing_key`` |
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.helpers.kafka import consume_all, kcat_produce, produce
from tests.helpers.tiny_model import make_tiny_model_dir
from tests.stream.conftest import STEP, T0, worker_argv

pytestmark = pytest.mark.integration

CODECS = ("gzip", "snappy", "lz4", "zstd")
BIG = "0" * 400  # an integer literal far beyond float range


def good(series: str, i: int) -> tuple[str, bytes]:
    doc = {"ts": T0 + i * STEP, "value": 10.0 + (i % 7), "features": {"temp": 20.0 + i % 3}}
    return series, orjson.dumps(doc)


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_poison_records_never_stop_or_blind_the_worker(
    stack: Any,
    make_topic: Any,
    redis_url: str,
    tmp_path: Path,
    thread_worker: Any,
    guarantee: str,
) -> None:
    from types import SimpleNamespace

    topics = SimpleNamespace(
        input=make_topic("events", 1), output=make_topic("forecasts", 1), dlq=make_topic("dlq", 1)
    )

    # The model checks out on its canary windows (finite outputs), but its location sits 1e9
    # window deviations above the last value: on a window of values near ±1e30 the forecast
    # overflows float32.
    def far_location(net: Any) -> None:
        net.head.bias[0] = 1e9

    model_dir = tmp_path / "models"
    make_tiny_model_dir(model_dir, features=("temp",), tweak=far_location)

    n_good = 60  # per good series; g0 and g1 fill their windows in the middle of the poison
    big_pad = "0" * 5_000_000
    now = time.time()
    poison: list[tuple[str | None, bytes, str]] = [
        ("p", b'{"ts": %d, "value": 1%s, "features": {"temp": 1}}' % (T0, BIG.encode()),
         "non_finite"),
        ("p", b'{"ts": 1%s, "value": 1, "features": {"temp": 1}}' % BIG.encode(), "non_finite"),
        ("p", b'{"ts": %d, "value": 1, "features": {"temp": -1%s}}' % (T0, BIG.encode()),
         "non_finite"),
        ("p", orjson.dumps({"ts": T0 * 1000, "value": 1, "features": {"temp": 1}}), "future"),
        ("p", orjson.dumps({"ts": now + 3600, "value": 1, "features": {"temp": 1}}), "future"),
        ("p", '{"ts": 1700000000, "value": 1, "features": {"temp": 1}}'.encode("utf-16"),
         "invalid_json"),
        ("p", '{"ts": 1700000000, "value": 1, "features": {"temp": 1}}'.encode("utf-32"),
         "invalid_json"),
        ("p", '{"ts": 1700000000, "value": 1, "note": "café"}'.encode("latin-1"), "invalid_json"),
        ("p", b"[" * 60_000, "invalid_json"),
        ("p", b'{"ts": 1700000000, "value": NaN, "features": {"temp": 1}}', "non_finite"),
        ("p", b'{"ts": true, "value": 1, "features": {"temp": 1}}', "schema"),
        ("p", orjson.dumps({"series_id": "q", "ts": T0, "value": 1}), "key_mismatch"),
        (None, orjson.dumps({"ts": T0, "value": 1}), "missing_key"),
        ("k" * 5000, orjson.dumps({"ts": T0, "value": 1}), "schema"),
    ]  # fmt: skip
    overflow = [
        ("m0", orjson.dumps({"ts": T0 + i * STEP, "value": (-1) ** i * 1e30,
                             "features": {"temp": 1.0}}))
        for i in range(48)
    ]  # fmt: skip

    # Produce, in this order, into partition 0: good events with each codec in turn, the poison
    # between them, the compressed 5 MB record, the overflowing series, then more good events.
    order: list[tuple[str, Any]] = []  # ("good", (series, i)) | ("poison", index) | ...
    chunk = n_good // 6
    for c, codec in enumerate(CODECS):
        lines = [good(s, i) for i in range(c * chunk, (c + 1) * chunk) for s in ("g0", "g1")]
        kcat_produce(
            stack.bootstrap, topics.input, [(k, v.decode()) for k, v in lines],
            compression=codec, partition=0,
        )  # fmt: skip
        order += [("good", (k, orjson.loads(v)["ts"])) for k, v in lines]
        half = poison[c * 4 : (c + 1) * 4]
        produce(stack.bootstrap, topics.input, [(k, v) for k, v, _ in half], partition=0)
        order += [("poison", why) for _, _, why in half]
    huge = orjson.dumps({"ts": T0, "value": 1, "features": {"temp": 1}, "pad": big_pad})
    kcat_produce(stack.bootstrap, topics.input, [("p", huge.decode())], compression="gzip",
                 partition=0)  # fmt: skip
    order.append(("poison", "too_large"))
    produce(stack.bootstrap, topics.input, overflow, partition=0)
    order += [("warming", None)] * 47 + [("poison", "model_output")]
    rest = [good(s, i) for i in range(4 * chunk, n_good) for s in ("g0", "g1")]
    produce(stack.bootstrap, topics.input, rest, partition=0)
    order += [("good", (k, orjson.loads(v)["ts"])) for k, v in rest]

    expected_dlq = [(offset, what) for offset, (kind, what) in enumerate(order) if kind == "poison"]
    by_series: dict[str, list[int]] = {}
    for offset, (kind, what) in enumerate(order):
        if kind == "good":
            by_series.setdefault(what[0], []).append(offset)
    expected_fc = {o for offs in by_series.values() for o in offs[47:]}
    assert len(expected_fc) == 2 * (n_good - 47)

    argv = worker_argv(
        stack.bootstrap, redis_url, model_dir, topics, "--metrics-port", "0",
        "--guarantee", guarantee,
    )  # fmt: skip
    w = thread_worker(argv)
    dlq = consume_all(stack.bootstrap, topics.dlq, expected=len(expected_dlq), timeout=120, idle=30)
    out = consume_all(
        stack.bootstrap, topics.output, expected=len(expected_fc), timeout=120, idle=15
    )
    w.check()
    assert w.thread.is_alive() and w.worker.alive()  # never stopped, never stuck
    w.stop()

    # Every good event after the poison is forecast, once (a clean run repeats nothing).
    offsets = [orjson.loads(r.value)["source"]["offset"] for r in out]
    assert sorted(offsets) == sorted(expected_fc) and len(offsets) == len(set(offsets))
    # Every poison record is a dead letter with its reason, in input order.
    got = [(int(r.headers["source.offset"]), r.headers["error.reason"]) for r in dlq]
    assert got == expected_dlq
    by_reason = {r.headers["error.reason"]: r for r in dlq}
    cut = by_reason["too_large"]
    assert int(cut.headers["original.size"]) == len(huge)
    assert cut.headers["original.sha256"] == hashlib.sha256(huge).hexdigest()
    assert cut.value is not None and 0 < len(cut.value) < 1_048_588 and huge.startswith(cut.value)
    long_key = next(r for r in dlq if r.key and r.key.startswith(b"kkk"))
    assert len(long_key.key) == 1024 and int(long_key.headers["original.key.size"]) == 5000
    assert by_reason["model_output"].key == b"m0"
    m = w.worker.metrics
    assert m.decode_unexpected._value.get() == 0  # the last-resort catch was never needed
    assert m.rejected.labels("model_output")._value.get() == 1
    assert m.dlq._value.get() == len(expected_dlq)
