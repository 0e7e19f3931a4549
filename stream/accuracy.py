"""Online accuracy: every forecast joined with the next accepted actual of its series, scored per
model version, in the worker's memory.

Why the worker can do it alone: a series lives on one input partition, and the window the worker
gathers for an event holds that event's series up to and including it. So a forecast made at
``ts_f`` (the newest point of its window) is answered by the first point after ``ts_f`` in the
window of the *next* row of the same series — the next row of the batch, or the first row of a
later batch. Only the newest forecast of each series (and lane) waits between batches.

Per batch and partition (:meth:`AccuracyLane.observe`), all vectorised (numpy), with one dict
lookup per row to map series ids to slots (done in C through ``map``):

1. rows whose newest ``ts`` is not after what the lane has already seen of their series are
   repeats (Kafka redeliveries re-forecast from older windows) and are ignored;
2. rows are grouped by series (stable argsort); each group's first row answers the lane's pending
   forecast of the series, every later row answers the row before it; the last row's forecast is
   the new pending one;
3. the answer is the first point with ``ts > ts_f`` in the answering window: the forecast's first
   step is scored (``|actual - mean|``, and whether the actual lies in the 80 % and 95 %
   intervals). When that point is no longer in the window (the series was forgotten and came back,
   or ``--emit latest`` skipped more than a window of points) the forecast *expires* unscored.

Two views of the scores, both labelled by model version only (and the interval ``level``; never a
series id), in the worker's registry (:class:`AccuracyMetrics`):

- cumulative counters (``eventcast_online_abs_error_total``, ``eventcast_online_scored_total``,
  ``eventcast_online_interval_hits_total{level}``, ``eventcast_online_expired_total``): any
  PromQL window gives MAE = ``rate(abs_error) / rate(scored)`` and coverage =
  ``rate(hits) / rate(scored)`` — what the drift alert in ``deploy/prometheus/alerts.yml`` uses;
- rolling gauges over each version's last ``window`` scores (``eventcast_online_mae``,
  ``eventcast_online_coverage{level}``), and :meth:`Scoreboard.summary` for code and tests.

A *lane* is one stream of forecasts: the serving model's (whatever version serves: the version is
stored with each pending forecast, so a hot reload scores the old version's last forecasts under
the old name) and a shadow model's (:mod:`stream.shadow`). Lanes share the scoreboard.

Memory is bounded: per lane and partition one pending forecast per series, at most
``max_series`` series (the least recently seen are evicted, counted as expired); a partition's
state is dropped when it is revoked or reset. Not thread-safe: the worker calls it from its event
loop only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any, Protocol

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge

from model.predictor import Forecast

LEVELS: tuple[str, ...] = ("80", "95")

# Every metric name exported here (the dashboard test checks queries against them).
METRIC_NAMES: tuple[str, ...] = (
    "eventcast_online_abs_error_total",
    "eventcast_online_scored_total",
    "eventcast_online_interval_hits_total",
    "eventcast_online_expired_total",
    "eventcast_online_mae",
    "eventcast_online_coverage",
    "eventcast_online_pending",
)

# Columns of the first-step forecast arrays kept per pending forecast.
_MEAN, _LO80, _UP80, _LO95, _UP95 = range(5)


class AccuracyMetrics:
    """The online-accuracy collectors, registered in ``registry`` (the worker's)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.abs_error = Counter(
            "eventcast_online_abs_error", "Sum of |actual - forecast mean| (step 1), by version",
            ["version"], registry=r,
        )  # fmt: skip
        self.scored = Counter(
            "eventcast_online_scored", "Forecasts joined with their next actual, by version",
            ["version"], registry=r,
        )  # fmt: skip
        self.hits = Counter(
            "eventcast_online_interval_hits",
            "Next actuals inside the forecast interval, by version and level",
            ["version", "level"], registry=r,
        )  # fmt: skip
        self.expired = Counter(
            "eventcast_online_expired",
            "Forecasts dropped unscored (next actual no longer in the window, or evicted), "
            "by version",
            ["version"], registry=r,
        )  # fmt: skip
        self.mae = Gauge(
            "eventcast_online_mae", "MAE over the last scored forecasts, by version",
            ["version"], registry=r,
        )  # fmt: skip
        self.coverage = Gauge(
            "eventcast_online_coverage",
            "Interval coverage over the last scored forecasts, by version and level",
            ["version", "level"], registry=r,
        )  # fmt: skip
        self.pending = Gauge(
            "eventcast_online_pending", "Forecasts waiting for their next actual", registry=r
        )


@dataclass(frozen=True)
class Summary:
    """Rolling accuracy of one version over its last ``points`` scores (``nan`` when empty)."""

    version: str
    points: int
    mae: float
    coverage: dict[str, float]


