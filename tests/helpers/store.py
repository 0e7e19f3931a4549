"""Synchronous Redis access for tests: a ``redis.Redis`` client (``redis.RedisCluster`` for a
cluster) from :class:`RedisSettings`, one series' stored window read with it (the worker itself
only uses the asyncio client), and :class:`StoreTarget`, the Redis a worker test runs on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stream.settings import RedisSettings
from stream.store import SeriesWindow, _series_window, partition_for, partition_keys


def sync_client(settings: RedisSettings, **extra: Any) -> Any:
    """A new synchronous ``redis.Redis`` client with the settings' URL, TLS and credentials (a
    ``redis.RedisCluster`` with ``redis_cluster``)."""
    import redis

    kwargs = {"socket_timeout": 5.0, "socket_connect_timeout": 3.0, **settings.client_kwargs()}
    kwargs.update(extra)
    if settings.redis_cluster:
        return redis.RedisCluster.from_url(settings.url, **kwargs)
    return redis.Redis.from_url(settings.url, **kwargs)


@dataclass(frozen=True)
class StoreTarget:
    """The Redis a worker under test keeps its state in: a database of the single Redis of its
    own, or (``cluster``) the session's Redis Cluster, which has only database 0 and is shared,
    so the test's keys are kept apart by a ``prefix`` of its own."""

    url: str
    prefix: str = "eventcast"
    cluster: bool = False

    @property
    def settings(self) -> RedisSettings:
        return RedisSettings(
            redis_url=self.url, redis_prefix=self.prefix, redis_cluster=self.cluster
        )

    def worker_flags(self) -> list[str]:
        """The worker's flags besides ``--redis-url``."""
        return ["--redis-prefix", self.prefix, *(["--redis-cluster"] if self.cluster else [])]

    def client(self) -> Any:
        return sync_client(self.settings)

    def lose_state(self) -> None:
        """Redis loses everything the worker stored (FLUSHDB of the test's database; on the
        shared cluster, every key of the test's prefix, on every primary)."""
        client = self.client()
        try:
            if not self.cluster:
                client.flushdb()
                return
            for key in list(client.scan_iter(match=f"*{self.prefix}:*", count=1000)):
                client.delete(key)
        finally:
            client.close()


def read_window_sync(
    client: Any, prefix: str, topic: str, series_id: str, num_partitions: int
) -> SeriesWindow | None:
    """:meth:`stream.store.WindowStore.read_window`, with a synchronous ``redis.Redis`` client."""
    p = partition_for(series_id, num_partitions)
    meta_key, win_key, _ = partition_keys(prefix, topic, p)
    return _series_window(
        series_id, p, client.hget(meta_key, "features"), client.hget(win_key, series_id)
    )
