"""The worker end to end against the real broker and Redis (in-process worker, fast)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from model.registry import ModelRegistry
from stream.store import partition_for
from tests.helpers.calibration import offline_forecast
from tests.helpers.kafka import consume_all, produce
from tests.helpers.store import StoreTarget, read_window_sync
from tests.helpers.tiny_model import make_tiny_model_dir
from tests.stream.conftest import T0, Truth, forecasts_by_source, make_events, wait_for, worker_argv

pytestmark = pytest.mark.integration


def offline_means(model_dir: Path, truth: Truth, picks: list[tuple[str, int]]) -> np.ndarray:
    """Mean forecasts computed offline (torch backend) for (series, index of event) picks."""
    model = ModelRegistry(model_dir).load(backend="torch", device="cpu")
    return offline_forecast(model, truth.events, picks).mean[:, 0]  # type: ignore[no-any-return]


def check_against_offline(
    model_dir: Path,
    truth: Truth,
    by_src: dict[Any, Any],
    n: int,
    seed: int = 0,
    *,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> None:
    rng = np.random.default_rng(seed)
    candidates = [(s, i) for s, evs in truth.events.items() for i in range(47, len(evs))]
    picks = [candidates[j] for j in rng.choice(len(candidates), size=n, replace=False)]
    want = offline_means(model_dir, truth, picks)
    got = np.array([by_src[truth.events[s][i][:2]][0]["mean"][0] for s, i in picks])
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


def test_end_to_end_forecasts_windows_and_offline_parity(
    stack: Any, topics: Any, store_redis: StoreTarget, tiny_model_dir: Path, thread_worker: Any
) -> None:
    """Runs on the single Redis and on a Redis Cluster (``store_redis``)."""
    events = make_events(50, 200)
    truth = Truth()
    truth.add(events, produce(stack.bootstrap, topics.input, events))
    expected = truth.expected_sources()
    assert len(expected) == 50 * 153

    argv = worker_argv(stack.bootstrap, store_redis.url, tiny_model_dir, topics,
                       "--metrics-port", "0", *store_redis.worker_flags())  # fmt: skip
    w = thread_worker(argv)
    recs = consume_all(stack.bootstrap, topics.output, expected=len(expected), timeout=180, idle=30)
    w.stop()

    by_src = forecasts_by_source(recs)
    assert set(by_src) == expected
    assert len(recs) == len(expected)  # a clean run repeats nothing
    version = ModelRegistry(tiny_model_dir).current()
    for r in recs[:200]:
        doc = orjson.loads(r.value)
        assert r.key.decode() == doc["series_id"]
        assert r.headers["model_version"] == version == doc["model_version"]
        assert r.headers["calibration"] == "online"  # the default: --interval-calibration online
        assert r.timestamp == int(doc["ts"] * 1000)
        assert doc["target_ts"] == [doc["ts"] + 300.0]
    for docs in by_src.values():
        d = docs[0]
        assert d["std"][0] > 0
        # nested (the contract's ≤: online calibration may bring the 95 % bound onto the 80 % one
        # when the two levels' factors cross), and a positive width at 80 %
        assert (
            d["lower"]["95"][0]
            <= d["lower"]["80"][0]
            < d["mean"][0]
            < d["upper"]["80"][0]
            <= d["upper"]["95"][0]
        )
    assert consume_all(stack.bootstrap, topics.dlq, idle=1.0) == []

    # Redis holds the last 48 accepted events of each series (plus history, oldest first).
    client = store_redis.client()
    try:
        for sid, evs in truth.events.items():
            win = read_window_sync(client, store_redis.prefix, topics.input, sid, 6)
            assert win is not None and win.partition == evs[0][0]
            assert win.ts[-48:].tolist() == [e[2] for e in evs[-48:]]
            assert win.values[-48:].tolist() == [e[3] for e in evs[-48:]]
            assert win.offsets[-48:].tolist() == [e[1] for e in evs[-48:]]
    finally:
        client.close()

    check_against_offline(tiny_model_dir, truth, by_src, 20)
    m = w.worker.metrics
    assert m.forecasts._value.get() == len(expected)
    assert m.warming._value.get() == 50 * 47


def test_torch_bf16_backend_end_to_end(
    stack: Any, topics: Any, redis_url: str, tiny_model_dir: Path, thread_worker: Any
) -> None:
    """``--backend torch-bf16`` through the real broker and Redis: every forecast arrives once,
    within bfloat16 rounding of the float32 model computed offline."""
    events = make_events(10, 80)
    truth = Truth()
    truth.add(events, produce(stack.bootstrap, topics.input, events))
    expected = truth.expected_sources()
    w = thread_worker(
        worker_argv(stack.bootstrap, redis_url, tiny_model_dir, topics, "--backend", "torch-bf16")
    )
    recs = consume_all(stack.bootstrap, topics.output, expected=len(expected), timeout=120, idle=30)
    w.stop()
    by_src = forecasts_by_source(recs)
    assert set(by_src) == expected and len(recs) == len(expected)
    assert w.worker.model.predictor.backend == "torch-bf16"
    check_against_offline(tiny_model_dir, truth, by_src, 20, rtol=5e-2, atol=0.5)


@pytest.mark.parametrize(
    ("backend", "rtol", "atol"),
    [
        ("onnx", 1e-4, 1e-5), ("torch", 1e-4, 1e-5), ("torch-bf16", 5e-2, 0.5),
        ("onnx-int8", 5e-2, 0.5),
    ],
)  # fmt: skip
def test_a_model_with_seasons_on_every_backend(
    stack: Any, topics: Any, redis_url: str, seasonal_model_dir: Path, thread_worker: Any,
    backend: str, rtol: float, atol: float, tmp_path: Path,
) -> None:  # fmt: skip
    """A model with seasons served with each backend: every forecast arrives once and equals
    the trainer's path computed offline (float32 torch), on the plain path (the 48th to 59th
    points, the state warming up) and the seasonal one (the 60th to 80th). ``onnx-int8``: the
    same tiny model written with its int8 ONNX file (the quantized network on the
    deseasonalised window, the offsets added back in float)."""
    if backend == "onnx-int8":
        from tests.conftest import SEASONAL_TINY
        from tests.helpers.tiny_model import make_tiny_model_dir

        seasonal_model_dir = tmp_path / "models"
        make_tiny_model_dir(seasonal_model_dir, int8=True, **SEASONAL_TINY)
    events = make_events(10, 80)
    truth = Truth()
    truth.add(events, produce(stack.bootstrap, topics.input, events))
    expected = truth.expected_sources()
    argv = worker_argv(stack.bootstrap, redis_url, seasonal_model_dir, topics, "--backend", backend)
    w = thread_worker(argv)
    recs = consume_all(stack.bootstrap, topics.output, expected=len(expected), timeout=120, idle=30)
    w.stop()
    by_src = forecasts_by_source(recs)
    assert set(by_src) == expected and len(recs) == len(expected)
    assert w.worker.model.predictor.backend == backend
    paths = w.worker.metrics.forecast_paths
    assert (paths.labels("plain")._value.get(), paths.labels("seasonal")._value.get()) == (
        10 * 12, 10 * 21,
    )  # fmt: skip
    check_against_offline(seasonal_model_dir, truth, by_src, 40, rtol=rtol, atol=atol)


def test_every_bad_input_class_reaches_the_dead_letter_topic(
    stack: Any, topics: Any, redis_url: str, tmp_path: Path, thread_worker: Any
) -> None:
    model_dir = tmp_path / "models"
    make_tiny_model_dir(model_dir, features=("temp",))
    p0 = [k for k in (f"k{i}" for i in range(200)) if partition_for(k, 6) == 0][:4]
    k0, k1, k2, k3 = p0
    other = next(k for k in (f"z{i}" for i in range(100)) if partition_for(k, 6) != 0)

    def ev(ts: float, value: Any = 1.0, temp: Any = 20.0, **extra: Any) -> bytes:
        return orjson.dumps({"ts": ts, "value": value, "features": {"temp": temp}, **extra})

    cases: list[tuple[str | None, bytes, str | None]] = [
        (k0, ev(T0), None),  # cold start: warming, no forecast, no dead letter
        (k1, ev(T0), None),
        (k2, ev(T0), None),
        (k3, ev(T0), "series_limit"),  # a 4th series in partition 0 (cap 3)
        (k0, ev(T0), "duplicate"),
        (k0, ev(T0 - 1), "late"),
        (k0, b'{"ts": 1, "value": ', "invalid_json"),
        (k0, b'{"ts": 1, "features": {"temp": 1}}', "schema"),
        (k0, b'{"ts": 1, "value": "high", "features": {"temp": 1}}', "schema"),
        (k0, b'{"ts": "2024-01-01T00:00:00", "value": 1, "features": {"temp": 1}}', "schema"),
        (k0, b'{"ts": 1, "value": NaN, "features": {"temp": 1}}', "non_finite"),
        (k0, b'{"ts": 1, "value": Infinity, "features": {"temp": 1}}', "non_finite"),
        (k0, b'{"ts": 1, "value": -Infinity, "features": {"temp": 1}}', "non_finite"),
        (k0, ev(T0 + 1, pad="x" * 3000), "too_large"),
        (k0, ev(T0 + 1, series_id="someone-else"), "key_mismatch"),
        (None, ev(T0 + 1), "missing_key"),
        (k0, orjson.dumps({"ts": T0 + 1, "value": 1.0}), "missing_feature"),
        # k1 alone runs ahead: the idle clock does not move (one series cannot make the rest
        # of its partition idle), so the cap still holds k0, k1 and k2.
        (k1, ev(T0 + 5000), None),
        (k3, ev(T0 + 5001), "series_limit"),
        (k2, ev(T0 + 5000.5), None),  # a second series follows: k0 is idle now (TTL 1000)
        (k3, ev(T0 + 5001), None),  # k0 is forgotten, so k3 fits under the cap
    ]
    records = [(k, v) for k, v, _ in cases]
    placed = produce(stack.bootstrap, topics.input, records)
    good = make_events(1, 48, prefix=other)  # the worker keeps going: one forecast after all that
    good = [
        (other, orjson.loads(v) | {"series_id": other, "features": {"temp": 1}}) for _, v in good
    ]
    produce(stack.bootstrap, topics.input, [(k, orjson.dumps(d)) for k, d in good])

    argv = worker_argv(
        stack.bootstrap, redis_url, model_dir, topics, "--metrics-port", "0",
        "--max-series-per-partition", "3", "--series-ttl", "1000", "--max-event-bytes", "2000",
    )  # fmt: skip
    w = thread_worker(argv)
    expected_dlq = [(k, v, why, placed[i]) for i, (k, v, why) in enumerate(cases) if why]
    dlq = consume_all(stack.bootstrap, topics.dlq, expected=len(expected_dlq), timeout=60, idle=15)
    out = consume_all(stack.bootstrap, topics.output, expected=1, timeout=60, idle=15)
    w.stop()

    assert len(dlq) == len(expected_dlq)
    got = sorted(
        dlq, key=lambda r: (int(r.headers["source.partition"]), int(r.headers["source.offset"]))
    )
    want = sorted(expected_dlq, key=lambda c: c[3])
    for r, (key, value, why, (p, o)) in zip(got, want, strict=True):
        assert r.headers["error.reason"] == why, (r.headers, why)
        assert r.headers["error.message"]
        assert r.headers["source.topic"] == topics.input
        assert (int(r.headers["source.partition"]), int(r.headers["source.offset"])) == (p, o)
        assert r.key == (key.encode() if key else None) and r.value == value
    assert [orjson.loads(r.value)["series_id"] for r in out] == [other]

    m = w.worker.metrics
    for why in {c[2] for c in cases if c[2]}:
        assert m.rejected.labels(why)._value.get() == sum(1 for c in cases if c[2] == why)
    assert m.dlq._value.get() == len(expected_dlq)
    assert m.warming._value.get() == 6 + 47  # cold starts above + the good series' first 47

    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        assert read_window_sync(client, "eventcast", topics.input, k0, 6) is None  # forgotten
        win = read_window_sync(client, "eventcast", topics.input, k2, 6)
        assert win is not None and win.ts.tolist() == [T0, T0 + 5000.5]
    finally:
        client.close()


def test_kcat_produce_and_consume(
    stack: Any, topics: Any, redis_url: str, tiny_model_dir: Path, thread_worker: Any
) -> None:
    from tests.helpers.kafka import kcat_consume, kcat_produce

    lines = [(k, v.decode()) for k, v in make_events(3, 50, prefix="kc")]
    kcat_produce(stack.bootstrap, topics.input, lines)
    w = thread_worker(
        worker_argv(stack.bootstrap, redis_url, tiny_model_dir, topics, "--metrics-port", "0")
    )
    rows = kcat_consume(stack.bootstrap, topics.output, count=9, timeout=60)
    w.stop()
    assert len(rows) == 9
    docs = [orjson.loads(v) for _, v in rows]
    assert sorted((d["series_id"], d["ts"]) for d in docs) == sorted(
        (f"kc{s}", T0 + i * 300.0) for s in range(3) for i in range(47, 50)
    )
    assert all(k == d["series_id"] for (k, _), d in zip(rows, docs, strict=True))


def test_new_input_partitions_are_picked_up(
    stack: Any, make_topic: Any, redis_url: str, tiny_model_dir: Path, thread_worker: Any
) -> None:
    from types import SimpleNamespace

    from deploy.stack import create_topics  # noqa: F401 - the fixture's way to make topics
    from tests.helpers.kafka import end_offsets

    topics = SimpleNamespace(
        input=make_topic("events", 2), output=make_topic("forecasts", 2), dlq=make_topic("dlq", 1)
    )
    argv = worker_argv(
        stack.bootstrap,
        redis_url,
        tiny_model_dir,
        topics,
        "--metrics-port",
        "0",
        "--metadata-max-age-ms",
        "1000",
    )
    w = thread_worker(argv)
    wait_for(lambda: len(w.worker.partitions.assigned) == 2, 30, "2 partitions assigned")
    _add_partitions(stack.bootstrap, topics.input, 4)
    wait_for(
        lambda: len(w.worker.partitions.assigned) == 4,
        60,
        "4 partitions assigned after the increase",
    )
    # Events produced to the new partitions are forecast.
    events = make_events(1, 48, prefix="np")
    produce(stack.bootstrap, topics.input, events, partition=3)
    out = consume_all(stack.bootstrap, topics.output, expected=1, timeout=60, idle=20)
    w.stop()
    assert [orjson.loads(r.value)["source"]["partition"] for r in out] == [3]
    assert end_offsets(stack.bootstrap, topics.input)[3] == 48


def _add_partitions(bootstrap: str, topic: str, total: int) -> None:
    import asyncio

    from aiokafka.admin import AIOKafkaAdminClient, NewPartitions

    async def run() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            await admin.create_partitions({topic: NewPartitions(total_count=total)})
        finally:
            await admin.close()

    asyncio.run(run())