class _Ring:
    """The last ``size`` scores of one version: abs error and the two interval hits."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.err = np.zeros(size)
        self.hit = np.zeros((size, 2), dtype=bool)
        self.n = 0  # scores ever appended

    def extend(self, err: np.ndarray, hit: np.ndarray) -> None:
        k = len(err)
        if k >= self.size:
            err, hit = err[-self.size :], hit[-self.size :]
            start = (self.n + k - self.size) % self.size
            idx = (start + np.arange(self.size)) % self.size
        else:
            idx = (self.n + np.arange(k)) % self.size
        self.err[idx] = err
        self.hit[idx] = hit
        self.n += k

    def summary(self, version: str) -> Summary:
        m = min(self.n, self.size)
        if m == 0:
            return Summary(version, 0, math.nan, {lvl: math.nan for lvl in LEVELS})
        mae = float(self.err[:m].sum()) / m
        cov = np.count_nonzero(self.hit[:m], axis=0) / m
        return Summary(version, m, mae, {LEVELS[0]: float(cov[0]), LEVELS[1]: float(cov[1])})


class Scoreboard:
    """Scores of every version: the Prometheus counters and gauges, and rolling rings."""

    def __init__(self, metrics: AccuracyMetrics, *, window: int = 1000) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        self.metrics = metrics
        self.window = window
        self._rings: dict[str, _Ring] = {}
        self._children: dict[str, tuple[Any, ...]] = {}  # version -> its labelled metrics

    def _labelled(self, version: str) -> tuple[Any, ...]:
        c = self._children.get(version)
        if c is None:
            m = self.metrics
            c = self._children[version] = (
                m.abs_error.labels(version), m.scored.labels(version),
                [m.hits.labels(version, lvl) for lvl in LEVELS], m.mae.labels(version),
                [m.coverage.labels(version, lvl) for lvl in LEVELS],
            )  # fmt: skip
        return c

    def record(self, version: str, err: np.ndarray, hit: np.ndarray) -> None:
        """Add ``k`` scores of ``version``: ``err`` (k,) absolute errors, ``hit`` (k, 2) whether
        the actual was inside the 80 % and 95 % intervals."""
        if len(err) == 0:
            return
        abs_error, scored, hits, mae, coverage = self._labelled(version)
        abs_error.inc(float(err.sum()))
        scored.inc(len(err))
        counts = np.count_nonzero(hit, axis=0).tolist()
        for child, c in zip(hits, counts, strict=True):
            child.inc(c)
        ring = self._rings.get(version)
        if ring is None:
            ring = self._rings[version] = _Ring(self.window)
        ring.extend(err, hit)
        s = ring.summary(version)
        mae.set(s.mae)
        for child, lvl in zip(coverage, LEVELS, strict=True):
            child.set(s.coverage[lvl])

    def expire(self, version: str, n: int) -> None:
        if n:
            self.metrics.expired.labels(version).inc(n)

    def summary(self, version: str) -> Summary:
        """Rolling MAE and coverage of ``version`` over its last ``window`` scores."""
        ring = self._rings.get(version)
        if ring is None:
            return Summary(version, 0, math.nan, {lvl: math.nan for lvl in LEVELS})
        return ring.summary(version)

    def versions(self) -> list[str]:
        """Versions with at least one score, sorted."""
        return sorted(self._rings)


class WindowsLike(Protocol):
    """What is read of a :class:`stream.windows.WindowBatch`."""

    series: list[str]
    ts: np.ndarray  # (R, T) float64, oldest first
    values: np.ndarray  # (R, T) float64


def first_step(fc: Forecast) -> np.ndarray:
    """``(R, 5)`` float64: mean, lower/upper 80 %, lower/upper 95 % of each row's first step."""
    return np.stack(
        [fc.mean[:, 0], fc.lower["80"][:, 0], fc.upper["80"][:, 0],
         fc.lower["95"][:, 0], fc.upper["95"][:, 0]],
        axis=1,
    ).astype(np.float64)  # fmt: skip


# Called with the version codes of pending forecasts evicted unscored.
_Evict = Callable[[np.ndarray], None]


