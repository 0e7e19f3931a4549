"""Both engines (``--engine native`` and ``--engine faust``) through one end-to-end suite, against
the real broker and Redis, each worker a subprocess (``python -m deploy.cli start --engine ...``).

The same checks for both: every expected forecast by source (partition, offset) and no other,
windows in Redis equal to the last accepted events, every bad-input class in the dead-letter topic
with its reason and original bytes, kill -9 at the named fault points and at random with nothing
lost, Redis flushed mid-run, and a running system switched from one engine to the other and
back in the same group and Redis.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from deploy.cli import main
from model.registry import ModelRegistry
from stream.store import partition_for
from tests.helpers.kafka import consume_all, produce
from tests.helpers.store import read_window_sync
from tests.helpers.tiny_model import make_tiny_model_dir
from tests.stream.conftest import (
    T0,
    Truth,
    forecasts_by_source,
    make_events,
    metric_value,
    published_total,
    wait_for,
    worker_argv,
)
from tests.stream.test_faults import (
    check_calibration,
    check_forecasts,
    check_windows,
    run_kill_test,
    run_two_workers_one_killed,
    wait_all_forecasts,
)
from tests.stream.test_worker import check_against_offline

ENGINES = ["native", "faust"]


@pytest.fixture(scope="module")
def features_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model that needs the feature ``temp`` (for ``missing_feature``)."""
    root = tmp_path_factory.mktemp("models-temp")
    make_tiny_model_dir(root, features=("temp",))
    return root


@pytest.mark.integration
@pytest.mark.parametrize("engine", ENGINES)
def test_happy_path_every_forecast_and_windows(
    engine: str, stack: Any, topics: Any, redis_url: str, tiny_model_dir: Path, proc_worker: Any
) -> None:
    events = make_events(20, 70)
    truth = Truth()
    truth.add(events, produce(stack.bootstrap, topics.input, events))
    expected = truth.expected_sources()
    assert len(expected) == 20 * 23

    # Every batch flag reaches either engine (one start-up shared by both, stream/runtime.py).
    batching = ("--max-batch", "64", "--max-delay-ms", "5", "--queue-size", "1",
                "--infer-batch", "7")  # fmt: skip
    argv = worker_argv(
        stack.bootstrap, redis_url, tiny_model_dir, topics, "--engine", engine, *batching
    )
    w = proc_worker(argv).wait_ready()
    recs = consume_all(stack.bootstrap, topics.output, expected=len(expected), timeout=120, idle=30)
    # The counter moves when the publish is acknowledged, which may trail the records' visibility.
    wait_for(lambda: published_total(w) >= len(expected), 30, "the published counter")
    published = published_total(w)
    assert w.terminate() == 0, w.log()
    log_text = w.log_path.read_text(errors="replace")
    assert (
        "batching: max_batch=64 max_delay_ms=5 queue_size=1 infer_batch=7 latency_budget_ms=100"
        in log_text
    )
    if engine == "faust":
        assert "broker_max_poll_records 64, stream buffer 64" in log_text

    by_src = forecasts_by_source(recs)
    assert set(by_src) == expected
    assert len(recs) == len(expected)  # a clean run repeats nothing
    assert published == len(expected)
    version = ModelRegistry(tiny_model_dir).current()
    for r in recs:
        doc = orjson.loads(r.value)
        assert r.key.decode() == doc["series_id"]
        assert r.headers["model_version"] == version == doc["model_version"]
        assert r.timestamp == int(doc["ts"] * 1000)
        assert doc["source"]["topic"] == topics.input
        assert doc["std"][0] > 0
        # nested as the contract says (≤: online calibration may bring the 95 % bound onto the
        # 80 % one when the levels' factors cross); a positive width at 80 %
        assert doc["lower"]["95"][0] <= doc["lower"]["80"][0] < doc["mean"][0]
        assert doc["mean"][0] < doc["upper"]["80"][0] <= doc["upper"]["95"][0]
    # Order per series follows input order.
    for sid, evs in truth.events.items():
        got = [orjson.loads(r.value)["ts"] for r in recs if r.key == sid.encode()]
        assert got == [e[2] for e in evs[47:]], sid
    assert consume_all(stack.bootstrap, topics.dlq, idle=1.0) == []
    check_windows(redis_url, topics.input, truth)
    check_against_offline(tiny_model_dir, truth, by_src, 10)


