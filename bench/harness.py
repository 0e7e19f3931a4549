"""Shared pieces of the benchmarks: a private stack, model versions, event data, worker processes
and the measurements read at the Kafka topics.

Everything talks to 127.0.0.1 only, and every wait is bounded: a benchmark that cannot make
progress raises instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch

from deploy.stack import KafkaServer, RedisServer, create_topics, free_port

REPO = Path(__file__).resolve().parent.parent
PARTITIONS = 6
T0 = 1_700_000_000.0  # first event time of the backlog (epoch seconds)
STEP = 60.0  # backlog series are minute data

MODELS: dict[str, dict[str, int]] = {
    "default": {"hidden_size": 256, "num_layers": 3, "attention_heads": 8},
    "small": {"hidden_size": 64, "num_layers": 2, "attention_heads": 4},
}


# ---- the stack -----------------------------------------------------------------------------------


@dataclass
class BenchStack:
    """Kafka + Redis of our own on free ports, in a temporary folder; ``stop()`` ends only them."""

    dir: Path
    kafka: KafkaServer
    redis: RedisServer

    @classmethod
    def start(cls, root: Path) -> BenchStack:
        kafka = KafkaServer(root, port=free_port(), heap="1g")
        redis = RedisServer(root, port=free_port())
        kafka.start()
        redis.start()
        return cls(root, kafka, redis)

    @property
    def bootstrap(self) -> str:
        return self.kafka.bootstrap

    def redis_url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.redis.port}/{db}"

    def topics(self, names: dict[str, int]) -> None:
        create_topics(self.bootstrap, names)

    def stop(self) -> None:
        for svc in (self.kafka, self.redis):
            with contextlib.suppress(Exception):
                svc.stop()


# ---- models --------------------------------------------------------------------------------------


def write_model(root: Path, name: str) -> Path:
    """A model directory holding one promoted version of the ``name`` architecture (seeded,
    untrained weights: speed does not depend on them), with ONNX and int8 ONNX files."""
    return write_model_dir(root / f"model-{name}", **MODELS[name], int8=True)


def write_model_dir(
    root: Path, *, hidden_size: int, num_layers: int, attention_heads: int, int8: bool = False
) -> Path:
    """Model directory ``root`` holding one promoted, seeded, untrained version of this size."""
    from model.config import ModelConfig
    from model.export import random_windows
    from model.network import ForecastNet
    from model.registry import ModelRegistry

    cfg = ModelConfig(
        hidden_size=hidden_size, num_layers=num_layers, attention_heads=attention_heads
    )
    torch.manual_seed(0)
    net = ForecastNet(cfg).eval()
    canary = random_windows(np.random.default_rng(0), 16, cfg.sequence_length, cfg.input_size)
    reg = ModelRegistry(root)
    version = reg.write_version(net, cfg, {"bench": True}, canary, int8=int8)
    reg.promote(version)
    return reg.root


# ---- events --------------------------------------------------------------------------------------


def series_name(i: int) -> str:
    return f"sensor-{i:05d}"


def backlog_file(path: Path, series: int, per_series: int, seed: int = 0) -> int:
    """Write ``series * per_series`` events as ``key<TAB>json`` lines for kcat, time-major (every
    series' point k before any series' point k+1, as a fleet of sensors reports). Returns the
    count."""
    rng = np.random.default_rng(seed)
    level = rng.uniform(10, 100, series)
    phase = rng.uniform(0, 2 * np.pi, series)
    names = [series_name(i) for i in range(series)]
    with open(path, "wb") as f:
        for k in range(per_series):
            ts = T0 + k * STEP
            vals = level + 5 * np.sin(phase + k * 2 * np.pi / 1440) + rng.normal(0, 1, series)
            f.write(
                b"".join(
                    b'%s\t{"series_id":"%s","ts":%.1f,"value":%.4f}\n'
                    % (n.encode(), n.encode(), ts, v)
                    for n, v in zip(names, vals.tolist(), strict=True)
                )
            )
    return series * per_series


def kcat_produce(bootstrap: str, topic: str, path: Path, timeout: float = 600) -> float:
    """Produce every line of ``path`` (key TAB value) with kcat, murmur2 partitioning as the
    Java client; returns the seconds it took."""
    t0 = time.perf_counter()
    subprocess.run(
        ["kcat", "-P", "-b", bootstrap, "-t", topic, "-K", "\t",
         "-X", "partitioner=murmur2_random", "-X", "linger.ms=20",
         "-X", "batch.num.messages=10000", "-X", "queue.buffering.max.messages=1000000",
         "-l", str(path)],
        check=True, timeout=timeout,
    )  # fmt: skip
    return time.perf_counter() - t0


# ---- reading what the topics say -----------------------------------------------------------------


async def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """High watermark of every partition of ``topic``."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await c.start()
    try:
        await c._client.force_metadata_update()  # the consumer subscribes to nothing
        parts = c.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        got = await c.end_offsets(tps)
        return {tp.partition: off for tp, off in got.items()}
    finally:
        await c.stop()