class _PartitionState:
    """Pending forecasts of one lane and partition, one slot per series."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.index: dict[str, int] = {}
        self.names: list[str | None] = []
        self.free: list[int] = []
        self.ts = np.zeros(0)  # (S,) ts of the pending forecast; nan: none
        self.seen = np.zeros(0)  # (S,) newest row ts seen; -inf: none
        self.ver = np.zeros(0, np.int32)  # (S,) version code of the pending forecast
        self.fc = np.zeros((0, 5))  # (S, 5) its first step (see first_step)
        self.pending = 0

    def slots(self, series: Sequence[str]) -> np.ndarray:
        """Each series' slot, allocated for new series (:meth:`trim` bounds them later)."""
        n = len(series)
        slots = np.fromiter(map(self.index.get, series, repeat(-1)), np.int64, n)
        if slots.min() < 0:
            for sid in dict.fromkeys(series[i] for i in np.flatnonzero(slots < 0).tolist()):
                self._allocate(sid)
            slots = np.fromiter(map(self.index.__getitem__, series), np.int64, n)
        return slots

    def _allocate(self, sid: str) -> None:
        if self.free:
            slot = self.free.pop()
            self.names[slot] = sid
        else:
            slot = len(self.names)
            self.names.append(sid)
            if slot >= len(self.ts):
                self._grow(max(64, 2 * len(self.ts)))
        self.ts[slot] = np.nan
        self.seen[slot] = -np.inf
        self.index[sid] = slot

    def _grow(self, n: int) -> None:
        def grown(a: np.ndarray, fill: float) -> np.ndarray:
            out = np.full((n, *a.shape[1:]), fill, a.dtype)
            out[: len(a)] = a
            return out

        self.ts, self.seen = grown(self.ts, np.nan), grown(self.seen, -np.inf)
        self.ver, self.fc = grown(self.ver, 0), grown(self.fc, np.nan)

    def trim(self, on_evict: _Evict) -> None:
        """Forget the least recently seen series beyond ``capacity`` (rare: a partition holding
        more series than the worker's series limit, e.g. many forgotten by the idle TTL)."""
        k = len(self.index) - self.capacity
        if k <= 0:
            return
        used = np.fromiter(self.index.values(), np.int64, len(self.index))
        victims = used[np.argpartition(self.seen[used], k - 1)[:k]]
        had = victims[~np.isnan(self.ts[victims])]
        on_evict(self.ver[had])
        self.pending -= len(had)
        for slot in victims.tolist():
            del self.index[self.names[slot]]  # type: ignore[arg-type]
            self.names[slot] = None
            self.free.append(slot)
            self.ts[slot] = np.nan


