"""Shared pieces of the benchmarks: a private stack, model versions, event data, worker processes
and the measurements read at the Kafka topics.

Everything talks to 127.0.0.1 only, and every wait is bounded: a benchmark that cannot make
progress raises instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
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

from deploy.stack import (
    KafkaServer,
    RedisClusterServers,
    RedisServer,
    create_topics,
    free_port,
)

REPO = Path(__file__).resolve().parent.parent
PARTITIONS = 6
WIDE_PARTITIONS = 12  # the backlog of the drains by several workers of one group
T0 = 1_700_000_000.0  # first event time of the backlog (epoch seconds)
STEP = 60.0  # backlog series are minute data

MODELS: dict[str, dict[str, Any]] = {
    "default": {"hidden_size": 256, "num_layers": 3, "attention_heads": 8},
    "small": {"hidden_size": 64, "num_layers": 2, "attention_heads": 4},
}
# The small model with seasonal memory (docs/training.md, "Seasonal memory"): two seasons of 24 and
# 168 steps, the state of hourly data with a daily and a weekly season (1.5 KB of indices and
# 1.5 KB of undo entries per series). A series forecasts on the seasonal path only once it has
# seen a whole cycle of its longest season, so its drain first waits for SEASONAL_READY points per
# series (the bench's minute data have no such seasons: the speed of the state does not depend on
# what it learns).
SEASONAL = {"seasons": [24, 168], "season_spacing_s": STEP, "season_alpha": 0.1,
            "season_gammas": [0.1, 0.1]}  # fmt: skip
SEASONAL_READY = 168 + 1  # points per series before every series is on the seasonal path
MODELS["small-seasonal"] = {**MODELS["small"], **SEASONAL}
MODELS["default-seasonal"] = {**MODELS["default"], **SEASONAL}


# ---- the stack -----------------------------------------------------------------------------------


@dataclass
class BenchStack:
    """Kafka + Redis of our own on free ports, in a temporary folder; ``stop()`` ends only them.

    ``cluster``: a Redis Cluster of our own too (deploy/stack.py's :class:`RedisClusterServers`,
    3 primaries + 3 replicas on free ports), started by :meth:`start_cluster` when a drain needs
    it. It has only database 0: drains on it keep apart by a key prefix of their own."""

    dir: Path
    kafka: KafkaServer
    redis: RedisServer
    cluster: RedisClusterServers | None = None

    @classmethod
    def start(cls, root: Path) -> BenchStack:
        kafka = KafkaServer(root, port=free_port(), heap="1g")
        redis = RedisServer(root, port=free_port())
        kafka.start()
        redis.start()
        return cls(root, kafka, redis)

    def start_cluster(self) -> RedisClusterServers:
        """The Redis Cluster, started on first use (healthy: every primary has its replica)."""
        if self.cluster is None:
            cluster = RedisClusterServers.on_free_ports(self.dir)
            try:
                cluster.start()
            except Exception:
                cluster.stop()
                raise
            self.cluster = cluster
        return self.cluster

    @property
    def bootstrap(self) -> str:
        return self.kafka.bootstrap

    def redis_url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.redis.port}/{db}"

    def redis_servers(self, cluster: bool = False) -> list[RedisServer]:
        """The single Redis, or (``cluster``) every node of the cluster: primaries and replicas."""
        return list(self.cluster.nodes) if cluster and self.cluster else [self.redis]

    def redis_pids(self, cluster: bool = False, primaries: bool = False) -> list[int]:
        """Processes of :meth:`redis_servers`; ``primaries``: only the cluster's primaries now."""
        servers = self.redis_servers(cluster)
        if cluster and primaries and self.cluster is not None:
            ports = {n.port for n in self.cluster.topology() if n.primary}
            servers = [s for s in servers if s.port in ports]
        return [pid for pid in (s.pid() for s in servers) if pid is not None]

    def redis_net_bytes(self, cluster: bool = False) -> dict[str, int]:
        """Network bytes so far summed over :meth:`redis_servers` (``INFO stats``): ``in`` from
        clients, ``out`` to clients, ``repl`` from primaries to their replicas."""
        import redis

        got = {"in": 0, "out": 0, "repl": 0}
        for server in self.redis_servers(cluster):
            r = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=5)
            try:
                info = r.info("stats")
            finally:
                r.close()
            got["in"] += int(info.get("total_net_input_bytes", 0))
            got["out"] += int(info.get("total_net_output_bytes", 0))
            got["repl"] += int(info.get("total_net_repl_output_bytes", 0))
        return got

    def topics(self, names: dict[str, int]) -> None:
        create_topics(self.bootstrap, names)

    def log_bytes(self, topic: str) -> int:
        """Bytes of ``topic``'s log segments on the broker's disk (record batches as produced:
        about what crossed the network to the broker, before replication)."""
        data = self.kafka.dir / "kafka" / "data"
        return sum(
            f.stat().st_size
            for d in data.glob(f"{topic}-*")
            if d.name.rsplit("-", 1)[0] == topic
            for f in d.glob("*.log")
        )

    def stop(self) -> None:
        for svc in (self.kafka, self.redis, self.cluster):
            if svc is not None:
                with contextlib.suppress(Exception):
                    svc.stop()


