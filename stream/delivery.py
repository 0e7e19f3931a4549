"""The two delivery guarantees: how a batch's messages reach Kafka and its offsets get committed.

Both keep "commit last" (docs/design.md invariant 3):

- :class:`AtLeastOnce` publishes forecasts and dead letters with the idempotent producer and
  waits for every acknowledgement, writes the windows to Redis (fenced), then commits the input
  offsets. A crash in between repeats forecasts, never loses one.
- :class:`ExactlyOnce` writes one input partition's forecasts, dead letters and next offset in
  one Kafka transaction, then the windows. A crash in between leaves Redis behind the committed
  offset, which the next owner repairs by re-reading the topic (invariant 6). A partition whose
  producer was fenced (another worker owns it now: this one is a zombie) is given up with one
  WARNING; the worker goes on with the partitions it still owns.

While the broker does not acknowledge, fetching is paused (:class:`stream.health.Pauses`, reason
``kafka``): not ready, still alive, retried with backoff, resumed by itself. A batch is never
skipped and never committed before it is acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError, MessageSizeTooLargeError, RecordTooLargeError

from stream.faults import FaultInjector
from stream.health import Pauses
from stream.metrics import Metrics
from stream.partitions import Partitions, PartitionState
from stream.publisher import (
    OutMessage,
    PartitionFencedError,
    Publisher,
    PublishError,
    TransactionalPublisher,
    headers_only,
)
from stream.retry import RetryPolicy
from stream.windows import Snapshot

log = logging.getLogger(__name__)

PUBLISH_RETRY = RetryPolicy(base=0.2, cap=5.0)  # backoff while the broker refuses a publish
_TOO_LARGE = (MessageSizeTooLargeError, RecordTooLargeError)

Messages = dict[TopicPartition, list[OutMessage]]
ToPersist = dict[TopicPartition, tuple[PartitionState, Snapshot]]


class Delivery(Protocol):
    """A batch is delivered in three calls, in this order per batch (:mod:`stream.batch`)."""

    async def publish(
        self, messages: Messages, next_offsets: dict[TopicPartition, int]
    ) -> list[TopicPartition]:
        """Deliver ``messages`` (per live input partition; exactly once: with the partitions'
        ``next_offsets`` in their transactions); returns the partitions delivered
        (acknowledged, or their transaction committed); the others were reset."""

    async def persist(self, persist: ToPersist) -> list[TopicPartition]:
        """Write those partitions' windows (fenced); returns the partitions persisted."""

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        """Commit input offsets of published and persisted batches (nothing under exactly
        once: the transaction committed them)."""


@dataclass(frozen=True)
class DeliveryContext:
    """What both guarantees work with. ``give_up()``: the worker stops, or a rebalance must
    abandon the batch in flight."""

    partitions: Partitions
    metrics: Metrics
    faults: FaultInjector
    pauses: Pauses
    dlq_topic: str
    give_up: Callable[[], bool]


class _Base:
    def __init__(self, ctx: DeliveryContext) -> None:
        self.partitions = ctx.partitions
        self.metrics = ctx.metrics
        self.faults = ctx.faults
        self.pauses = ctx.pauses
        self.dlq_topic = ctx.dlq_topic
        self.give_up = ctx.give_up

    def _without_dlq_values(self, messages: list[OutMessage]) -> list[OutMessage]:
        """Dead-letter records refused for their size, sent again as headers only."""
        out = [headers_only(m) if m.topic == self.dlq_topic else m for m in messages]
        self.metrics.dlq_truncated.inc(sum(1 for m in out if m.topic == self.dlq_topic))
        return out

    async def persist(self, persist: ToPersist) -> list[TopicPartition]:
        t0 = time.perf_counter()
        done = await self.partitions.persist(persist)
        self.metrics.stage.labels("persist").observe(time.perf_counter() - t0)
        self.faults.hit("after_window_write")
        return done

    def _count(self, messages: Messages) -> None:
        n_dlq = sum(1 for msgs in messages.values() for m in msgs if m.topic == self.dlq_topic)
        n_all = sum(len(msgs) for msgs in messages.values())
        self.metrics.dlq.inc(n_dlq)
        self.metrics.forecasts.inc(n_all - n_dlq)