async def committed(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """The group's committed offsets on ``topic`` (partitions without a commit are absent)."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import CoordinatorNotAvailableError

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        for _ in range(20):  # the group's coordinator may still be loading
            try:
                got = await admin.list_consumer_group_offsets(group)
                return {tp.partition: m.offset for tp, m in got.items() if tp.topic == topic}
            except CoordinatorNotAvailableError:
                await asyncio.sleep(0.5)
        return {}
    finally:
        await admin.close()


def total(offsets: dict[int, int]) -> int:
    return sum(offsets.values())


# ---- worker processes ----------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Proc:
    """A worker-like subprocess with its output in a log file; ``stop()`` sends SIGTERM to it
    (and only it), SIGKILL after a grace period."""

    def __init__(
        self,
        argv: list[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path = REPO,
    ) -> None:
        self.argv = argv
        self.log_path = log_path
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTCAST_")}
        full_env.update(env or {})
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv, cwd=cwd, env=full_env, stdout=self._log, stderr=subprocess.STDOUT
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def stop(self, grace: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


def worker_argv(
    stack: BenchStack,
    model_dir: Path,
    *,
    input_topic: str,
    output_topic: str,
    group: str,
    db: int,
    backend: str = "onnx",
    threads: int = 2,
    extra: tuple[str, ...] = (),
    metrics_port: int = 0,
) -> list[str]:
    return [
        sys.executable, "-m", "deploy.cli", "--log-level", "WARNING", "start",
        "--bootstrap-servers", stack.bootstrap,
        "--redis-url", stack.redis_url(db),
        "--model-dir", str(model_dir),
        "--input-topic", input_topic,
        "--output-topic", output_topic,
        "--dlq-topic", f"{output_topic}.dlq",
        "--group-id", group,
        "--backend", backend,
        "--device", "cpu",
        "--threads", str(threads),
        "--auto-offset-reset", "earliest",
        "--metrics-port", str(metrics_port),
        *extra,
    ]  # fmt: skip


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def workdir(keep: bool = False) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="eventcast-bench-"))
    try:
        yield d
    finally:
        if not keep:
            import shutil

            shutil.rmtree(d, ignore_errors=True)


def flush_db(stack: BenchStack, db: int) -> None:
    import redis

    r = redis.Redis(host="127.0.0.1", port=stack.redis.port, db=db)
    r.flushdb()
    r.close()


# ---- statistics ----------------------------------------------------------------------------------


def percentiles(xs: list[float] | np.ndarray, qs: tuple[float, ...] = (50, 95, 99)) -> list[float]:
    a = np.asarray(xs, dtype=np.float64)
    if len(a) == 0:
        return [float("nan")] * len(qs)
    return [float(np.percentile(a, q)) for q in qs]


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def dumps(obj: Any) -> bytes:
    return orjson.dumps(
        obj, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
    )


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def stage_means(port: int) -> dict[str, float]:
    """Mean seconds per batch of each worker stage, and the mean batch size, from /metrics."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for line in text.splitlines():
        for name, store in (("_sum", sums), ("_count", counts)):
            if line.startswith("eventcast_stage_seconds" + name + "{"):
                stage = line.split('stage="', 1)[1].split('"', 1)[0]
                store[stage] = float(line.rsplit(" ", 1)[1])
            elif line.startswith("eventcast_batch_size" + name + " "):
                store["batch size"] = float(line.rsplit(" ", 1)[1])
    return {k: sums[k] / counts[k] for k in sums if counts.get(k)}
