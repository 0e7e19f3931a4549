"""Session fixtures: the real local stack (Kafka + Redis), unique topics, a clean Redis db per test.

The stack used by the suite is its own: ``make test`` exports ``EVENTCAST_TEST_BOOTSTRAP`` and
``EVENTCAST_TEST_REDIS_URL`` for a stack it started on free ports; without them, the ``stack``
fixture starts one on free ports in a temporary folder and stops it at the end of the session.
A stack the user runs on 9092/6379 is never touched.

Fault tests that restart or kill a service use ``private_kafka`` / ``private_redis``: instances of
their own on free ports, stopped when the test ends. ``redis_cluster`` is a Redis Cluster (3
primaries + 3 replicas) of the session's own, started by the first test that asks for it.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from deploy.stack import KafkaServer, RedisClusterServers, RedisServer, create_topics, free_port


@dataclass
class TestStack:
    bootstrap: str
    redis_host_port: str  # "127.0.0.1:PORT"
    kafka: KafkaServer | None = None  # None when the stack was started outside pytest
    redis: RedisServer | None = None

    def redis_url(self, db: int = 0) -> str:
        return f"redis://{self.redis_host_port}/{db}"


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestStack]:
    bootstrap = os.environ.get("EVENTCAST_TEST_BOOTSTRAP")
    redis_url = os.environ.get("EVENTCAST_TEST_REDIS_URL")
    if bootstrap and redis_url:
        yield TestStack(bootstrap, redis_url.split("://", 1)[1].split("/", 1)[0])
        return
    root = tmp_path_factory.mktemp("stack")
    redis = RedisServer(root, port=free_port())
    kafka = KafkaServer(root, port=free_port())
    redis.start()
    kafka.start()
    try:
        yield TestStack(kafka.bootstrap, f"127.0.0.1:{redis.port}", kafka, redis)
    finally:
        kafka.stop()
        redis.stop()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def make_topic(stack: TestStack) -> Callable[..., str]:
    """Create a uniquely named topic: ``make_topic("events", partitions=6) -> name``."""

    def make(prefix: str = "t", partitions: int = 1) -> str:
        name = unique(prefix)
        create_topics(stack.bootstrap, {name: partitions})
        return name

    return make


@pytest.fixture
def topics(make_topic: Callable[..., str]) -> SimpleNamespace:
    """A fresh set of the worker's topics: ``input`` (6 partitions), ``output`` (6), ``dlq`` (1)."""
    return SimpleNamespace(
        input=make_topic("events", 6), output=make_topic("forecasts", 6), dlq=make_topic("dlq", 1)
    )


_redis_dbs = itertools.cycle(range(1, 64))  # db 0 is left alone; the test stack has 64 dbs


@pytest.fixture
def redis_url(stack: TestStack) -> str:
    """A Redis URL with a database of its own, flushed before the test."""
    import redis

    db = next(_redis_dbs)
    url = stack.redis_url(db)
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()
    return url


@pytest.fixture(params=["redis", "redis-cluster"])
def store_redis(request: pytest.FixtureRequest) -> Any:
    """The Redis of a worker test that runs on both: once a fresh database of the single Redis
    (``redis_url``), once the session's Redis Cluster (``redis_cluster``) under a key prefix of
    the test's own; a :class:`tests.helpers.store.StoreTarget`."""
    from tests.helpers.store import StoreTarget

    if request.param == "redis":
        return StoreTarget(request.getfixturevalue("redis_url"))
    cluster = request.getfixturevalue("redis_cluster")
    return StoreTarget(cluster.url, unique("t"), cluster=True)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis instance of this test's own (free port, AOF in tmp_path), for restart tests."""
    server = RedisServer(tmp_path / "private-redis", port=free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    """A Redis Cluster of this session's own (deploy/stack.py: 3 primaries with one replica each,
    free ports, AOF in a temporary folder), stopped at the end of the session. A cluster has only
    database 0: tests sharing it keep apart by a unique ``--redis-prefix``."""
    cluster = RedisClusterServers.on_free_ports(tmp_path_factory.mktemp("redis-cluster"))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def private_kafka(tmp_path: Path) -> Iterator[KafkaServer]:
    """A Kafka broker of this test's own (free ports), for broker restart tests."""
    server = KafkaServer(tmp_path / "private-kafka", port=free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory holding one promoted, untrained tiny version (built once per session)."""
    from tests.helpers.tiny_model import make_tiny_model_dir

    root = tmp_path_factory.mktemp("models")
    make_tiny_model_dir(root)
    return root


# A tiny model with seasons (model/seasonal.py) for tests/stream/conftest.py's series (5-minute
# steps, a 24-step wave and a 5-step sawtooth): its series' seasonal state warms up at their 60th
# point, so the windows of points 48..59 take the plain path and the later ones the seasonal path.
# Its input ends with the state's level (``season_level``), which feeds the AR path; the weight
# a trained hybrid learns for it is set by hand (untrained it is 0), so a level lost or taken
# from another state on the way to the model changes the forecasts and the tests see it.
def _level_counts(net: Any) -> None:
    net.ar.weight[:, -1] = 0.3


SEASONAL_TINY = {
    "seasons": [5, 60], "season_spacing_s": 300.0, "season_alpha": 0.3,
    "season_gammas": [0.2, 0.1], "season_level": True, "ar_skip": True, "tweak": _level_counts,
}  # fmt: skip


@pytest.fixture(scope="session")
def seasonal_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory holding one promoted tiny version with seasons (:data:`SEASONAL_TINY`)."""
    from tests.helpers.tiny_model import make_tiny_model_dir

    root = tmp_path_factory.mktemp("seasonal-models")
    make_tiny_model_dir(root, **SEASONAL_TINY)
    return root


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests skip without CUDA; everything else runs (slow tests too)."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch is a hard dependency
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
