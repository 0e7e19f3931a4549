"""`worker start` fails fast with docs/contract.md's exit codes; `topics create`, `status` and a
clean SIGTERM stop."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from deploy.cli import settings as cli_settings
from deploy.stack import free_port
from stream.settings import WorkerSettings
from tests.helpers.kafka import produce
from tests.stream.conftest import REPO, make_events, worker_argv


def run_cli(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deploy.cli", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_settings_layering_and_validation(tmp_path: Path) -> None:
    from model.errors import ConfigError

    cfg = tmp_path / "w.yaml"
    cfg.write_text("worker:\n  max-batch: 99\n  emit: latest\n")
    args = cli_settings(
        ["start", "--config", str(cfg), "--emit", "every"], environ={"EVENTCAST_GROUP_ID": "g7"}
    )
    s = args
    assert (s.batch.max_batch, s.emit, s.group_id) == (99, "every", "g7")
    kw = s.kafka.client_kwargs()
    assert kw["bootstrap_servers"] == "127.0.0.1:9092" and "ssl_context" not in kw
    with pytest.raises(ConfigError, match="--sasl-mechanism"):
        cli_settings(["start", "--security-protocol", "SASL_SSL"], environ={})
    with pytest.raises(ConfigError, match="EVENTCAST_FAULT"):
        cli_settings(["start"], environ={"EVENTCAST_FAULT": "nowhere:1"})
    sasl = cli_settings(
        ["start", "--security-protocol", "SASL_SSL", "--sasl-mechanism", "SCRAM-SHA-512",
         "--sasl-username", "u", "--sasl-password", "p", "--redis-url", "rediss://h:6380/0"],
        environ={},
    )  # fmt: skip
    s = sasl
    kw = s.kafka.client_kwargs()
    assert kw["sasl_mechanism"] == "SCRAM-SHA-512" and kw["ssl_context"] is not None
    assert s.redis.url.startswith("rediss://")


def test_redis_cluster_setting_picks_the_cluster_client(tmp_path: Path) -> None:
    """--redis-cluster (EVENTCAST_REDIS_CLUSTER, YAML redis-cluster) gives a RedisCluster client
    with the same credentials; a cluster URL must be TCP and database 0."""
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

    from model.errors import ConfigError

    def settings(argv: list[str], environ: dict[str, str]) -> WorkerSettings:
        return cli_settings(["start", "--redis-url", "redis://h:7000/0", *argv], environ=environ)

    cfg = tmp_path / "w.yaml"
    cfg.write_text("worker:\n  redis-cluster: true\n")
    assert settings([], {}).redis.redis_cluster is False
    assert isinstance(settings([], {}).redis.client(), Redis)
    for s in (
        settings(["--redis-cluster", "--redis-password", "pw"], {}),
        settings(["--redis-password", "pw"], {"EVENTCAST_REDIS_CLUSTER": "true"}),
        settings(["--config", str(cfg), "--redis-password", "pw"], {}),
    ):
        client = s.redis.client()
        assert isinstance(client, RedisCluster)
        (node,) = client.nodes_manager.startup_nodes.values()  # connects on first use
        assert (node.host, node.port) == ("h", 7000)
        assert node.connection_kwargs["password"] == "pw"
        assert node.connection_kwargs["socket_timeout"] == 5.0
    with pytest.raises(ConfigError, match="only database 0"):
        settings(["--redis-cluster", "--redis-url", "redis://h:7000/3"], {})
    with pytest.raises(ConfigError, match="unix://"):
        settings(["--redis-cluster", "--redis-url", "unix:///run/redis.sock"], {})


def test_gc_freeze_is_on_by_default_and_can_be_turned_off(tmp_path: Path) -> None:
    def settings(argv: list[str], environ: dict[str, str]) -> WorkerSettings:
        return cli_settings(["start", *argv], environ=environ)

    assert settings([], {}).gc_freeze is True
    assert settings(["--no-gc-freeze"], {}).gc_freeze is False
    assert settings([], {"EVENTCAST_GC_FREEZE": "false"}).gc_freeze is False
    assert settings(["--gc-freeze"], {"EVENTCAST_GC_FREEZE": "0"}).gc_freeze is True
    # What the flag does, in a fresh interpreter: the start-up objects leave the collector's view.
    code = (
        "import gc, torch; from stream.runtime import freeze_startup_objects; "
        "n = len(gc.get_objects()); freeze_startup_objects(); "
        "print(n, gc.get_freeze_count(), len(gc.get_objects()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    before, frozen, after = map(int, out.stdout.split())
    assert before > 100_000 and frozen > 100_000 and after < 1_000, (before, frozen, after)


def test_empty_model_dir_exits_3(tmp_path: Path) -> None:
    res = run_cli("start", "--model-dir", str(tmp_path), "--metrics-port", "0")
    assert res.returncode == 3, res.stderr
    assert "worker retrain" in res.stderr and "--wait-for-model" in res.stderr


def test_bad_flag_exits_2(tmp_path: Path) -> None:
    res = run_cli("start", "--model-dir", str(tmp_path), "--max-batch", "0", "--metrics-port", "0")
    assert res.returncode == 2 and "--max-batch" in res.stderr


@pytest.mark.integration
def test_unreachable_brokers_exit_1_and_missing_topics_exit_2(
    stack: Any, redis_url: str, tiny_model_dir: Path
) -> None:
    names = SimpleNamespace(input="nope-in", output="nope-out", dlq="nope-dlq")
    dead = f"127.0.0.1:{free_port()}"
    res = run_cli(*worker_argv(dead, redis_url, tiny_model_dir, names, "--metrics-port", "0"))
    assert res.returncode == 1, res.stderr
    assert "cannot reach Kafka" in res.stderr and dead in res.stderr
    res = run_cli(
        *worker_argv(stack.bootstrap, redis_url, tiny_model_dir, names, "--metrics-port", "0")
    )
    assert res.returncode == 2, res.stderr
    assert "nope-in" in res.stderr and "worker topics create" in res.stderr


@pytest.mark.integration
def test_topics_create_status_and_sigterm(
    stack: Any, redis_url: str, tiny_model_dir: Path, proc_worker: Any
) -> None:
    import uuid

    base = f"cli-{uuid.uuid4().hex[:8]}"
    topics = SimpleNamespace(input=base, output=base + ".out", dlq=base + ".dlq")
    args = ["--bootstrap-servers", stack.bootstrap, "--input-topic", topics.input,
            "--output-topic", topics.output, "--dlq-topic", topics.dlq]  # fmt: skip
    res = run_cli("topics", "create", *args, "--partitions", "3")
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("created") == 3
    assert run_cli("topics", "create", *args).stdout.count("exists") == 3

    produce(stack.bootstrap, topics.input, make_events(3, 50))
    w = proc_worker(
        worker_argv(stack.bootstrap, redis_url, tiny_model_dir, topics, group="cli-g")
    ).wait_ready()
    from tests.stream.conftest import wait_for

    wait_for(lambda: "eventcast_forecasts_published_total 9.0" in w.metrics(), 60, "9 forecasts")
    import redis

    announced = redis.Redis.from_url(redis_url)
    try:
        wait_for(lambda: announced.hlen("eventcast:workers:cli-g") > 0, 30, "the announce record")
    finally:
        announced.close()
    res = run_cli(
        "status", "--bootstrap-servers", stack.bootstrap, "--redis-url", redis_url,
        "--group-id", "cli-g", "--input-topic", topics.input, "--interval", "0.5", "--json",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    report = orjson.loads(res.stdout)
    assert report["total_lag"] == 0 and len(report["partitions"]) == 3
    assert len(report["members"]) == 1 and sorted(report["members"][0]["partitions"]) == [0, 1, 2]
    # the running worker's own announce record: its interval calibration (default online)
    (worker,) = report["workers"]
    calibration = worker["calibration"]
    assert calibration["mode"] == "online", worker
    assert set(calibration["coverage"]) == set(calibration["adjustment"]) == {"80", "95"}, worker
    assert isinstance(calibration["scored"], int), worker
    text = run_cli(
        "status", "--bootstrap-servers", stack.bootstrap, "--redis-url", redis_url,
        "--group-id", "cli-g", "--input-topic", topics.input, "--interval", "0.1",
    )  # fmt: skip
    assert text.returncode == 0, text.stderr
    assert "    calibration online  coverage 80 % " in text.stdout, text.stdout
    # SIGUSR1: thread and asyncio task stacks in the log; the worker goes on serving.
    dump = w.dump()
    assert "thread stacks" in dump and "end of dump" in dump, dump
    assert "-- task fetch" in dump and "in _fetch" in dump, dump
    assert w.ready()
    assert w.terminate() == 0, w.log()
    assert "stopped cleanly" in w.log()


@pytest.mark.integration
def test_status_reports_each_workers_calibration(
    stack: Any, make_topic: Any, redis_url: str, capsys: Any
) -> None:
    """Announce records written by the worker's own code (``WindowStore.announce``) with and
    without the ``calibration`` key (workers of older versions lack it), and one malformed."""
    import asyncio

    from stream.commands import calibration_record
    from stream.settings import RedisSettings
    from stream.store import WindowStore

    topic, group = make_topic("status-in", 2), "status-cal"
    online = {
        "mode": "online",
        "coverage": {"80": 0.794, "95": None},
        "adjustment": {"80": 1.0823, "95": 0.97},
        "scored": 1000,
    }
    redis = RedisSettings(redis_url=redis_url)

    async def announce() -> None:
        client = redis.client()
        try:
            store = WindowStore(client, redis.prefix, topic)
            base = {"version": "v1", "partitions": [0], "pid": 1, "host": "h"}
            await store.announce(group, "w-new", {**base, "calibration": online})
            await store.announce(group, "w-old", {**base, "partitions": [1]})
            await store.announce(group, "w-odd", {**base, "calibration": {"mode": 3, "scored": "x",
                                                  "coverage": {"80": "high"}}})  # fmt: skip
        finally:
            await client.aclose()

    asyncio.run(announce())
    argv = ["status", "--bootstrap-servers", stack.bootstrap, "--redis-url", redis_url,
            "--group-id", group, "--input-topic", topic, "--interval", "0.1"]  # fmt: skip
    from deploy.cli import main as worker_main

    assert worker_main([*argv, "--json"]) == 0
    report = orjson.loads(capsys.readouterr().out)
    by_member = {w["member"]: w for w in report["workers"]}
    assert by_member["w-new"]["calibration"] == online
    assert by_member["w-old"]["calibration"] is None
    unknown = {"80": None, "95": None}
    assert by_member["w-odd"]["calibration"] == {
        "mode": None, "coverage": unknown, "adjustment": unknown, "scored": None,
    }  # fmt: skip
    assert calibration_record([1, 2]) is None

    assert worker_main(argv) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    line_of = {m: lines[i + 1] for i, ln in enumerate(lines) for m in by_member if f" {m} " in ln}
    assert line_of["w-new"].strip() == (
        "calibration online  coverage 80 % 79.4 %  95 % -  "
        "adjustment 80 % 1.082  95 % 0.970  (1000 scored)"
    ), out
    assert line_of["w-old"].strip() == "calibration -  coverage -  adjustment -", out
    assert line_of["w-odd"].strip() == (
        "calibration -  coverage 80 % -  95 % -  adjustment 80 % -  95 % -  (- scored)"
    ), out
