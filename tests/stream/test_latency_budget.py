"""The batcher's latency budget (``--latency-budget-ms``, stream/budget.py).

Pure logic driven by synthetic timings (no wall clock in any assertion): the chosen batch limit
falls when the per-row cost rises, grows again towards ``max_batch`` under backlog, stays within
``[1, max_batch]`` with a fill wait within ``[0, max_delay]``; the cost estimator converges to a
known fixed and per-row cost from noisy measurements with outliers. Then the wiring: the batcher
fetches at the planned limit and reports its backlog evidence, the pipeline feeds each batch's
measured service time to the budget, and a worker started with a budget against the real broker
publishes every forecast exactly as without it and exports ``eventcast_batch_limit``.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import orjson
import pytest
from aiokafka import TopicPartition
from hypothesis import given, settings
from hypothesis import strategies as st

from stream.budget import CostModel, LatencyBudget, Plan
from stream.consumer import Batcher, oldest_age
from stream.health import Watchdog
from stream.metrics import Metrics
from stream.pipeline import InflightSlots, Pipeline, RebalanceGate
from stream.settings import BatchSettings
from tests.helpers.kafka import consume_all, produce
from tests.stream.conftest import (
    Truth,
    forecasts_by_source,
    make_events,
    metric_value,
    published_total,
    wait_for,
    worker_argv,
)
from tests.stream.test_faults import check_calibration, check_windows
from tests.stream.test_worker import check_against_offline

MS = 1e-3
US = 1e-6


def known_model(fixed: float, per_row: float) -> CostModel:
    """A cost model that has already learnt ``fixed + per_row × rows``."""
    model = CostModel()
    model.fixed, model.per_row, model.used = fixed, per_row, 1
    return model


def serve(
    budget: LatencyBudget,
    batches: int,
    cost: Callable[[int], float],
    rng: np.random.Generator,
    now: float = 0.0,
) -> float:
    """``batches`` batches through one server, each fetched as planned with between half and all
    of the limit (the records on hand vary) and served for ``cost(rows)`` simulated seconds;
    no backlog. Returns the simulated clock."""
    for _ in range(batches):
        plan = budget.plan(now)
        rows = int(rng.integers(max(1, plan.limit // 2), plan.limit + 1))
        budget.fetched(full=False, age=0.0)
        ticket = budget.begin(rows, now)
        ticket.service = cost(rows)
        now += ticket.service
        budget.finish(ticket, now)
    return now


def budget_limit(budget: LatencyBudget, now: float) -> int:
    """The limit the budget's cost estimate alone allows (no backlog boost)."""
    boost, budget.boost = budget.boost, 1.0
    try:
        return budget.plan(now).limit
    finally:
        budget.boost = boost


# ---- (a) the limit falls when the per-row cost rises --------------------------------------------


def test_the_limit_falls_as_the_per_row_cost_rises() -> None:
    rng = np.random.default_rng(1)
    budget = LatencyBudget(100 * MS, max_batch=8192, max_delay=20 * MS)
    now, limits = 0.0, []
    for per_row in (10 * US, 20 * US, 50 * US, 100 * US, 200 * US, 500 * US):
        now = serve(budget, 150, lambda n, b=per_row: 10 * MS + b * n, rng, now)
        limits.append(budget.plan(now).limit)
    assert limits == sorted(limits, reverse=True) and len(set(limits)) == len(limits), limits
    # the largest batch within the budget: (100 ms - 10 ms) / per-row cost, capped at max_batch
    want = [
        min(8192, 90 * MS / b) for b in (10 * US, 20 * US, 50 * US, 100 * US, 200 * US, 500 * US)
    ]
    np.testing.assert_allclose(limits, want, rtol=0.1)


def test_a_fixed_cost_that_rises_leaves_less_room_for_rows() -> None:
    rng = np.random.default_rng(2)
    budget = LatencyBudget(100 * MS, max_batch=8192, max_delay=20 * MS)
    now = serve(budget, 150, lambda n: 10 * MS + 50 * US * n, rng)
    before = budget.plan(now).limit
    now = serve(budget, 150, lambda n: 60 * MS + 50 * US * n, rng, now)
    after = budget.plan(now).limit
    assert after < before
    assert after == pytest.approx(40 * MS / (50 * US), rel=0.1)  # 800 rows


