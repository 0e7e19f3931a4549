"""In-memory windows of one input partition: the hot-path state of the worker.

Each series of an assigned partition has a ring buffer of its newest ``sequence_length + history``
accepted points (source offset, ts, value, features). Applying a batch of records checks each
event against its series (``duplicate``, ``late``, ``series_limit``, idle TTL), appends accepted
points, and collects the windows to forecast as dense ``(R, T)`` arrays, gathered with one
fancy-indexing pass per batch rather than per event.

The state is a pure function of the sequence of records applied since the partition was empty,
so re-reading the input topic rebuilds it exactly (docs/design.md invariant 6). That is why idle
TTL is measured in *event time*, not wall clock: against the partition's clock :attr:`max_ts`,
the newest ``ts`` accepted from any series *but the one furthest ahead* (the second-highest last
``ts`` of the series held). Only accepted events move it, and one series far ahead of the rest
(a producer sending milliseconds as seconds, a broken device clock) cannot make every other
series of its partition idle: that takes two.

Records at or below :attr:`PartitionWindows.applied` are Kafka redeliveries: they change nothing;
when their point is still retained the window as it stood at their offset is forecast again.

This module is the admission policy (decoding, ordering, limits, the idle clock, redelivery);
the points themselves live in :class:`stream.rings.SeriesRings`, which also encodes them as the
blobs Redis stores. For a model with seasons the rings also hold each series' seasonal state, and
each window gathered carries its seasonal parts (:class:`model.seasonal.SeasonalParts`), taken
from the state as it stood at the window's newest point: a redelivered record's window again
gets exactly what it got the first time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import numpy as np

from model.seasonal import SeasonalParts, SeasonalSpec, SeasonalState, parts_of_many
from stream.decode import Event, Rejection, decode_event
from stream.rings import SeriesRings, decode_series
from stream.settings import LimitSettings

__all__ = ["ApplyResult", "PartitionWindows", "RecordLike", "Snapshot", "WindowBatch",
           "decode_series"]  # fmt: skip


class RecordLike(Protocol):
    """What is used of a Kafka record (aiokafka's ConsumerRecord fits)."""

    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int


# One window's seasonal side as the worker takes it from the series' state: the seasonal part of
# its points and of the next H steps, and the state's level; None on the plain path.
RowSeason = tuple[np.ndarray, np.ndarray, float] | None


class _Frozen(NamedTuple):
    """What a window's seasonal parts read from its series' state (a copy, as it stood then)."""

    ready: bool
    idx: list[np.ndarray]
    level: float


# Where a deferred window's seasonal parts are read: the series' state, or a frozen copy of it
SeasonSource = SeasonalState | _Frozen | None


def _frozen(src: SeasonSource) -> SeasonSource:
    """What a deferred window reads from its series' state, copied before the state moves on."""
    if isinstance(src, SeasonalState):
        return _Frozen(src.ready, [ix.copy() for ix in src.idx] if src.ready else [], src.level)
    return src


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
    seasonal: SeasonalParts | None = None  # a model with seasons: each row's seasonal parts

    def __len__(self) -> int:
        return len(self.series)

    @staticmethod
    def concat(
        partition: int, parts: Sequence[WindowBatch], t: int, names: Sequence[str]
    ) -> WindowBatch:
        """The rows of ``parts`` one after another (empty parts left out: an empty batch carries
        no seasonal parts)."""
        parts = [p for p in parts if len(p)]
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
            _concat_seasonal([p.seasonal for p in parts]),
        )


def _concat_seasonal(parts: Sequence[SeasonalParts | None]) -> SeasonalParts | None:
    if all(p is None for p in parts):
        return None
    if any(p is None for p in parts):
        raise ValueError("windows of a model with seasons and of one without, in one batch")
    return SeasonalParts.concat(parts)  # type: ignore[arg-type]


