"""Dead letters that always fit, and publishing that never skips, exits or loops.

How each case is handled:
- an original value longer than the dead-letter topic accepts: cut, with ``original.size`` and
  ``original.sha256`` of the whole value (a key over 1 KiB likewise, ``original.key.*``);
- a dead-letter record the broker still refuses for its size (the topic's limit was lowered
  after the worker read it): sent again without its value, headers only;
- a publish the broker does not acknowledge: fetching pauses (not ready, alive), only the
  records not acknowledged are sent again with backoff, and the batch completes when they are.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from aiokafka.errors import KafkaTimeoutError

from stream.decode import Rejection
from stream.publisher import (
    DLQ_RECORD_OVERHEAD,
    MAX_DLQ_KEY_BYTES,
    OutMessage,
    PublishError,
    dead_letter,
    dlq_value_limit,
    headers_only,
)
from stream.settings import KafkaSettings
from tests.helpers.kafka import consume_all, kcat_produce, produce
from tests.stream.conftest import STEP, T0, wait_for, worker_argv


def rec(key: bytes | None, value: bytes | None, offset: int = 7) -> SimpleNamespace:
    return SimpleNamespace(offset=offset, key=key, value=value, timestamp=-1)


def headers(msg: OutMessage) -> dict[str, str]:
    return {k: v.decode() for k, v in msg.headers}


def test_dead_letter_keeps_small_records_whole() -> None:
    msg = dead_letter(
        rec(b"s1", b'{"ts": 1}'), Rejection("schema", "missing field value"),
        input_topic="events", partition=3, dlq_topic="events.dlq", max_value_bytes=100,
    )  # fmt: skip
    assert (msg.topic, msg.key, msg.value) == ("events.dlq", b"s1", b'{"ts": 1}')
    assert headers(msg) == {
        "error.reason": "schema", "error.message": "missing field value",
        "source.topic": "events", "source.partition": "3", "source.offset": "7",
    }  # fmt: skip


def test_dead_letter_cuts_an_oversized_value_and_key() -> None:
    value, key = b"x" * 5000, b"k" * 3000
    msg = dead_letter(
        rec(key, value), Rejection("too_large", "value is 5000 bytes"),
        input_topic="events", partition=0, dlq_topic="dlq", max_value_bytes=1000,
    )  # fmt: skip
    h = headers(msg)
    assert msg.value == value[:1000] and msg.key == key[:MAX_DLQ_KEY_BYTES]
    assert h["original.size"] == "5000"
    assert h["original.sha256"] == hashlib.sha256(value).hexdigest()
    assert h["original.key.size"] == "3000"
    assert h["original.key.sha256"] == hashlib.sha256(key).hexdigest()
    # Refused even so: headers only, keeping what the whole value was.
    bare = headers_only(msg)
    assert bare.value == b"" and headers(bare)["original.size"] == "5000"
    assert headers(bare)["original.sha256"] == hashlib.sha256(value).hexdigest()
    small = dead_letter(rec(b"s", b"abc"), Rejection("schema", "x"), input_topic="e",
                        partition=0, dlq_topic="d")  # fmt: skip
    assert headers(headers_only(small))["original.size"] == "3"


@pytest.mark.integration
def test_dlq_value_limit_follows_the_topic_config(stack: Any) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    from tests.conftest import unique

    name = unique("dlq-small")

    async def run() -> tuple[int, int]:
        admin = AIOKafkaAdminClient(bootstrap_servers=stack.bootstrap)
        await admin.start()
        try:
            await admin.create_topics(
                [NewTopic(name, 1, 1, topic_configs={"max.message.bytes": "200000"})]
            )
        finally:
            await admin.close()
        kafka = KafkaSettings(bootstrap_servers=stack.bootstrap)
        return await dlq_value_limit(kafka, name), await dlq_value_limit(kafka, "no-such-topic")

    small, missing = asyncio.run(run())
    assert small == 200_000 - DLQ_RECORD_OVERHEAD
    assert missing == 1_048_588 - DLQ_RECORD_OVERHEAD  # Kafka's default when it cannot tell


class FlakyPublisher:
    """Refuses the last two records twice (a broker that does not answer), then acknowledges;
    notes at each call whether the worker is paused and alive."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.calls: list[list[OutMessage]] = []
        self.seen: list[tuple[list[str], bool, bool]] = []

    async def publish(self, messages: list[OutMessage]) -> None:
        w = self.worker
        self.calls.append(list(messages))
        self.seen.append((w.pauses.reasons, w.ready(), w.alive()))
        await asyncio.sleep(0.02)  # longer than the liveness timeout: the clocks run out
        if len(self.calls) <= 2:
            raise PublishError(KafkaTimeoutError(), list(messages[-2:]))


