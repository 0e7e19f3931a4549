"""Synchronous Redis access for tests: a ``redis.Redis`` client from :class:`RedisSettings`, and
one series' stored window read with it (the worker itself only uses the asyncio client)."""

from __future__ import annotations

from typing import Any

from stream.settings import RedisSettings
from stream.store import SeriesWindow, _series_window, partition_for, partition_keys


def sync_client(settings: RedisSettings, **extra: Any) -> Any:
    """A new synchronous ``redis.Redis`` client with the settings' URL, TLS and credentials."""
    import redis

    kwargs = {"socket_timeout": 5.0, "socket_connect_timeout": 3.0, **settings.client_kwargs()}
    kwargs.update(extra)
    return redis.Redis.from_url(settings.url, **kwargs)


def read_window_sync(
    client: Any, prefix: str, topic: str, series_id: str, num_partitions: int
) -> SeriesWindow | None:
    """:meth:`stream.store.WindowStore.read_window`, with a synchronous ``redis.Redis`` client."""
    p = partition_for(series_id, num_partitions)
    meta_key, win_key, _ = partition_keys(prefix, topic, p)
    return _series_window(
        series_id, p, client.hget(meta_key, "features"), client.hget(win_key, series_id)
    )