@dataclass
class ApplyResult:
    """What applying one partition's records produced."""

    windows: WindowBatch
    rejected: list[tuple[RecordLike, Rejection]] = field(default_factory=list)
    accepted: int = 0
    warming: int = 0
    redelivered: int = 0
    not_reemitted: int = 0  # redelivered accepted events whose window is no longer retained
    # Accepted points in offset order: (offset, series id, index of the point in its series,
    # value); what online interval calibration scores forecasts against.
    points: list[tuple[int, str, int, float]] = field(default_factory=list)


@dataclass
class Snapshot:
    """Changes to persist for one partition: series blobs to set, series to delete; and the
    same for the interval calibration (stream/calibration.py), filled in after inference."""

    applied: int
    max_ts: float
    set: dict[str, bytes]
    delete: list[str]
    cal_set: dict[str, bytes] = field(default_factory=dict)
    cal_delete: list[str] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.set or self.delete or self.cal_set or self.cal_delete)


class PartitionWindows:
    """The windows of one input partition (see module docstring).

    ``features``: the serving model's feature names (only those are kept); ``seasonal`` and
    ``horizon``: its seasonal spec (None: no seasons) and forecast steps. Not thread-safe: the
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
        seasonal: SeasonalSpec | None = None,
        horizon: int = 1,
    ) -> None:
        self.topic = topic
        self.partition = partition
        self.seq_len = sequence_length
        self.feature_names = tuple(features)
        self.limits = limits
        self.max_event_bytes = max_event_bytes
        self.max_future_skew = max_future_skew  # seconds an event may be ahead of its record
        self.capacity = sequence_length + limits.window_history  # points kept per series (W)
        self.horizon = horizon
        self.rings = SeriesRings(
            self.capacity, self.feature_names, seasonal, keep=limits.window_history
        )
        self.applied = -1  # highest input offset applied; -1 before the first
        self.max_ts = -math.inf  # the TTL clock: newest accepted ts of all series but the lead
        self._lead_row = -1  # the series with the newest accepted ts, and that ts
        self._lead_ts = -math.inf
        self._dirty: set[int] = set()  # rows changed since the last snapshot
        self._deleted: set[str] = set()  # series forgotten since the last snapshot

    # ---- reading -------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Number of series held."""
        return len(self.rings)

    def series(self) -> list[str]:
        return list(self.rings.index)

    def window(
        self, series_id: str
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """``(offsets, ts, values, features)`` of every retained point of a series, oldest first.
        Raises KeyError for an unknown series."""
        return self.rings.window(series_id)

    def encode(self, series_id: str) -> bytes:
        """The blob Redis stores for a series (:mod:`stream.rings`). KeyError when unknown."""
        return self.rings.encode(self.rings.index[series_id])

    # ---- applying records ----------------------------------------------------------------------

    def apply(
        self, records: Sequence[RecordLike], *, emit: bool = True, latest: bool = False
    ) -> ApplyResult:
        """Apply ``records`` (in offset order) and return the windows to forecast.

        ``emit=False`` (rebuilding from Kafka) collects no windows. ``latest=True`` keeps only the
        newest window of each series (coalescing). Bad events are returned in ``rejected`` with
        their reason; they and every other record advance :attr:`applied`. Never raises for a
        record: an unforeseen error is a ``schema`` rejection marked ``unexpected``.
        """
        seq_len, cap = self.seq_len, self.capacity
        names = self.feature_names
        rings = self.rings
        res_rows: list[int] = []
        res_ends: list[int] = []
        res_offs: list[int] = []
        res_tsms: list[int] = []
        res_seasonal: list[RowSeason] = []  # (past, ahead, level) per row
        # its seasonal parts left to the gather (_gather): the state to read them from (its
        # indices and level), or None
        res_source: list[SeasonSource] = []
        latest_at: dict[int, int] = {}  # row -> position in res_* (coalescing)
        first_end: dict[int, int] = {}  # row -> smallest window end pending for it
        parts: list[WindowBatch] = []
        result = ApplyResult(windows=WindowBatch.concat(self.partition, [], seq_len, names))

        def flush() -> None:
            if res_rows:
                parts.append(
                    self._gather(res_rows, res_ends, res_offs, res_tsms, res_seasonal, res_source)
                )
                for seq in (res_rows, res_ends, res_offs, res_tsms, res_seasonal, res_source):
                    seq.clear()
                latest_at.clear()
                first_end.clear()

        def request(row: int, end: int, offset: int, ts_ms: int) -> None:
            # The seasonal parts: of a window at the state's newest point, at the gather, for
            # every such window at once (from the state, or from a copy of its indices and level
            # taken when a next point of the row moves it on, below); of an older one (a
            # redelivered record), now, while the state undoes cheaply back to ``end``.
            season, source = None, None
            if rings.seasonal is not None:
                state = rings.states[row]
                if rings.n[row] == end and state is not None:
                    source = state
                else:
                    season = self._seasonal_parts(row, end)
            if latest and row in latest_at:
                i = latest_at[row]
                res_ends[i], res_offs[i], res_tsms[i] = end, offset, ts_ms
                res_seasonal[i], res_source[i] = season, source
                first_end[row] = end
            else:
                latest_at[row] = len(res_rows)
                res_rows.append(row)
                res_ends.append(end)
                res_offs.append(offset)
                res_tsms.append(ts_ms)
                res_seasonal.append(season)
                res_source.append(source)
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
                row = self._admit(ev, flush if first_end else None, first_end)
                if isinstance(row, Rejection):
                    result.rejected.append((rec, row))
                    continue
                pending = first_end.get(row)
                if pending is not None and rings.n[row] + 1 - cap > pending - seq_len:
                    flush()  # the next point would overwrite a window still waiting to be gathered
                if not latest and row in latest_at:  # its state moves on: its newest window
                    i = latest_at[row]  # (the only one that can still read the live state)
                    res_source[i] = _frozen(res_source[i])  # (coalescing replaces it instead)
                n = rings.append(row, offset, ev.ts, ev.value, ev.features)
                self._advance_clock(row, ev.ts)
                self._dirty.add(row)
                result.accepted += 1
                result.points.append((offset, ev.series_id, n, ev.value))
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

    def _admit(
        self, ev: Event, flush: Callable[[], None] | None, pending: dict[int, int]
    ) -> int | Rejection:
        """The row that takes ``ev``, or why it is refused: an idle series starts afresh, a new
        one needs room under the series cap (idle series are swept first), a known one must be
        newer than its last point (``duplicate``, ``late``). ``flush`` gathers the windows still
        pending before a row is forgotten (its points would be overwritten)."""
        rings = self.rings
        ttl = self.limits.series_ttl
        row = rings.index.get(ev.series_id)
        if row is not None and ttl and rings.last_ts[row] < self.max_ts - ttl:
            if flush is not None and row in pending:
                flush()
            self._forget(row)
            row = None
        if row is None:
            if len(rings) >= self.limits.max_series_per_partition:
                if flush is not None:
                    flush()
                self._sweep_idle()
            if len(rings) >= self.limits.max_series_per_partition:
                return Rejection("series_limit", f"partition holds {len(rings)} series, the limit")
            row = rings.allocate(ev.series_id)
            self._deleted.discard(ev.series_id)
            return row
        last = rings.last_ts[row]
        if ev.ts == last:
            return Rejection("duplicate", f"ts {ev.ts} equals the last accepted ts")
        if ev.ts < last:
            return Rejection("late", f"ts {ev.ts} is before the last accepted ts {last}")
        return row

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

    def _reemit(
        self, rec: RecordLike, request: Callable[[int, int, int, int], None], result: ApplyResult
    ) -> None:
        ev = decode_event(rec.key, rec.value, max_bytes=self.max_event_bytes, required_features=())
        if not isinstance(ev, Event):
            return  # it was rejected the first time; its dead-letter record exists already
        row = self.rings.index.get(ev.series_id)
        if row is None:
            return
        end = self.rings.end_of(row, rec.offset)
        if end is None:
            return  # not accepted the first time (late, duplicate...) or no longer retained
        if end < self.seq_len:
            return  # the series was still warming at that offset
        if end - self.seq_len < max(0, self.rings.n[row] - self.capacity):
            result.not_reemitted += 1
            return
        request(row, end, rec.offset, rec.timestamp)

    def _seasonal_parts(self, row: int, end: int) -> RowSeason:
        """The seasonal parts and level of the row's window ending at point ``end``, from its
        state as it stood then (usually now: the window of the point just appended), or None on
        the plain path (:meth:`model.seasonal.SeasonalState.parts`, the trainer's call)."""
        rings = self.rings
        state = rings.states[row]
        then = state.back(rings.n[row] - end) if state is not None else None
        if then is None:
            return None
        cols = (end - self.seq_len + np.arange(self.seq_len)) % rings.capacity
        return (*then.parts(rings.ts[row, cols], self.horizon), then.level)

    def _gather(
        self,
        rows: list[int],
        ends: list[int],
        offs: list[int],
        tsms: list[int],
        season: list[RowSeason],
        sources: list[SeasonSource],
    ) -> WindowBatch:
        rings = self.rings
        series, ts, values, feats = rings.gather(rows, ends, self.seq_len)
        seasonal = None
        if rings.seasonal is not None:
            seasonal = SeasonalParts.plain(len(rows), self.seq_len, self.horizon)
            # deferred windows: each one's state as it stood at its newest point (request())
            now, read = [], []
            for i, src in enumerate(sources):
                if src is not None and src.ready:
                    now.append(i)
                    read.append(src)
            if now:
                idx = [src.idx for src in read]
                past, ahead = parts_of_many(rings.seasonal, idx, ts[now], self.horizon)
                seasonal.ready[now] = True
                seasonal.past[now], seasonal.ahead[now] = past, ahead
                seasonal.level[now] = [src.level for src in read]
            for i, parts in enumerate(season):  # the others: computed as they were requested
                if parts is not None:
                    seasonal.ready[i] = True
                    seasonal.past[i], seasonal.ahead[i], seasonal.level[i] = parts
        return WindowBatch(
            self.partition, series, np.asarray(offs, dtype=np.int64),
            np.asarray(tsms, dtype=np.int64), ts, values, feats, seasonal,
        )  # fmt: skip

    # ---- forgetting ----------------------------------------------------------------------------

    def _forget(self, row: int) -> None:
        if row == self._lead_row:  # (idle series are forgotten, and the lead one never is idle)
            self._lead_row = -1  # its ts stays the lead ts: the clock never goes back
        self._dirty.discard(row)
        self._deleted.add(self.rings.forget(row))

    def _sweep_idle(self) -> None:
        """Forget every idle series (see :class:`~stream.settings.LimitSettings`)."""
        ttl = self.limits.series_ttl
        if not ttl:
            return
        horizon = self.max_ts - ttl
        last_ts = self.rings.last_ts
        for row in list(self.rings.index.values()):
            if last_ts[row] < horizon:
                self._forget(row)

    def sweep(self) -> int:
        """Forget idle series now (between batches, to free memory); returns how many."""
        before = len(self.rings)
        self._sweep_idle()
        return before - len(self.rings)

    # ---- persistence ---------------------------------------------------------------------------

    def snapshot(self, *, full: bool = False) -> Snapshot:
        """The changes since the last snapshot (every series with ``full``), then forget them."""
        rings = self.rings
        rows = range(rings.rows) if full else sorted(self._dirty)
        blobs = {rings.names[r]: rings.encode(r) for r in rows if rings.names[r] is not None}
        snap = Snapshot(self.applied, self.max_ts, blobs, sorted(self._deleted))  # type: ignore[arg-type]
        self._dirty.clear()
        self._deleted.clear()
        return snap

    def load_series(self, series_id: str, blob: bytes) -> None:
        """Restore one series from its blob (loading a partition from Redis). Raises ValueError
        when the blob is malformed or has another feature count."""
        row = self.rings.load(series_id, blob)
        self._deleted.discard(series_id)
        if self.rings.n[row]:
            self._advance_clock(row, self.rings.last_ts[row])
