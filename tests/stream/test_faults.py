"""Fault tests against the real broker and Redis: kill -9 at named points and at random, a second
worker taking over, exactly-once under kills, Redis flushed, Redis stopped and restarted.

Every test compares with ground truth: each expected forecast (source partition, offset) present,
repeated forecasts of one event identical, and each series' window in Redis equal to its last
accepted events (no entry missing or duplicated).
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deploy.stack import free_port
from tests.helpers.calibration import replayed_intervals
from tests.helpers.kafka import consume_all, end_offsets, produce
from tests.helpers.store import StoreTarget, read_window_sync
from tests.stream.conftest import (
    Truth,
    forecasts_by_source,
    http_get,
    make_events,
    wait_for,
    worker_argv,
)
from tests.stream.test_worker import check_against_offline

pytestmark = pytest.mark.integration


def output_count(bootstrap: str, topic: str) -> int:
    return sum(end_offsets(bootstrap, topic).values())


def _flat(x: Any) -> list[float]:
    if isinstance(x, dict):
        return [v for key in sorted(x) for v in x[key]]
    return list(x)


def wait_all_forecasts(
    bootstrap: str,
    topic: str,
    truth: Truth,
    timeout: float,
    iso: str = "read_uncommitted",
    worker: Any = None,
) -> None:
    """Wait until every expected forecast is on ``topic``; a ``worker`` (ThreadWorker or
    ProcWorker) that ended fails the wait at once. On timeout, says what is missing and what the
    worker was doing (its thread and task stacks)."""
    missing: set[Any] = set()

    def done() -> bool:
        if worker is not None:
            worker.check()
        recs = consume_all(bootstrap, topic, idle=0.5, timeout=20, isolation_level=iso)
        missing.clear()
        missing.update(truth.expected_sources() - set(forecasts_by_source(recs)))
        return not missing

    try:
        wait_for(done, timeout, "every expected forecast", every=1.0)
    except AssertionError as exc:
        by_part: dict[int, list[int]] = {}
        for part, off in sorted(missing):
            by_part.setdefault(part, []).append(off)
        stacks = worker.dump() if worker is not None else "(no worker given)"
        raise AssertionError(
            f"{exc}; missing (partition: offsets): {by_part}\nworker stacks:\n{stacks}"
        ) from None


def check_windows(
    redis: str | StoreTarget,
    topic: str,
    truth: Truth,
    partitions: int = 6,
    model_dir: Path | None = None,
) -> None:
    """Each series' window in the Redis at that URL (or of that target) is its last accepted
    events; for a model with seasons (``model_dir``'s), its seasonal state is byte for byte the
    state of an uninterrupted run over every accepted point (undo entries included)."""
    from model.registry import ModelRegistry
    from model.seasonal import SeasonalState
    from stream.rings import series_size
    from stream.store import partition_for, partition_keys

    spec = None
    if model_dir is not None:
        spec = ModelRegistry(model_dir).load(backend="torch", device="cpu").config.seasonal()
    target = StoreTarget(redis) if isinstance(redis, str) else redis
    client = target.client()
    try:
        for sid, evs in truth.events.items():
            win = read_window_sync(client, target.prefix, topic, sid, partitions)
            assert win is not None, sid
            k = len(win.offsets)
            assert k == min(len(evs), 96), (sid, k)
            assert win.offsets.tolist() == [e[1] for e in evs[-k:]], sid
            assert win.ts.tolist() == [e[2] for e in evs[-k:]], sid
            assert win.values.tolist() == [e[3] for e in evs[-k:]], sid
            if spec is not None:
                _, win_key, _ = partition_keys(target.prefix, topic, partition_for(sid, partitions))
                blob = client.hget(win_key, sid)
                want = SeasonalState(spec, keep=48)
                for _, _, ts, value in evs:
                    want.update(ts, value)
                assert want.ready and blob[series_size(blob) :] == want.encode(), sid
    finally:
        client.close()


def check_forecasts(
    records: list[Any], truth: Truth, *, exactly_once: bool = False
) -> dict[Any, Any]:
    by_src = forecasts_by_source(records)
    assert set(by_src) == truth.expected_sources()
    # Repeats of one event: same window, version and metadata exactly; the numbers equal up to
    # float32 rounding, because onnxruntime's kernels may block a batch of another size
    # differently (the last bit can change with the batch an event lands in).
    numeric = ("mean", "std", "lower", "upper")
    for docs in by_src.values():
        first = {k: v for k, v in docs[0].items() if k not in ("emitted_at", *numeric)}
        for d in docs[1:]:
            assert {k: v for k, v in d.items() if k not in ("emitted_at", *numeric)} == first
            for k in numeric:
                a, b = _flat(docs[0][k]), _flat(d[k])
                assert np.allclose(a, b, rtol=1e-5, atol=1e-6), (k, a, b)
    if exactly_once:
        assert len(records) == len(by_src), "duplicates under exactly_once"
    return by_src


def check_calibration(
    model_dir: Path, truth: Truth, by_src: dict[Any, Any], *, window: int = 48
) -> int:
    """Every published forecast's intervals equal the independent replay of online calibration
    over the true history (tests/helpers/calibration.py). Returns how many were compared."""
    want = replayed_intervals(model_dir, truth.events, window=window)
    compared = 0
    for src, bounds in want.items():
        for d in by_src[src]:
            for side, levels in bounds.items():
                for lv, arr in levels.items():
                    np.testing.assert_allclose(
                        d[side][lv], arr, rtol=1e-4, atol=1e-4, err_msg=f"{side} {lv} of {src}"
                    )
            compared += 1
    return compared


def run_kill_test(
    stack: Any, topics: Any, redis: str | StoreTarget, model_dir: Path, proc_worker: Any,
    *extra: str,
) -> None:  # fmt: skip
    target = StoreTarget(redis) if isinstance(redis, str) else redis
    n_series, half = 20, 50
    truth = Truth()
    first = make_events(n_series, half)
    truth.add(first, produce(stack.bootstrap, topics.input, first))
    argv = worker_argv(
        stack.bootstrap, target.url, model_dir, topics,
        "--max-batch", "60", "--max-delay-ms", "5", "--group-instance-id", "w1",
        *target.worker_flags(), *extra,
    )  # fmt: skip

    # 1 and 2: the worker kills itself at each named point, on its 3rd batch.
    for point in ("after_window_write", "after_publish"):
        w = proc_worker(argv, env={"EVENTCAST_FAULT": f"{point}:3"})
        rc = w.wait(90)
        assert rc == -9, f"{point}: exit {rc}\n{w.log()}"

    # 3: kill -9 at a random moment while it works through the second half.
    second = make_events(n_series, half, start=half)
    truth.add(second, produce(stack.bootstrap, topics.input, second))
    before = output_count(stack.bootstrap, topics.output)
    w = proc_worker(argv).wait_ready()
    wait_for(
        lambda: output_count(stack.bootstrap, topics.output) > before, 60, "forecasts from run 3"
    )
    time.sleep(random.uniform(0.0, 0.4))
    w.kill()

    # 4: a clean run finishes the stream.
    w = proc_worker(argv).wait_ready()
    iso = "read_committed" if "exactly_once" in extra else "read_uncommitted"

    wait_all_forecasts(stack.bootstrap, topics.output, truth, 120, iso, worker=w)
    assert w.terminate() == 0, w.log()
    records = consume_all(stack.bootstrap, topics.output, idle=1.0, timeout=30, isolation_level=iso)
    by_src = check_forecasts(records, truth, exactly_once="exactly_once" in extra)
    check_windows(target, topics.input, truth, model_dir=model_dir)
    assert check_calibration(model_dir, truth, by_src) >= len(truth.expected_sources())


@pytest.mark.slow
def test_kill_9_three_times_at_least_once(
    stack: Any, topics: Any, store_redis: StoreTarget, tiny_model_dir: Path, proc_worker: Any
) -> None:
    """Runs on the single Redis and on a Redis Cluster (``store_redis``)."""
    run_kill_test(stack, topics, store_redis, tiny_model_dir, proc_worker)


@pytest.mark.slow
def test_kill_9_three_times_exactly_once_has_no_duplicates(
    stack: Any, topics: Any, redis_url: str, tiny_model_dir: Path, proc_worker: Any
) -> None:
    run_kill_test(
        stack, topics, redis_url, tiny_model_dir, proc_worker, "--guarantee", "exactly_once"
    )


@pytest.mark.slow
def test_kill_9_three_times_seasonal_model(
    stack: Any, topics: Any, redis_url: str, seasonal_model_dir: Path, proc_worker: Any
) -> None:
    """A model with seasons: its per-series seasonal state is in the same fenced write as the
    windows. After three kill -9s every forecast (the repeats of an event equal to the first)
    equals the trainer's path replayed over the true history, plain path and seasonal path, and
    the stored state equals an uninterrupted run's."""
    run_kill_test(stack, topics, redis_url, seasonal_model_dir, proc_worker)


def run_two_workers_one_killed(
    stack: Any,
    topics: Any,
    redis_url: str,
    proc_worker: Any,
    argv_a: list[str],
    argv_b: list[str],
) -> None:
    """Workers A and B share the group (3 partitions each); A is killed with ``kill -9`` after
    the first forecasts; B takes all 6 partitions and finishes the stream with nothing lost."""
    from tests.stream.conftest import metric_value

    truth = Truth()
    first = make_events(20, 50)
    truth.add(first, produce(stack.bootstrap, topics.input, first))
    a = proc_worker(argv_a).wait_ready()
    b = proc_worker(argv_b).wait_ready()

    def assigned(w: Any) -> float:
        return metric_value(w.metrics(), "eventcast_assigned_partitions")

    wait_for(lambda: assigned(a) == 3 and assigned(b) == 3, 60, "3 partitions each")
    wait_for(lambda: output_count(stack.bootstrap, topics.output) > 0, 60, "first forecasts")
    a.kill()
    second = make_events(20, 50, start=50)
    truth.add(second, produce(stack.bootstrap, topics.input, second))
    wait_for(lambda: assigned(b) == 6, 60, "the survivor owns all 6 partitions")
    wait_all_forecasts(stack.bootstrap, topics.output, truth, 120, worker=b)
    assert b.terminate() == 0, b.log()
    check_forecasts(consume_all(stack.bootstrap, topics.output, idle=1.0), truth)
    check_windows(redis_url, topics.input, truth)


@pytest.mark.slow
def test_two_workers_one_killed(
    stack: Any, topics: Any, redis_url: str, tiny_model_dir: Path, proc_worker: Any
) -> None:
    argv = worker_argv(stack.bootstrap, redis_url, tiny_model_dir, topics, "--max-batch", "100")
    run_two_workers_one_killed(stack, topics, redis_url, proc_worker, argv, argv)


@pytest.mark.parametrize("model", ["tiny_model_dir", "seasonal_model_dir"])
def test_redis_flushed_mid_run_rebuilds_windows(
    stack: Any, topics: Any, store_redis: StoreTarget, model: str, thread_worker: Any,
    request: Any,
) -> None:  # fmt: skip
    """Redis loses the worker's state while it runs (the single Redis: FLUSHDB; a Redis
    Cluster: the test's keys deleted on every primary): the partitions are rebuilt from the
    input topic and every later forecast equals the offline one; with a model with seasons, the
    seasonal state after the rebuild equals the state before the loss (an uninterrupted run's)."""
    model_dir: Path = request.getfixturevalue(model)
    truth = Truth()
    first = make_events(10, 60)
    truth.add(first, produce(stack.bootstrap, topics.input, first))
    argv = worker_argv(stack.bootstrap, store_redis.url, model_dir, topics,
                       "--metrics-port", "0", *store_redis.worker_flags())  # fmt: skip
    w = thread_worker(argv)
    n1 = len(truth.expected_sources())
    wait_for(lambda: output_count(stack.bootstrap, topics.output) >= n1, 60, "first forecasts")
    wait_for(lambda: w.worker.metrics.commits._value.get() > 0, 30, "a commit")
    time.sleep(0.5)  # let the last batch commit
    store_redis.lose_state()
    second = make_events(10, 30, start=60)
    truth.add(second, produce(stack.bootstrap, topics.input, second))
    wait_all_forecasts(stack.bootstrap, topics.output, truth, 90, worker=w)
    w.stop()
    m = w.worker.metrics
    assert m.state_conflicts._value.get() >= 1 and m.rebuilds._value.get() >= 1
    by_src = check_forecasts(consume_all(stack.bootstrap, topics.output, idle=1.0), truth)
    check_windows(store_redis, topics.input, truth, model_dir=model_dir)
    if model == "seasonal_model_dir":  # points 48..59 warm up (plain), the others seasonal
        paths = {p: m.forecast_paths.labels(p)._value.get() for p in ("plain", "seasonal")}
        assert paths["plain"] >= 10 * 12 and paths["seasonal"] >= 10 * 30, paths
    # Forecasts after the flush equal offline predictions on the true windows.
    later = Truth({s: evs for s, evs in truth.events.items()})
    check_against_offline(model_dir, later, by_src, 20, seed=1)
    # The interval calibration state was rebuilt exactly (by re-forecasting the replayed log):
    # every forecast after the flush has the intervals an uninterrupted replay gives.
    assert check_calibration(model_dir, truth, by_src) >= len(truth.expected_sources())


def worker_on_private_redis(
    stack: Any, topics: Any, url: str, model_dir: Path, thread_worker: Any, truth: Truth
) -> tuple[Any, int]:
    """Produce 60 steps of 10 series (added to ``truth``), then start an in-process worker on
    the Redis at ``url`` with a metrics port, a 2 s liveness timeout and a fast Redis retry
    policy; returns the worker and its metrics port (the Redis outage and OOM tests)."""
    from stream.retry import RetryPolicy

    first = make_events(10, 60)
    truth.add(first, produce(stack.bootstrap, topics.input, first))
    port = free_port()
    argv = worker_argv(
        stack.bootstrap, url, model_dir, topics, "--metrics-port", str(port),
        "--liveness-timeout", "2s",
    )  # fmt: skip
    retry = RetryPolicy(base=0.05, cap=0.5, errors=RetryPolicy.for_redis().errors)
    return thread_worker(argv, retry=retry), port


@pytest.mark.slow
def test_redis_stopped_10s_then_restarted(
    stack: Any, topics: Any, private_redis: Any, tiny_model_dir: Path, thread_worker: Any
) -> None:
    url = private_redis.url
    truth = Truth()
    w, port = worker_on_private_redis(stack, topics, url, tiny_model_dir, thread_worker, truth)
    n1 = len(truth.expected_sources())
    wait_for(lambda: output_count(stack.bootstrap, topics.output) >= n1, 60, "first forecasts")
    m = w.worker.metrics
    wait_for(lambda: m.commits._value.get() > 0, 30, "a commit")
    time.sleep(0.5)

    private_redis.stop()
    commits = m.commits._value.get()
    second = make_events(10, 30, start=60)
    truth.add(second, produce(stack.bootstrap, topics.input, second))
    wait_for(lambda: not w.worker.ready(), 30, "not ready while Redis is down")
    t_end = time.monotonic() + 10
    while time.monotonic() < t_end:
        assert m.commits._value.get() == commits, "committed while Redis was down"
        # A deliberate pause: out of rotation (readyz), but alive (healthz) past the liveness
        # timeout: restarting the worker would not bring Redis back.
        assert http_get(f"http://127.0.0.1:{port}/readyz")[0] == 503
        assert http_get(f"http://127.0.0.1:{port}/healthz")[0] == 200
        time.sleep(0.5)
    assert m.redis_errors._value.get() > 0
    assert m.paused.labels("redis")._value.get() == 1
    private_redis.start()
    wait_for(w.worker.ready, 60, "ready again after Redis is back")
    wait_all_forecasts(stack.bootstrap, topics.output, truth, 90, worker=w)
    w.stop()
    assert m.commits._value.get() > commits
    check_forecasts(consume_all(stack.bootstrap, topics.output, idle=1.0), truth)
    check_windows(url, topics.input, truth)
