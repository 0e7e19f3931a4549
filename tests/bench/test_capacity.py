"""The capacity measurements of bench/run.py's drains, without a stack: what is read from a worker's
/metrics (its real exposition), CPU time from /proc, the cost per event over a window summed over
several workers, the worker's command line on the Redis Cluster, and which drains ``--drains``
selects."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from bench.harness import BenchStack, cpu_seconds, parse_metrics, worker_argv
from bench.run import STAGES, Bench, _cost, parse
from deploy.stack import KafkaServer, RedisClusterServers, RedisServer
from stream.metrics import Metrics


def test_parse_metrics_reads_the_worker_exposition() -> None:
    m = Metrics()
    m.consumed.inc(1000)
    m.forecasts.inc(900)
    for stage, secs in (("apply", 0.25), ("infer", 0.5), ("persist", 0.125)):
        m.stage.labels(stage).observe(secs)
        m.stage.labels(stage).observe(secs)
    m.inference.labels("onnx").observe(0.375)
    m.forecast_paths.labels("seasonal").inc(700)
    m.forecast_paths.labels("plain").inc(200)
    got = parse_metrics(m.exposition().decode())
    assert got["consumed"] == 1000
    assert got["forecasts"] == 900
    assert got["stage:apply"] == 0.5 and got["stage:infer"] == 1.0 and got["stage:persist"] == 0.25
    assert got["inference:onnx"] == 0.375
    assert got["path:seasonal"] == 700 and got["path:plain"] == 200
    assert not any(k.startswith("stage:") and k[6:] not in STAGES for k in got)


def test_cpu_seconds_of_this_process() -> None:
    before = cpu_seconds(os.getpid())
    end = time.process_time() + 0.05
    while time.process_time() < end:
        pass
    assert cpu_seconds(os.getpid()) >= before + 0.03  # clock ticks: 10 ms
    assert cpu_seconds(2**22 + 12345) == 0.0  # above pid_max: no such process


def test_cost_per_event_sums_the_workers() -> None:
    m0 = [{"consumed": 100.0, "stage:infer": 1.0}, {"consumed": 0.0}]
    m1 = [
        {"consumed": 1100.0, "stage:infer": 1.002, "inference:onnx": 0.001},
        {"consumed": 1000.0, "stage:infer": 0.003, "inference:onnx": 0.001},
    ]
    c = _cost(
        m0, m1, {"workers": 0.02, "redis": 0.002, "kafka": 0.004}, {"in": 400_000, "out": 20_000}
    )
    assert c["events"] == 2000
    assert c["stage_us"]["infer"] == pytest.approx(2.5)  # 5 ms over 2000 events
    assert c["stage_us"]["apply"] == 0
    assert c["inference_us"] == {"onnx": pytest.approx(1.0)}
    assert c["cpu_us"] == pytest.approx({"workers": 10.0, "redis": 1.0, "kafka": 2.0})
    assert c["redis_bytes"] == {"in": 200.0, "out": 10.0}
    assert _cost(m0, m0, {"workers": 1.0})["events"] == 0


def test_worker_argv_on_the_cluster_uses_a_prefix_not_a_db(tmp_path: Path) -> None:
    stack = BenchStack(
        tmp_path, KafkaServer(tmp_path, port=9), RedisServer(tmp_path, port=10),
        RedisClusterServers(tmp_path, ports=(21, 22, 23, 24, 25, 26)),
    )  # fmt: skip
    kw = {"input_topic": "in", "output_topic": "out", "group": "g", "db": 7}
    single = worker_argv(stack, tmp_path, **kw)  # type: ignore[arg-type]
    assert single[single.index("--redis-url") + 1] == "redis://127.0.0.1:10/7"
    assert "--redis-cluster" not in single
    on_cluster = worker_argv(stack, tmp_path, cluster_prefix="bench-1", **kw)  # type: ignore[arg-type]
    i = on_cluster.index("--redis-url")
    assert on_cluster[i + 1 : i + 5] == [
        "redis://127.0.0.1:21/0", "--redis-cluster", "--redis-prefix", "bench-1"
    ]  # fmt: skip


def test_drains_selects_the_capacity_rows(tmp_path: Path) -> None:
    b = Bench(parse(["--quick", "--drains", "small onnx emit=every"]), tmp_path)
    assert b.cluster_key() == "small onnx emit=every, redis cluster"
    assert [b.workers_key(n) for n in (1, 3)] == [
        "small onnx emit=every, 12 partitions, 1 worker",
        "small onnx emit=every, 12 partitions, 3 workers",
    ]
    assert all(b.want_drain(k) for k in (b.cluster_key(), b.workers_key(2)))
    assert not b.want_drain("small torch emit=every")
    assert Bench(parse([]), tmp_path).want_drain("anything")
    exact = Bench(parse(["--drains", "=small onnx emit=every,seasonal"]), tmp_path)
    assert exact.want_drain("small onnx emit=every")
    assert exact.want_drain("small-seasonal onnx emit=every")
    assert exact.want_drain("default-seasonal onnx emit=every")
    assert not Bench(parse(["--drains", "=small-seasonal onnx emit=every"]), tmp_path).want_drain(
        "default-seasonal onnx emit=every"
    )
    assert not exact.want_drain(exact.cluster_key())
