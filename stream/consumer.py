"""Kafka reading: the micro-batcher over the group consumer, and the replayer that re-reads a
partition to rebuild lost windows."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from stream.errors import KafkaUnavailableError
from stream.settings import BatchSettings, KafkaSettings

Batch = dict[TopicPartition, list[Any]]


class Batcher:
    """Micro-batches from a consumer (as Triton's dynamic batcher): a batch closes when it holds
    ``max_batch`` records or ``max_delay`` seconds after its first record arrived. Records of a
    partition stay in offset order."""

    def __init__(
        self, consumer: AIOKafkaConsumer, settings: BatchSettings, poll: float = 0.2
    ) -> None:
        self.consumer = consumer
        self.settings = settings
        self.poll = poll

    async def next(self, max_delay: float | None = None) -> Batch:
        """The next batch; empty after ``poll`` seconds without records. ``max_delay`` overrides
        the configured one for this batch (0: take what the first fetch returns)."""
        limit = self.settings.max_batch
        batch: Batch = await self.consumer.getmany(
            timeout_ms=int(self.poll * 1000), max_records=limit
        )
        n = sum(len(v) for v in batch.values())
        if n == 0:
            return {}
        delay = self.settings.max_delay if max_delay is None else max_delay
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
        return batch


class PartitionReplayer:
    """Re-reads ``[start, end)`` of one input partition without a group (nothing committed)."""

    def __init__(
        self, kafka: KafkaSettings, isolation_level: str = "read_uncommitted", stall: float = 30.0
    ) -> None:
        self.kafka = kafka
        self.isolation_level = isolation_level
        self.stall = stall

    async def replay(
        self, tp: TopicPartition, start: int, end: int, apply: Callable[[list[Any]], None]
    ) -> int:
        """Feed records with ``start <= offset < end`` to ``apply`` in order; return how many.
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
            low = (await consumer.beginning_offsets([tp]))[tp]
            start = max(start, low)
            if start >= end:
                return 0
            consumer.seek(tp, start)
            last = time.monotonic()
            while await consumer.position(tp) < end:
                got = await consumer.getmany(tp, timeout_ms=500, max_records=20_000)
                recs = [r for r in got.get(tp, []) if r.offset < end]
                if recs:
                    apply(recs)
                    count += len(recs)
                    last = time.monotonic()
                elif time.monotonic() - last > self.stall:
                    raise KafkaUnavailableError(
                        f"{tp.topic}[{tp.partition}]: re-reading offsets {start}..{end - 1} stalled"
                    )
            return count
        finally:
            await consumer.stop()