def test_the_batches_ahead_in_flight_shrink_the_limit() -> None:
    budget = LatencyBudget(
        100 * MS, max_batch=8192, max_delay=20 * MS, model=known_model(10 * MS, 50 * US)
    )
    alone = budget.plan(0.0)
    assert alone.limit == 1800  # (100 - 10) ms / 50 µs
    budget.begin(400, 0.0)  # 30 ms of work ahead, none of it done yet
    behind = budget.plan(0.0)
    assert behind.limit == 1200  # (100 - 30 - 10) ms / 50 µs
    assert 0.0 < behind.wait <= 30 * MS  # waiting while the batch ahead is served costs nothing
    assert budget.plan(0.020).limit == 1600  # 20 ms later, 10 ms of it left


# ---- (b) it grows again towards max_batch under backlog ----------------------------------------


def test_under_backlog_the_limit_grows_to_max_batch_and_falls_back_after() -> None:
    rng = np.random.default_rng(3)
    budget = LatencyBudget(100 * MS, max_batch=8192, max_delay=20 * MS)
    now = serve(budget, 200, lambda n: 10 * MS + 200 * US * n, rng)
    own = budget.plan(now).limit
    assert own == pytest.approx(450, rel=0.1)

    limits = []
    for _ in range(12):  # every fetch's first read comes back full: records are waiting
        plan = budget.plan(now)
        limits.append(plan.limit)
        budget.fetched(full=True, age=None)
    limits.append(budget.plan(now).limit)
    assert limits == sorted(limits) and limits[0] == own and limits[-1] == 8192, limits
    # patience: one full batch is not yet a backlog; then the limit doubles at each
    assert limits[1] == own and limits[2] == 2 * own and limits[3] == 4 * own

    for _ in range(12):  # the backlog is gone: back to the budget's own limit
        budget.fetched(full=False, age=0.0)
    assert budget.plan(now).limit == own


def test_a_budget_already_lost_before_the_fetch_counts_as_backlog() -> None:
    budget = LatencyBudget(
        100 * MS, max_batch=4096, max_delay=20 * MS, model=known_model(10 * MS, 100 * US)
    )
    assert budget.plan(0.0).limit == 900
    for _ in range(2):  # not full, but the oldest record had waited 0.5 s before the fetch
        budget.fetched(full=False, age=0.5)
    assert budget.plan(0.0).limit == 1800
    budget.fetched(full=False, age=0.05)  # within the budget: no evidence
    assert budget.plan(0.0).limit == 900


def simulate(
    budget: LatencyBudget, rates: list[tuple[float, float]], cost: Callable[[int], float]
) -> list[tuple[float, int, float, float]]:
    """One server fed by a steady arrival rate: each ``(rate, seconds)`` phase in turn. Each
    batch takes what is waiting up to the plan's limit; it is full when at least the limit was
    waiting; its oldest record had waited ``waiting / rate``. Returns ``(clock, limit, waiting
    after, fetch-to-publish time)`` per batch."""
    now, waiting, out = 0.0, 0.0, []
    for rate, seconds in rates:
        end = now + seconds
        while now < end:
            if waiting < 1.0:  # idle until the next record
                now += (1.0 - waiting) / rate
                waiting = 1.0
            plan = budget.plan(now)
            rows = min(plan.limit, int(waiting))
            budget.fetched(full=waiting >= plan.limit, age=waiting / rate)
            ticket = budget.begin(rows, now)
            ticket.service = cost(rows)
            now += ticket.service
            waiting += rate * ticket.service - rows
            budget.finish(ticket, now)
            out.append((now, plan.limit, waiting, ticket.service))
    return out


def test_an_arrival_rate_beyond_the_budgets_batches_grows_them_and_the_backlog_drains() -> None:
    # 60 ms a batch + 10 µs a record: the budget's own batches (4,000 rows in 100 ms) serve at
    # most 40,000 records/s; 8,192-row batches 57,700/s. At 50,000/s only the larger ones keep up.
    def cost(n: int) -> float:
        return 60 * MS + 10 * US * n

    phases = [(5_000.0, 5.0), (50_000.0, 20.0), (5_000.0, 10.0)]
    budget = LatencyBudget(100 * MS, max_batch=8192, max_delay=20 * MS)
    run = simulate(budget, phases, cost)
    light = [r for r in run if 3.0 < r[0] < 5.0]
    heavy = [r for r in run if 15.0 < r[0] < 25.0]
    after = [r for r in run if r[0] > 30.0]
    assert max(r[1] for r in light) < 8192  # the budget's limit while it is met
    assert all(r[3] <= 100 * MS for r in light)  # and every batch within the budget
    assert min(r[1] for r in heavy) == 8192  # throughput first: the budget is lost anyway
    assert max(r[2] for r in heavy) < 2 * 8192  # and the backlog stays bounded
    assert max(r[1] for r in after) < 8192 and all(r[3] <= 100 * MS for r in after)

    # Without the backlog rule the budget's batches fall behind for good.
    stuck = LatencyBudget(100 * MS, max_batch=8192, max_delay=20 * MS, patience=10**9)
    run = simulate(stuck, phases[:2], cost)
    assert run[-1][2] > 100_000