# ---- models --------------------------------------------------------------------------------------


def write_model(root: Path, name: str) -> Path:
    """A model directory holding one promoted version of the ``name`` architecture (seeded,
    untrained weights: speed does not depend on them), with ONNX and int8 ONNX files."""
    return write_model_dir(root / f"model-{name}", **MODELS[name], int8=True)


def write_model_dir(root: Path, *, int8: bool = False, **config: Any) -> Path:
    """Model directory ``root`` holding one promoted, seeded, untrained version of this
    ``config`` (ModelConfig fields: its size, and seasons for a seasonal one)."""
    from model.config import as_config
    from model.export import random_windows
    from model.network import ForecastNet
    from model.registry import ModelRegistry

    cfg = as_config(config)  # the defaults of a new model for what it leaves out
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


# ---- the paced producer (bench/pacer.c) ----------------------------------------------------------

PACER_BUILD = REPO / "bench" / "build_pacer.sh"
# One record per acknowledged event in the pacer's --deliveries file: where it landed and its
# CreateTime as the broker stored it (three little-endian int64).
DELIVERY = np.dtype([("partition", "<i8"), ("offset", "<i8"), ("create_ms", "<i8")])


class PacerUnavailable(RuntimeError):
    """No C compiler or librdkafka headers, and bench/build_pacer.sh could not install them."""


def build_pacer() -> Path:
    """The pacer binary, built by bench/build_pacer.sh into the cache (reused while its source is
    unchanged; apt-get installs a C compiler and librdkafka-dev when root and missing)."""
    r = subprocess.run(
        ["bash", str(PACER_BUILD)], capture_output=True, text=True, timeout=900, check=False
    )
    if r.returncode == 2:
        raise PacerUnavailable(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "")
    if r.returncode != 0 or not r.stdout.strip():
        raise RuntimeError(f"bench/build_pacer.sh failed (exit {r.returncode}):\n{r.stderr}")
    return Path(r.stdout.strip().splitlines()[-1])


def pacer_argv(
    binary: Path,
    bootstrap: str,
    topic: str,
    *,
    series: int,
    rate: float = 0.0,
    duration: float = 0.0,
    warmup: int = 0,
    deliveries: Path | None = None,
    cpus: str | None = None,
) -> list[str]:
    """Command line of one pacer run: ``rate`` events/s for ``duration`` s, or with ``warmup``
    that many points per series, unpaced; ``cpus`` pins it (taskset)."""
    argv = [str(binary), "-b", bootstrap, "-t", topic, "-s", str(series)]
    if warmup:
        argv += ["--warmup", str(warmup)]
    else:
        argv += ["-r", f"{rate:.3f}", "-d", f"{duration:.3f}"]
    if deliveries is not None:
        argv += ["--deliveries", str(deliveries)]
    return (["taskset", "-c", cpus] if cpus else []) + argv


def read_deliveries(path: Path) -> np.ndarray:
    """The pacer's delivery records (structured array: partition, offset, create_ms)."""
    return np.fromfile(path, dtype=DELIVERY)


