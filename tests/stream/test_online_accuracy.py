"""Online accuracy and the shadow version, end to end against the real broker and Redis.

One input topic is read by two workers at once (own groups, output topics and Redis prefixes):
one serving alone, one serving the same version with a shadow (challenger) version beside it.
The serving forecasts of both are the same bytes (but ``emitted_at``); the shadow topic holds the
challenger's forecast of every serving forecast; and the ``eventcast_online_*`` numbers on the
shadow worker's /metrics equal an offline join of the forecast topics with the produced events,
for both versions. Then, without Kafka: a shadow that cannot start is counted, not fatal, and a
full shadow queue drops (counted) instead of waiting.
"""

from __future__ import annotations

import asyncio
import math
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import orjson
import pytest

from deploy.cli import settings as cli_settings
from deploy.stack import free_port
from stream.metrics import Metrics
from stream.settings import WorkerSettings
from stream.shadow import ShadowRunner
from tests.helpers.kafka import Record, consume_all, produce
from tests.helpers.tiny_model import make_tiny_model_dir
from tests.stream.conftest import (
    Truth,
    forecasts_by_source,
    http_get,
    make_events,
    metric_value,
    wait_for,
    worker_argv,
)

N_SERIES, N_EVENTS = 10, 75  # 10 * 28 forecasts per version
EMITTED = re.compile(rb',"emitted_at":[^,}]+')


def offline_scores(truth: Truth, records: list[Record]) -> dict[str, Any]:
    """Each forecast's first step against the next produced event of its series (after its
    ``ts``); forecasts without one yet are pending."""
    out: dict[str, Any] = {"n": 0, "err": [], "in80": 0, "in95": 0, "pending": 0}
    for docs in forecasts_by_source(records).values():
        f = docs[0]
        nxt = next(((ts, v) for _, _, ts, v in truth.events[f["series_id"]] if ts > f["ts"]), None)
        if nxt is None:
            out["pending"] += 1
            continue
        actual = nxt[1]
        out["n"] += 1
        out["err"].append(abs(actual - f["mean"][0]))
        out["in80"] += f["lower"]["80"][0] <= actual <= f["upper"]["80"][0]
        out["in95"] += f["lower"]["95"][0] <= actual <= f["upper"]["95"][0]
    return out


def _sources(records: list[Record]) -> list[tuple[int, int]]:
    docs = [orjson.loads(r.value)["source"] for r in records]
    return [(d["partition"], d["offset"]) for d in docs]


def gauge(text: str, name: str) -> float:
    line = next(ln for ln in text.splitlines() if ln.startswith(name + " "))
    return float(line.rsplit(" ", 1)[1])


@pytest.mark.integration
def test_shadow_forecasts_and_online_accuracy_equal_offline(
    stack: Any,
    topics: Any,
    make_topic: Any,
    redis_url: str,
    tmp_path: Path,
    thread_worker: Any,
) -> None:
    model_dir = tmp_path / "models"
    serving = make_tiny_model_dir(model_dir, seed=0)
    challenger = make_tiny_model_dir(model_dir, seed=1, promote=False)
    shadow_topic = make_topic("forecasts-shadow", 6)
    plain = SimpleNamespace(input=topics.input, output=make_topic("forecasts", 6), dlq=topics.dlq)

    events = make_events(N_SERIES, N_EVENTS)
    truth = Truth()
    truth.add(events, produce(stack.bootstrap, topics.input, events))
    expected = truth.expected_sources()
    assert len(expected) == N_SERIES * (N_EVENTS - 47)

    port = free_port()
    with_shadow = thread_worker(
        worker_argv(
            stack.bootstrap, redis_url, model_dir, topics, "--metrics-port", str(port),
            "--shadow-version", challenger, "--shadow-topic", shadow_topic,
            "--accuracy-window", "100000",
        )
    )  # fmt: skip
    alone = thread_worker(
        worker_argv(
            stack.bootstrap, redis_url, model_dir, plain, "--metrics-port", "0",
            "--redis-prefix", "alone", group=f"alone-{topics.input}",
        )
    )  # fmt: skip
    assert with_shadow.worker.shadow is not None and with_shadow.worker.shadow.running
    assert alone.worker.shadow is None

    n = len(expected)
    served = consume_all(stack.bootstrap, topics.output, expected=n, timeout=120, idle=30)
    reference = consume_all(stack.bootstrap, plain.output, expected=n, timeout=120, idle=30)
    shadowed = consume_all(stack.bootstrap, shadow_topic, expected=n, timeout=120, idle=30)

    # 1. the serving forecasts do not change with a shadow beside them
    assert len(served) == len(reference) == n
    by_source_ref = {src: [r] for src, r in zip(_sources(reference), reference, strict=True)}
    by_source_ref = {src: rs[0] for src, rs in by_source_ref.items()}
    assert len(by_source_ref) == n
    for r in served:
        doc = orjson.loads(r.value)
        twin = by_source_ref[(doc["source"]["partition"], doc["source"]["offset"])]
        assert EMITTED.sub(b"", r.value) == EMITTED.sub(b"", twin.value)
        assert (r.key, r.headers, r.timestamp, r.partition) == (
            twin.key, twin.headers, twin.timestamp, twin.partition,
        )  # fmt: skip
        assert doc["model_version"] == r.headers["model_version"] == serving

    # 2. the shadow topic holds the challenger's forecast of every serving forecast
    shadow_by_src = forecasts_by_source(shadowed)
    assert set(shadow_by_src) == set(forecasts_by_source(served)) == expected
    differ = 0
    for r in shadowed:
        doc = orjson.loads(r.value)
        assert doc["model_version"] == r.headers["model_version"] == challenger
        assert r.key.decode() == doc["series_id"] and doc["horizon"] == 1
        twin = by_source_ref[(doc["source"]["partition"], doc["source"]["offset"])]
        tdoc = orjson.loads(twin.value)
        assert (doc["series_id"], doc["ts"], doc["target_ts"]) == (
            tdoc["series_id"], tdoc["ts"], tdoc["target_ts"],
        )  # fmt: skip
        differ += doc["mean"] != tdoc["mean"]
    assert differ > n // 2  # another model, other forecasts

    # 3. /metrics of the worker equal an offline join, for both versions
    url = f"http://127.0.0.1:{port}/metrics"
    offline = {v: offline_scores(truth, recs) for v, recs in ((serving, served),
                                                              (challenger, shadowed))}  # fmt: skip
    for version, want in offline.items():
        assert want["n"] == n - N_SERIES and want["pending"] == N_SERIES
        label = f'version="{version}"'
        wait_for(
            lambda label=label, k=want["n"]: metric_value(
                http_get(url)[1].decode(), "eventcast_online_scored_total", label
            ) == k,
            30, f"online scores of {version}",
        )  # fmt: skip
    text = http_get(url)[1].decode()
    for version, want in offline.items():
        label = f'version="{version}"'
        k = want["n"]
        assert metric_value(text, "eventcast_online_scored_total", label) == k
        assert metric_value(text, "eventcast_online_abs_error_total", label) == pytest.approx(
            math.fsum(want["err"]), rel=1e-9
        )
        for lvl in ("80", "95"):
            hits = metric_value(
                text, "eventcast_online_interval_hits_total", f'level="{lvl}",{label}'
            )
            assert hits == want[f"in{lvl}"], (version, lvl)
            cov = metric_value(text, "eventcast_online_coverage", f'level="{lvl}",{label}')
            assert cov == pytest.approx(want[f"in{lvl}"] / k, rel=1e-12)
        mae = metric_value(text, "eventcast_online_mae", label)
        assert mae == pytest.approx(math.fsum(want["err"]) / k, rel=1e-9)
        assert metric_value(text, "eventcast_online_expired_total", label) == 0
        assert 0.0 < mae < 10.0
    assert gauge(text, "eventcast_online_pending") == 2 * N_SERIES
    assert metric_value(text, "eventcast_shadow_forecasts_published_total") == n
    assert metric_value(text, "eventcast_shadow_failures_total") == 0
    assert metric_value(text, "eventcast_shadow_dropped_total") == 0
    assert metric_value(text, "eventcast_shadow_info", f'version="{challenger}"') == 1
    # no series id in any label of the worker
    assert not re.search(r'\{[^}]*"s\d+"', text)
    with_shadow.stop()
    alone.stop()


