"""The latency budget of the native engine's batcher (``--latency-budget-ms``): pure logic, no
I/O, every time passed in, so the tests drive it with synthetic timings.

- :class:`CostModel` learns, online, what a batch costs: ``fixed + per_row × rows`` seconds of
  service (prepare + infer + complete, measured by :mod:`stream.pipeline`).
- :class:`LatencyBudget` turns that into the next batch's plan: the most records to take and how
  long to wait for them (:class:`Plan`), so that a record's expected time from fetch to publish
  stays within the budget; under backlog it grows batches towards ``max_batch`` again.

How it combines with the other batching flags: ``--max-batch`` is a hard cap (the budget only
ever lowers the limit below it), ``--max-delay-ms`` caps the fill wait (the budget only ever
shortens it), and while the pipeline is idle the batch takes what the first fetch returns, as
without a budget. With the budget off (0) every batch is planned as before: ``max_batch`` records
or ``max_delay`` after the first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    """The next batch: at most ``limit`` records, waiting at most ``wait`` seconds after the first
    fetch for more (when the pipeline is busy; an idle pipeline never waits)."""

    limit: int
    wait: float


@dataclass(eq=False)
class Ticket:
    """One batch between fetch and completion: its records, when it was fetched (monotonic
    seconds) and the service time its stages have measured so far."""

    rows: int
    fetched_at: float
    service: float = 0.0


class CostModel:
    """Online estimate of a batch's service time ``fixed + per_row × rows`` (seconds).

    **Estimator: exponentially weighted least squares** of the measured time against the rows,
    kept as five decayed sums (weight, rows, time, rows², rows × time; each multiplied by
    ``decay`` before a batch is added, so a batch ``k`` batches ago weighs ``decay**k``: 0.95
    remembers about the last 20 batches). Why this and not two separate EWMAs: the split between
    the fixed and the per-row cost is only visible in how the time varies *with* the rows, which
    is what the fitted slope measures; an EWMA of time per row would call a fixed cost per-row
    cost and misjudge every other batch size. Why weighted: costs drift (another process takes a
    core, a model version changes), and the estimate should follow within a few dozen batches.

    **Robust to noise.** A batch that met a garbage collection, a Redis retry or a partition load
    can take ten times its usual time. Each measurement is clipped to within ``clip`` scales of
    the current prediction before it is added (a Huber-style clip); the scale is an EWMA of the
    clipped absolute residuals, and at least ``floor`` of the prediction (perfectly regular
    batches must not shrink it to nothing). So a one-off outlier moves the fit by at most ``clip``
    scales, while a lasting change widens the scale (by up to 20 % a batch) until the fit follows
    it. The first ``skip`` measurements are ignored: they carry one-off start-up costs (partitions
    loaded from Redis, the producer's first connection).

    **When the rows do not vary** (every batch full, or every batch one record) the slope is not
    identified; a small ridge (a pseudo-variance of ``(ridge × mean rows)²``) pulls it towards
    "all of it per row" (no fixed cost), which predicts the batches seen exactly and errs towards
    smaller batches below them; the next batches of another size correct it. Both costs are kept
    non-negative.
    """

    def __init__(
        self,
        *,
        decay: float = 0.95,
        clip: float = 3.0,
        floor: float = 0.01,
        skip: int = 2,
        ridge: float = 0.05,
    ) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.clip = clip
        self.skip = skip
        self.ridge = ridge
        self.floor = floor
        self.seen = 0  # measurements offered, skipped ones included
        self.used = 0  # measurements fitted
        self._w = self._n = self._y = self._nn = self._ny = 0.0
        self._scale = 0.0  # EWMA of the clipped absolute residuals (seconds)
        self.fixed = 0.0  # seconds per batch
        self.per_row = 0.0  # seconds per record

    @property
    def ready(self) -> bool:
        """At least one measurement fitted: :meth:`predict` means something."""
        return self.used > 0

    def predict(self, rows: float) -> float:
        """Expected service seconds of a batch of ``rows`` records."""
        return self.fixed + self.per_row * rows

    def observe(self, rows: int, seconds: float) -> None:
        """Add one batch: ``rows`` records took ``seconds`` of service."""
        self.seen += 1
        if self.seen <= self.skip or rows <= 0 or not math.isfinite(seconds) or seconds < 0:
            return
        if self.used == 0:
            self._scale = seconds / 2.0  # no residual yet: up to 1.5× this one passes unclipped
        else:
            pred = self.predict(rows)
            bound = self.clip * max(self._scale, self.floor * pred)
            y = min(max(seconds, pred - bound), pred + bound)
            self._scale = 0.9 * self._scale + 0.1 * abs(y - pred)
            seconds = y
        d = self.decay
        self._w = d * self._w + 1.0
        self._n = d * self._n + rows
        self._y = d * self._y + seconds
        self._nn = d * self._nn + rows * rows
        self._ny = d * self._ny + rows * seconds
        self.used += 1
        self._fit()

    def _fit(self) -> None:
        mean_n = self._n / self._w
        mean_y = self._y / self._w
        var = max(0.0, self._nn / self._w - mean_n * mean_n)
        cov = self._ny / self._w - mean_n * mean_y
        ratio = mean_y / mean_n  # the slope with no fixed cost
        prior = (self.ridge * mean_n) ** 2
        slope = (cov + prior * ratio) / (var + prior)
        fixed = mean_y - slope * mean_n
        if fixed < 0.0:  # through the mean point, with both costs >= 0
            fixed, slope = 0.0, ratio
        elif slope < 0.0:
            fixed, slope = mean_y, 0.0
        self.fixed, self.per_row = fixed, slope


class LatencyBudget:
    """Sizes each batch so that its records' expected time from fetch to publish stays within
    ``budget`` seconds (None: off, every batch planned as ``max_batch`` / ``max_delay``).

    **The limit.** The pipeline is modelled as one server that serves batches in fetch order,
    each taking ``fixed + per_row × rows`` (:class:`CostModel`). A batch fetched now waits for
    the work still ahead of it (:meth:`ahead`: the predicted service of the batches in flight,
    less what was served since the oldest of them started), so its records are published after
    about ``max(wait, ahead) + fixed + per_row × rows``. The limit is the largest ``rows`` with
    ``ahead + fixed + per_row × rows <= budget``, within ``[1, max_batch]``; the fill wait is
    what the budget leaves, ``budget - fixed - per_row × limit`` (the time spent waiting for the
    batch ahead is free), within ``[0, max_delay]``. The stages overlap in truth (the next batch
    is prepared while this one is inferred), so the model errs towards smaller batches: lower
    latency, and the backlog rule below takes over when that costs too much throughput. When not
    even one record fits (the work ahead or the fixed cost exceed the budget) the limit is one
    record: the quickest way back under the budget when the work ahead is the cause; when the
    fixed cost is, the budget cannot be met and the backlog rule sizes batches by the load.

    **What is measured** (:meth:`finish`): each batch's own time in the pipeline's three stages
    (prepare: load, decode and apply; infer; complete: encode, publish, persist, commit), not its
    waits in the queues between them. Those waits depend on the batches ahead, which
    :meth:`ahead` counts separately; charging them to the batch would blur the per-row cost with
    its predecessors' sizes. Persist and commit come after the publish, so the measurement is a
    few milliseconds longer than fetch to publish (errs towards smaller batches again), but they
    hold the last stage, and so the next batch, just the same.

    **Before measurements** (the first few batches after start-up) the plan is ``max_batch`` /
    ``max_delay``, today's behaviour without a budget: start-up usually meets a backlog (records
    produced while the worker was down), where throughput matters, and the first batches' times
    are not representative anyway (:class:`CostModel` skips them).

    **Backlog.** A fetch gives evidence of backlog when its first read already returned a full
    batch (records were waiting: the batches the budget allows do not keep up with the arrival
    rate, and the lag grows), or when its oldest record had waited longer than the budget before
    the fetch (the budget is already lost for it; by the record's Kafka timestamp, as the
    event-to-forecast latency metric). After ``patience`` such fetches in a row the limit is
    doubled (up to ``max_batch``), and again at each further one: throughput first, since
    larger batches spread the fixed cost over more records and drain the backlog sooner. Each
    fetch without evidence halves the boost again, back to the budget's own limit. ``--emit
    latest`` needs nothing here: its coalescing makes large batches cheaper per record, which the
    cost model measures (the rows are the records fetched, not the forecasts made).
    """

    def __init__(
        self,
        budget: float | None,
        max_batch: int,
        max_delay: float,
        *,
        model: CostModel | None = None,
        patience: int = 2,
    ) -> None:
        self.budget = budget if budget else None
        self.max_batch = max_batch
        self.max_delay = max_delay
        self.model = model or CostModel()
        self.patience = patience
        self.boost = 1.0  # the backlog rule's factor on the budget's limit
        self.streak = 0  # fetches in a row with evidence of backlog
        self._budget_limit = max_batch  # the last plan's limit before the boost
        self._in_flight: list[Ticket] = []
        self._last_end = -math.inf

    @property
    def enabled(self) -> bool:
        return self.budget is not None

    # ---- planning ------------------------------------------------------------------------------

    def ahead(self, now: float) -> float:
        """Seconds of predicted service still ahead of a batch fetched at ``now``."""
        if not self._in_flight:
            return 0.0
        started = max(self._in_flight[0].fetched_at, self._last_end)
        work = sum(self.model.predict(t.rows) for t in self._in_flight)
        return max(0.0, work - (now - started))

    def plan(self, now: float) -> Plan:
        """The next batch's limit and fill wait (see the class docstring)."""
        if self.budget is None or not self.model.ready:
            return Plan(self.max_batch, self.max_delay)
        m, budget = self.model, self.budget
        room = budget - self.ahead(now) - m.fixed
        if m.per_row <= 0.0:
            limit = self.max_batch
        else:
            limit = int(min(max(room / m.per_row, 1.0), float(self.max_batch)))
        self._budget_limit = limit
        limit = min(self.max_batch, max(limit, int(limit * self.boost)))
        wait = min(max(budget - m.predict(limit), 0.0), self.max_delay)
        return Plan(limit, wait)

    def fetched(self, *, full: bool, age: float | None) -> None:
        """What a fetch saw: ``full``, its first read alone returned the plan's whole limit;
        ``age``, the seconds its oldest record had waited before the fetch (None: unknown)."""
        if self.budget is None:
            return
        late = age is not None and age > self.budget
        if full or late:
            self.streak += 1
            if self.streak >= self.patience:
                cap = self.max_batch / max(1, self._budget_limit)
                self.boost = min(self.boost * 2.0, max(cap, 1.0))
        else:
            self.streak = 0
            self.boost = max(1.0, self.boost / 2.0)

    # ---- the batches in flight -----------------------------------------------------------------

    def begin(self, rows: int, now: float) -> Ticket:
        """A batch of ``rows`` records was fetched at ``now`` and enters the pipeline."""
        ticket = Ticket(rows, now)
        self._in_flight.append(ticket)
        return ticket

    def finish(self, ticket: Ticket, now: float) -> None:
        """The batch was published (completed) at ``now``: its service time is a measurement."""
        self.forget(ticket)
        self._last_end = now
        self.model.observe(ticket.rows, ticket.service)

    def forget(self, ticket: Ticket) -> None:
        """The batch left the pipeline without a measurement (nothing of it was assigned)."""
        if ticket in self._in_flight:
            self._in_flight.remove(ticket)
