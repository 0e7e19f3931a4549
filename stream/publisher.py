"""Forecast encoding and the Kafka producers that publish forecasts and dead-letter records.

:func:`encode_forecasts` turns a batch of windows and the model's outputs into the forecast
messages of the contract; :func:`dead_letter` the dead-letter record of a refused event, which
always fits what the producer and the dead-letter topic accept (an oversized original is
truncated, with its size and sha256 in headers; :func:`headers_only` drops it altogether).
:class:`Publisher` sends them with one idempotent producer (``acks=all``), all sends first and then
one wait for every acknowledgement. :class:`TransactionalPublisher` (``--guarantee exactly_once``)
keeps one transactional producer per input partition and writes a partition's forecasts,
dead-letter records and next input offset in one Kafka transaction; when another worker's producer
fenced that partition's, :class:`PartitionFencedError` says the partition is lost.

No exception is left on a future nobody awaits (asyncio would log "Future exception was never
retrieved" at ERROR when the future is collected): the futures of records queued before a send
failed (:func:`_send_all`), and those aiokafka keeps inside a producer whose sender died, e.g. of
``ProducerFenced`` (:func:`_retrieve_internal_failures`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import orjson
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import (
    KafkaError,
    MessageSizeTooLargeError,
    ProducerFenced,
    RecordTooLargeError,
)
from aiokafka.structs import OffsetAndMetadata

from model.features import target_times
from model.predictor import Forecast
from stream.decode import Rejection
from stream.errors import StreamError
from stream.settings import KafkaSettings
from stream.store import partition_for
from stream.windows import RecordLike, WindowBatch

log = logging.getLogger(__name__)

# Kafka's default max.message.bytes (topic) / message.max.bytes (broker), and our producers' own
# request limit: no record may be larger than the smaller of the two.
KAFKA_DEFAULT_MAX_MESSAGE_BYTES = 1_048_588
MAX_REQUEST_SIZE = 4 * 1024 * 1024
# What a dead-letter record adds to the original value: record batch and record framing, the
# headers (error.message is cut to MAX_ERROR_MESSAGE_CHARS) and the key (cut to MAX_DLQ_KEY_BYTES).
DLQ_RECORD_OVERHEAD = 8 * 1024
MAX_DLQ_KEY_BYTES = 1024
MAX_ERROR_MESSAGE_CHARS = 1000
# After a fence, how long a partition's producer is not started again unless the partition is
# revoked first (:meth:`TransactionalPublisher.close`): a worker fenced because it lost the
# partition (a zombie, frozen past its session timeout) learns so from the group within a
# heartbeat, and must not fence the new owner meanwhile; one fenced only because its transaction
# outlived the broker's transaction timeout (and still owns the partition) resumes after this.
FENCED_HOLD_S = 20.0


class PartitionFencedError(StreamError):
    """The transactional producer of input ``partition`` was fenced: a newer producer with its
    transactional id started (another worker took the partition over), or its transaction
    outlived the broker's transaction timeout. The transaction is aborted. ``first``: this call
    found it out; later calls fail at once, without the broker, while the fence holds
    (:data:`FENCED_HOLD_S`, or until the partition is closed)."""

    def __init__(self, partition: int, cause: BaseException | None, first: bool) -> None:
        why = f"{cause}" if cause is not None else "fenced earlier, not restarted yet"
        super().__init__(f"the transactional producer of input partition {partition}: {why}")
        self.partition = partition
        self.cause = cause
        self.first = first


class PublishError(StreamError):
    """Records were not acknowledged. ``failed``: the records to send again (those of the
    record batches that failed; all of them when sending itself failed). ``too_large``: a record
    was refused for its size (by the producer or the broker)."""

    def __init__(self, cause: BaseException, failed: list[OutMessage]) -> None:
        super().__init__(f"{len(failed)} record(s) not acknowledged: {cause!r}")
        self.cause = cause
        self.failed = failed
        self.too_large = isinstance(cause, MessageSizeTooLargeError | RecordTooLargeError)


@dataclass(frozen=True, slots=True)
class OutMessage:
    """One record to produce."""

    topic: str
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None
    headers: list[tuple[str, bytes]]


def forecast_documents(
    series_ids: Sequence[str],
    ts: np.ndarray,
    fc: Forecast,
    *,
    version: str,
    sources: Sequence[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """The forecast objects of docs/contract.md "Forecasts", one per window, in row order: the one
    builder used by the worker (with ``sources``: the message form), ``worker predict`` and
    ``worker serve`` (without: ``source`` left out).

    ``ts``: (R, T) window timestamps (epoch seconds); ``fc``: the predictor's output for them.
    """
    ts = np.asarray(ts, dtype=np.float64)
    if len(series_ids) == 0:
        return []
    horizon = int(fc.mean.shape[1])
    newest = ts[:, -1].tolist()  # (R,)
    targets = target_times(ts, horizon).tolist()  # (R, H)
    mean, std = fc.mean.tolist(), fc.std.tolist()
    lo80, lo95 = fc.lower["80"].tolist(), fc.lower["95"].tolist()
    up80, up95 = fc.upper["80"].tolist(), fc.upper["95"].tolist()
    emitted = time.time()
    out = []
    for i, sid in enumerate(series_ids):
        doc: dict[str, Any] = {
            "schema_version": 1,
            "series_id": sid,
            "ts": newest[i],
            "horizon": horizon,
            "target_ts": targets[i],
            "mean": mean[i],
            "std": std[i],
            "lower": {"80": lo80[i], "95": lo95[i]},
            "upper": {"80": up80[i], "95": up95[i]},
            "model_version": version,
        }
        if sources is not None:
            doc["source"] = sources[i]
        doc["emitted_at"] = emitted
        out.append(doc)
    return out


def encode_forecasts(
    windows: WindowBatch,
    fc: Forecast,
    *,
    version: str,
    input_topic: str,
    output_topic: str,
    calibration: str = "static",
) -> list[OutMessage]:
    """Forecast messages (docs/contract.md "Forecasts") for each row of ``windows``, in row order:
    key = series id, record timestamp = newest ts (ms), headers ``model_version`` and
    ``calibration`` (``online`` or ``static``: how the intervals were set)."""
    if len(windows) == 0:
        return []
    p = windows.partition
    sources = [
        {"topic": input_topic, "partition": p, "offset": o} for o in windows.offsets.tolist()
    ]
    docs = forecast_documents(windows.series, windows.ts, fc, version=version, sources=sources)
    headers = [("model_version", version.encode()), ("calibration", calibration.encode())]
    ts_ms = np.floor(windows.ts[:, -1] * 1000.0).astype(np.int64).tolist()
    return [
        OutMessage(
            output_topic,
            doc["series_id"].encode(),
            orjson.dumps(doc),
            ts_ms[i] if ts_ms[i] >= 0 else None,
            headers,
        )
        for i, doc in enumerate(docs)
    ]


def _original(prefix: str, data: bytes) -> list[tuple[str, bytes]]:
    return [
        (f"{prefix}.size", str(len(data)).encode()),
        (f"{prefix}.sha256", hashlib.sha256(data).hexdigest().encode()),
    ]


def dead_letter(
    rec: RecordLike,
    rejection: Rejection,
    *,
    input_topic: str,
    partition: int,
    dlq_topic: str,
    max_value_bytes: int | None = None,
) -> OutMessage:
    """The dead-letter record of a refused event: the original key and value bytes with the
    reason headers of the contract.

    A value longer than ``max_value_bytes`` (an event small on the broker but huge once
    decompressed) is cut to that length, and the headers ``original.size`` (bytes) and
    ``original.sha256`` (hex) describe the whole value; a key longer than
    :data:`MAX_DLQ_KEY_BYTES` likewise, with ``original.key.size`` and ``original.key.sha256``.
    """
    message = rejection.message[:MAX_ERROR_MESSAGE_CHARS]
    headers = [
        ("error.reason", rejection.reason.encode()),
        ("error.message", message.encode("utf-8", "replace")),
        ("source.topic", input_topic.encode()),
        ("source.partition", str(partition).encode()),
        ("source.offset", str(rec.offset).encode()),
    ]
    key = rec.key
    if key is not None and len(key) > MAX_DLQ_KEY_BYTES:
        headers += _original("original.key", key)
        key = key[:MAX_DLQ_KEY_BYTES]
    # A missing value cannot be produced as-is when the key is missing too; an empty value is the
    # closest faithful copy (Kafka requires a key or a value).
    value = rec.value if (rec.value is not None or rec.key is not None) else b""
    if value is not None and max_value_bytes is not None and len(value) > max_value_bytes:
        headers += _original("original", value)
        value = value[: max(0, max_value_bytes)]
    return OutMessage(dlq_topic, key, value, None, headers)


def headers_only(msg: OutMessage) -> OutMessage:
    """A dead-letter record without its value (refused by the broker even truncated): the
    headers say why the event was refused, where it is in the input topic, and
    ``original.size``/``original.sha256`` what the value was."""
    if not msg.value:
        return msg
    names = {name for name, _ in msg.headers}
    extra = [] if "original.size" in names else _original("original", msg.value)
    return replace(msg, value=b"", headers=[*msg.headers, *extra])


async def dlq_value_limit(kafka: KafkaSettings, dlq_topic: str) -> int:
    """How many bytes of an original value a dead-letter record may carry: the dead-letter
    topic's ``max.message.bytes`` (Kafka's default when the broker does not say, e.g. no
    DescribeConfigs permission), capped by the producers' request size, less the record's own
    overhead."""
    limit = KAFKA_DEFAULT_MAX_MESSAGE_BYTES
    admin = AIOKafkaAdminClient(**kafka.client_kwargs(), request_timeout_ms=10_000)
    try:
        await admin.start()
        resource = ConfigResource(ConfigResourceType.TOPIC, dlq_topic, None)  # all entries
        for response in await admin.describe_configs([resource]):
            for res in response.resources:
                for entry in res[-1]:  # (name, value, read_only, ...)
                    if entry[0] == "max.message.bytes" and str(entry[1]).isdigit():
                        limit = int(entry[1])
    except (KafkaError, OSError, IndexError, TypeError, AttributeError) as exc:
        log.warning(
            "could not read max.message.bytes of %s (%r); assuming Kafka's default %d",
            dlq_topic, exc, limit,
        )  # fmt: skip
    finally:
        await admin.close()
    return max(0, min(limit, MAX_REQUEST_SIZE) - DLQ_RECORD_OVERHEAD)


def _producer_kwargs(kafka: KafkaSettings) -> dict[str, Any]:
    return {
        **kafka.client_kwargs(),
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": 0,  # record batches are packed by _send_all: waiting adds only latency
        "max_batch_size": 256 * 1024,
        "max_request_size": 4 * 1024 * 1024,
        "request_timeout_ms": 30_000,
    }


class _Partitioner:
    """murmur2 partition of each key (as Java clients and aiokafka place them), cached per key:
    the pure-Python hash would otherwise cost more than the rest of the send. Records without a
    key go round-robin."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._cache: dict[tuple[str, bytes], int] = {}
        self._next = 0

    async def partition(self, producer: AIOKafkaProducer, topic: str, key: bytes | None) -> int:
        n = self._counts.get(topic)
        if n is None:
            n = self._counts[topic] = len(await producer.partitions_for(topic))
        if key is None:
            self._next += 1
            return self._next % n
        hit = self._cache.get((topic, key))
        if hit is None:
            if len(self._cache) > 1_000_000:
                self._cache.clear()
            hit = self._cache[(topic, key)] = partition_for(key, n)
        return hit


