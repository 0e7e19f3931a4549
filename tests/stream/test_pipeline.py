"""The native pipeline's stages with stand-in steps (pure logic: no services; the real steps run
in every worker test). A batch is published without waiting for the previous batch's persist and
commit; a commit covers only batches that were published and persisted, after their persists;
when batches queue up behind a slow persist the settle stage commits once for several of them;
slots go back only after the commit, so a rebalance waits for it."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from aiokafka import TopicPartition

from stream.consumer import Batcher
from stream.health import Watchdog
from stream.metrics import Metrics
from stream.pipeline import SETTLE_GROUP, InflightSlots, Pipeline, RebalanceGate
from stream.settings import BatchSettings
from tests.stream.test_latency_budget import FakeConsumer, records

TP = TopicPartition("events", 0)


class Steps:
    """Records what happens, in order: ``("publish", last offset)``, ``("persist", last
    offset)``, ``("commit", offset committed)``; the pipeline stops after ``n`` publishes.
    ``hold`` blocks a batch's persist until an event is set; ``persist_s`` slows every persist."""

    def __init__(self, n: int, stopping: asyncio.Event, slots: InflightSlots) -> None:
        self.n, self.stopping, self.slots = n, stopping, slots
        self.log: list[tuple[str, int]] = []
        self.hold: dict[int, asyncio.Event] = {}
        self.persist_s = 0.0
        self.on_publish: Any = None
        self.slots_at_commit: list[int] = []
        self.settled_batches = 0
        self.infer_hold: dict[int, asyncio.Event] = {}

    def done(self, what: str) -> list[int]:
        return [o for w, o in self.log if w == what]

    async def prepare(self, batch: Any) -> Any:
        recs = batch[TP]
        self.log.append(("prepare", recs[-1].offset))
        return SimpleNamespace(last=recs[-1].offset, rows=len(recs))

    async def infer(self, prep: Any) -> None:
        if prep.last in self.infer_hold:
            await self.infer_hold[prep.last].wait()
        await asyncio.sleep(0)

    async def publish(self, prep: Any) -> None:
        self.log.append(("publish", prep.last))
        if self.on_publish is not None:
            self.on_publish(prep.last)
        if len(self.done("publish")) >= self.n:
            self.stopping.set()

    async def settle(self, prep: Any) -> dict[Any, int]:
        if prep.last in self.hold:
            await self.hold[prep.last].wait()
        await asyncio.sleep(self.persist_s)
        self.log.append(("persist", prep.last))
        return {TP: prep.last + 1}

    async def commit(self, offsets: dict[Any, int]) -> None:
        self.slots_at_commit.append(len(self.slots))
        self.log.append(("commit", offsets[TP]))

    def settled(self, batches: int) -> None:
        self.settled_batches += batches


def pipeline(
    steps_n: int, n_records: int, budget_ms: float = 100.0
) -> tuple[Pipeline, Steps, RebalanceGate]:
    settings = BatchSettings(max_batch=10, max_delay_ms=0.0, latency_budget_ms=budget_ms)
    stopping = asyncio.Event()
    slots = InflightSlots()
    gate = RebalanceGate(slots, lambda _: None)
    batcher = Batcher(FakeConsumer(records(n_records)), settings, poll=0.01)  # type: ignore[arg-type]
    steps = Steps(steps_n, stopping, slots)

    async def nothing(*_: Any) -> None:
        return None

    p = Pipeline(
        steps, batcher, gate, slots,
        metrics=Metrics(), fetch_clock=Watchdog(60.0), queue_size=4, swap_model=lambda: None,
        rewind=nothing, between_batches=nothing, stopping=stopping,
    )  # fmt: skip
    return p, steps, gate


def check_commit_last(steps: Steps) -> None:
    """Every commit comes after the publish and the persist of each batch it covers; commits
    only move forward."""
    published: set[int] = set()
    persisted: set[int] = set()
    committed = 0
    for what, offset in steps.log:
        if what == "publish":
            published.add(offset)
        elif what == "persist":
            assert offset in published, f"persisted before published: {offset}"
            persisted.add(offset)
        elif what == "commit":
            assert offset > committed, steps.log
            assert offset - 1 in persisted, f"commit {offset} before its batch was persisted"
            assert all(o in persisted for o in published if o < offset), steps.log
            committed = offset


