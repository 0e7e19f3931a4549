"""The Redis window store: durable copy of each input partition's windows and applied offset.

Redis layout (``P`` = ``--redis-prefix``, default ``eventcast``; ``TOPIC`` = input topic; ``N`` =
partition number). Both keys of a partition share the hash tag ``{P:TOPIC:N}``, so one partition
lives in one Redis Cluster slot and its update is one atomic script call::

    {P:TOPIC:N}:meta   HASH  applied   highest input offset applied to the windows (decimal)
                             max_ts    the partition's idle-TTL clock (float; informative: a load
                             recomputes it from the series, stream/windows.py)
                             features  JSON list of the feature names stored per point
                             updated   wall-clock time of the last write (epoch seconds)
    {P:TOPIC:N}:win    HASH  <series id> -> window blob
    P:workers:GROUP    HASH  <client id> -> JSON {version, partitions, host, pid, at}
                             (written by running workers for ``worker status``)

A window blob holds a series' newest points, oldest first: a little-endian header
``<B version=1><H k points><H F features>`` then ``int64[k]`` source offsets, ``float64[k]`` ts,
``float64[k]`` values, ``float64[k*F]`` features (point-major, in ``features`` order). Use
:func:`stream.windows.decode_series` or :meth:`WindowStore.read_window` to read one.

Writes are fenced: the script refuses (nothing written) unless ``applied`` in Redis equals the
value this worker last read or wrote, which catches both a flushed/restarted Redis and a second
worker that took the partition over (see :class:`~stream.errors.StateConflictError`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from aiokafka.partitioner import murmur2

from stream.errors import StateConflictError
from stream.windows import Snapshot, decode_series

log = logging.getLogger(__name__)

# KEYS: meta, win. ARGV: expected applied ('' = none), new applied, max_ts, features JSON,
# replace flag ('1' deletes the old windows first), updated, number of series to set, then
# series/blob pairs, then series names to delete.
_PERSIST = """
local cur = redis.call('HGET', KEYS[1], 'applied')
if not cur then cur = '' end
if cur ~= ARGV[1] then return {0, cur} end
if ARGV[5] == '1' then redis.call('DEL', KEYS[2]) end
local nset = tonumber(ARGV[7])
local i = 8
local stop = 8 + 2 * nset
while i < stop do
  local chunk = {}
  local last = math.min(i + 999, stop - 1)
  for j = i, last do chunk[#chunk + 1] = ARGV[j] end
  redis.call('HSET', KEYS[2], unpack(chunk))
  i = last + 1
end
while i <= #ARGV do
  local chunk = {}
  local last = math.min(i + 999, #ARGV)
  for j = i, last do chunk[#chunk + 1] = ARGV[j] end
  redis.call('HDEL', KEYS[2], unpack(chunk))
  i = last + 1
end
redis.call('HSET', KEYS[1], 'applied', ARGV[2], 'max_ts', ARGV[3], 'features', ARGV[4],
           'updated', ARGV[6])
return {1, ARGV[2]}
"""


def partition_for(series_id: str | bytes, num_partitions: int) -> int:
    """The input partition of a series key, as aiokafka and the Java client place it (murmur2)."""
    key = series_id.encode("utf-8") if isinstance(series_id, str) else series_id
    return (murmur2(key) & 0x7FFFFFFF) % num_partitions


def partition_keys(prefix: str, topic: str, partition: int) -> tuple[str, str]:
    """The meta and window hash keys of one input partition, hash-tagged so that both (and one
    batch's whole write) land on one Redis Cluster slot."""
    tag = f"{{{prefix}:{topic}:{partition}}}"
    return f"{tag}:meta", f"{tag}:win"


@dataclass(frozen=True)
class StoredPartition:
    """A partition as read from Redis."""

    applied: int
    max_ts: float
    features: tuple[str, ...]
    blobs: dict[str, bytes]


@dataclass(frozen=True)
class SeriesWindow:
    """A series' retained points, oldest first (the last ``sequence_length`` are its window)."""

    series_id: str
    partition: int
    offsets: np.ndarray  # (k,) int64
    ts: np.ndarray  # (k,) float64
    values: np.ndarray  # (k,) float64
    features: dict[str, np.ndarray]  # name -> (k,) float64


class WindowStore:
    """Reads and fenced writes of partition windows in Redis (layout in the module docstring).

    ``client`` is a ``redis.asyncio.Redis``; errors from it (connection lost...) propagate to the
    caller, which owns the retry policy.
    """

    def __init__(self, client: Any, prefix: str, topic: str) -> None:
        self.client = client
        self.prefix = prefix
        self.topic = topic
        self._persist = client.register_script(_PERSIST)

    def keys(self, partition: int) -> tuple[str, str]:
        return partition_keys(self.prefix, self.topic, partition)

    async def load(self, partition: int) -> StoredPartition | None:
        """The partition's stored state, or None when Redis holds no applied offset for it."""
        meta_key, win_key = self.keys(partition)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hgetall(meta_key)
            pipe.hgetall(win_key)
            meta, blobs = await pipe.execute()
        if not meta or b"applied" not in meta:
            return None
        features = tuple(orjson.loads(meta.get(b"features", b"[]")))
        return StoredPartition(
            applied=int(meta[b"applied"]),
            max_ts=float(meta.get(b"max_ts", b"-inf")),
            features=features,
            blobs={k.decode("utf-8"): v for k, v in blobs.items()},
        )

    async def persist(
        self,
        partition: int,
        snap: Snapshot,
        *,
        expected: int | None,
        features: tuple[str, ...],
        replace: bool = False,
    ) -> None:
        """Write ``snap`` and its applied offset atomically, if Redis still holds ``expected``
        (None: no state); a no-op when it already holds ``snap.applied`` (a retried write whose
        reply was lost). Raises StateConflictError, writing nothing, otherwise."""
        meta_key, win_key = self.keys(partition)
        args: list[Any] = [
            "" if expected is None else str(expected),
            str(snap.applied),
            repr(snap.max_ts) if math.isfinite(snap.max_ts) else "-inf",
            orjson.dumps(list(features)),
            "1" if replace else "0",
            f"{time.time():.3f}",
            len(snap.set),
        ]
        for name, blob in snap.set.items():
            args.append(name)
            args.append(blob)
        args.extend(snap.delete)
        ok, found = await self._persist(keys=[meta_key, win_key], args=args)
        if not ok:
            found_s = found.decode() if isinstance(found, bytes) else str(found)
            if found_s == args[1]:
                # Redis already holds this very offset: our own write, applied before the
                # connection dropped and its reply was lost (the caller retried it), or the same
                # records applied by another owner. The state is a function of the records up to
                # that offset, so it is the state we meant to write.
                return
            raise StateConflictError(self.topic, partition, args[0], found_s)

    async def read_window(self, series_id: str, num_partitions: int) -> SeriesWindow | None:
        """A series' current window (None when the store does not hold it). ``num_partitions``
        is the input topic's partition count (the series' partition is computed from it)."""
        p = partition_for(series_id, num_partitions)
        meta_key, win_key = self.keys(p)
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hget(meta_key, "features")
            pipe.hget(win_key, series_id)
            raw_features, blob = await pipe.execute()
        return _series_window(series_id, p, raw_features, blob)

    async def eviction_policy(self) -> str | None:
        """Redis's ``maxmemory-policy`` (None when CONFIG is not allowed, as on managed Redis)."""
        try:
            res = await self.client.config_get("maxmemory-policy")
        except Exception:  # CONFIG is often disabled by ACLs or hosting providers
            return None
        value = res.get("maxmemory-policy") or res.get(b"maxmemory-policy")
        return value.decode() if isinstance(value, bytes) else value

    async def announce(self, group: str, member: str, info: dict[str, Any], ttl: int = 60) -> None:
        """Record a running worker's status for ``worker status`` (expires unless refreshed)."""
        key = f"{self.prefix}:workers:{group}"
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hset(key, member, orjson.dumps({**info, "at": time.time()}))
            pipe.expire(key, ttl)
            await pipe.execute()


def _series_window(
    series_id: str, partition: int, raw_features: bytes | None, blob: bytes | None
) -> SeriesWindow | None:
    """Decode one stored series (``None`` when the store does not hold it)."""
    if blob is None:
        return None
    names = tuple(orjson.loads(raw_features or b"[]"))
    off, ts, val, feat = decode_series(blob, len(names))
    return SeriesWindow(
        series_id, partition, off.copy(), ts.copy(), val.copy(),
        {n: feat[:, j].copy() for j, n in enumerate(names)},
    )  # fmt: skip
