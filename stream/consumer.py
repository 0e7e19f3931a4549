"""Kafka reading: the micro-batcher over the group consumer, and bounded reads of offset ranges.

:func:`offset_bounds` and :func:`read_ranges` are the one implementation of "read ``[start, end)``
of some partitions, then stop": the worker's rebuild (:class:`PartitionReplayer`), the trainer's
``kafka://`` replay (``train/replay.py``), ``worker dlq replay`` (``deploy/dlq.py``) and
``worker plot`` (``deploy/plot.py``) all read through it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from stream.budget import LatencyBudget
from stream.errors import KafkaUnavailableError
from stream.settings import BatchSettings, KafkaSettings

Batch = dict[TopicPartition, list[Any]]


class Batcher:
    """Micro-batches from a consumer (as Triton's dynamic batcher): a batch closes when it holds
    ``limit`` records or ``wait`` seconds after its first record arrived. Records of a partition
    stay in offset order.

    ``limit`` and ``wait`` come from ``budget`` (:class:`stream.budget.LatencyBudget`, built from
    the settings when not given): ``max_batch`` and ``max_delay`` without a latency budget, at
    most those with one. Each fetch tells the budget whether records were waiting (its first read
    alone filled the limit) and how long its oldest record had waited: its backlog evidence.
    """

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        settings: BatchSettings,
        poll: float = 0.2,
        budget: LatencyBudget | None = None,
    ) -> None:
        self.consumer = consumer
        self.settings = settings
        self.poll = poll
        self.budget = budget or LatencyBudget(
            settings.latency_budget, settings.max_batch, settings.max_delay
        )
        self.limit = settings.max_batch  # the limit of the latest fetch (the batch-limit gauge)

    async def next(self, max_delay: float | None = None) -> Batch:
        """The next batch; empty after ``poll`` seconds without records. ``max_delay`` overrides
        the planned fill wait for this batch (0: take what the first fetch returns)."""
        plan = self.budget.plan(time.monotonic())
        limit = self.limit = plan.limit
        batch: Batch = await self.consumer.getmany(
            timeout_ms=int(self.poll * 1000), max_records=limit
        )
        n = sum(len(v) for v in batch.values())
        if n == 0:
            return {}
        full = n >= limit
        delay = plan.wait if max_delay is None else max_delay
        deadline = time.monotonic() + delay
        while n < limit:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            more = await self.consumer.getmany(
                timeout_ms=max(1, int(remaining * 1000)), max_records=limit - n
            )
            if not more:
                break
            for tp, recs in more.items():
                batch.setdefault(tp, []).extend(recs)
                n += len(recs)
        self.budget.fetched(full=full, age=oldest_age(batch, time.time()))
        return batch


def oldest_age(batch: Batch, now: float) -> float | None:
    """Seconds between the oldest Kafka record timestamp of ``batch`` (the first record of each
    partition) and ``now`` (wall clock); None when no record carries a timestamp."""
    stamps = [recs[0].timestamp for recs in batch.values() if recs]
    stamps = [t for t in stamps if t is not None and t > 0]
    return now - min(stamps) / 1000.0 if stamps else None


async def offset_bounds(
    consumer: AIOKafkaConsumer, tps: list[TopicPartition]
) -> dict[TopicPartition, tuple[int, int]]:
    """``(first retained offset, end offset)`` of each partition, now."""
    begins = await consumer.beginning_offsets(tps)
    ends = await consumer.end_offsets(tps)
    return {tp: (begins[tp], ends[tp]) for tp in tps}


async def read_ranges(
    consumer: AIOKafkaConsumer,
    ranges: Mapping[TopicPartition, tuple[int, int]],
    *,
    stall: float | None = None,
    timeout: float | None = None,
    max_records: int = 10_000,
) -> AsyncIterator[tuple[TopicPartition, list[Any]]]:
    """Yield ``(partition, records)`` with ``start <= offset < end`` for each partition of
    ``ranges``, in offset order per partition, and stop once every partition's position reached
    its ``end``. ``consumer`` is started and assigned every partition of ``ranges`` (it may hold
    others: they are left as they are); ``start`` should be at or above the partition's first
    retained offset (see :func:`offset_bounds`). Finished partitions are paused.

    The end is judged by the consumer's position, not by the last offset seen: transaction
    markers occupy offsets too, so the last record may sit below ``end``. Raises
    :class:`KafkaUnavailableError` when no record arrives for ``stall`` seconds, or when the
    whole read takes longer than ``timeout`` seconds (either None: no limit).
    """
    pending: set[TopicPartition] = set()
    for tp, (start, end) in ranges.items():
        if start < end:
            consumer.seek(tp, start)
            consumer.resume(tp)
            pending.add(tp)
        else:
            consumer.pause(tp)
    t0 = last = time.monotonic()
    while pending:
        got = await consumer.getmany(*pending, timeout_ms=500, max_records=max_records)
        for tp, recs in got.items():
            end = ranges[tp][1]
            recs = [r for r in recs if r.offset < end]
            if recs:
                last = time.monotonic()
                yield tp, recs
        for tp in list(pending):
            if await consumer.position(tp) >= ranges[tp][1]:
                pending.discard(tp)
                consumer.pause(tp)
        now = time.monotonic()
        if pending and stall is not None and now - last > stall:
            raise KafkaUnavailableError(_describe(pending, ranges, f"stalled for {stall:.0f} s"))
        if pending and timeout is not None and now - t0 > timeout:
            raise KafkaUnavailableError(_describe(pending, ranges, f"not done in {timeout:.0f} s"))


def _describe(
    pending: set[TopicPartition], ranges: Mapping[TopicPartition, tuple[int, int]], what: str
) -> str:
    parts = ", ".join(
        f"{tp.topic}[{tp.partition}] offsets {ranges[tp][0]}..{ranges[tp][1] - 1}"
        for tp in sorted(pending, key=lambda t: (t.topic, t.partition))
    )
    return f"reading {parts}: {what}"


class PartitionReplayer:
    """Re-reads ``[start, end)`` of one input partition without a group (nothing committed)."""

    def __init__(
        self, kafka: KafkaSettings, isolation_level: str = "read_uncommitted", stall: float = 30.0
    ) -> None:
        self.kafka = kafka
        self.isolation_level = isolation_level
        self.stall = stall

    async def replay(
        self,
        tp: TopicPartition,
        start: int,
        end: int,
        apply: Callable[[list[Any]], Awaitable[None] | None],
    ) -> int:
        """Feed records with ``start <= offset < end`` to ``apply`` (awaited when it returns an
        awaitable) in order; return how many.
        ``start`` below the partition's first retained offset is raised to it. Raises
        KafkaUnavailableError when no progress is made for ``stall`` seconds."""
        consumer = AIOKafkaConsumer(
            **self.kafka.client_kwargs(),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level=self.isolation_level,
            max_partition_fetch_bytes=8 * 1024 * 1024,
        )
        await consumer.start()
        count = 0
        try:
            consumer.assign([tp])
            low, _ = (await offset_bounds(consumer, [tp]))[tp]
            start = max(start, low)
            if start >= end:
                return 0
            ranges = {tp: (start, end)}
            async for _, recs in read_ranges(
                consumer, ranges, stall=self.stall, max_records=20_000
            ):
                done = apply(recs)
                if done is not None:
                    await done
                count += len(recs)
            return count
        finally:
            await consumer.stop()