@pytest.mark.integration
@pytest.mark.parametrize("engine", ENGINES)
def test_bad_input_reaches_the_dead_letter_topic(
    engine: str,
    stack: Any,
    topics: Any,
    redis_url: str,
    features_model_dir: Path,
    proc_worker: Any,
) -> None:
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
        (k0, b'{"ts": "2024-01-01T00:00:00", "value": 1, "features": {"temp": 1}}', "schema"),
        (k0, b'{"ts": 1, "value": NaN, "features": {"temp": 1}}', "non_finite"),
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
    placed = produce(stack.bootstrap, topics.input, [(k, v) for k, v, _ in cases])
    good = [
        (other, orjson.dumps(orjson.loads(v) | {"series_id": other, "features": {"temp": 1}}))
        for _, v in make_events(1, 48, prefix=other)
    ]
    produce(stack.bootstrap, topics.input, good)

    argv = worker_argv(
        stack.bootstrap, redis_url, features_model_dir, topics, "--engine", engine,
        "--max-series-per-partition", "3", "--series-ttl", "1000", "--max-event-bytes", "2000",
    )  # fmt: skip
    w = proc_worker(argv).wait_ready()
    want = [(k, v, why, placed[i]) for i, (k, v, why) in enumerate(cases) if why]
    dlq = consume_all(stack.bootstrap, topics.dlq, expected=len(want), timeout=60, idle=20)
    out = consume_all(stack.bootstrap, topics.output, expected=1, timeout=60, idle=20)
    text = w.metrics()
    assert w.terminate() == 0, w.log()

    assert len(dlq) == len(want)
    got = sorted(
        dlq, key=lambda r: (int(r.headers["source.partition"]), int(r.headers["source.offset"]))
    )
    for r, (key, value, why, (p, o)) in zip(got, sorted(want, key=lambda c: c[3]), strict=True):
        assert r.headers["error.reason"] == why, (r.headers, why)
        assert r.headers["error.message"]
        assert r.headers["source.topic"] == topics.input
        assert (int(r.headers["source.partition"]), int(r.headers["source.offset"])) == (p, o)
        assert r.key == (key.encode() if key else None) and r.value == value
    assert [orjson.loads(r.value)["series_id"] for r in out] == [other]  # it kept going
    for why in {c[2] for c in cases if c[2]}:
        n = sum(1 for c in cases if c[2] == why)
        assert metric_value(text, "eventcast_events_rejected_total", f'reason="{why}"') == n, why
    assert metric_value(text, "eventcast_dlq_records_total") == len(want)

    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        assert read_window_sync(client, "eventcast", topics.input, k0, 6) is None  # idle: gone
        win = read_window_sync(client, "eventcast", topics.input, k3, 6)
        assert win is not None and win.ts.tolist() == [T0 + 5001]
    finally:
        client.close()


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_kill_9_three_times_and_restart(
    engine: str, stack: Any, topics: Any, redis_url: str, tiny_model_dir: Path, proc_worker: Any
) -> None:
    """kill -9 after the window write, after publishing (before the commit) and at a random
    moment, restarting each time: every forecast present, repeats identical, windows exact."""
    run_kill_test(stack, topics, redis_url, tiny_model_dir, proc_worker, "--engine", engine)


