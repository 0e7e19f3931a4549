"""In-memory windows of one input partition: the hot-path state of the worker.

Each series of an assigned partition has a ring buffer of its newest ``sequence_length + history``
accepted points (source offset, ts, value, features). Applying a batch of records checks each
event against its series (``duplicate``, ``late``, ``series_limit``, idle TTL), appends accepted
points, and collects the windows to forecast as dense ``(R, T)`` arrays, gathered with one
fancy-indexing pass per batch rather than per event.

The state is a pure function of the sequence of records applied since the partition was empty,
so re-reading the input topic rebuilds it exactly (DESIGN.md invariant 6). That is why idle TTL is
measured in *event time*, not wall clock: against the partition's clock :attr:`max_ts`, which is
the newest ``ts`` accepted from any series *but the one furthest ahead* (the second-highest last
``ts`` of the series held). Only accepted events move it, and one series far ahead of the rest
(a producer sending milliseconds as seconds, a broken device clock) cannot make every other
series of its partition idle: that takes two.

Records at or below :attr:`PartitionWindows.applied` are Kafka redeliveries: they change nothing;
when their point is still retained the window as it stood at their offset is forecast again.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from stream.decode import Event, Rejection, decode_event
from stream.settings import LimitSettings

_BLOB_HEADER = struct.Struct("<BHH")  # format version, points retained, feature count
_BLOB_VERSION = 1


class RecordLike(Protocol):
    """What is used of a Kafka record (aiokafka's ConsumerRecord fits)."""

    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int


@dataclass
class WindowBatch:
    """Windows to forecast for one partition: R rows, T points each, oldest point first."""

    partition: int
    series: list[str]
    offsets: np.ndarray  # (R,) int64 source offset of the event each row forecasts
    record_ts_ms: np.ndarray  # (R,) int64 Kafka timestamps of those records (latency metric)
    ts: np.ndarray  # (R, T) float64
    values: np.ndarray  # (R, T) float64
    features: dict[str, np.ndarray]  # name -> (R, T) float64

    def __len__(self) -> int:
        return len(self.series)

    @staticmethod
    def concat(
        partition: int, parts: Sequence[WindowBatch], t: int, names: Sequence[str]
    ) -> WindowBatch:
        if len(parts) == 1:
            return parts[0]
        if not parts:
            z = np.zeros((0, t))
            return WindowBatch(
                partition, [], np.zeros(0, np.int64), np.zeros(0, np.int64), z, z,
                {n: z for n in names},
            )  # fmt: skip
        return WindowBatch(
            partition,
            [s for p in parts for s in p.series],
            np.concatenate([p.offsets for p in parts]),
            np.concatenate([p.record_ts_ms for p in parts]),
            np.concatenate([p.ts for p in parts]),
            np.concatenate([p.values for p in parts]),
            {n: np.concatenate([p.features[n] for p in parts]) for n in names},
        )


@dataclass
class ApplyResult:
    """What applying one partition's records produced."""

    windows: WindowBatch
    rejected: list[tuple[RecordLike, Rejection]] = field(default_factory=list)
    accepted: int = 0
    warming: int = 0
    redelivered: int = 0
    not_reemitted: int = 0  # redelivered accepted events whose window is no longer retained


@dataclass
class Snapshot:
    """Changes to persist for one partition: series blobs to set, series to delete."""

    applied: int
    max_ts: float
    set: dict[str, bytes]
    delete: list[str]


class PartitionWindows:
    """The windows of one input partition (see module docstring).

    ``features``: the serving model's feature names (only those are kept). Not thread-safe: the
    worker applies batches from its event loop only.
    """

    def __init__(
        self,
        topic: str,
        partition: int,
        *,
        sequence_length: int,
        features: Sequence[str],
        limits: LimitSettings,
        max_event_bytes: int = 65536,
        max_future_skew: float | None = None,
    ) -> None:
        self.topic = topic
        self.partition = partition
        self.seq_len = sequence_length
        self.feature_names = tuple(features)
        self.limits = limits
        self.max_event_bytes = max_event_bytes
        self.max_future_skew = max_future_skew  # seconds an event may be ahead of its record
        self.capacity = sequence_length + limits.history  # points kept per series (W)
        self.applied = -1  # highest input offset applied; -1 before the first
        self.max_ts = -math.inf  # the TTL clock: newest accepted ts of all series but the lead
        self._lead_row = -1  # the series with the newest accepted ts, and that ts
        self._lead_ts = -math.inf
        self._index: dict[str, int] = {}  # series id -> row
        self._names: list[str | None] = []
        self._free: list[int] = []
        self._n: list[int] = []  # points appended to each row since it was (re)created
        self._last_ts: list[float] = []
        self._rows = 0
        w, f = self.capacity, len(self.feature_names)
        self._off = np.zeros((0, w), np.int64)
        self._ts = np.zeros((0, w), np.float64)
        self._val = np.zeros((0, w), np.float64)
        self._feat = np.zeros((0, w, f), np.float64)
        self._dirty: set[int] = set()
        self._deleted: set[str] = set()

    # ---- reading -------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Number of series held."""
        return len(self._index)

    def series(self) -> list[str]:
        return list(self._index)

    def window(
        self, series_id: str
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """``(offsets, ts, values, features)`` of every retained point of a series, oldest first.
        Raises KeyError for an unknown series."""
        row = self._index[series_id]
        idx = self._retained(row)
        feats = {n: self._feat[row, idx, j].copy() for j, n in enumerate(self.feature_names)}
        return (
            self._off[row, idx].copy(),
            self._ts[row, idx].copy(),
            self._val[row, idx].copy(),
            feats,
        )

    def _retained(self, row: int) -> np.ndarray:
        n = self._n[row]
        return np.arange(max(0, n - self.capacity), n) % self.capacity

    # ---- applying records ----------------------------------------------------------------------

    def apply(
        self, records: Sequence[RecordLike], *, emit: bool = True, latest: bool = False
    ) -> ApplyResult:
        """Apply ``records`` (in offset order) and return the windows to forecast.

        ``emit=False`` (rebuilding from Kafka) collects no windows. ``latest=True`` keeps only the
        newest window of each series (coalescing). Bad events are returned in ``rejected`` with
        their reason; they and every other record advance :attr:`applied`.
        """
        seq_len, cap = self.seq_len, self.capacity
        ttl = self.limits.series_ttl
        names = self.feature_names
        res_rows: list[int] = []
        res_ends: list[int] = []
        res_offs: list[int] = []
        res_tsms: list[int] = []
        latest_at: dict[int, int] = {}  # row -> position in res_* (coalescing)
        first_end: dict[int, int] = {}  # row -> smallest window end pending for it
        parts: list[WindowBatch] = []
        result = ApplyResult(windows=WindowBatch.concat(self.partition, [], seq_len, names))

        def flush() -> None:
            if res_rows:
                parts.append(self._gather(res_rows, res_ends, res_offs, res_tsms))
                for seq in (res_rows, res_ends, res_offs, res_tsms):
                    seq.clear()
                latest_at.clear()
                first_end.clear()

        def request(row: int, end: int, offset: int, ts_ms: int) -> None:
            if latest and row in latest_at:
                i = latest_at[row]
                res_ends[i], res_offs[i], res_tsms[i] = end, offset, ts_ms
                first_end[row] = end
                return
            latest_at[row] = len(res_rows)
            res_rows.append(row)
            res_ends.append(end)
            res_offs.append(offset)
            res_tsms.append(ts_ms)
            first_end.setdefault(row, end)

        for rec in records:
            try:
                offset = rec.offset
                if offset <= self.applied:
                    result.redelivered += 1
                    if emit:
                        self._reemit(rec, request, result)
                    continue
                ev = decode_event(
                    rec.key, rec.value, max_bytes=self.max_event_bytes, required_features=names,
                    record_ts_ms=rec.timestamp, max_future_skew=self.max_future_skew,
                )  # fmt: skip
                if isinstance(ev, Rejection):
                    result.rejected.append((rec, ev))
                    continue
                row = self._index.get(ev.series_id)
                if row is not None and ttl and self._last_ts[row] < self.max_ts - ttl:
                    if row in first_end:
                        flush()
                    self._forget(row)
                    row = None
                if row is None:
                    if len(self._index) >= self.limits.max_series:
                        if first_end:
                            flush()
                        self._sweep_idle()
                    if len(self._index) >= self.limits.max_series:
                        result.rejected.append(
                            (
                                rec,
                                Rejection(
                                    "series_limit",
                                    f"partition holds {len(self._index)} series, the limit",
                                ),
                            )
                        )
                        continue
                    row = self._allocate(ev.series_id)
                else:
                    last = self._last_ts[row]
                    if ev.ts == last:
                        result.rejected.append(
                            (rec, Rejection("duplicate", f"ts {ev.ts} equals the last accepted ts"))
                        )
                        continue
                    if ev.ts < last:
                        why = f"ts {ev.ts} is before the last accepted ts {last}"
                        result.rejected.append((rec, Rejection("late", why)))
                        continue
                n = self._n[row]
                pending = first_end.get(row)
                if pending is not None and n + 1 - cap > pending - seq_len:
                    flush()  # the next point would overwrite a window still waiting to be gathered
                self._append(row, n, offset, ev)
                result.accepted += 1
                if n + 1 >= seq_len:
                    if emit:
                        request(row, n + 1, offset, rec.timestamp)
                else:
                    result.warming += 1
            except Exception as exc:  # the last resort: a bug, never a stopped worker
                why = f"unexpected {type(exc).__name__} while admitting the event: {exc}"
                result.rejected.append((rec, Rejection("schema", why[:300], True)))
        if records:
            self.applied = max(self.applied, records[-1].offset)
        flush()
        result.windows = WindowBatch.concat(self.partition, parts, seq_len, names)
        return result

    def _append(self, row: int, n: int, offset: int, ev: Event) -> None:
        col = n % self.capacity
        self._off[row, col] = offset
        self._ts[row, col] = ev.ts
        self._val[row, col] = ev.value
        for j, name in enumerate(self.feature_names):
            self._feat[row, col, j] = ev.features[name]
        self._n[row] = n + 1
        self._last_ts[row] = ev.ts
        self._advance_clock(row, ev.ts)
        self._dirty.add(row)

    def _advance_clock(self, row: int, ts: float) -> None:
        """Series ``row`` now has newest ``ts``: keep the lead series and the clock (the newest
        ts of every other series) up to date. Each series' newest ts only grows, so this running
        top-two is exact whatever order the series come in."""
        if row == self._lead_row:
            self._lead_ts = ts
        elif ts > self._lead_ts:
            if self._lead_ts > self.max_ts:
                self.max_ts = self._lead_ts
            self._lead_row, self._lead_ts = row, ts
        elif ts > self.max_ts:
            self.max_ts = ts

    def _reemit(self, rec: RecordLike, request, result: ApplyResult) -> None:  # type: ignore[no-untyped-def]
        ev = decode_event(rec.key, rec.value, max_bytes=self.max_event_bytes, required_features=())
        if not isinstance(ev, Event):
            return  # it was rejected the first time; its dead-letter record exists already
        row = self._index.get(ev.series_id)
        if row is None:
            return
        n = self._n[row]
        base = max(0, n - self.capacity)
        hits = np.flatnonzero(self._off[row, : min(n, self.capacity)] == rec.offset)
        if len(hits) == 0:
            return  # not accepted the first time (late, duplicate...) or no longer retained
        col = int(hits[0])
        end = base + ((col - base) % self.capacity) + 1
        if end < self.seq_len:
            return  # the series was still warming at that offset
        if end - self.seq_len < base:
            result.not_reemitted += 1
            return
        request(row, end, rec.offset, rec.timestamp)

    def _gather(
        self, rows: list[int], ends: list[int], offs: list[int], tsms: list[int]
    ) -> WindowBatch:
        t = self.seq_len
        r = np.asarray(rows, dtype=np.int64)[:, None]  # (R, 1)
        cols = (
            np.asarray(ends, dtype=np.int64)[:, None] - t + np.arange(t)
        ) % self.capacity  # (R, T)
        feats = {n: self._feat[r, cols, j] for j, n in enumerate(self.feature_names)}
        return WindowBatch(
            self.partition,
            [self._names[i] for i in rows],  # type: ignore[misc]
            np.asarray(offs, dtype=np.int64),
            np.asarray(tsms, dtype=np.int64),
            self._ts[r, cols],
            self._val[r, cols],
            feats,
        )

    # ---- rows ----------------------------------------------------------------------------------

    def _allocate(self, series_id: str) -> int:
        if self._free:
            row = self._free.pop()
            self._names[row] = series_id
            self._n[row] = 0
            self._last_ts[row] = -math.inf
        else:
            row = self._rows
            self._rows += 1
            if row >= len(self._off):
                self._grow(max(64, 2 * len(self._off)))
            self._names.append(series_id)
            self._n.append(0)
            self._last_ts.append(-math.inf)
        self._index[series_id] = row
        self._deleted.discard(series_id)
        return row

    def _grow(self, rows: int) -> None:
        def grown(a: np.ndarray) -> np.ndarray:
            out = np.zeros((rows, *a.shape[1:]), a.dtype)
            out[: len(a)] = a
            return out

        self._off, self._ts, self._val, self._feat = map(
            grown, (self._off, self._ts, self._val, self._feat)
        )

    def _forget(self, row: int) -> None:
        name = self._names[row]
        assert name is not None
        if row == self._lead_row:  # (idle series are forgotten, and the lead one never is idle)
            self._lead_row = -1  # its ts stays the lead ts: the clock never goes back
        del self._index[name]
        self._names[row] = None
        self._free.append(row)
        self._dirty.discard(row)
        self._deleted.add(name)

    def _sweep_idle(self) -> None:
        """Forget every idle series (see :class:`~stream.settings.LimitSettings`)."""
        ttl = self.limits.series_ttl
        if not ttl:
            return
        horizon = self.max_ts - ttl
        for row in list(self._index.values()):
            if self._last_ts[row] < horizon:
                self._forget(row)

    def sweep(self) -> int:
        """Forget idle series now (between batches, to free memory); returns how many."""
        before = len(self._index)
        self._sweep_idle()
        return before - len(self._index)

    # ---- persistence ---------------------------------------------------------------------------

    def encode_series(self, row: int) -> bytes:
        idx = self._retained(row)
        header = _BLOB_HEADER.pack(_BLOB_VERSION, len(idx), len(self.feature_names))
        return b"".join(
            (
                header,
                self._off[row, idx].tobytes(),
                self._ts[row, idx].tobytes(),
                self._val[row, idx].tobytes(),
                np.ascontiguousarray(self._feat[row, idx, :]).tobytes(),
            )
        )

    def snapshot(self, *, full: bool = False) -> Snapshot:
        """The changes since the last snapshot (every series with ``full``), then forget them."""
        rows = range(self._rows) if full else sorted(self._dirty)
        blobs = {self._names[r]: self.encode_series(r) for r in rows if self._names[r] is not None}
        snap = Snapshot(self.applied, self.max_ts, blobs, sorted(self._deleted))  # type: ignore[arg-type]
        self._dirty.clear()
        self._deleted.clear()
        return snap

    def load_series(self, series_id: str, blob: bytes) -> None:
        """Restore one series from :meth:`encode_series` bytes (loading a partition from Redis).
        Raises ValueError when the blob is malformed or has another feature count."""
        off, ts, val, feat = decode_series(blob, len(self.feature_names))
        k = min(len(off), self.capacity)
        row = self._allocate(series_id)
        sl = slice(len(off) - k, len(off))
        self._off[row, :k] = off[sl]
        self._ts[row, :k] = ts[sl]
        self._val[row, :k] = val[sl]
        self._feat[row, :k] = feat[sl]
        self._n[row] = k
        self._last_ts[row] = float(ts[-1]) if k else -math.inf
        if k:
            self._advance_clock(row, self._last_ts[row])


def decode_series(
    blob: bytes, features: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Parse a series blob into ``(offsets (k,), ts (k,), values (k,), features (k, F))``, oldest
    first. Raises ValueError on a malformed blob or (when given) another feature count."""
    if len(blob) < _BLOB_HEADER.size:
        raise ValueError("window blob too short")
    version, k, f = _BLOB_HEADER.unpack_from(blob)
    if version != _BLOB_VERSION:
        raise ValueError(f"window blob format {version} is not {_BLOB_VERSION}")
    if features is not None and f != features:
        raise ValueError(f"window blob has {f} features, expected {features}")
    if len(blob) != _BLOB_HEADER.size + 8 * k * (3 + f):
        raise ValueError("window blob has the wrong length")
    pos = _BLOB_HEADER.size
    off = np.frombuffer(blob, np.int64, k, pos)
    ts = np.frombuffer(blob, np.float64, k, pos + 8 * k)
    val = np.frombuffer(blob, np.float64, k, pos + 16 * k)
    feat = np.frombuffer(blob, np.float64, k * f, pos + 24 * k).reshape(k, f)
    return off, ts, val, feat