class AccuracyLane:
    """The join of one stream of forecasts (serving, or a shadow version) with the actuals.

    ``max_series``: pending series kept per partition (the worker passes its series limit).
    """

    def __init__(self, board: Scoreboard, *, max_series: int = 100_000) -> None:
        self.board = board
        self.max_series = max_series
        self._states: dict[int, _PartitionState] = {}
        self._versions: list[str] = []
        self._codes: dict[str, int] = {}

    def _code(self, version: str) -> int:
        code = self._codes.get(version)
        if code is None:
            code = self._codes[version] = len(self._versions)
            self._versions.append(version)
        return code

    @property
    def pending(self) -> int:
        """Forecasts waiting for their next actual, over every partition."""
        return sum(st.pending for st in self._states.values())

    def drop(self, partition: int) -> None:
        """Forget a partition's pending forecasts (revoked or reset): nothing is scored for them."""
        self._states.pop(partition, None)

    def observe_batch(
        self,
        parts: Iterable[tuple[int, WindowsLike]],
        fc: Forecast,
        version: str,
        keep: Callable[[int], bool] | None = None,
    ) -> None:
        """:meth:`observe` for consecutive row ranges of one model call: ``parts`` are the
        partitions' windows in the order their rows were concatenated for ``fc``; partitions
        for which ``keep`` is false are skipped. The scores are recorded once for the batch."""
        steps = first_step(fc)
        row = 0
        matched = []
        for partition, windows in parts:
            k = len(windows.series)
            if keep is None or keep(partition):
                m = self._join(partition, windows, steps[row : row + k], version)
                if m is not None:
                    matched.append(m)
            row += k
        if matched:
            self._score(*(np.concatenate(a) for a in zip(*matched, strict=True)))

    def observe(
        self, partition: int, windows: WindowsLike, steps: np.ndarray | None, version: str
    ) -> None:
        """Score the lane's forecasts answered by ``windows`` (rows of one partition, in input
        order) and keep the newest forecast of each series. ``steps``: ``(R, 5)`` first steps of
        this lane's forecasts of these rows (:func:`first_step`), or None when the lane made none
        for them (its pending forecasts are still answered)."""
        m = self._join(partition, windows, steps, version)
        if m is not None:
            self._score(*m)

    def _join(
        self, partition: int, windows: WindowsLike, steps: np.ndarray | None, version: str
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """Pair forecasts with their answers; returns ``(actual (n,), first steps (n, 5),
        version codes (n,), answered (n,) bool)`` (not answered: expired), or None."""
        series = windows.series
        if not series:
            return None
        st = self._states.get(partition)
        if st is None:
            st = self._states[partition] = _PartitionState(self.max_series)
        slots = st.slots(series)
        ts, values = windows.ts, windows.values  # (R, T)
        t_new = ts[:, -1]  # (R,)
        fresh = t_new > st.seen[slots]
        rows = np.flatnonzero(fresh) if not fresh.all() else np.arange(len(series))
        if len(rows) == 0:
            return None
        rslots = slots[rows]
        order = np.argsort(rslots, kind="stable")  # rows of one series together, input order kept
        grouped = rows[order]  # (n,) row indices
        gslots = rslots[order]
        n = len(grouped)
        first = np.empty(n, bool)
        first[0] = True
        np.not_equal(gslots[1:], gslots[:-1], out=first[1:])
        last = np.empty(n, bool)
        last[-1] = True
        last[:-1] = first[1:]

        # (a) the pending forecast of each series, answered by the series' first row
        a_rows, a_slots = grouped[first], gslots[first]
        had = ~np.isnan(st.ts[a_slots])
        a_rows, a_slots = a_rows[had], a_slots[had]
        f_ts, f_fc, f_ver = [st.ts[a_slots]], [st.fc[a_slots]], [st.ver[a_slots]]
        answer = [a_rows]
        st.ts[a_slots] = np.nan
        st.pending -= len(a_slots)
        # (b) each later row of a series answers the row before it
        if steps is not None:
            code = self._code(version)
            later = np.flatnonzero(~first)
            src = grouped[later - 1]
            answer.append(grouped[later])
            f_ts.append(t_new[src])
            f_fc.append(steps[src])
            f_ver.append(np.full(len(src), code, np.int32))
            keep_rows, keep_slots = grouped[last], gslots[last]
            st.pending += int(np.isnan(st.ts[keep_slots]).sum())
            st.ts[keep_slots] = t_new[keep_rows]
            st.fc[keep_slots] = steps[keep_rows]
            st.ver[keep_slots] = code
        st.seen[gslots[last]] = t_new[grouped[last]]
        st.trim(self._expire_codes)

        rows = np.concatenate(answer)
        fts = np.concatenate(f_ts)
        # The answer is the first point after the forecast's ts. Usually (every event forecast)
        # that is the answering window's newest point; search the window only otherwise.
        actual = values[rows, -1]
        ok = np.ones(len(rows), bool)
        other = np.flatnonzero(ts[rows, -2] != fts)
        if len(other):
            r, ft = rows[other], fts[other]
            w = ts[r]  # (m, T)
            k = (w > ft[:, None]).argmax(axis=1)  # first point after the forecast's ts
            actual[other] = values[r, k]
            ok[other] = w[:, 0] <= ft  # else that point has left the window: expired
        return actual, np.concatenate(f_fc), np.concatenate(f_ver), ok

    def _score(
        self, actual: np.ndarray, f_fc: np.ndarray, f_ver: np.ndarray, ok: np.ndarray
    ) -> None:
        if len(actual) == 0:
            return
        err = np.abs(actual - f_fc[:, _MEAN])
        hit = np.stack(
            [(f_fc[:, _LO80] <= actual) & (actual <= f_fc[:, _UP80]),
             (f_fc[:, _LO95] <= actual) & (actual <= f_fc[:, _UP95])],
            axis=1,
        )  # fmt: skip
        codes = [int(f_ver[0])] if (f_ver == f_ver[0]).all() else np.unique(f_ver).tolist()
        for code in codes:
            version = self._versions[code]
            sel = ok if len(codes) == 1 else ok & (f_ver == code)
            self.board.record(version, err[sel], hit[sel])
            expired = ~ok if len(codes) == 1 else ~ok & (f_ver == code)
            self.board.expire(version, int(np.count_nonzero(expired)))

    def _expire_codes(self, codes: np.ndarray) -> None:
        for code, n in zip(*np.unique(codes, return_counts=True), strict=True):
            self.board.expire(self._versions[int(code)], int(n))


class OnlineAccuracy:
    """The worker's online accuracy: a scoreboard in ``registry``'s metrics and one lane per
    stream of forecasts (:attr:`serving`, and :meth:`lane` for a shadow)."""

    def __init__(
        self, metrics: AccuracyMetrics, *, window: int = 1000, max_series: int = 100_000
    ) -> None:
        self.board = Scoreboard(metrics, window=window)
        self.max_series = max_series
        self._lanes: dict[str, AccuracyLane] = {}
        self.serving = self.lane("serving")

    def lane(self, name: str) -> AccuracyLane:
        lane = self._lanes.get(name)
        if lane is None:
            lane = self._lanes[name] = AccuracyLane(self.board, max_series=self.max_series)
        return lane

    def drop(self, partition: int) -> None:
        """Forget a partition in every lane (revoked or reset)."""
        for lane in self._lanes.values():
            lane.drop(partition)
        self.update_pending()

    def update_pending(self) -> None:
        self.board.metrics.pending.set(sum(lane.pending for lane in self._lanes.values()))

    def summary(self, version: str) -> Summary:
        return self.board.summary(version)