@pytest.mark.integration
@pytest.mark.parametrize("model", ["tiny_model_dir", "seasonal_model_dir"])
def test_engines_swap_on_a_running_system(
    stack: Any, topics: Any, redis_url: str, model: str, proc_worker: Any, request: Any
) -> None:
    """native, then faust, then native again, each on its part of the stream, in the same group
    and Redis: no window entry duplicated or missing, every forecast present, none twice. With a
    model with seasons, faust serves the first seasonal-path forecasts (points 60..89) from the
    state native left in Redis, and hands it back: every forecast is the trainer's path
    replayed, and the stored seasonal state an uninterrupted run's."""
    model_dir: Path = request.getfixturevalue(model)
    truth = Truth()
    base = worker_argv(stack.bootstrap, redis_url, model_dir, topics)
    for engine, start, n in (("native", 0, 60), ("faust", 60, 30), ("native", 90, 30)):
        part = make_events(20, n, start=start)
        truth.add(part, produce(stack.bootstrap, topics.input, part))
        w = proc_worker([*base, "--engine", engine]).wait_ready()
        wait_all_forecasts(stack.bootstrap, topics.output, truth, 90, worker=w)
        assert w.terminate() == 0, w.log()
    records = consume_all(stack.bootstrap, topics.output, idle=1.0)
    by_src = check_forecasts(records, truth)
    assert len(records) == len(by_src), "a clean swap repeats no forecast"
    check_windows(redis_url, topics.input, truth, model_dir=model_dir)
    # the engines hand the interval calibration state to each other through Redis, exactly
    assert check_calibration(model_dir, truth, by_src) == len(records)


@pytest.mark.integration
@pytest.mark.slow
def test_native_and_faust_share_one_group_then_one_is_killed(
    stack: Any, topics: Any, redis_url: str, tiny_model_dir: Path, proc_worker: Any
) -> None:
    """A rolling swap: a native and a faust worker in one group split the partitions (both use
    the round-robin assignor); the native one is killed and faust finishes with nothing lost."""
    base = worker_argv(stack.bootstrap, redis_url, tiny_model_dir, topics, "--max-batch", "100")
    run_two_workers_one_killed(
        stack, topics, redis_url, proc_worker,
        [*base, "--engine", "native"], [*base, "--engine", "faust"],
    )  # fmt: skip


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_redis_flushed_mid_run_windows_rebuilt(
    engine: str, stack: Any, topics: Any, redis_url: str, tiny_model_dir: Path, proc_worker: Any
) -> None:
    """Redis loses everything mid-run: the fenced write is refused, the partition is rebuilt
    from Kafka (faust: up to the batch in hand, which it then processes again in place)."""
    import redis

    truth = Truth()
    first = make_events(10, 60)
    truth.add(first, produce(stack.bootstrap, topics.input, first))
    w = proc_worker(
        worker_argv(stack.bootstrap, redis_url, tiny_model_dir, topics, "--engine", engine)
    ).wait_ready()
    wait_all_forecasts(stack.bootstrap, topics.output, truth, 60, worker=w)
    time.sleep(2.0)  # let the faust engine's timed commit happen too
    redis.Redis.from_url(redis_url).flushdb()
    second = make_events(10, 30, start=60)
    truth.add(second, produce(stack.bootstrap, topics.input, second))
    wait_all_forecasts(stack.bootstrap, topics.output, truth, 90, worker=w)
    text = w.metrics()
    assert w.terminate() == 0, w.log()
    assert metric_value(text, "eventcast_state_conflicts_total") >= 1
    assert metric_value(text, "eventcast_partition_rebuilds_total") >= 1
    by_src = check_forecasts(consume_all(stack.bootstrap, topics.output, idle=1.0), truth)
    check_windows(redis_url, topics.input, truth)
    check_against_offline(tiny_model_dir, truth, by_src, 10, seed=1)
    assert check_calibration(tiny_model_dir, truth, by_src) >= len(by_src)  # rebuilt exactly


def test_faust_refuses_exactly_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(
        ["start", "--engine", "faust", "--guarantee", "exactly_once",
         "--model-dir", str(tmp_path), "--metrics-port", "0"]
    )  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert "--guarantee exactly_once" in err and "--engine faust" in err
    assert "--engine native" in err  # says what to do instead


@pytest.mark.parametrize("engine", ENGINES)
def test_no_model_exits_3(engine: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["start", "--engine", engine, "--model-dir", str(tmp_path), "--metrics-port", "0"])
    assert rc == 3
    assert "retrain" in capsys.readouterr().err