def test_publish_retries_only_what_failed_while_paused(tmp_path: Path) -> None:
    """The at-least-once retry loop (pure logic: the publisher is a stand-in)."""
    from stream.delivery import AtLeastOnce, DeliveryContext
    from stream.settings import WorkerSettings
    from stream.worker import Worker

    w = Worker(WorkerSettings(model_dir=tmp_path, liveness_timeout=0.01))
    w.start_clocks()  # as once start-up is done: a worker still starting is always alive
    flaky = FlakyPublisher(w)
    ctx = DeliveryContext(w.partitions, w.metrics, w.faults, w.pauses, "dlq", w.giving_up)
    delivery = AtLeastOnce(flaky, ctx)  # type: ignore[arg-type]
    msgs = [OutMessage("forecasts", b"s", b"%d" % i, None, []) for i in range(5)]
    assert asyncio.run(delivery.publish_all(msgs))
    assert [len(c) for c in flaky.calls] == [5, 2, 2] and flaky.calls[1] == msgs[-2:]
    # Retrying: paused on purpose for "kafka", so not ready but alive past the timeout.
    assert flaky.seen[1:] == [(["kafka"], False, True), (["kafka"], False, True)]
    assert not w.pauses and not w.alive()  # released; the clocks did run out meanwhile
    assert w.metrics.publish_errors._value.get() == 2


@pytest.mark.integration
@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_a_dead_letter_refused_for_its_size_is_sent_headers_only(
    stack: Any,
    make_topic: Any,
    redis_url: str,
    tmp_path: Path,
    thread_worker: Any,
    guarantee: str,
) -> None:
    """The dead-letter topic's limit is lowered after the worker read it: a 5 MB (decompressed)
    event's truncated copy is refused by the broker, then sent without its value. Nothing is
    skipped, the worker goes on, and the events behind it are forecast."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    from tests.helpers.tiny_model import make_tiny_model_dir

    topics = SimpleNamespace(
        input=make_topic("events", 1), output=make_topic("forecasts", 1), dlq=make_topic("dlq", 1)
    )
    model_dir = tmp_path / "models"
    make_tiny_model_dir(model_dir)
    produce(stack.bootstrap, topics.input, [("s", b"not json")])
    argv = worker_argv(
        stack.bootstrap, redis_url, model_dir, topics, "--metrics-port", "0",
        "--guarantee", guarantee,
    )  # fmt: skip
    w = thread_worker(argv)
    wait_for(lambda: len(consume_all(stack.bootstrap, topics.dlq, idle=0.5)) == 1, 30, "a DLQ")

    async def lower() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=stack.bootstrap)
        await admin.start()
        try:
            limit = {"max.message.bytes": "50000"}
            await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topics.dlq, limit)])
        finally:
            await admin.close()

    asyncio.run(lower())
    want = 50_000 - DLQ_RECORD_OVERHEAD
    kafka = KafkaSettings(bootstrap_servers=stack.bootstrap)
    wait_for(lambda: asyncio.run(dlq_value_limit(kafka, topics.dlq)) == want, 30, "new limit")
    huge = orjson.dumps({"ts": T0, "value": 1, "pad": "0" * 5_000_000})
    kcat_produce(stack.bootstrap, topics.input, [("s", huge.decode())], compression="gzip")
    good = [("g", orjson.dumps({"ts": T0 + i * STEP, "value": float(i)})) for i in range(48)]
    produce(stack.bootstrap, topics.input, good)
    out = consume_all(stack.bootstrap, topics.output, expected=1, timeout=60, idle=15)
    dlq = consume_all(stack.bootstrap, topics.dlq, expected=2, timeout=30, idle=5)
    w.stop()
    assert [orjson.loads(r.value)["source"]["offset"] for r in out] == [49]
    assert len(dlq) == 2
    bare = dlq[1]
    assert bare.headers["error.reason"] == "too_large" and bare.headers["source.offset"] == "1"
    assert bare.value == b"" and int(bare.headers["original.size"]) == len(huge)
    assert bare.headers["original.sha256"] == hashlib.sha256(huge).hexdigest()
    assert w.worker.metrics.publish_errors._value.get() >= 1
