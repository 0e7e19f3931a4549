"""Series windows in the worker's Redis store, read (and deleted) by ``worker serve``,
``worker plot`` and ``worker series delete`` (layout: :mod:`stream.store`)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson


@dataclass(frozen=True)
class Window:
    """A series' current window: oldest first, ``ts`` in epoch seconds (UTC)."""

    series_id: str
    ts: list[float]
    values: list[float]
    features: dict[str, list[float]] = field(default_factory=dict)


# Reads a series' current window (from Redis); None when the series has no state.
WindowReader = Callable[[str], Awaitable[Window | None]]


class RedisWindows:
    """Reads series windows from the worker's Redis store (layout: :mod:`stream.store`).

    With ``partitions`` (the input topic's partition count) a series is read from the partition
    its key hashes to; without it, the partitions present in Redis are discovered with ``SCAN``
    (cached for ``rescan_seconds``) and the series is looked up in each, so the server needs no
    Kafka connection. ``client`` is a ``redis.asyncio.Redis`` or (``--redis-cluster``) a
    ``redis.asyncio.cluster.RedisCluster``, whose ``scan_iter`` walks every primary's keys (redis-py
    sends SCAN to all primaries and follows each one's cursor), so discovery sees every shard.
    """

    def __init__(
        self, client: Any, prefix: str, topic: str, partitions: int | None = None,
        *, rescan_seconds: float = 30.0,
    ) -> None:  # fmt: skip
        from stream.store import WindowStore

        self.client = client
        self.store = WindowStore(client, prefix, topic)
        self.prefix = prefix
        self.topic = topic
        self.partitions = partitions
        self.rescan_seconds = rescan_seconds
        self._known: list[int] = []
        self._scanned_at = -math.inf

    async def known_partitions(self) -> list[int]:
        """Partitions of the input topic that have state in Redis (cached)."""
        if time.monotonic() - self._scanned_at > self.rescan_seconds:
            head = f"{{{self.prefix}:{self.topic}:"
            found = set()
            async for key in self.client.scan_iter(match=f"{_glob(head)}*}}:meta", count=1000):
                text = key.decode() if isinstance(key, bytes) else key
                num = text[len(head) :].split("}", 1)[0]
                if num.isdigit():
                    found.add(int(num))
            self._known = sorted(found)
            self._scanned_at = time.monotonic()
        return self._known

    async def __call__(self, series_id: str) -> Window | None:
        """The series' window, oldest first (every retained point), or None."""
        from stream.windows import decode_series

        if self.partitions is not None:
            got = await self.store.read_window(series_id, self.partitions)
            if got is None:
                return None
            return Window(series_id, got.ts.tolist(), got.values.tolist(),
                          {k: v.tolist() for k, v in got.features.items()})  # fmt: skip
        for p in await self.known_partitions():
            meta_key, win_key, _ = self.store.keys(p)
            blob = await self.client.hget(win_key, series_id)
            if blob is None:
                continue
            names = orjson.loads(await self.client.hget(meta_key, "features") or b"[]")
            _off, ts, values, feats = decode_series(blob, len(names))
            return Window(series_id, ts.tolist(), values.tolist(),
                          {n: feats[:, j].tolist() for j, n in enumerate(names)})  # fmt: skip
        return None

    async def delete(self, series_id: str) -> bool:
        """Remove the series' window from every partition that holds it; True when one did.

        The partition's applied offset is left alone (the worker's fence stays valid). A worker
        that owns the partition still holds the series in memory; see docs/operations.md.
        """
        parts = (
            list(range(self.partitions))
            if self.partitions is not None
            else await self.known_partitions()
        )
        removed = 0
        for p in parts:
            _, win_key, cal_key = self.store.keys(p)
            removed += int(await self.client.hdel(win_key, series_id))
            await self.client.hdel(cal_key, series_id)  # its interval calibration too
        return removed > 0


def _glob(text: str) -> str:
    """``text`` with Redis glob metacharacters escaped."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def redis_collaborators(
    redis: Any, topic: str = "events", partitions: int | None = None
) -> tuple[RedisWindows, Callable[[], Awaitable[bool]]]:
    """The window reader and the readiness ping of a :class:`stream.settings.RedisSettings`."""
    client = redis.client()

    async def ping() -> bool:
        return bool(await client.ping())

    return RedisWindows(client, redis.prefix, topic, partitions), ping


def read_window_sync(
    redis: Any, series_id: str, topic: str = "events", partitions: int | None = None
) -> Window | None:
    """Synchronous read of one series' window (for commands); Redis errors propagate."""

    async def run() -> Window | None:
        client = redis.client()
        try:
            return await RedisWindows(client, redis.prefix, topic, partitions)(series_id)
        finally:
            await client.aclose()

    return asyncio.run(run())


def delete_series_sync(
    redis: Any, series_id: str, topic: str = "events", partitions: int | None = None
) -> bool:
    """Synchronous :meth:`RedisWindows.delete` (for ``worker series delete``)."""

    async def run() -> bool:
        client = redis.client()
        try:
            return await RedisWindows(client, redis.prefix, topic, partitions).delete(series_id)
        finally:
            await client.aclose()

    return asyncio.run(run())
