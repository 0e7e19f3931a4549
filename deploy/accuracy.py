"""Online accuracy, one event at a time: join each forecast with the next actual of its series, per
model version — the sidecar form of what the worker does itself in batches (``stream.accuracy``).

The worker scores its forecasts in its own memory (``stream/accuracy.py``, vectorised per batch).
This module is for a process that reads the input and forecast topics instead (a sidecar, a
notebook, forecasts of another producer): it calls :meth:`OnlineAccuracy.observe_forecast` for
every forecast object — the serving version's and a shadow (challenger) version's alike, each under
its own ``model_version`` — and :meth:`OnlineAccuracy.observe_actual` for every accepted event.
The first actual of a series with a ``ts`` after a forecast's ``ts`` is that forecast's "next
actual": the pair is scored on the forecast's first step (absolute error of the mean, and
whether the value lies inside each interval), and the forecast is dropped.

Two views of the scores, both per version:

- cumulative Prometheus counters, the worker's very metrics (``stream.accuracy.AccuracyMetrics``:
  ``eventcast_online_abs_error_total``,
  ``eventcast_online_scored_total``, ``eventcast_online_interval_hits_total{level}``), so any
  PromQL window gives MAE = ``rate(abs_error) / rate(scored)`` and coverage =
  ``rate(hits) / rate(scored)`` — what the drift alert in ``deploy/prometheus/alerts.yml`` uses;
- rolling gauges over the last ``window`` scored forecasts (``eventcast_online_mae``,
  ``eventcast_online_coverage{level}``), and :meth:`OnlineAccuracy.summary` for code and tests.

Nothing here imports Kafka, Redis or the worker loop. Memory is bounded: at most ``max_pending``
unscored forecasts (the least recently updated series is dropped first) and ``window`` scores per
version. Not thread-safe: call it from one thread (the worker's event loop).
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry

# One definition of the metrics, shared with the worker (the dashboard test checks queries
# against METRIC_NAMES).
from stream.accuracy import LEVELS, METRIC_NAMES, AccuracyMetrics

__all__ = ["LEVELS", "METRIC_NAMES", "OnlineAccuracy", "Pending", "Score", "Summary"]


@dataclass(frozen=True, slots=True)
class Pending:
    """A forecast waiting for its series' next actual (step 1 only)."""

    ts: float  # newest observation the forecast saw
    mean: float
    lower: dict[str, float]
    upper: dict[str, float]


@dataclass(frozen=True, slots=True)
class Score:
    """One forecast scored against its next actual."""

    series_id: str
    version: str
    ts: float  # the actual's ts
    actual: float
    abs_error: float
    inside: dict[str, bool]  # level -> lower <= actual <= upper


@dataclass(frozen=True)
class Summary:
    """Rolling accuracy of one version over its last ``points`` scores (``nan`` when empty)."""

    version: str
    points: int
    mae: float
    coverage: dict[str, float]


class OnlineAccuracy:
    """The rolling join of forecasts with next actuals (see module docstring).

    ``registry``: where the metrics are registered (a sidecar's ``CollectorRegistry``); None
    registers them in a private registry (``self.registry``). Not in the worker's registry: the
    worker registers the same metrics itself.
    """

    def __init__(
        self,
        *,
        window: int = 1000,
        max_pending: int = 1_000_000,
        levels: Sequence[str] = LEVELS,
        registry: CollectorRegistry | None = None,
    ) -> None:
        if window < 1 or max_pending < 1:
            raise ValueError("window and max_pending must be >= 1")
        self.window = window
        self.max_pending = max_pending
        self.levels = tuple(levels)
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._pending: OrderedDict[tuple[str, str], Pending] = OrderedDict()
        self._recent: dict[str, deque[Score]] = {}
        self._versions: set[str] = set()
        m = AccuracyMetrics(r)
        self.abs_error, self.scored, self.hits = m.abs_error, m.scored, m.hits
        self.mae, self.coverage, self.pending_gauge = m.mae, m.coverage, m.pending

    # ---- feeding -------------------------------------------------------------------------------

    def observe_forecast(self, forecast: Mapping[str, Any]) -> None:
        """Remember a forecast object (CONTRACT.md "Forecasts") until its series' next actual.

        A newer forecast of the same series and version replaces an unscored older one (only the
        newest forecast is answered by the next actual); an older or equal ``ts`` one is ignored
        (a repeat under at-least-once). Raises ValueError for an object without a string
        ``series_id``/``model_version``, a numeric ``ts``, and first-step ``mean``/bounds.
        """
        try:
            sid = forecast["series_id"]
            version = forecast["model_version"]
            ts = float(forecast["ts"])
            mean = float(forecast["mean"][0])
            lower = {lvl: float(forecast["lower"][lvl][0]) for lvl in self.levels}
            upper = {lvl: float(forecast["upper"][lvl][0]) for lvl in self.levels}
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise ValueError(f"not a forecast object: {exc!r}") from exc
        if not isinstance(sid, str) or not isinstance(version, str):
            raise ValueError("series_id and model_version must be strings")
        key = (sid, version)
        old = self._pending.get(key)
        if old is not None and old.ts >= ts:
            return
        self._pending[key] = Pending(ts, mean, lower, upper)
        self._versions.add(version)
        self._pending.move_to_end(key)
        while len(self._pending) > self.max_pending:
            self._pending.popitem(last=False)
        self.pending_gauge.set(len(self._pending))

    def observe_actual(self, series_id: str, ts: float, value: float) -> list[Score]:
        """Score every pending forecast of ``series_id`` made before ``ts`` against ``value``
        (one per version) and return the scores. Non-finite values score nothing."""
        if not (math.isfinite(ts) and math.isfinite(value)):
            return []
        scores: list[Score] = []
        # Versions are few (serving + shadow), so each one's key is looked up directly instead
        # of scanning every pending forecast.
        for version in sorted(self._versions):
            key = (series_id, version)
            p = self._pending.get(key)
            if p is None or ts <= p.ts:
                continue  # no forecast, or this actual is not after it
            del self._pending[key]
            inside = {lvl: p.lower[lvl] <= value <= p.upper[lvl] for lvl in self.levels}
            score = Score(series_id, version, ts, value, abs(value - p.mean), inside)
            self._record(score)
            scores.append(score)
        self.pending_gauge.set(len(self._pending))
        return scores

    def _record(self, score: Score) -> None:
        v = score.version
        self.abs_error.labels(v).inc(score.abs_error)
        self.scored.labels(v).inc()
        for lvl, ok in score.inside.items():
            if ok:
                self.hits.labels(v, lvl).inc()
        ring = self._recent.setdefault(v, deque(maxlen=self.window))
        ring.append(score)
        s = self.summary(v)
        self.mae.labels(v).set(s.mae)
        for lvl, c in s.coverage.items():
            self.coverage.labels(v, lvl).set(c)

    # ---- reading -------------------------------------------------------------------------------

    def summary(self, version: str) -> Summary:
        """Rolling MAE and coverage of ``version`` over its last ``window`` scores."""
        ring = self._recent.get(version, ())
        n = len(ring)
        if n == 0:
            return Summary(version, 0, math.nan, {lvl: math.nan for lvl in self.levels})
        mae = math.fsum(s.abs_error for s in ring) / n
        cov = {lvl: sum(s.inside[lvl] for s in ring) / n for lvl in self.levels}
        return Summary(version, n, mae, cov)

    def versions(self) -> list[str]:
        """Versions with at least one score, sorted."""
        return sorted(self._recent)

    @property
    def pending(self) -> int:
        return len(self._pending)