# ---- CPU pinning ---------------------------------------------------------------------------------


def can_pin(cpus: set[int]) -> str | None:
    """Why pinning to ``cpus`` is impossible here, or None when taskset exists and they are ours."""
    if shutil.which("taskset") is None:
        return "taskset not found (util-linux)"
    missing = cpus - os.sched_getaffinity(0)
    return f"CPU(s) {sorted(missing)} not available to this process" if missing else None


def affinity(pid: int) -> str:
    """The CPU list a process may run on now (its main thread's), as taskset writes it."""
    return ",".join(str(c) for c in sorted(os.sched_getaffinity(pid)))


def thread_affinities(pid: int) -> str:
    """The distinct CPU lists of every thread of a process ("1", or "0,1 1" when they differ)."""
    seen: set[str] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread may end meanwhile
            seen.add(affinity(int(task.name)))
    return " ".join(sorted(seen))


def pin(pid: int, cpus: str) -> None:
    """Pin every thread of a running process to ``cpus`` (``taskset -a -p``); threads it starts
    later inherit the affinity of the thread that starts them, so the whole process stays there."""
    subprocess.run(
        ["taskset", "-a", "-p", "-c", cpus, str(pid)], check=True, capture_output=True, timeout=10
    )


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


async def record_sizes(bootstrap: str, topic: str, n: int = 2000) -> dict[str, float]:
    """Mean key and value bytes of up to ``n`` records of ``topic`` read from its beginning
    (``records``: how many were read)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await c.start()
    keys = values = count = 0
    try:
        await c._client.force_metadata_update()
        tps = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or set())]
        c.assign(tps)
        await c.seek_to_beginning(*tps)
        deadline = time.monotonic() + 10
        while count < n and time.monotonic() < deadline:
            for recs in (await c.getmany(timeout_ms=200, max_records=n - count)).values():
                for r in recs:
                    keys += len(r.key or b"")
                    values += len(r.value or b"")
                    count += 1
    finally:
        await c.stop()
    return {
        "records": count,
        "key_bytes": keys / max(count, 1),
        "value_bytes": values / max(count, 1),
    }


def total(offsets: dict[int, int]) -> int:
    return sum(offsets.values())


class LagProbe:
    """Consumer lag of a group on one topic (sum over partitions of end offset − committed
    offset; a partition without a commit counts from 0), with one consumer and one admin client
    kept open, so sampling it every second is cheap."""

    def __init__(self, bootstrap: str, topic: str, group: str) -> None:
        self.bootstrap, self.topic, self.group = bootstrap, topic, group
        self._consumer: Any = None
        self._admin: Any = None
        self._tps: list[Any] = []

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition
        from aiokafka.admin import AIOKafkaAdminClient

        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, enable_auto_commit=False
        )
        await self._consumer.start()
        await self._consumer._client.force_metadata_update()
        parts = self._consumer.partitions_for_topic(self.topic) or set()
        self._tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
        self._admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await self._admin.start()

    async def lag(self) -> int | None:
        """Events not yet committed by the group; None when the coordinator did not answer."""
        from aiokafka.errors import KafkaError

        ends = await self._consumer.end_offsets(self._tps)
        try:
            got = await self._admin.list_consumer_group_offsets(self.group)
        except KafkaError:
            return None
        done = {tp.partition: m.offset for tp, m in got.items() if tp.topic == self.topic}
        return sum(max(0, end - max(0, done.get(tp.partition, 0))) for tp, end in ends.items())

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self._consumer.stop()
        with contextlib.suppress(Exception):
            await self._admin.close()


class ForecastReader:
    """Reads a forecast topic from its beginning for as long as it runs (one consumer, no group).

    It counts every forecast; while ``recording`` it also notes, per forecast, when it arrived
    (``time.time()`` when the fetch returned: the same machine's clock as the input records'
    CreateTime) under the key of its input record, ``source`` partition and offset (the first
    arrival of a repeated forecast counts), and the highest source offset seen per partition.
    ``read_committed`` for exactly-once workers: their forecasts become visible at the
    transaction's commit, and that is when a consumer gets them."""

    def __init__(self, bootstrap: str, topic: str, *, read_committed: bool = False) -> None:
        self.bootstrap, self.topic, self.read_committed = bootstrap, topic, read_committed
        self.seen = 0
        self.recording = False
        self.arrivals: dict[int, float] = {}  # (partition << 40) | offset → arrival, epoch s
        self.high: dict[int, int] = {}  # source partition → highest offset recorded
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    @staticmethod
    def key(partition: Any, offset: Any) -> Any:
        return (partition << 40) | offset

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, enable_auto_commit=False, fetch_max_wait_ms=20,
            isolation_level="read_committed" if self.read_committed else "read_uncommitted",
        )  # fmt: skip
        await consumer.start()
        try:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(self.topic) or set()
            tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            while not self._stop.is_set():
                got = await consumer.getmany(timeout_ms=100, max_records=10000)
                now = time.time()
                for recs in got.values():
                    self.seen += len(recs)
                    if not self.recording:
                        continue
                    for r in recs:
                        src = orjson.loads(r.value)["source"]
                        p, o = src["partition"], src["offset"]
                        self.arrivals.setdefault((p << 40) | o, now)
                        if o > self.high.get(p, -1):
                            self.high[p] = o
        finally:
            await consumer.stop()

    def clear(self) -> None:
        self.arrivals.clear()
        self.high.clear()

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 10)