async def _send_all(
    producer: AIOKafkaProducer, parts: _Partitioner, messages: Sequence[OutMessage]
) -> list[tuple[asyncio.Future[Any], list[OutMessage]]]:
    """Queue ``messages`` for sending; one future per record batch (it fails if any record of
    the batch is refused), with the batch's messages. Records are packed into record batches
    per partition here, in order, rather than one ``send()`` each: the per-message future and
    accumulator bookkeeping of ``send()`` cost more than encoding the forecast.

    When queuing fails part way (the caller then sends every message again), the futures of the
    record batches queued already are given up: their outcome, exception included, is
    retrieved when it comes (:func:`_retrieve`), so none is left unretrieved."""
    futures: list[tuple[asyncio.Future[Any], list[OutMessage]]] = []
    try:
        await _queue_all(producer, parts, messages, futures)
    except BaseException:
        for fut, _ in futures:
            fut.add_done_callback(_retrieve)
        raise
    return futures


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark the exception of a finished future as retrieved (a done callback)."""
    if not fut.cancelled():
        fut.exception()


def _retrieve_internal_failures(producer: AIOKafkaProducer) -> None:
    """Retrieve the exceptions aiokafka leaves on futures of its own that no public call
    awaits, once a producer failed for good (its sender task died, e.g. of ``ProducerFenced``):

    - the transaction's end waiter: ``TransactionManager.fatal_error`` (and ``error_transaction``)
      set the exception on it, and ``TransactionContext.__aexit__`` returns without awaiting it
      when the error is fatal (aiokafka/producer/producer.py);
    - each queued record batch's drain waiter: ``MessageBatch.failure`` sets the exception on it
      for a batch the sender had not taken yet (aiokafka/producer/message_accumulator.py; only
      ``add_message`` ever awaits it) — and the batch futures themselves.

    These are aiokafka's private attributes (0.14), read defensively: without them this does
    nothing (tests/deploy/test_logs.py notices the warnings coming back)."""
    futures: list[Any] = []
    txn = getattr(producer, "_txn_manager", None)
    futures.append(getattr(txn, "_transaction_waiter", None))
    futures += [fut for _, _, fut in getattr(txn, "_pending_txn_offsets", ())]
    acc = getattr(producer, "_message_accumulator", None)
    batches = [b for bs in getattr(acc, "_batches", {}).values() for b in bs]
    batches += list(getattr(acc, "_pending_batches", ()))
    for batch in batches:
        futures += [getattr(batch, "_drain_waiter", None), getattr(batch, "future", None)]
    for fut in futures:
        if isinstance(fut, asyncio.Future) and fut.done():
            _retrieve(fut)


async def _queue_all(
    producer: AIOKafkaProducer,
    parts: _Partitioner,
    messages: Sequence[OutMessage],
    futures: list[tuple[asyncio.Future[Any], list[OutMessage]]],
) -> None:
    open_batches: dict[tuple[str, int], tuple[Any, list[OutMessage]]] = {}

    async def submit(topic: str, partition: int) -> None:
        builder, batch = open_batches.pop((topic, partition))
        builder.close()  # nothing else may join it once queued
        futures.append((await producer.send_batch(builder, topic, partition=partition), batch))

    for m in messages:
        p = await parts.partition(producer, m.topic, m.key)
        if (m.topic, p) not in open_batches:
            open_batches[(m.topic, p)] = (producer.create_batch(), [])
        builder, batch = open_batches[(m.topic, p)]
        args = {"timestamp": m.timestamp_ms, "key": m.key, "value": m.value, "headers": m.headers}
        if builder.append(**args) is None:  # full
            if batch:
                await submit(m.topic, p)
            builder, batch = open_batches[(m.topic, p)] = (producer.create_batch(), [])
            if builder.append(**args) is None:  # larger than a whole batch: on its own
                del open_batches[(m.topic, p)]
                fut = await producer.send(
                    m.topic, m.value, m.key, partition=p, timestamp_ms=m.timestamp_ms,
                    headers=m.headers,
                )  # fmt: skip
                futures.append((fut, [m]))
                continue
        batch.append(m)
    for topic, p in list(open_batches):
        await submit(topic, p)


class Publisher:
    """At-least-once publishing: one idempotent producer, ``acks=all``. ``stop()`` is idempotent.

    After a failed publish the producer is replaced before the next one: an idempotent
    producer whose record batch failed (expired, or refused for its size) has lost track of its
    sequence numbers, and every later send to that partition would fail with
    ``OutOfOrderSequenceNumber``."""

    def __init__(self, kafka: KafkaSettings) -> None:
        self._kafka = kafka
        self._producer = AIOKafkaProducer(**_producer_kwargs(kafka))
        self._parts = _Partitioner()
        self._started = False
        self._broken = False

    async def start(self) -> None:
        await self._producer.start()
        self._started = True

    async def stop(self) -> None:
        if self._started:
            self._started = False
            await self._producer.stop()

    async def _replace_producer(self) -> None:
        old, self._producer = self._producer, AIOKafkaProducer(**_producer_kwargs(self._kafka))
        try:
            await old.stop()
        except KafkaError as exc:  # its pending batches failed already
            log.debug("stopping the failed producer: %r", exc)
        _retrieve_internal_failures(old)
        self._started = False
        await self._producer.start()
        self._started = True
        self._broken = False

    async def publish(self, messages: Sequence[OutMessage]) -> None:
        """Send every message, then wait until the broker acknowledged all of them. Raises
        :class:`PublishError` naming the records not acknowledged (nothing may be committed
        then; sending those again completes the publish)."""
        try:
            if self._broken:
                await self._replace_producer()
            sent = await _send_all(self._producer, self._parts, messages)
        except KafkaError as exc:  # which records left is unknown: all are sent again
            self._broken = True
            raise PublishError(exc, list(messages)) from exc
        results = await asyncio.gather(*(fut for fut, _ in sent), return_exceptions=True)
        failed: list[OutMessage] = []
        cause: BaseException | None = None
        for (_, batch), result in zip(sent, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, KafkaError):
                    raise result
                failed.extend(batch)
                if cause is None or isinstance(result, MessageSizeTooLargeError):
                    cause = result
        if cause is not None:
            self._broken = True
            raise PublishError(cause, failed) from cause


class TransactionalPublisher:
    """Exactly-once publishing: one transactional producer per input partition, with
    ``transactional_id = <group>.<input topic>.<partition>`` so that a worker taking a partition
    over fences the previous owner's producer (its open transaction is aborted).

    The fenced side learns it from :class:`PartitionFencedError`. Its producer is then
    discarded and, for :data:`FENCED_HOLD_S` or until the partition is closed (revoked), not
    started again: a zombie that restarted it at once would fence the new owner in turn."""

    def __init__(self, kafka: KafkaSettings, group_id: str, input_topic: str) -> None:
        self.kafka = kafka
        self.group_id = group_id
        self.input_topic = input_topic
        self._producers: dict[int, AIOKafkaProducer] = {}
        self._fenced: dict[int, float] = {}  # partition -> time.monotonic() of its fence
        self._parts = _Partitioner()

    def transactional_id(self, partition: int) -> str:
        return f"{self.group_id}.{self.input_topic}.{partition}"

    def fenced(self, partition: int) -> bool:
        """Whether the partition's producer was fenced and the hold is not over."""
        since = self._fenced.get(partition)
        if since is not None and time.monotonic() - since >= FENCED_HOLD_S:
            del self._fenced[partition]
            since = None
        return since is not None

    async def open(self, partition: int) -> None:
        """Start (and fence older holders of) the producer of an input partition; nothing while
        the partition is :meth:`fenced`."""
        if partition in self._producers or self.fenced(partition):
            return
        producer = AIOKafkaProducer(
            **_producer_kwargs(self.kafka), transactional_id=self.transactional_id(partition)
        )
        await producer.start()
        self._producers[partition] = producer

    async def close(self, partition: int) -> None:
        """Stop the partition's producer and forget a fence (the partition was revoked, or its
        producer failed otherwise)."""
        self._fenced.pop(partition, None)
        await self._discard(partition)

    async def _discard(self, partition: int) -> None:
        producer = self._producers.pop(partition, None)
        if producer is None:
            return
        try:
            await producer.stop()
        except KafkaError as exc:  # a failed producer: its batches failed already
            log.debug("stopping the producer of partition %d: %r", partition, exc)
        _retrieve_internal_failures(producer)

    async def stop(self) -> None:
        for p in list(self._producers):
            await self.close(p)

    async def publish_and_commit(
        self,
        partition: int,
        messages: Sequence[OutMessage],
        next_offset: int,
        before_commit: Callable[[], None] | None = None,
    ) -> None:
        """One transaction: ``messages`` plus the group's offset ``next_offset`` for the input
        partition; ``before_commit`` runs after the sends, before the commit (fault hook).
        Raises on any failure (the transaction is then aborted).

        Every send is awaited *inside* the transaction: aiokafka commits a transaction whose
        record batch failed (e.g. refused for its size), so the offset would be committed and
        the record lost. After a failure the caller must :meth:`close` the producer (its
        sequence numbers are lost) before the next transaction of the partition.

        Raises :class:`PartitionFencedError` when the producer is fenced (it is discarded then,
        no :meth:`close` needed), and at once while the fence holds."""
        await self.open(partition)
        producer = self._producers.get(partition)
        if producer is None:  # fenced, held
            raise PartitionFencedError(partition, None, first=False)
        tp = TopicPartition(self.input_topic, partition)
        try:
            async with producer.transaction():
                try:
                    futures = [fut for fut, _ in await _send_all(producer, self._parts, messages)]
                    if futures:
                        await asyncio.gather(*futures)  # a failure raises: the transaction aborts
                    await producer.send_offsets_to_transaction(
                        {tp: OffsetAndMetadata(next_offset, "")}, self.group_id
                    )
                    if before_commit is not None:
                        before_commit()
                except BaseException:
                    # Before the abort: it replaces a failed transaction waiter unretrieved.
                    _retrieve_internal_failures(producer)
                    raise
        except ProducerFenced as exc:
            self._fenced[partition] = time.monotonic()
            await self._discard(partition)
            raise PartitionFencedError(partition, exc, first=True) from exc
