"""Small synchronous Kafka helpers for tests: produce, consume everything, and kcat wrappers.

They talk to the real broker of the test stack. Consumers stop on their own: after ``expected``
records, or once everything the topic held at the start was read and ``idle`` seconds passed
without a record, or at ``timeout``.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, str]
    timestamp: int


def produce(
    bootstrap: str,
    topic: str,
    records: Iterable[tuple[bytes | str | None, bytes | str]],
    *,
    partition: int | None = None,
) -> list[tuple[int, int]]:
    """Produce ``(key, value)`` pairs in order (murmur2 partitioning by key, as Java clients do);
    return the ``(partition, offset)`` of each, acknowledged by the broker (acks=all)."""

    def enc(v: bytes | str | None) -> bytes | None:
        return v.encode() if isinstance(v, str) else v

    async def run() -> list[tuple[int, int]]:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
        await producer.start()
        try:
            futures = [
                await producer.send(topic, value=enc(v), key=enc(k), partition=partition)
                for k, v in records
            ]
            metas = [await f for f in futures]
            return [(m.partition, m.offset) for m in metas]
        finally:
            await producer.stop()

    return asyncio.run(run())


def consume_all(
    bootstrap: str,
    topic: str,
    *,
    expected: int | None = None,
    idle: float = 3.0,
    timeout: float = 60.0,
    isolation_level: str = "read_uncommitted",
) -> list[Record]:
    """Read a topic from the beginning of every partition (no group, no commits).

    Everything the topic held when the call started (until each partition's position reaches the
    end offset taken at the start — the high watermark, or the last stable offset under
    ``read_committed``), then whatever else arrives until ``idle`` seconds pass without a record;
    with ``expected``, stops as soon as that many were read. Always bounded by ``timeout``.
    (An idle gap alone is not a safe end: a fetch round can take longer than a short ``idle``,
    and stopping there silently returned a part of the topic.)"""

    async def run() -> list[Record]:
        # No group: aiokafka assigns every partition of the topic; "earliest" reads from the start.
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level=isolation_level,
        )
        await consumer.start()
        out: list[Record] = []
        try:
            start = last = time.monotonic()
            ends: dict[TopicPartition, int] | None = None
            while True:
                batch = await consumer.getmany(timeout_ms=200)
                now = time.monotonic()
                for msgs in batch.values():
                    for m in msgs:
                        headers = {k: v.decode() for k, v in (m.headers or ())}
                        out.append(
                            Record(
                                m.topic, m.partition, m.offset, m.key, m.value, headers, m.timestamp
                            )
                        )
                    last = now
                if expected is not None and len(out) >= expected:
                    break
                if now - start > timeout:
                    break
                if ends is None and consumer.assignment():
                    ends = await consumer.end_offsets(list(consumer.assignment()))
                if ends is None and now - last > max(idle, 5.0):
                    break  # the topic has no partitions (does not exist)
                if now - last > idle and ends is not None:
                    positions = {tp: await consumer.position(tp) for tp in ends}
                    if all(positions[tp] >= end for tp, end in ends.items()):
                        break
            return out
        finally:
            await consumer.stop()

    return asyncio.run(run())


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    async def run() -> dict[int, int]:
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None)
        await consumer.start()
        try:
            deadline = time.monotonic() + 10
            while not consumer.assignment() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            ends = await consumer.end_offsets(list(consumer.assignment()))
            return {tp.partition: off for tp, off in ends.items()}
        finally:
            await consumer.stop()

    return asyncio.run(run())


# --- kcat: an independent client, as a user's tooling would be -----------------------------------


def kcat() -> str:
    path = shutil.which("kcat")
    if path is None:
        raise RuntimeError("kcat not found: `make test` installs it (Debian package kcat)")
    return path


def kcat_produce(
    bootstrap: str,
    topic: str,
    lines: Sequence[tuple[str, str]],
    *,
    compression: str | None = None,
    partition: int | None = None,
) -> None:
    """Produce ``key<TAB>value`` lines with kcat, partitioned by murmur2 like Java clients (or
    all to ``partition``). ``compression``: kcat's ``-z`` codec (gzip, snappy, lz4, zstd); the
    lines then travel in compressed record batches, several records each."""
    payload = "".join(f"{k}\t{v}\n" for k, v in lines)
    argv = [kcat(), "-b", bootstrap, "-P", "-t", topic, "-K", "\t",
            "-X", "partitioner=murmur2_random", "-X", "acks=all",
            # a record may be large once decompressed (the broker checks the compressed batch)
            "-X", "message.max.bytes=16000000"]  # fmt: skip
    if compression:
        argv += ["-z", compression, "-X", "linger.ms=100"]
    if partition is not None:
        argv += ["-p", str(partition)]
    subprocess.run(argv, input=payload.encode(), check=True, timeout=60)


def kcat_consume(
    bootstrap: str, topic: str, count: int, timeout: float = 60.0, read_committed: bool = False
) -> list[tuple[str, str]]:
    """Consume ``count`` messages from the beginning with kcat; return ``(key, value)`` pairs."""
    cmd = [
        kcat(),
        "-b",
        bootstrap,
        "-C",
        "-t",
        topic,
        "-o",
        "beginning",
        "-c",
        str(count),
        "-e",
        "-q",
        "-f",
        "%k\t%s\n",
    ]
    if read_committed:
        cmd += ["-X", "isolation.level=read_committed"]
    deadline = time.monotonic() + timeout
    rows: list[tuple[str, str]] = []
    while time.monotonic() < deadline:
        # -e exits at the end of the partitions; retry until the count has arrived.
        out = subprocess.run(cmd, capture_output=True, check=True, timeout=timeout).stdout.decode()
        rows = [tuple(line.split("\t", 1)) for line in out.splitlines() if line]  # type: ignore[misc]
        if len(rows) >= count:
            break
        time.sleep(0.5)
    return rows