# ---- worker processes ----------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, every thread of it (0 when it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state is field 3
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


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
    cluster_prefix: str | None = None,
) -> list[str]:
    """The worker's command line; with ``cluster_prefix`` on the stack's Redis Cluster (any node's
    URL, ``--redis-cluster``) under that key prefix instead of database ``db`` of the single
    Redis."""
    if cluster_prefix is not None:
        assert stack.cluster is not None, "BenchStack.start_cluster() first"
        redis = [stack.cluster.url, "--redis-cluster", "--redis-prefix", cluster_prefix]
    else:
        redis = [stack.redis_url(db)]
    return [
        sys.executable, "-m", "deploy.cli", "--log-level", "WARNING", "start",
        "--bootstrap-servers", stack.bootstrap,
        "--redis-url", *redis,
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


def scrape(port: int) -> dict[str, float]:
    """Counters of a worker's /metrics that the cost tables use: ``consumed`` (input records),
    ``forecasts``, ``stage:NAME`` (sum of eventcast_stage_seconds) and ``inference:BACKEND``
    (sum of eventcast_inference_seconds: the model call alone), ``path:seasonal``/``path:plain``
    (forecasts by path); for the latency curve's batch columns also ``batches:STAGE`` (the
    stage's count), ``batches``/``batch_rows`` (the batch size histogram's count and sum),
    ``batch_limit`` (the gauge) and ``commits``."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return parse_metrics(text)


def parse_metrics(text: str) -> dict[str, float]:
    """The counters :func:`scrape` returns, from the Prometheus text format."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, value = line.rsplit(" ", 1)
        if name == "eventcast_events_consumed_total":
            out["consumed"] = float(value)
        elif name == "eventcast_forecasts_published_total":
            out["forecasts"] = float(value)
        elif name.startswith("eventcast_stage_seconds_sum{"):
            out["stage:" + name.split('stage="', 1)[1].split('"', 1)[0]] = float(value)
        elif name.startswith("eventcast_inference_seconds_sum{"):
            out["inference:" + name.split('backend="', 1)[1].split('"', 1)[0]] = float(value)
        elif name.startswith("eventcast_stage_seconds_count{"):
            out["batches:" + name.split('stage="', 1)[1].split('"', 1)[0]] = float(value)
        elif name == "eventcast_batch_size_sum":
            out["batch_rows"] = float(value)
        elif name == "eventcast_batch_size_count":
            out["batches"] = float(value)
        elif name == "eventcast_batch_limit":
            out["batch_limit"] = float(value)  # a gauge: its value at the scrape
        elif name == "eventcast_commits_total":
            out["commits"] = float(value)
        elif name.startswith("eventcast_forecast_paths_total{"):
            out["path:" + name.split('path="', 1)[1].split('"', 1)[0]] = float(value)
    return out
