"""The native engine's pipeline, and the two things that coordinate it with rebalances:
in-flight slots and the rebalance gate.

Four stages run concurrently, joined by bounded FIFO queues (docs/design.md, "Worker loop"):

    fetch + decode + window update ──► inference (a thread) ──► publish ──► persist, commit
    (BatchSteps.prepare)               (BatchSteps.infer)       (publish)    (settle, commit)

While the model works on one batch, the next is fetched and applied and the previous one is
published; a batch's forecasts go out as soon as its inference is done, and its windows are
persisted and its offsets committed behind that, off the path to the output topic. Every stage
takes batches in fetch order, so per-partition order holds, and a commit always follows the
publish and the persist of every batch it covers (commit last). The settle stage commits once
for every batch it persisted while later ones queued up behind it (up to :data:`SETTLE_GROUP`),
so the worker commits less often when it is busy. When the inference queue is full, fetching
stops (aiokafka keeps at most one prefetched response per partition), so memory stays bounded.
Under a latency budget (the default) the fetch stage goes further: it fetches the next batch
only once the model has taken the previous one, so at most one batch waits for the model and
records that arrive meanwhile join the next batch, which grows, instead of queueing as more
small batches (``--queue-size`` then bounds only the queues after inference).

Each batch carries a :class:`~stream.budget.Ticket` of the batcher's latency budget through the
stages: the pipeline times the batch's own work in each stage up to its publish (prepare, infer,
publish; not the waits in the queues between them, which depend on the batches ahead, not on
this one's size) and hands the sum to the budget when the batch is published, as a measurement
of what a batch of its size costs (:mod:`stream.budget`). The budget also sees which batches are
still in flight, to estimate how long a new batch will wait behind them.

- :class:`InflightSlots` counts the batches between fetch and commit. A batch takes a
  :class:`Slot` when it is fetched and gives it back once its offsets are committed, or when it
  is dropped on the way.
- :class:`RebalanceGate` makes batches and rebalances take turns: a batch is prepared under its
  lock, and a rebalance (``async with gate.closed():``) stops new batches, waits for those in
  flight to be committed (abandoning them after a while if Redis keeps them from finishing) and
  holds the lock while partitions change hands. A batch's publish or persist that fails resets
  its partitions (:meth:`stream.partitions.Partitions.reset`: synchronous in this engine, the
  rewind deferred to the fetch stage); a batch being prepared meanwhile leaves such a partition
  out (:meth:`stream.batch.BatchProcessor.prepare`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from aiokafka.errors import KafkaError

from stream.consumer import Batch, Batcher
from stream.health import Watchdog
from stream.metrics import Metrics

log = logging.getLogger(__name__)

# The most batches the settle stage persists before it commits (when they queued up behind each
# other: otherwise it commits after each).
SETTLE_GROUP = 8


class Slot:
    """One batch's place in the pipeline. As a context manager it gives the place back on exit,
    unless :meth:`hand_over` passed it on (to the batch, which completes it later)."""

    def __init__(self, slots: InflightSlots) -> None:
        self._slots = slots
        self._held = True
        self._handed = False

    def hand_over(self) -> Slot:
        self._handed = True
        return self

    def release(self) -> None:
        if self._held:
            self._held = False
            self._slots.give_back()

    def __enter__(self) -> Slot:
        self._handed = False
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._handed or exc[0] is not None:
            self.release()


class InflightSlots:
    """How many batches are between fetch and completion; :meth:`drained` waits for none.
    ``on_busy`` runs when the first batch enters an idle pipeline."""

    def __init__(self, on_busy: Callable[[], None] = lambda: None) -> None:
        self._count = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._on_busy = on_busy

    def __len__(self) -> int:
        return self._count

    def take(self) -> Slot:
        if not self._count:
            self._on_busy()
        self._count += 1
        self._idle.clear()
        return Slot(self)

    def give_back(self) -> None:
        """One batch left the pipeline (its :class:`Slot` was released)."""
        self._count -= 1
        if not self._count:
            self._idle.set()

    async def drained(self) -> None:
        while self._count:
            await self._idle.wait()


class RebalanceGate:
    """Batches and rebalances take turns (see the module docstring). ``abandon(flag)`` is told
    when the batches in flight must give up (they did not finish within ``timeout``) and when
    that is over."""

    def __init__(
        self, slots: InflightSlots, abandon: Callable[[bool], None], timeout: float = 10.0
    ) -> None:
        self.batch_lock = asyncio.Lock()  # held while a batch is prepared
        self._slots = slots
        self._abandon = abandon
        self._timeout = timeout
        self._open = asyncio.Event()
        self._open.set()

    async def wait_open(self) -> None:
        """Return once no rebalance is waiting for the pipeline."""
        await self._open.wait()

    async def _quiesce(self) -> None:
        await self._slots.drained()
        await self.batch_lock.acquire()

    @contextlib.asynccontextmanager
    async def closed(self) -> AsyncIterator[None]:
        """Let the batches in flight finish (and commit) while the partitions are still ours; if
        they do not within the timeout, have them abandoned (their offsets stay uncommitted for
        the next owner). No new batch is prepared meanwhile; the body runs under the batch lock.
        """
        self._open.clear()
        try:
            try:
                await asyncio.wait_for(self._quiesce(), timeout=self._timeout)
            except TimeoutError:
                self._abandon(True)
                await self._quiesce()
            try:
                yield
            finally:
                self._abandon(False)
                self.batch_lock.release()
        finally:
            self._open.set()


class BatchSteps(Protocol):
    """What the pipeline runs on each batch (:class:`stream.batch.BatchProcessor`)."""

    async def prepare(self, batch: Batch) -> Any | None: ...

    async def infer(self, prep: Any) -> None: ...

    async def publish(self, prep: Any) -> None: ...

    async def settle(self, prep: Any) -> dict[Any, int]: ...

    async def commit(self, offsets: dict[Any, int]) -> None: ...

    def settled(self, batches: int) -> None: ...


class Pipeline:
    """The three stages of :meth:`run` over ``steps``. ``between_batches`` runs in the fetch
    stage after each fetch (housekeeping); ``swap_model`` where no batch is mid-inference;
    ``rewind`` seeks reset partitions back before a fetch and drops their records from a
    fetched batch (see :meth:`stream.partitions.Partitions.rewind_pending`)."""

    def __init__(
        self,
        steps: BatchSteps,
        batcher: Batcher,
        gate: RebalanceGate,
        slots: InflightSlots,
        *,
        metrics: Metrics,
        fetch_clock: Watchdog,
        queue_size: int,
        swap_model: Callable[[], None],
        rewind: Callable[[Batch], Awaitable[None]],
        between_batches: Callable[[], Awaitable[None]],
        stopping: asyncio.Event,
    ) -> None:
        self.steps = steps
        self.batcher = batcher
        self.gate = gate
        self.slots = slots
        self.metrics = metrics
        self.fetch_clock = fetch_clock
        self.queue_size = queue_size
        self.swap_model = swap_model
        self.rewind = rewind
        self.between_batches = between_batches
        self.stopping = stopping
        self.budget = batcher.budget
        self.unpublished = 0  # batches fetched and not yet published (the model is busy)
        metrics.batch_limit.set(batcher.limit)

    async def run(self) -> None:
        """Run the stages until ``stopping`` is set; the batches in flight are finished first.
        Raises the first exception of a stage."""
        to_infer: asyncio.Queue[Any] = asyncio.Queue(self.queue_size)
        to_publish: asyncio.Queue[Any] = asyncio.Queue(self.queue_size)
        to_settle: asyncio.Queue[Any] = asyncio.Queue(self.queue_size)
        stages = [
            asyncio.create_task(self._fetch(to_infer), name="fetch"),
            asyncio.create_task(self._infer(to_infer, to_publish), name="infer"),
            asyncio.create_task(self._publish(to_publish, to_settle), name="publish"),
            asyncio.create_task(self._settle(to_settle), name="settle"),
        ]
        try:
            done, _ = await asyncio.wait(stages, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            for task in stages:
                task.cancel()
            await asyncio.gather(*stages, return_exceptions=True)

    async def _fetch(self, out: asyncio.Queue[Any]) -> None:
        while not self.stopping.is_set():
            if not self.unpublished:
                self.swap_model()  # idle: no inference in flight (else the infer stage)
            await self.rewind({})
            # Dynamic batching: while the model is busy, records pile up into the next batch
            # (up to the batcher's limit and fill wait: max_batch / max_delay, or less under the
            # latency budget); when it is idle, waiting would only add latency.
            try:
                batch = await self.batcher.next(None if self.unpublished else 0.0)
            except KafkaError as exc:
                # e.g. a record batch that cannot be decompressed or fails its CRC: nothing is
                # skipped; fetching is tried again, and /healthz fails if it never passes.
                self.metrics.fetch_errors.labels(type(exc).__name__).inc()
                log.error("fetch failed (%r); trying again", exc)
                await asyncio.sleep(1.0)
                continue
            self.fetch_clock.beat()
            self.metrics.batch_limit.set(self.batcher.limit)
            await self.gate.wait_open()  # a rebalance is waiting for the batches in flight
            if any(batch.values()):
                rows = sum(len(recs) for recs in batch.values())
                with self.slots.take() as slot:
                    ticket = self.budget.begin(rows, time.monotonic())
                    async with self.gate.batch_lock:
                        # Partitions reset by a later stage while these records were fetched:
                        # the records predate the rewind and are read again.
                        await self.rewind(batch)
                        ticket.rows = sum(len(recs) for recs in batch.values())
                        t0 = time.perf_counter()
                        prep = await self.steps.prepare(batch)
                        ticket.service += time.perf_counter() - t0
                    if prep is None:
                        self.budget.forget(ticket)
                    else:
                        prep.slot = slot.hand_over()
                        self.unpublished += 1
                        await out.put((prep, ticket))
                        if self.budget.budget is not None:
                            # Under a latency budget, the next fetch waits until the model has
                            # taken this batch: records that arrive meanwhile wait in the
                            # consumer and join one larger batch instead of queueing as several
                            # small ones, each paying a batch's fixed cost and waiting for all
                            # those ahead of it (measured: a deep queue of small batches was
                            # most of the latency at half capacity).
                            await out.join()
            await self.between_batches()
        await out.put(None)

    async def _infer(self, inp: asyncio.Queue[Any], out: asyncio.Queue[Any]) -> None:
        while (item := await inp.get()) is not None:
            inp.task_done()  # taken: the fetch stage may fetch the next batch (see _fetch)
            prep, ticket = item
            self.swap_model()  # between batches: a batch never mixes versions
            t0 = time.perf_counter()
            await self.steps.infer(prep)
            ticket.service += time.perf_counter() - t0
            await out.put(item)
        await out.put(None)

    async def _publish(self, inp: asyncio.Queue[Any], out: asyncio.Queue[Any]) -> None:
        """Publish each batch as soon as its inference is done; its slot goes on to the settle
        stage. The latency budget's measurement of the batch ends here."""
        while (item := await inp.get()) is not None:
            prep, ticket = item
            try:
                with prep.slot:
                    t0 = time.perf_counter()
                    await self.steps.publish(prep)
                    ticket.service += time.perf_counter() - t0
                    prep.slot.hand_over()
            finally:
                self.unpublished -= 1
            self.budget.finish(ticket, time.monotonic())
            await out.put(prep)
        await out.put(None)

    async def _settle(self, inp: asyncio.Queue[Any]) -> None:
        """Persist each published batch, in publish order, then commit: once for every batch
        settled while the next ones queued up behind it (at most :data:`SETTLE_GROUP`), so a
        commit always follows the persists of every batch it covers. The batches' slots are
        given back after the commit (a rebalance waits for it)."""
        more = True
        while more and (prep := await inp.get()) is not None:
            group = [prep]
            try:
                offsets: dict[Any, int] = {}
                while True:
                    offsets.update(await self.steps.settle(group[-1]))
                    if inp.empty() or len(group) >= SETTLE_GROUP:
                        break
                    if (nxt := inp.get_nowait()) is None:
                        more = False
                        break
                    group.append(nxt)
                await self.steps.commit(offsets)
                self.steps.settled(len(group))
            finally:
                for p in group:
                    p.slot.release()
