"""The local stack: real Kafka + Redis, kcat as an independent client, idempotent start/stop."""

from __future__ import annotations

import json
import socket
import uuid
from pathlib import Path

import pytest

from deploy.stack import KafkaServer, RedisServer, Stack, StackError, free_port
from tests.helpers.kafka import consume_all, kcat_consume, kcat_produce, produce

pytestmark = pytest.mark.integration


def test_kcat_produces_and_aiokafka_consumes(stack, make_topic):
    topic = make_topic("kcat-in", partitions=3)
    lines = [(f"s{i % 5}", json.dumps({"ts": 1000 + i, "value": float(i)})) for i in range(30)]
    kcat_produce(stack.bootstrap, topic, lines)
    records = consume_all(stack.bootstrap, topic, expected=30)
    assert sorted((r.key.decode(), r.value.decode()) for r in records) == sorted(lines)
    # murmur2 (Java's and aiokafka's partitioner): one series always lands on one partition
    by_key: dict[bytes, set[int]] = {}
    for r in records:
        by_key.setdefault(r.key, set()).add(r.partition)
    assert all(len(parts) == 1 for parts in by_key.values())


def test_aiokafka_produces_and_kcat_consumes(stack, make_topic):
    topic = make_topic("kcat-out", partitions=2)
    sent = [(f"k{i}", f"v{i}") for i in range(20)]
    produce(stack.bootstrap, topic, sent)
    got = kcat_consume(stack.bootstrap, topic, count=20)
    assert sorted(got) == sorted(sent)


def test_aiokafka_and_kcat_agree_on_partitions(stack, make_topic):
    """A producer using kcat's murmur2 partitioner and one using aiokafka place keys alike."""
    a, b = make_topic("part-a", partitions=6), make_topic("part-b", partitions=6)
    keys = [f"sensor-{i}" for i in range(40)]
    kcat_produce(stack.bootstrap, a, [(k, "x") for k in keys])
    produce(stack.bootstrap, b, [(k, "x") for k in keys])
    pa = {r.key: r.partition for r in consume_all(stack.bootstrap, a, expected=40)}
    pb = {r.key: r.partition for r in consume_all(stack.bootstrap, b, expected=40)}
    assert pa == pb


def test_broker_does_not_auto_create_topics(stack):
    import asyncio

    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaTimeoutError, UnknownTopicOrPartitionError

    name = "no-such-topic-" + uuid.uuid4().hex[:8]

    async def run() -> set[str]:
        producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap, request_timeout_ms=3000)
        await producer.start()
        try:
            with pytest.raises((KafkaTimeoutError, UnknownTopicOrPartitionError)):
                await asyncio.wait_for(producer.send_and_wait(name, b"x"), 10)
        finally:
            await producer.stop()
        admin = AIOKafkaAdminClient(bootstrap_servers=stack.bootstrap)
        await admin.start()
        try:
            return set(await admin.list_topics())
        finally:
            await admin.close()

    assert name not in asyncio.run(run())


def test_redis_url_gives_a_clean_database(redis_url):
    import redis

    r = redis.Redis.from_url(redis_url)
    assert r.dbsize() == 0
    r.set("k", "v")
    assert r.config_get("appendonly")["appendonly"] == "yes"
    r.close()


def test_redis_start_is_idempotent_and_stop_leaves_nothing(tmp_path: Path):
    server = RedisServer(tmp_path, port=free_port())
    server.start()
    pid = server.pid()
    server.start()  # already running: reused, not started twice
    assert server.pid() == pid
    server.stop()
    server.stop()  # safe twice
    assert server.pid() is None and not server.running()


def test_taken_port_is_named_in_the_error(tmp_path: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(StackError, match=f"port {port} is already taken"):
            KafkaServer(tmp_path, port=port).start()
        with pytest.raises(StackError, match=f"port {port} is already taken"):
            RedisServer(tmp_path, port=port).start()


def test_kafka_storage_formats_with_a_cluster_id_that_starts_with_a_dash(tmp_path: Path):
    """Kafka's random cluster ids are URL-safe base64: one in 64 starts with "-" (it once failed
    a CI run with "--cluster-id: expected one argument")."""
    from deploy.stack import _java, ensure_kafka_jars

    server = KafkaServer(tmp_path, port=free_port())
    props = tmp_path / "server.properties"
    props.write_text(server._properties())
    server._format(_java(), ensure_kafka_jars(), props, cluster_id="-AbCdEfGhIjKlMnOpQrStUw")
    meta = (tmp_path / "kafka" / "data" / "meta.properties").read_text()
    assert "cluster.id=-AbCdEfGhIjKlMnOpQrStUw" in meta


def test_redis_cluster_has_three_primaries_each_with_a_replica(redis_cluster, tmp_path: Path):
    import redis

    topology = redis_cluster.topology()
    primaries = [n for n in topology if n.primary]
    assert len(primaries) == 3
    assert sum(hi - lo + 1 for n in primaries for lo, hi in n.slots) == 16384  # all slots served
    followed = sorted(n.primary_id for n in topology if not n.primary)
    assert followed == sorted(n.id for n in primaries)
    node = redis.Redis(port=primaries[0].port)
    try:
        config = node.config_get("*")
    finally:
        node.close()
    assert config["cluster-enabled"] == "yes" and config["cluster-node-timeout"] == "2000"
    assert config["appendonly"] == "yes" and config["maxmemory-policy"] == "noeviction"
    # `make stack-status REDIS_CLUSTER=1` shows the cluster and each node's role.
    kafka, redis_server = KafkaServer(tmp_path, port=free_port()), RedisServer(tmp_path)
    stack = Stack(tmp_path, kafka, redis_server, redis_cluster, use_cluster=True)
    rows = "\n".join(stack.status())
    assert "cluster_state:ok" in rows
    assert rows.count("node (primary)") == 3 and rows.count("node (replica)") == 3