def _settings(tmp_path: Path, *extra: str) -> WorkerSettings:
    argv = ["start", "--model-dir", str(tmp_path), "--bootstrap-servers", "127.0.0.1:1", *extra]
    return cli_settings(argv, environ={})


def test_a_shadow_that_cannot_start_is_counted_not_fatal(tmp_path: Path) -> None:
    from model.registry import ModelRegistry

    make_tiny_model_dir(tmp_path, seed=0)
    serving = ModelRegistry(tmp_path).load(backend="onnx", device="cpu", threads=1)
    metrics = Metrics()
    runner = ShadowRunner(_settings(tmp_path, "--shadow-version", "nope"), metrics, None)
    assert asyncio.run(runner.start(serving)) is False
    assert not runner.running
    assert metric_value(metrics.exposition().decode(), "eventcast_shadow_failures_total") == 1
    asyncio.run(runner.stop())
    asyncio.run(runner.stop())  # idempotent


def test_a_full_shadow_queue_drops_instead_of_waiting(tmp_path: Path) -> None:
    from stream.windows import WindowBatch

    async def body() -> None:
        metrics = Metrics()
        s = _settings(tmp_path, "--shadow-version", "challenger", "--shadow-queue-size", "2")
        runner = ShadowRunner(s, metrics, None)
        runner.model = SimpleNamespace(version="challenger")  # type: ignore[assignment]
        runner._task = asyncio.get_running_loop().create_future()  # type: ignore[assignment]
        z = np.zeros((3, 48))
        w = WindowBatch(0, ["a", "b", "c"], np.arange(3), np.zeros(3, np.int64), z, z, {})
        for _ in range(5):
            runner.submit(w, [(0, w)], "serving-version")
        assert runner._queue.qsize() == 2
        assert metric_value(metrics.exposition().decode(), "eventcast_shadow_dropped_total") == 9
        runner.submit(w, [(0, w)], "challenger")  # promoted: the shadow idles
        assert runner._queue.qsize() == 2

    asyncio.run(body())


def test_shadow_flags_are_validated(tmp_path: Path) -> None:
    from model.errors import ConfigError

    s = _settings(tmp_path, "--output-topic", "out", "--shadow-version", "v")
    assert s.shadow_topic_name == "out.shadow" and s.shadow_enabled
    assert not _settings(tmp_path).shadow_enabled
    with pytest.raises(ConfigError, match="--shadow-topic"):
        _settings(tmp_path, "--shadow-version", "v", "--shadow-topic", "forecasts")
    with pytest.raises(ConfigError, match="--engine native"):
        _settings(tmp_path, "--shadow-model-dir", str(tmp_path), "--engine", "faust")
    assert _settings(tmp_path, "--no-online-accuracy").online_accuracy is False