# ---- (c) the bounds: max_batch, max_delay, at least one row ------------------------------------


def test_before_measurements_and_when_off_the_plan_is_max_batch_and_max_delay() -> None:
    rng = np.random.default_rng(4)
    budget = LatencyBudget(100 * MS, max_batch=512, max_delay=20 * MS)
    assert budget.plan(0.0) == Plan(512, 20 * MS)
    off = LatencyBudget(None, max_batch=512, max_delay=20 * MS)
    serve(off, 50, lambda n: 10 * MS + 1 * MS * n, rng)
    off.fetched(full=True, age=10.0)
    assert off.plan(0.0) == Plan(512, 20 * MS)
    assert off.model.used == 48  # measured all the same (the first two skipped)
    assert LatencyBudget(0.0, 512, 0.02).budget is None  # --latency-budget-ms 0: off


def test_cheap_batches_are_capped_at_max_batch_and_max_delay() -> None:
    budget = LatencyBudget(
        100 * MS, max_batch=512, max_delay=20 * MS, model=known_model(5 * MS, 1 * US)
    )
    assert budget.plan(0.0) == Plan(512, 20 * MS)
    free = LatencyBudget(100 * MS, 512, 20 * MS, model=known_model(5 * MS, 0.0))
    assert free.plan(0.0).limit == 512


def test_a_budget_that_cannot_be_met_still_takes_one_row_without_waiting() -> None:
    budget = LatencyBudget(
        10 * MS, max_batch=512, max_delay=20 * MS, model=known_model(30 * MS, 100 * US)
    )
    assert budget.plan(0.0) == Plan(1, 0.0)


@settings(max_examples=300, deadline=None)
@given(
    budget_ms=st.floats(0.1, 2000.0),
    fixed_ms=st.floats(0.0, 1000.0),
    per_row_us=st.floats(0.0, 10_000.0),
    max_batch=st.integers(1, 20_000),
    max_delay_ms=st.floats(0.0, 200.0),
    in_flight=st.lists(st.tuples(st.integers(1, 20_000), st.floats(0.0, 5.0)), max_size=4),
    evidence=st.lists(st.tuples(st.booleans(), st.one_of(st.none(), st.floats(0.0, 5.0)))),
    now=st.floats(0.0, 10.0),
)
def test_every_plan_is_within_its_bounds(
    budget_ms: float,
    fixed_ms: float,
    per_row_us: float,
    max_batch: int,
    max_delay_ms: float,
    in_flight: list[tuple[int, float]],
    evidence: list[tuple[bool, float | None]],
    now: float,
) -> None:
    budget = LatencyBudget(
        budget_ms * MS,
        max_batch,
        max_delay_ms * MS,
        model=known_model(fixed_ms * MS, per_row_us * US),
    )
    for rows, at in in_flight:
        budget.begin(rows, at)
    for full, age in evidence:
        plan = budget.plan(now)
        assert 1 <= plan.limit <= max_batch and 0.0 <= plan.wait <= max_delay_ms * MS
        budget.fetched(full=full, age=age)
    plan = budget.plan(now)
    assert 1 <= plan.limit <= max_batch and 0.0 <= plan.wait <= max_delay_ms * MS


# ---- (d) the estimator ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_the_estimator_converges_to_the_fixed_and_per_row_cost_despite_noise(seed: int) -> None:
    rng = np.random.default_rng(seed)
    fixed, per_row = 12 * MS, 250 * US
    model = CostModel()
    for _ in range(400):
        rows = int(rng.integers(1, 2049))
        seconds = fixed + per_row * rows + rng.normal(0.0, 2 * MS)
        if rng.random() < 0.05:  # a garbage collection, a Redis retry, a partition load
            seconds *= rng.uniform(3.0, 20.0)
        model.observe(rows, max(seconds, 0.0))
    # With decay 0.95 the fit is worth about 40 equally weighted batches: with 2 ms of noise, one
    # standard error is about 0.6 ms on the fixed cost and 0.2 % on the per-row cost.
    assert model.per_row == pytest.approx(per_row, rel=0.03)
    assert model.fixed == pytest.approx(fixed, abs=2.5 * MS)
    for rows in (100, 1000, 2000):
        assert model.predict(rows) == pytest.approx(fixed + per_row * rows, rel=0.05)


