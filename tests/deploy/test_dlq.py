"""``worker dlq replay`` against the real broker: exactly the selected records come back.

Dead-letter records are built by the worker's own encoder (``stream.publisher.dead_letter``) and
produced with their headers; the replay must re-publish, to the input topic, exactly the records
whose reason was selected — original key and value bytes, each once, per-key order kept — and
nothing that reached the dead-letter topic after it started.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from deploy.cli import main as worker_main
from deploy.dlq import replay, replay_async
from stream.decode import Rejection
from stream.publisher import dead_letter
from stream.settings import KafkaSettings
from tests.helpers.kafka import consume_all, end_offsets

pytestmark = pytest.mark.integration


@dataclass
class Rec:
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int = 0


def dlq_records() -> list[tuple[Rec, str]]:
    """Originals of refused events with their reasons; some are awkward on purpose."""
    rows: list[tuple[Rec, str]] = []
    reasons = ["non_finite", "late", "invalid_json", "missing_feature", "schema"]
    for i in range(40):
        reason = reasons[i % len(reasons)]
        key = f"s{i % 7}".encode()
        value = orjson.dumps({"ts": 1000 + i, "value": i, "n": i})
        if reason == "invalid_json":
            value = b"\xff{not json " + str(i).encode()  # not even UTF-8
        rows.append((Rec(100 + i, key, value), reason))
    rows.append((Rec(500, None, b'{"ts": 1, "value": 2}'), "missing_key"))
    return rows


async def produce_dlq(
    bootstrap: str, dlq: str, input_topic: str, rows: list[tuple[Rec, str]]
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        futs = []
        for rec, reason in rows:
            msg = dead_letter(
                rec, Rejection(reason, f"test {reason}"), input_topic=input_topic, partition=3,
                dlq_topic=dlq,
            )  # fmt: skip
            futs.append(await producer.send(msg.topic, key=msg.key, value=msg.value,
                                            headers=msg.headers))  # fmt: skip
        for f in futs:
            await f
    finally:
        await producer.stop()


def test_replay_republishes_exactly_the_selected_records(stack: Any, make_topic: Any) -> None:
    input_topic, dlq = make_topic("events", 6), make_topic("dlq", 1)
    rows = dlq_records()
    asyncio.run(produce_dlq(stack.bootstrap, dlq, input_topic, rows))
    late_rows = [(Rec(900 + i, b"late-key", b'{"ts": 5, "value": %d}' % i), "non_finite")
                 for i in range(5)]  # fmt: skip
    kafka = KafkaSettings(bootstrap_servers=stack.bootstrap)

    async def run() -> Any:
        async def arrive_during_replay(_ends: dict[int, int]) -> None:
            # Records that reach the DLQ after the replay fixed its bounds must not be replayed.
            await produce_dlq(stack.bootstrap, dlq, input_topic, late_rows)

        return await replay_async(
            kafka, dlq_topic=dlq, input_topic=input_topic, reasons={"non_finite", "invalid_json",
            "missing_key"}, on_start=arrive_during_replay,
        )  # fmt: skip

    report = asyncio.run(run())
    wanted = [r for r, reason in rows if reason in {"non_finite", "invalid_json", "missing_key"}]
    assert report.scanned == len(rows)
    assert report.selected == report.published == len(wanted) == 17
    assert report.by_reason == Counter(reason for _, reason in rows)
    assert report.end_offsets == {0: len(rows)} and report.next_offsets == {0: len(rows)}

    got = consume_all(stack.bootstrap, input_topic, expected=len(wanted), idle=2.0)
    assert sum(end_offsets(stack.bootstrap, input_topic).values()) == len(wanted)  # no extras
    assert Counter((r.key, r.value) for r in got) == Counter((r.key, r.value) for r in wanted)
    for r in got:
        assert r.headers["replay.of"].startswith(f"{dlq}/0/")
    # per key, the replayed order is the dead-letter order (the worker sees them in order again)
    for key in {r.key for r in wanted if r.key is not None}:
        assert [r.value for r in got if r.key == key] == [r.value for r in wanted if r.key == key]


def test_replay_command_dry_run_and_all_reasons(stack: Any, make_topic: Any, capsys: Any) -> None:
    input_topic, dlq = make_topic("events", 6), make_topic("dlq", 1)
    rows = dlq_records()[:10]
    asyncio.run(produce_dlq(stack.bootstrap, dlq, input_topic, rows))
    base = ["dlq", "replay", "--bootstrap-servers", stack.bootstrap, "--dlq-topic", dlq,
            "--input-topic", input_topic]  # fmt: skip

    assert worker_main([*base, "--dry-run", "--reason", "late"]) == 0
    dry = orjson.loads(capsys.readouterr().out)
    assert dry["selected"] == 2 and dry["published"] == 0 and dry["scanned"] == 10
    assert sum(end_offsets(stack.bootstrap, input_topic).values()) == 0

    assert worker_main([*base, "--from-offset", "4"]) == 0  # every reason, from offset 4
    out = orjson.loads(capsys.readouterr().out)
    assert out["published"] == 6 and out["next_offsets"] == {"0": 10}
    got = consume_all(stack.bootstrap, input_topic, expected=6, idle=2.0)
    assert sorted(r.value for r in got) == sorted(r.value for r, _ in rows[4:])


def test_replay_fails_clearly_for_a_missing_topic(stack: Any, make_topic: Any) -> None:
    from model.errors import EventcastError

    kafka = KafkaSettings(bootstrap_servers=stack.bootstrap)
    dlq = make_topic("dlq", 1)
    with pytest.raises(EventcastError, match="input topic 'no-such-topic' not found"):
        replay(kafka, dlq_topic=dlq, input_topic="no-such-topic", timeout=5)
    assert worker_main(["dlq", "replay", "--bootstrap-servers", stack.bootstrap,
                        "--dlq-topic", "x", "--input-topic", "x"]) == 2  # fmt: skip
