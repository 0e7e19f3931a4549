"""Health that tells the truth, against the real broker and Redis: Redis out of memory is a
deliberate pause (not ready, alive, counted, logged as OOM, resumed by itself, nothing lost),
and a stuck pipeline stage fails ``/healthz`` so an orchestrator restarts the worker.
(A Redis outage keeping ``/healthz`` at 200: ``test_faults.py::test_redis_stopped_10s_then_
restarted``.)"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from deploy.stack import free_port
from stream.health import Watchdog
from tests.helpers.kafka import consume_all, end_offsets, produce
from tests.stream.conftest import Truth, http_get, make_events, wait_for, worker_argv
from tests.stream.test_faults import (
    check_forecasts,
    check_windows,
    output_count,
    wait_all_forecasts,
    worker_on_private_redis,
)

pytestmark = pytest.mark.integration


def status(port: int, path: str) -> int:
    return http_get(f"http://127.0.0.1:{port}{path}")[0]


def test_redis_out_of_memory_pauses_and_resumes_when_memory_is_freed(
    stack: Any,
    topics: Any,
    private_redis: Any,
    tiny_model_dir: Path,
    thread_worker: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = private_redis.url
    truth = Truth()
    w, port = worker_on_private_redis(stack, topics, url, tiny_model_dir, thread_worker, truth)
    m = w.worker.metrics
    wait_all_forecasts(stack.bootstrap, topics.output, truth, 60, worker=w)

    # Fill Redis past its limit: a 32 MB key, then maxmemory 16 MB below what is used
    # (noeviction). The SET's own 32 MB query buffer is counted as used until it is released,
    # so the use is read once it has settled.
    client = redis.Redis.from_url(url)
    try:
        client.set("filler", b"x" * 32_000_000)
        time.sleep(0.5)
        used = min(int(client.info("memory")["used_memory"]) for _ in range(3))
        client.config_set("maxmemory", used - 16_000_000)
        commits = m.commits._value.get()
        second = make_events(10, 30, start=60)
        truth.add(second, produce(stack.bootstrap, topics.input, second))
        wait_for(lambda: m.redis_oom._value.get() > 0, 30, "an OOM refusal")
        wait_for(lambda: status(port, "/readyz") == 503, 10, "not ready while out of memory")
        for _ in range(8):  # past the liveness timeout: paused on purpose, so alive
            assert status(port, "/healthz") == 200
            assert m.commits._value.get() == commits, "committed while Redis refused writes"
            time.sleep(0.5)
        assert m.paused.labels("redis_oom")._value.get() == 1
        exposition = http_get(f"http://127.0.0.1:{port}/metrics")[1].decode()
        assert 'eventcast_paused{reason="redis_oom"} 1.0' in exposition
        assert any("OOM" in r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)

        client.delete("filler")  # memory is freed: writes pass again
        wait_for(lambda: status(port, "/readyz") == 200, 30, "ready again after memory is freed")
        assert m.paused.labels("redis_oom")._value.get() == 0
        third = make_events(10, 10, start=90)
        truth.add(third, produce(stack.bootstrap, topics.input, third))
        wait_all_forecasts(stack.bootstrap, topics.output, truth, 60, worker=w)
        ends = end_offsets(stack.bootstrap, topics.input)
        wait_for(lambda: w.worker.batches > 0 and m.commits._value.get() > commits, 30, "a commit")
    finally:
        client.config_set("maxmemory", 0)
        client.close()
    w.stop()
    # Nothing lost, nothing applied twice: every forecast and every window against the truth.
    check_forecasts(consume_all(stack.bootstrap, topics.output, idle=1.0), truth)
    check_windows(url, topics.input, truth)
    assert sum(ends.values()) == sum(len(v) for v in truth.events.values())


def test_a_stuck_stage_fails_healthz(
    stack: Any, topics: Any, redis_url: str, tiny_model_dir: Path, thread_worker: Any
) -> None:
    """The inference stage hangs for good on the first batch (a test-only fault): records keep
    waiting, no stage finishes anything, and /healthz turns 503 after the liveness timeout,
    while /readyz stays 200 (the worker did not pause on purpose)."""
    port = free_port()
    argv = worker_argv(
        stack.bootstrap, redis_url, tiny_model_dir, topics, "--metrics-port", str(port),
        "--liveness-timeout", "2s",
    )  # fmt: skip
    w = thread_worker(argv, environ={"EVENTCAST_FAULT": "stall_infer:1"})
    assert status(port, "/healthz") == 200
    events = make_events(5, 60)
    produce(stack.bootstrap, topics.input, events)
    wait_for(lambda: status(port, "/healthz") == 503, 30, "/healthz to fail on the stuck stage")
    assert status(port, "/readyz") == 200
    assert w.worker.batches == 0 and output_count(stack.bootstrap, topics.output) == 0
    w.stop()


def test_healthz_stays_up_while_the_worker_waits_for_its_first_model(
    stack: Any, topics: Any, redis_url: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """``--wait-for-model`` on an empty model directory: past the liveness timeout /healthz is
    still 200 (waiting on purpose: an orchestrator must not restart it) and /readyz 503; once a
    version appears the worker starts and both are 200."""
    import shutil

    from tests.helpers.worker import ThreadWorker

    port, models = free_port(), tmp_path / "models"
    models.mkdir()
    argv = worker_argv(
        stack.bootstrap, redis_url, models, topics, "--metrics-port", str(port),
        "--liveness-timeout", "1s", "--wait-for-model",
    )  # fmt: skip
    w = ThreadWorker(argv)
    w.thread.start()
    try:

        def serving() -> bool:
            try:
                return status(port, "/readyz") > 0
            except OSError:
                return False

        wait_for(serving, 30, "the health endpoint")
        time.sleep(2.5)  # over twice the liveness timeout
        assert not w.started.is_set()
        assert (status(port, "/healthz"), status(port, "/readyz")) == (200, 503)
        for entry in tiny_model_dir.iterdir():
            (shutil.copytree if entry.is_dir() else shutil.copy)(entry, models / entry.name)
        assert w.started.wait(60)
        w.check()
        wait_for(lambda: status(port, "/readyz") == 200, 60, "ready")
        assert status(port, "/healthz") == 200
    finally:
        w.stop()


def test_watchdog_clock() -> None:
    now = [100.0]
    dog = Watchdog(5.0, clock=lambda: now[0])
    now[0] = 104.0
    assert not dog.expired()
    now[0] = 105.5
    assert dog.expired() and dog.idle_for() == 5.5
    dog.beat()
    assert not dog.expired()