def test_the_estimator_follows_a_cost_change_and_ignores_a_lone_outlier() -> None:
    rng = np.random.default_rng(7)
    model = CostModel()
    for _ in range(200):
        rows = int(rng.integers(100, 1000))
        model.observe(rows, 5 * MS + 20 * US * rows)
    settled = (model.fixed, model.per_row)
    model.observe(500, 2.0)  # one batch met a two-second stall
    assert model.predict(500) < 1.5 * (settled[0] + settled[1] * 500)
    for _ in range(200):  # the model got four times slower per row, for good
        rows = int(rng.integers(100, 1000))
        model.observe(rows, 5 * MS + 80 * US * rows)
    assert model.per_row == pytest.approx(80 * US, rel=0.05)
    assert model.fixed == pytest.approx(5 * MS, abs=1 * MS)


def test_the_first_measurements_are_skipped_and_a_constant_size_is_all_per_row() -> None:
    model = CostModel(skip=2)
    model.observe(100, 5.0)  # start-up: partitions loaded from Redis
    model.observe(100, 3.0)
    assert not model.ready
    for _ in range(50):  # every batch the same size: the split is not identified
        model.observe(100, 20 * MS)
    assert model.ready
    assert model.predict(100) == pytest.approx(20 * MS)
    assert model.fixed == pytest.approx(0.0, abs=1e-12) and model.per_row > 0
    assert math.isfinite(model.predict(10_000))


# ---- the wiring: batcher and pipeline ------------------------------------------------------------


class FakeConsumer:
    """``getmany`` over a list of records of one partition; waits its timeout when empty."""

    def __init__(self, records: list[Any]) -> None:
        self.records = deque(records)
        self.asked: list[int] = []

    async def getmany(self, *, timeout_ms: int, max_records: int) -> dict[Any, list[Any]]:
        self.asked.append(max_records)
        if not self.records:
            await asyncio.sleep(timeout_ms / 1000)
            return {}
        take = [self.records.popleft() for _ in range(min(max_records, len(self.records)))]
        return {TopicPartition("events", 0): take}


def records(n: int, timestamp_ms: int = 0) -> list[Any]:
    return [SimpleNamespace(offset=i, timestamp=timestamp_ms) for i in range(n)]


async def test_the_batcher_fetches_at_the_planned_limit_and_reports_its_evidence() -> None:
    settings = BatchSettings(max_batch=500, max_delay_ms=0.0, latency_budget_ms=100.0)
    budget = LatencyBudget(0.1, 500, 0.0, model=known_model(10 * MS, 1 * MS))  # limit 90
    consumer = FakeConsumer(records(400))
    batcher = Batcher(consumer, settings, poll=0.01, budget=budget)  # type: ignore[arg-type]
    for _ in range(2):
        batch = await batcher.next(0.0)
        assert sum(map(len, batch.values())) == 90 and batcher.limit == 90
    assert consumer.asked == [90, 90] and budget.streak == 2  # full at once: records waited
    assert budget.plan(0.0).limit == 180  # two in a row: a backlog, the limit doubles
    batch = await batcher.next(0.0)
    assert consumer.asked[-1] == 180 and sum(map(len, batch.values())) == 180


async def test_the_batcher_without_a_budget_fetches_max_batch() -> None:
    settings = BatchSettings(max_batch=64, max_delay_ms=0.0, latency_budget_ms=0.0)
    consumer = FakeConsumer(records(100))
    batcher = Batcher(consumer, settings, poll=0.01)  # type: ignore[arg-type]
    assert not batcher.budget.enabled
    assert sum(map(len, (await batcher.next()).values())) == 64
    assert consumer.asked == [64]


def test_the_age_of_a_batch_is_its_oldest_record_timestamp() -> None:
    tp0, tp1 = TopicPartition("t", 0), TopicPartition("t", 1)
    batch = {tp0: records(2, 9_000), tp1: records(1, 7_500)}
    assert oldest_age(batch, 10.0) == pytest.approx(2.5)
    assert oldest_age({tp0: records(3, -1)}, 10.0) is None  # no timestamp on the records


