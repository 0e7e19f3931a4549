"""Ceilings: each part of the worker's path measured alone, against the same stack and data.

- model inference only: the registry-loaded predictor (same model file, backend, threads as the
  worker) on real windows, per batch size;
- Kafka consume + decode: a group-less consumer reading the backlog topic and decoding every event;
- Redis window update: :meth:`stream.store.WindowStore.persist` (the fenced Lua script) on the
  snapshots that applying the backlog's batches produces, one call per partition per batch;
- Kafka produce: :class:`stream.publisher.Publisher` sending forecast messages, all acknowledged;
- compute: fp32 matrix multiply in numpy and torch (GFLOP/s).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.harness import STEP, T0, BenchStack


def windows(batch: int, t: int = 48, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(ts, values) of ``batch`` realistic windows: minute spacing, a level plus noise."""
    rng = np.random.default_rng(seed)
    ts = T0 + STEP * np.arange(t)[None, :] + STEP * rng.integers(0, 10_000, (batch, 1))
    values = rng.uniform(10, 100, (batch, 1)) + rng.normal(0, 1, (batch, t)).cumsum(axis=1)
    return ts.astype(np.float64), values


def inference(
    model_dir: Path, backend: str, threads: int, batches: tuple[int, ...], min_time: float
) -> dict[int, float]:
    """Forecasts/s of the serving predictor alone (inputs built beforehand), per batch size."""
    from model.features import build_inputs
    from model.registry import ModelRegistry

    loaded = ModelRegistry(model_dir).load(backend=backend, device="cpu", threads=threads)
    out: dict[int, float] = {}
    for b in batches:
        ts, values = windows(b)
        x = build_inputs(ts, values, None, loaded.config)
        p = loaded.predictor
        p.predict(x)
        reps, t0 = 0, time.perf_counter()
        while True:
            p.predict(x)
            reps += 1
            el = time.perf_counter() - t0
            if el >= min_time:
                break
        out[b] = reps * b / el
    return out


def matmul(min_time: float, n: int = 1024) -> dict[str, float]:
    """fp32 GFLOP/s of an n×n matrix multiply: numpy (its BLAS threads) and torch at 1 and 2
    threads."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    res: dict[str, float] = {}

    def rate(fn: Any) -> float:
        fn()
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < min_time:
            fn()
            reps += 1
        return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9

    res["numpy"] = rate(lambda: a @ a)
    ta = torch.from_numpy(a)
    old = torch.get_num_threads()
    for th in (1, 2):
        torch.set_num_threads(th)
        res[f"torch {th} thread{'s' if th > 1 else ''}"] = rate(lambda: ta @ ta)
    torch.set_num_threads(old)
    return res


async def _fetch(bootstrap: str, topic: str, limit: int, deadline: float) -> list[Any]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    c = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await c.start()
    try:
        await c._client.force_metadata_update()  # the consumer subscribes to nothing
        parts = sorted(c.partitions_for_topic(topic) or ())
        c.assign([TopicPartition(topic, p) for p in parts])
        recs: list[Any] = []
        while len(recs) < limit and time.monotonic() < deadline:
            got = await c.getmany(timeout_ms=500, max_records=2048)
            for batch in got.values():
                recs.extend(batch)
        return recs
    finally:
        await c.stop()


async def consume_decode(
    bootstrap: str, topic: str, limit: int, max_time: float = 60.0
) -> dict[str, float]:
    """Events/s read from the backlog topic with ``getmany`` and decoded (orjson + validation),
    and the consume rate alone (decode excluded)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from stream.decode import decode_event

    c = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest",
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )  # fmt: skip
    await c.start()
    try:
        await c._client.force_metadata_update()  # the consumer subscribes to nothing
        parts = sorted(c.partitions_for_topic(topic) or ())
        c.assign([TopicPartition(topic, p) for p in parts])
        n = 0
        t_decode = 0.0
        t0 = time.perf_counter()
        deadline = time.monotonic() + max_time
        while n < limit and time.monotonic() < deadline:
            got = await c.getmany(timeout_ms=500, max_records=2048)
            td = time.perf_counter()
            for batch in got.values():
                for r in batch:
                    decode_event(r.key, r.value)
                n += len(batch)
            t_decode += time.perf_counter() - td
        el = time.perf_counter() - t0
    finally:
        await c.stop()
    return {"events": n, "consume+decode": n / el, "consume only": n / max(1e-9, el - t_decode)}