async def test_a_batch_is_published_while_the_one_before_is_still_being_persisted() -> None:
    """The first batch's persist waits until the second batch is published: with persist on the
    path to the output topic (publish, persist, commit in one stage) this would never end."""
    p, steps, _ = pipeline(steps_n=3, n_records=30)
    first_done = asyncio.Event()
    steps.hold[9] = first_done  # the first batch: offsets 0..9

    def on_publish(last: int) -> None:
        if last == 19:  # the second batch is out
            first_done.set()

    steps.on_publish = on_publish
    await asyncio.wait_for(p.run(), 10)
    log = steps.log
    first_commit = next(i for i, (what, _) in enumerate(log) if what == "commit")
    assert log.index(("publish", 19)) < log.index(("persist", 9)) < first_commit
    check_commit_last(steps)
    assert steps.done("commit")[-1] == 30 and steps.settled_batches == 3 and not len(p.slots)


async def test_commits_follow_their_persists_and_group_the_batches_queued_behind() -> None:
    """A slow persist (20 ms) behind fast inference: batches queue up for the settle stage,
    which persists each in order and then commits once for all it persisted, at most
    SETTLE_GROUP at a time; every batch's slot is held until its commit."""
    p, steps, _ = pipeline(steps_n=20, n_records=200)
    steps.persist_s = 0.02
    await asyncio.wait_for(p.run(), 30)
    check_commit_last(steps)
    commits = steps.done("commit")
    assert steps.done("persist") == [10 * i + 9 for i in range(20)]  # every batch, in order
    assert commits[-1] == 200 and steps.settled_batches == 20
    assert len(commits) < 20, commits  # some commits covered several batches
    groups = [b - a for a, b in zip([0, *commits], commits, strict=False)]
    assert max(groups) <= SETTLE_GROUP * 10 and max(groups) > 10, groups
    # The slots of a commit's batches were still held when it committed.
    assert all(held >= g // 10 for held, g in zip(steps.slots_at_commit, groups, strict=True))
    assert not len(p.slots)


async def test_a_rebalance_waits_for_the_commit_of_every_published_batch() -> None:
    """A rebalance closes the gate after the second publish while persists are slow: its body
    runs only once every batch published before it was persisted and committed."""
    p, steps, gate = pipeline(steps_n=6, n_records=60)
    steps.persist_s = 0.03
    seen: dict[str, Any] = {}

    async def rebalance() -> None:
        async with gate.closed():
            seen["published"] = max(steps.done("publish"))
            seen["committed"] = steps.done("commit")[-1]
            steps.log.append(("rebalance", 0))

    def on_publish(last: int) -> None:
        if last == 19:
            seen["task"] = asyncio.get_running_loop().create_task(rebalance())

    steps.on_publish = on_publish
    await asyncio.wait_for(p.run(), 30)
    await seen["task"]
    assert seen["committed"] == seen["published"] + 1, (seen, steps.log)
    check_commit_last(steps)


async def test_under_a_latency_budget_at_most_one_batch_waits_for_the_model() -> None:
    """While the model holds the first batch, records keep arriving (all 100 are there from the
    start). Under the budget the fetch stage prepares one more batch and then waits for the
    model to take it: the other records stay in the consumer for later, larger batches instead
    of queueing as more small ones. With the budget off, ``--queue-size`` (4 here) batches queue
    up behind the model, as before."""
    for budget_ms, ahead in ((100.0, 1), (0.0, 1 + 4)):
        p, steps, _ = pipeline(steps_n=10, n_records=100, budget_ms=budget_ms)
        model_free = asyncio.Event()
        steps.infer_hold[9] = model_free
        run = asyncio.get_running_loop().create_task(p.run())
        await asyncio.sleep(0.3)  # the fetch stage has long done all it may do meanwhile
        prepared = steps.done("prepare")
        model_free.set()
        await asyncio.wait_for(run, 10)
        assert prepared == [10 * i + 9 for i in range(1 + ahead)], (budget_ms, prepared)
        check_commit_last(steps)
        assert steps.done("publish") == [10 * i + 9 for i in range(10)]