class AtLeastOnce(_Base):
    """Publish (all acknowledged) → persist windows → commit offsets."""

    def __init__(self, publisher: Publisher, ctx: DeliveryContext) -> None:
        super().__init__(ctx)
        self.publisher = publisher

    async def publish(
        self, messages: Messages, next_offsets: dict[TopicPartition, int]
    ) -> list[TopicPartition]:
        t0 = time.perf_counter()
        if not await self.publish_all([msg for msgs in messages.values() for msg in msgs]):
            for tp in messages:  # stopping, or the partitions were revoked: not committed
                await self.partitions.reset(tp)
            return []
        self._count(messages)
        self.metrics.stage.labels("publish").observe(time.perf_counter() - t0)
        self.faults.hit("after_publish")
        return list(messages)

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.faults.hit("before_commit")
        consumer = self.partitions.consumer
        if not offsets or consumer is None:
            return
        t0 = time.perf_counter()
        try:
            await consumer.commit(offsets)
            self.metrics.commits.inc()
        except KafkaError as exc:
            # A rebalance took the partitions: the next owner re-reads from the last commit.
            log.warning("commit of %s failed: %s", _fmt(offsets), exc)
        self.metrics.stage.labels("commit").observe(time.perf_counter() - t0)

    async def publish_all(self, messages: list[OutMessage]) -> bool:
        """Publish ``messages`` until the broker acknowledged all of them; False when the worker
        stops or must abandon the batch first (nothing may be committed then). Only the records
        not acknowledged are sent again, with backoff, while fetching is paused."""
        attempt = 0
        try:
            while True:
                try:
                    await self.publisher.publish(messages)
                    return True
                except PublishError as exc:
                    self.metrics.publish_errors.inc()
                    messages = exc.failed
                    if exc.too_large:
                        messages = self._without_dlq_values(messages)
                    if attempt % 20 == 0:
                        log.error(
                            "publishing failed (%r): %d record(s) to send again; fetching paused",
                            exc.cause, len(messages),
                        )  # fmt: skip
                    self.pauses.hold("kafka")
                    if self.give_up():
                        return False
                    await asyncio.sleep(PUBLISH_RETRY.delay(attempt))
                    attempt += 1
        finally:
            if "kafka" in self.pauses.reasons:
                log.info("the broker acknowledges again; resuming")
                self.pauses.release("kafka")


class ExactlyOnce(_Base):
    """One transaction per input partition (messages + offset) → persist windows."""

    def __init__(self, txn: TransactionalPublisher, ctx: DeliveryContext) -> None:
        super().__init__(ctx)
        self.txn = txn
        self._failures = 0  # consecutive batches with a failed transaction (backoff)

    async def publish(
        self, messages: Messages, next_offsets: dict[TopicPartition, int]
    ) -> list[TopicPartition]:
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(self._transact(tp, msgs, next_offsets[tp]) for tp, msgs in messages.items())
        )
        done = [tp for tp, ok in zip(messages, results, strict=True) if ok]
        if len(done) < len(messages) and not self.give_up():
            # The aborted partitions are reprocessed from their committed offsets: back off
            # first (fetching paused, not ready) so an unreachable broker is not hammered.
            self.pauses.hold("kafka")
            try:
                await asyncio.sleep(PUBLISH_RETRY.delay(self._failures))
            finally:
                self.pauses.release("kafka")
            self._failures += 1
        elif len(done) == len(messages):
            self._failures = 0
        self._count({tp: messages[tp] for tp in done})
        self.metrics.commits.inc(len(done))
        self.metrics.stage.labels("publish").observe(time.perf_counter() - t0)
        return done

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        """Nothing: each partition's offset was committed in its transaction."""

    async def _transact(self, tp: TopicPartition, msgs: list[OutMessage], next_offset: int) -> bool:
        def hook() -> None:
            self.faults.hit("after_publish")
            self.faults.hit("before_commit")

        for attempt in (0, 1):
            try:
                await self.txn.publish_and_commit(tp.partition, msgs, next_offset, hook)
                return True
            except PartitionFencedError as exc:
                # Not a broker failure: the partition belongs to another worker (or, rarely, our
                # transaction outlived the broker's transaction timeout). Its records are read
                # again from the committed offset if it is still ours once the fence is over.
                if exc.first:
                    self.metrics.publish_errors.inc()
                    log.warning(
                        "lost input partition %s[%d]: its transactional producer was fenced (%s:"
                        " another worker took the partition over); transaction aborted, the"
                        " batch is left to the new owner",
                        tp.topic, tp.partition, type(exc.cause).__name__,
                    )  # fmt: skip
                else:
                    log.debug("%s[%d]: still fenced; batch dropped", tp.topic, tp.partition)
                await self.partitions.reset(tp)
                break
            except KafkaError as exc:
                self.metrics.publish_errors.inc()
                if attempt == 0 and isinstance(exc, _TOO_LARGE):
                    # Aborted: once more with the dead letters headers only, on a new producer
                    # (the failed one lost its sequence numbers).
                    await self.txn.close(tp.partition)
                    msgs = self._without_dlq_values(msgs)
                    continue
                log.error(
                    "transaction for %s[%d] failed (%r); reprocessing", tp.topic, tp.partition, exc
                )
                await self.txn.close(tp.partition)
                await self.partitions.reset(tp)
                break
        return False


def _fmt(offsets: dict[TopicPartition, int]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]@{o}" for tp, o in sorted(offsets.items()))