async def redis_updates(
    stack: BenchStack, topic: str, limit: int, batch: int = 2048, db: int = 63
) -> dict[str, float]:
    """Window updates/s through the store's fenced Lua script: the backlog's records applied in
    batches of ``batch`` to in-memory windows, each partition's snapshot persisted in one call
    (all partitions concurrently, as the worker does). Only the Redis calls are timed."""
    import redis.asyncio as aioredis

    from stream.settings import LimitSettings
    from stream.store import WindowStore
    from stream.windows import PartitionWindows

    recs = await _fetch(stack.bootstrap, topic, limit, time.monotonic() + 60)
    by_part: dict[int, list[Any]] = {}
    for r in recs:
        by_part.setdefault(r.partition, []).append(r)
    client = aioredis.Redis.from_url(stack.redis_url(db))
    await client.flushdb()
    store = WindowStore(client, "bench", topic)
    wins = {
        p: PartitionWindows(topic, p, sequence_length=48, features=(), limits=LimitSettings())
        for p in by_part
    }
    expected: dict[int, int | None] = dict.fromkeys(by_part)
    per_part = max(1, batch // max(1, len(by_part)))
    updates = events = 0
    spent = 0.0
    i = 0
    try:
        while True:
            chunk = {p: rs[i : i + per_part] for p, rs in by_part.items() if i < len(rs)}
            if not chunk:
                break
            snaps = {}
            for p, rs in chunk.items():
                wins[p].apply(rs)
                snaps[p] = wins[p].snapshot()
                events += len(rs)
            t0 = time.perf_counter()
            await asyncio.gather(
                *(store.persist(p, s, expected=expected[p], features=()) for p, s in snaps.items())
            )
            spent += time.perf_counter() - t0
            for p, s in snaps.items():
                expected[p] = s.applied
                updates += len(s.set)
            i += per_part
    finally:
        await client.flushdb()
        await client.aclose()
    return {"events": events, "events/s": events / spent, "series updates/s": updates / spent}


async def produce(bootstrap: str, topic: str, count: int, batch: int = 2048) -> dict[str, float]:
    """Forecast messages/s through the worker's Publisher (idempotent, acks=all), ``batch``
    messages sent then awaited at a time, as the worker does."""
    from model.predictor import Forecast
    from stream.publisher import Publisher, encode_forecasts
    from stream.settings import KafkaSettings
    from stream.windows import WindowBatch

    ts, values = windows(batch)
    h = 1
    z = np.ones((batch, h), np.float32)
    fc = Forecast(z, z, {"80": z, "95": z}, {"80": z, "95": z})
    wb = WindowBatch(
        0, [f"sensor-{i:05d}" for i in range(batch)], np.arange(batch), np.zeros(batch, np.int64),
        ts, values, {},
    )  # fmt: skip
    msgs = encode_forecasts(wb, fc, version="bench", input_topic="events", output_topic=topic)
    pub = Publisher(KafkaSettings(bootstrap_servers=bootstrap))
    await pub.start()
    try:
        await pub.publish(msgs)  # warm-up: metadata, connections
        n, t0 = 0, time.perf_counter()
        while n < count:
            await pub.publish(msgs)
            n += len(msgs)
        el = time.perf_counter() - t0
    finally:
        await pub.stop()
    return {"messages": n, "messages/s": n / el, "bytes/msg": float(len(msgs[0].value or b""))}