class Steps:
    """BatchSteps that do nothing but count; the pipeline stops after ``n`` batches."""

    def __init__(self, n: int, stopping: asyncio.Event) -> None:
        self.n, self.stopping, self.completed = n, stopping, 0

    async def prepare(self, batch: Any) -> Any:
        return SimpleNamespace(rows=sum(map(len, batch.values())))

    async def infer(self, prep: Any) -> None:
        await asyncio.sleep(0)

    async def publish(self, prep: Any) -> None:
        self.completed += 1
        if self.completed >= self.n:
            self.stopping.set()

    async def settle(self, prep: Any) -> dict[Any, int]:
        return {}

    async def commit(self, offsets: dict[Any, int]) -> None:
        return None

    def settled(self, batches: int) -> None:
        return None


async def test_the_pipeline_feeds_every_completed_batch_to_the_budget() -> None:
    settings = BatchSettings(max_batch=50, max_delay_ms=0.0, latency_budget_ms=100.0)
    stopping = asyncio.Event()
    metrics = Metrics()
    slots = InflightSlots()
    batcher = Batcher(FakeConsumer(records(500)), settings, poll=0.01)  # type: ignore[arg-type]

    async def nothing(*_: Any) -> None:
        return None

    steps = Steps(10, stopping)
    pipeline = Pipeline(
        steps, batcher, RebalanceGate(slots, lambda _: None), slots,
        metrics=metrics, fetch_clock=Watchdog(60.0), queue_size=2, swap_model=lambda: None,
        rewind=nothing, between_batches=nothing, stopping=stopping,
    )  # fmt: skip
    await asyncio.wait_for(pipeline.run(), 30)
    budget = batcher.budget
    assert budget.model.seen == steps.completed >= 10  # every completed batch was measured
    assert not budget._in_flight
    assert 1 <= metric_value(metrics.exposition().decode(), "eventcast_batch_limit") <= 50


# ---- against the real broker -------------------------------------------------------------------


@pytest.mark.integration
def test_a_worker_with_a_latency_budget_publishes_every_forecast_and_exports_the_limit(
    stack: Any, topics: Any, redis_url: str, tiny_model_dir: Path, proc_worker: Any
) -> None:
    """A backlog at start (throughput first), then live traffic in small bursts (the budget
    sizes the batches): every forecast arrives once, in order per series, equal to the offline
    model's and to the replay of online calibration, with the windows in Redis; the batch-limit
    gauge is exported and within ``[1, --max-batch]``."""
    events = make_events(20, 70)
    truth = Truth()
    backlog, live = events[: 20 * 40], events[20 * 40 :]
    truth.add(backlog, produce(stack.bootstrap, topics.input, backlog))
    argv = worker_argv(
        stack.bootstrap, redis_url, tiny_model_dir, topics,
        "--latency-budget-ms", "20", "--max-batch", "256",
    )  # fmt: skip
    w = proc_worker(argv).wait_ready()
    for i in range(0, len(live), 40):
        chunk = live[i : i + 40]
        truth.add(chunk, produce(stack.bootstrap, topics.input, chunk))
    expected = truth.expected_sources()
    assert len(expected) == 20 * 23
    recs = consume_all(stack.bootstrap, topics.output, expected=len(expected), timeout=120, idle=30)
    wait_for(lambda: published_total(w) >= len(expected), 30, "the published counter")
    exposition = w.metrics()
    assert "\neventcast_batch_limit " in exposition
    assert 1 <= metric_value(exposition, "eventcast_batch_limit") <= 256
    assert w.terminate() == 0, w.log()
    log_text = w.log_path.read_text(errors="replace")
    assert (
        "batching: max_batch=256 max_delay_ms=20 queue_size=2 infer_batch=256 "
        "latency_budget_ms=20" in log_text
    )

    by_src = forecasts_by_source(recs)
    assert set(by_src) == expected
    assert len(recs) == len(expected)  # a clean run repeats nothing
    for sid, evs in truth.events.items():
        got = [orjson.loads(r.value)["ts"] for r in recs if r.key == sid.encode()]
        assert got == [e[2] for e in evs[47:]], sid
    assert consume_all(stack.bootstrap, topics.dlq, idle=1.0) == []
    check_windows(redis_url, topics.input, truth)
    check_against_offline(tiny_model_dir, truth, by_src, 10)
    assert check_calibration(tiny_model_dir, truth, by_src) == len(expected)
