"""The Redis window store: durable copy of each input partition's windows and applied offset.

Redis layout (``P`` = ``--redis-prefix``, default ``eventcast``; ``TOPIC`` = input topic; ``N`` =
partition number). Both keys of a partition share the hash tag ``{P:TOPIC:N}``, so one partition
lives in one Redis Cluster slot and its update is one atomic script call::

    {P:TOPIC:N}:meta   HASH  applied   highest input offset applied to the windows (decimal)
                             epoch     owner epoch: incremented by every worker that takes the
                                       partition (loads it), before it reads anything
                             owner     random token of that claim (so an epoch number reused after
                                       Redis lost the hash still fences the old owner)
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

Taking a partition is :meth:`WindowStore.load`: one script bumps ``epoch``, sets a new ``owner``
and returns the meta (a :class:`Fence` and the applied offset), then the windows are read in
``HSCAN`` pages (no single unbounded reply, whatever the series count), and the fence is read
again: had another worker claimed the partition meanwhile, the load fails (StateConflictError).

Writes are fenced twice: the script refuses (nothing written) unless ``epoch`` and ``owner`` are
still the writer's claim *and* ``applied`` equals the value it last read or wrote. The epoch
makes a stale owner (a zombie whose partition was given to another worker, which loaded it) unable
to write anything after the new owner's load, whatever offsets it holds; the offset catches a
flushed or restarted Redis (see :class:`~stream.errors.StateConflictError`).
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from aiokafka.partitioner import murmur2
from redis.asyncio.cluster import RedisCluster

from stream.errors import StateConflictError
from stream.windows import Snapshot, decode_series

log = logging.getLogger(__name__)

# KEYS: meta. Takes the partition: a new epoch and owner token, and the meta as it stands.
_CLAIM = """
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('HSET', KEYS[1], 'owner', ARGV[1])
return {epoch, redis.call('HMGET', KEYS[1], 'applied', 'max_ts', 'features')}
"""

# KEYS: meta, win, cal. ARGV: expected applied ('' = none), fence ('epoch:owner', '' = none), new
# applied, max_ts, features JSON, replace flag ('1' deletes the old windows and calibration
# first), updated, then four counts: window blobs to set, windows to delete, calibration blobs to
# set, calibration entries to delete; then those, in that order (blobs as name/blob pairs).
_PERSIST = """
local m = redis.call('HMGET', KEYS[1], 'applied', 'epoch', 'owner')
local cur = m[1] or ''
local fence = ''
if m[2] then fence = m[2] .. ':' .. (m[3] or '') end
if fence ~= ARGV[2] or cur ~= ARGV[1] then return {0, cur, fence} end
if ARGV[6] == '1' then redis.call('DEL', KEYS[2], KEYS[3]) end
local i = 12
local function run(cmd, key, n)
  local stop = i + n
  while i < stop do
    local chunk = {}
    local last = math.min(i + 999, stop - 1)
    for j = i, last do chunk[#chunk + 1] = ARGV[j] end
    redis.call(cmd, key, unpack(chunk))
    i = last + 1
  end
end
run('HSET', KEYS[2], 2 * tonumber(ARGV[8]))
run('HDEL', KEYS[2], tonumber(ARGV[9]))
run('HSET', KEYS[3], 2 * tonumber(ARGV[10]))
run('HDEL', KEYS[3], tonumber(ARGV[11]))
redis.call('HSET', KEYS[1], 'applied', ARGV[3], 'max_ts', ARGV[4], 'features', ARGV[5],
           'updated', ARGV[7])
return {1, ARGV[3], fence}
"""

LOAD_PAGE = 1000  # HSCAN COUNT of a partition load


def partition_for(series_id: str | bytes, num_partitions: int) -> int:
    """The input partition of a series key, as aiokafka and the Java client place it (murmur2)."""
    key = series_id.encode("utf-8") if isinstance(series_id, str) else series_id
    return (murmur2(key) & 0x7FFFFFFF) % num_partitions


def partition_keys(prefix: str, topic: str, partition: int) -> tuple[str, str, str]:
    """The meta, window and calibration hash keys of one input partition, hash-tagged so that
    all three (and one batch's whole write) land on one Redis Cluster slot."""
    tag = f"{{{prefix}:{topic}:{partition}}}"
    return f"{tag}:meta", f"{tag}:win", f"{tag}:cal"


@dataclass(frozen=True)
class Fence:
    """One claim of a partition: the owner epoch it set and its random owner token."""

    epoch: int
    owner: str

    def token(self) -> str:
        return f"{self.epoch}:{self.owner}"


@dataclass(frozen=True)
class StoredPartition:
    """A partition as read from Redis by the worker that just claimed it (``fence``).
    ``applied`` is None when Redis holds no state for it (never written, or lost)."""

    fence: Fence
    applied: int | None
    max_ts: float
    features: tuple[str, ...]
    blobs: dict[str, bytes]
    calibration: dict[str, bytes] = field(default_factory=dict)  # stream/calibration.py blobs


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

    ``client`` is a ``redis.asyncio.Redis`` or a ``redis.asyncio.cluster.RedisCluster``: every
    call names keys of one partition (one hash tag, so one slot), except :meth:`announce` (one
    key) and :meth:`eviction_policy` (asks every primary). Errors from it (connection lost, a
    cluster failing over...) propagate to the caller, which owns the retry policy.
    """

    def __init__(self, client: Any, prefix: str, topic: str) -> None:
        self.client = client
        self.prefix = prefix
        self.topic = topic
        self._persist = client.register_script(_PERSIST)
        self._claim = client.register_script(_CLAIM)

    def keys(self, partition: int) -> tuple[str, str, str]:
        return partition_keys(self.prefix, self.topic, partition)

    async def load(self, partition: int, *, page: int = LOAD_PAGE) -> StoredPartition:
        """Take the partition (a new owner epoch: every persist of an earlier claim is refused
        from now on) and read its state, the windows in ``HSCAN`` pages of about ``page`` series.
        Raises StateConflictError when another worker claimed it while the pages were read."""
        meta_key, win_key, cal_key = self.keys(partition)
        owner = secrets.token_hex(16)
        epoch, (applied, max_ts, features) = await self._claim(keys=[meta_key], args=[owner])
        fence = Fence(int(epoch), owner)
        blobs = await self._scan(win_key, page)
        calibration = await self._scan(cal_key, page)
        now = await self.client.hmget(meta_key, ["epoch", "owner"])
        if [_text(x) for x in now] != [str(fence.epoch), fence.owner]:
            raise StateConflictError(
                self.topic, partition, f"owner epoch {fence.epoch}",
                f"{_text(applied)} (claimed by another worker while loading: epoch "
                f"{_text(now[0])})",
            )  # fmt: skip
        if applied is None:
            return StoredPartition(fence, None, -math.inf, (), blobs, calibration)
        return StoredPartition(
            fence=fence,
            applied=int(applied),
            max_ts=float(max_ts) if max_ts is not None else -math.inf,
            features=tuple(orjson.loads(features or b"[]")),
            blobs=blobs,
            calibration=calibration,
        )

    async def _scan(self, key: str, page: int) -> dict[str, bytes]:
        """A whole hash, read in ``HSCAN`` pages of about ``page`` fields."""
        out: dict[str, bytes] = {}
        cursor: int = 0
        while True:
            cursor, chunk = await self.client.hscan(key, cursor, count=page)
            for k, v in chunk.items():
                out[k.decode("utf-8") if isinstance(k, bytes) else k] = v
            if not cursor:
                return out

    async def persist(
        self,
        partition: int,
        snap: Snapshot,
        *,
        expected: int | None,
        features: tuple[str, ...],
        replace: bool = False,
        fence: Fence | None = None,
    ) -> None:
        """Write ``snap`` and its applied offset atomically, if Redis still holds ``expected``
        (None: no state) and ``fence`` is still the partition's claim (None: no claim was ever
        made, as for a store written without a worker); a no-op when it already holds
        ``snap.applied`` under the same claim (a retried write whose reply was lost). Raises
        StateConflictError, writing nothing, otherwise."""
        meta_key, win_key, cal_key = self.keys(partition)
        token = "" if fence is None else fence.token()
        args: list[Any] = [
            "" if expected is None else str(expected),
            token,
            str(snap.applied),
            repr(snap.max_ts) if math.isfinite(snap.max_ts) else "-inf",
            orjson.dumps(list(features)),
            "1" if replace else "0",
            f"{time.time():.3f}",
            len(snap.set),
            len(snap.delete),
            len(snap.cal_set),
            len(snap.cal_delete),
        ]
        for blobs, deleted in ((snap.set, snap.delete), (snap.cal_set, snap.cal_delete)):
            for name, blob in blobs.items():
                args.append(name)
                args.append(blob)
            args.extend(deleted)
        ok, found, found_fence = await self._persist(keys=[meta_key, win_key, cal_key], args=args)
        if not ok:
            found_s = _text(found) or ""
            fence_s = _text(found_fence) or ""
            if fence_s == token and found_s == args[2]:
                # Redis already holds this very offset under our own claim: our write, applied
                # before the connection dropped and its reply was lost (the caller retried it).
                return
            if fence_s != token:
                theirs = fence_s.split(":", 1)[0] or "none"
                ours = str(fence.epoch) if fence is not None else "none"
                found_s = f"{found_s or 'missing'} (owner epoch {theirs}, ours {ours})"
            raise StateConflictError(self.topic, partition, args[0], found_s)

    async def read_window(self, series_id: str, num_partitions: int) -> SeriesWindow | None:
        """A series' current window (None when the store does not hold it). ``num_partitions``
        is the input topic's partition count (the series' partition is computed from it)."""
        p = partition_for(series_id, num_partitions)
        meta_key, win_key, _ = self.keys(p)
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hget(meta_key, "features")
            pipe.hget(win_key, series_id)
            raw_features, blob = await pipe.execute()
        return _series_window(series_id, p, raw_features, blob)

    async def eviction_policy(self) -> str | None:
        """Redis's ``maxmemory-policy`` (None when CONFIG is not allowed, as on managed Redis).
        On a Redis Cluster each primary has its own: the first one that is not ``noeviction``
        (a single node's answer would hide the others')."""
        replies: list[Any]  # {name: value}, the name str or bytes as the client decodes
        try:
            if isinstance(self.client, RedisCluster):
                await self.client.initialize()  # the node list, if no command ran yet
                replies = [
                    await self.client.config_get("maxmemory-policy", target_nodes=node)
                    for node in self.client.get_primaries()
                ]
            else:
                replies = [await self.client.config_get("maxmemory-policy")]
        except Exception:  # CONFIG is often disabled by ACLs or hosting providers
            return None
        policies = [_text(r.get("maxmemory-policy") or r.get(b"maxmemory-policy")) for r in replies]
        return next((p for p in policies if p != "noeviction"), policies[0] if policies else None)

    async def announce(self, group: str, member: str, info: dict[str, Any], ttl: int = 60) -> None:
        """Record a running worker's status for ``worker status`` (expires unless refreshed)."""
        key = f"{self.prefix}:workers:{group}"
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hset(key, member, orjson.dumps({**info, "at": time.time()}))
            pipe.expire(key, ttl)
            await pipe.execute()


def _text(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else None if value is None else str(value)


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
