"""``worker dlq replay``: re-publish dead-letter records to the input topic once fixed.

A dead-letter record (docs/contract.md "Dead-letter topic") holds the original key and value bytes
of a refused event and its ``error.reason`` header. Replaying sends exactly those bytes back to the
input topic, so the worker decodes them again (after a model with the missing feature was
promoted, a series limit raised, a producer bug fixed...).

What gets replayed is decided once, at start: every record from the start offset up to each
dead-letter partition's end offset *at that moment*, whose reason is in the filter. Records that
arrive while the replay runs (for example, the replayed events refused again) are not replayed,
so a replay always terminates and never loops. Sends use an idempotent producer with
``acks=all``; the command returns only after every send was acknowledged. Each replayed record
carries a ``replay.of`` header (``TOPIC/PARTITION/OFFSET`` of the dead-letter record) for tracing.
The report's ``next_offsets`` let an operator resume with ``--from-offset``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from model.errors import EventcastError
from stream.consumer import offset_bounds, read_ranges
from stream.errors import KafkaUnavailableError

log = logging.getLogger(__name__)

UNKNOWN_REASON = "unknown"  # a record without an error.reason header
ACK_BATCH = 1000  # sends in flight before waiting for their acknowledgements


@dataclass
class ReplayReport:
    """What a replay did. ``selected`` counts records that matched the filter (published
    unless ``dry_run``); ``by_reason`` counts every scanned record by its reason."""

    dlq_topic: str
    input_topic: str
    reasons: list[str] | None
    dry_run: bool
    scanned: int = 0
    selected: int = 0
    published: int = 0
    by_reason: Counter[str] = field(default_factory=Counter)
    end_offsets: dict[int, int] = field(default_factory=dict)
    next_offsets: dict[int, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dlq_topic": self.dlq_topic,
            "input_topic": self.input_topic,
            "reasons": self.reasons,
            "dry_run": self.dry_run,
            "scanned": self.scanned,
            "selected": self.selected,
            "published": self.published,
            "by_reason": dict(sorted(self.by_reason.items())),
            "end_offsets": {str(p): o for p, o in sorted(self.end_offsets.items())},
            "next_offsets": {str(p): o for p, o in sorted(self.next_offsets.items())},
        }


def _reason(headers: Any) -> str:
    for k, v in headers or ():
        if k == "error.reason":
            try:
                return bytes(v).decode("utf-8")
            except UnicodeDecodeError:
                return UNKNOWN_REASON
    return UNKNOWN_REASON


async def replay_async(
    kafka: Any,
    *,
    dlq_topic: str,
    input_topic: str,
    reasons: set[str] | None = None,
    from_offset: int | None = None,
    dry_run: bool = False,
    timeout: float = 30.0,
    on_start: Callable[[dict[int, int]], Awaitable[None]] | None = None,
) -> ReplayReport:
    """Replay the dead-letter records of ``dlq_topic`` to ``input_topic`` (see module docstring).

    ``kafka`` is a :class:`stream.settings.KafkaSettings`; ``reasons`` None selects every
    record; ``from_offset`` starts every partition there (default: its beginning).
    ``on_start`` is awaited with the end offsets once they are fixed (a hook for tests and
    progress reporting). Raises EventcastError when a topic does not exist, the broker does not
    answer, or a send is not acknowledged — records acknowledged before that stay published (see
    the log for how far it got).
    """
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.errors import KafkaError, UnknownTopicOrPartitionError

    from deploy.plot import assigned_partitions, kafka_failure_detail

    report = ReplayReport(
        dlq_topic, input_topic, sorted(reasons) if reasons is not None else None, dry_run
    )
    consumer = AIOKafkaConsumer(
        dlq_topic, **kafka.client_kwargs(), group_id=None, enable_auto_commit=False,
        isolation_level="read_committed", auto_offset_reset="earliest",
    )  # fmt: skip
    producer = None if dry_run else AIOKafkaProducer(
        **kafka.client_kwargs(), acks="all", enable_idempotence=True, linger_ms=5,
        request_timeout_ms=int(timeout * 1000),
    )  # fmt: skip
    try:
        try:
            await asyncio.wait_for(consumer.start(), timeout)
            if producer is not None:
                await asyncio.wait_for(producer.start(), timeout)
                try:
                    found = await producer.partitions_for(input_topic)
                except UnknownTopicOrPartitionError:
                    found = None
                if not found:
                    raise EventcastError(f"input topic {input_topic!r} not found")
        except (KafkaError, TimeoutError, OSError) as exc:
            detail = await kafka_failure_detail(kafka) or repr(exc)
            raise EventcastError(
                f"cannot reach Kafka at {kafka.bootstrap_servers}: {detail}"
            ) from exc
        tps = await assigned_partitions(consumer, dlq_topic, timeout)
        bounds = await offset_bounds(consumer, tps)
        ends = {tp: end for tp, (_, end) in bounds.items()}
        report.end_offsets = {tp.partition: ends[tp] for tp in tps}
        ranges = {tp: (max(begin, from_offset or 0), end) for tp, (begin, end) in bounds.items()}
        for tp in tps:
            report.next_offsets[tp.partition] = ranges[tp][0]
        if on_start is not None:
            await on_start(dict(report.end_offsets))
        log.info("replaying %s up to %s into %s (reasons: %s)", dlq_topic, report.end_offsets,
                 input_topic, report.reasons or "all")  # fmt: skip

        inflight: list[tuple[Any, Any]] = []  # (ack future, consumer record)

        async def drain() -> None:
            for fut, rec in inflight:
                try:
                    await fut
                except KafkaError as exc:
                    raise EventcastError(
                        f"replay of {dlq_topic}[{rec.partition}] offset {rec.offset} was not "
                        f"acknowledged: {exc!r}; {report.published} records were published"
                    ) from exc
                report.published += 1
            inflight.clear()

        reading = read_ranges(consumer, ranges, stall=timeout, max_records=ACK_BATCH)
        try:
            async for tp, records in reading:
                for rec in records:
                    report.scanned += 1
                    reason = _reason(rec.headers)
                    report.by_reason[reason] += 1
                    report.next_offsets[tp.partition] = rec.offset + 1
                    if reasons is not None and reason not in reasons:
                        continue
                    report.selected += 1
                    if producer is None:
                        continue
                    origin = f"{dlq_topic}/{tp.partition}/{rec.offset}".encode()
                    fut = await producer.send(
                        input_topic, key=rec.key, value=rec.value, headers=[("replay.of", origin)]
                    )
                    inflight.append((fut, rec))
                if len(inflight) >= ACK_BATCH:
                    await drain()
        except KafkaUnavailableError as exc:
            raise EventcastError(
                f"timed out reading {dlq_topic}: no records for {timeout:.0f}s before "
                f"the end offsets {report.end_offsets}"
            ) from exc
        await drain()
        # Transactions' control records may sit at the end: the scan stops at the end offsets.
        for tp in tps:
            report.next_offsets[tp.partition] = max(report.next_offsets[tp.partition], ends[tp])
        return report
    finally:
        await consumer.stop()
        if producer is not None:
            await producer.stop()


def replay(kafka: Any, **kwargs: Any) -> ReplayReport:
    """Synchronous :func:`replay_async` (same arguments)."""
    return asyncio.run(replay_async(kafka, **kwargs))
