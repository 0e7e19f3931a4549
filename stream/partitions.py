"""The worker's input partitions: which are ours, their in-memory windows, and how that state
is loaded, rebuilt, reset, persisted and given up.

A partition's windows are loaded from Redis before its first batch (assign), completed from Kafka
when Redis is behind the committed offset (docs/design.md invariant 6), and dropped when it is
revoked. Whenever Redis's copy cannot be trusted (the fenced write is refused, a batch had to be
abandoned), the partition is *reset*: its memory is dropped and the consumer seeks back to the
committed offset, so it is reloaded before its next records are processed.

The consumer is reached through :class:`ConsumerPort`, which aiokafka's consumer satisfies and
the faust engine answers for Faust (``stream.faust_engine``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from model.config import ModelConfig
from stream.calibration import OnlineCalibrator
from stream.consumer import Batch
from stream.errors import RedisUnavailableError, StateConflictError
from stream.metrics import Metrics
from stream.publisher import TransactionalPublisher
from stream.rebuild import Forecaster, Rebuilder
from stream.redis_guard import GuardedRedis
from stream.settings import WorkerSettings
from stream.store import Fence, WindowStore
from stream.windows import PartitionWindows, Snapshot

log = logging.getLogger(__name__)


class ConsumerPort(Protocol):
    """What the worker needs of a group consumer (aiokafka's ``AIOKafkaConsumer`` fits)."""

    def assignment(self) -> set[TopicPartition]: ...

    async def committed(self, tp: TopicPartition) -> int | None: ...

    def seek(self, tp: TopicPartition, offset: int) -> None: ...

    async def seek_to_beginning(self, *tps: TopicPartition) -> Any: ...

    async def seek_to_end(self, *tps: TopicPartition) -> Any: ...

    async def commit(self, offsets: dict[TopicPartition, int]) -> Any: ...

    def pause(self, *tps: TopicPartition) -> None: ...

    def resume(self, *tps: TopicPartition) -> None: ...

    def highwater(self, tp: TopicPartition) -> int | None: ...


@dataclass
class PartitionState:
    """One partition's windows, the applied offset Redis holds as far as we know (None:
    nothing) and our claim of the partition (owner epoch): the fence of the next write."""

    windows: PartitionWindows
    expected: int | None
    fence: Fence | None = None
    calibration: OnlineCalibrator | None = None  # --interval-calibration online

    def calibrator(self, horizon: int) -> OnlineCalibrator:
        """The partition's interval calibration state, for forecasts of ``horizon`` steps (a
        fresh one when there is none, or when the serving model's horizon changed)."""
        cal = self.calibration
        if cal is None or cal.horizon != horizon:
            if cal is not None:
                log.warning("the model's horizon changed (%d -> %d): interval calibration of "
                            "%s[%d] starts afresh", cal.horizon, horizon, self.windows.topic,
                            self.windows.partition)  # fmt: skip
            cal = self.calibration = OnlineCalibrator(horizon, self.windows.capacity)
        return cal


class Partitions:
    """The assigned input partitions and their state (see the module docstring).

    ``config()``: the serving model's config (window length, features). ``store()`` and
    ``txn()``: the window store and, with exactly-once, the transactional publisher (both made at
    start-up). ``on_progress`` is called while a long rebuild reads Kafka (the liveness clocks);
    ``on_drop(partition)`` when a partition's state is forgotten (online accuracy, shadow).
    """

    def __init__(
        self,
        settings: WorkerSettings,
        metrics: Metrics,
        redis: GuardedRedis,
        *,
        config: Callable[[], ModelConfig],
        store: Callable[[], WindowStore],
        txn: Callable[[], TransactionalPublisher | None],
        on_progress: Callable[[], None] = lambda: None,
        on_drop: Callable[[int], None] = lambda partition: None,
        forecast: Forecaster | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.redis = redis
        self._config = config
        self._store = store
        self._txn = txn
        self._on_drop = on_drop
        self.consumer: ConsumerPort | None = None  # set at start-up
        self.assigned: set[TopicPartition] = set()
        self._states: dict[TopicPartition, PartitionState] = {}
        # While the native pipeline runs, resets are rewound by its fetch stage between two
        # fetches (no fetch in flight can then return records from before the seek).
        self.defer_rewinds = False
        self._rewind: set[TopicPartition] = set()
        self._rebuilder = Rebuilder(settings, metrics, on_progress, forecast)

    # ---- reading -------------------------------------------------------------------------------

    def state(self, tp: TopicPartition) -> PartitionState | None:
        return self._states.get(tp)

    def is_current(self, tp: TopicPartition, state: PartitionState) -> bool:
        """Whether ``state`` is still the partition's (not reset or revoked since)."""
        return self._states.get(tp) is state

    def states(self) -> Iterable[PartitionState]:
        return self._states.values()

    def rewinding(self, tp: TopicPartition) -> bool:
        """Whether ``tp`` was reset (or assigned again) and not yet sought back to its committed
        offset: records of it fetched before that seek continue from where the dropped state
        stood, so they must not be applied, not even to a state loaded meanwhile."""
        return tp in self._rewind

    def series_count(self) -> int:
        return sum(len(p.windows) for p in self._states.values())

    # ---- assign, load, drop, reset, revoke -----------------------------------------------------

    def assign(self, tps: set[TopicPartition]) -> None:
        self.assigned |= tps
        for tp in tps:
            self._states.pop(tp, None)  # load afresh from Redis before its first batch
        if self.defer_rewinds:
            # A batch fetched before this rebalance may still wait at the gate with records of
            # these partitions, read from where the previous assignment stood. Given back to us,
            # a partition must restart at its committed offset: those stale records are dropped
            # from that batch and the partition is sought to its committed offset (else they
            # would be forecast once from the stale batch and again when re-fetched from the
            # committed offset: a duplicate under exactly-once).
            self._rewind |= tps
        self.metrics.assigned.set(len(self.assigned))
        log.info("partitions assigned: %s", sorted(tp.partition for tp in tps))

    def adopt(self, tps: set[TopicPartition]) -> None:
        """Count ``tps`` as ours without reloading them (the faust engine: Faust hands the agent
        only assigned partitions' events, possibly before its assignment signal)."""
        self.assigned |= tps

    async def revoke(self, tps: set[TopicPartition]) -> None:
        """Forget revoked partitions (the batches in flight are finished or abandoned first:
        see :class:`stream.pipeline.RebalanceGate`)."""
        txn = self._txn()
        for tp in tps:
            self.drop(tp)
            self.assigned.discard(tp)
            self._rewind.discard(tp)
            with contextlib.suppress(KeyError):
                self.metrics.lag.remove(str(tp.partition))
            if txn is not None:
                await txn.close(tp.partition)
        self.metrics.assigned.set(len(self.assigned))
        log.info("partitions revoked: %s", sorted(tp.partition for tp in tps))

    def drop(self, tp: TopicPartition) -> None:
        self._states.pop(tp, None)
        self._on_drop(tp.partition)

    async def reset(self, tp: TopicPartition) -> None:
        """Forget a partition's memory and rewind it to the committed offset; it is reloaded
        (and rebuilt if needed) before its next records are processed."""
        self.drop(tp)
        if tp not in self.assigned:
            return
        if self.defer_rewinds:
            self._rewind.add(tp)
        else:
            await self._seek_committed(tp)

    async def rewind_pending(self, batch: Batch) -> None:
        """Seek the partitions reset since the last fetch back to their committed offsets and
        drop their records from ``batch`` (the fetch stage calls it between two fetches). A
        rewind that failed (the broker unreachable) is tried again before the next batch: until
        it succeeds, none of the partition's records are processed."""
        failed: set[TopicPartition] = set()
        while self._rewind:
            tp = self._rewind.pop()
            batch.pop(tp, None)
            if not await self._seek_committed(tp):
                failed.add(tp)
        self._rewind |= failed

    async def _seek_committed(self, tp: TopicPartition) -> bool:
        """Seek to the committed offset; False when the broker could not say it (try again)."""
        consumer = self.consumer
        assert consumer is not None
        if tp not in self.assigned:
            return True
        try:
            txn = self._txn()
            if txn is not None:
                # After a failed transaction: a new producer of the partition's transactional id
                # first completes (or aborts) the one left pending, so the committed offset read
                # next is final. A commit whose answer was lost (the broker died after the
                # commit was decided) would otherwise read as not committed, and its records
                # would be forecast again in a second transaction.
                await txn.open(tp.partition)
            committed = await consumer.committed(tp)
            if committed is not None:
                consumer.seek(tp, committed)
            elif self.settings.auto_offset_reset == "earliest":
                await consumer.seek_to_beginning(tp)
            else:
                await consumer.seek_to_end(tp)
        except KafkaError as exc:
            log.warning("could not rewind %s[%d] (%r); trying again", tp.topic, tp.partition, exc)
            return False
        except (AssertionError, ValueError) as exc:  # partition revoked meanwhile
            log.warning("could not rewind %s[%d]: %s", tp.topic, tp.partition, exc)
        return True

    async def load(self, tp: TopicPartition) -> bool:
        """Bring a partition's windows into memory: claim it in Redis (a new owner epoch, which
        fences every earlier owner) and load them, completed from Kafka when Redis is behind the
        committed offset; rebuilt from the input topic's history when Redis lost them, holds
        them for other features, or holds an unreadable blob. False when abandoned
        (stop/revoke). (docs/design.md, "State, fencing and rebuild".)"""
        consumer = self.consumer
        assert consumer is not None
        cfg = self._config()
        txn = self._txn()
        if txn is not None:
            await txn.open(tp.partition)  # fences a previous owner's open transaction first
        store = self._store()
        where = f"{tp.topic}[{tp.partition}]"
        try:
            stored = await self.redis.call(f"load of {where}", lambda: store.load(tp.partition))
        except StateConflictError as exc:  # another worker claimed it while we read it
            self.metrics.state_conflicts.inc()
            log.warning("%s during the load; retrying the load", exc)
            return await self.load(tp)
        except RedisUnavailableError:
            return False
        # Read after the claim: an owner that committed before it can write no more.
        committed = await consumer.committed(tp)
        windows, cal = self._windows(tp, cfg), self._calibration(tp, cfg)
        expected = stored.applied
        usable = stored.applied is not None and stored.features == tuple(cfg.features)
        if usable:
            bad = self._rebuilder.restore(windows, stored, cal)
            if bad:
                log.warning(
                    "%s: unreadable window or calibration blob of series %s%s; rebuilding the "
                    "partition from the input topic", where, ", ".join(repr(b) for b in bad[:5]),
                    f" and {len(bad) - 5} more" if len(bad) > 5 else "",
                )  # fmt: skip
                windows, cal = self._windows(tp, cfg), self._calibration(tp, cfg)
                usable = False
        elif stored.applied is not None:
            log.warning(
                "%s: stored windows hold features %s, the model needs %s; rebuilding",
                where, list(stored.features), list(cfg.features),
            )  # fmt: skip
        rebuilt = not usable and stored.applied is not None  # rewrite the unusable copy
        if committed is not None and windows.applied < committed - 1:
            await self._rebuilder.rebuild(
                tp, windows, committed, expected, resume=usable, calibration=cal
            )
            rebuilt = True
        elif rebuilt:
            self.metrics.rebuilds.inc()  # nothing committed: the rebuilt state is empty
        if rebuilt:
            snap = windows.snapshot(full=True)
            if cal is not None:
                done = cal.snapshot(full=True)
                snap.cal_set, snap.cal_delete = done.set, done.delete
            try:
                await self.redis.call(
                    f"rebuild write of {where}",
                    lambda: store.persist(
                        tp.partition,
                        snap,
                        expected=expected,
                        features=tuple(cfg.features),
                        replace=True,
                        fence=stored.fence,
                    ),
                )
            except StateConflictError as exc:
                self.metrics.state_conflicts.inc()
                log.warning("%s during rebuild; retrying the load", exc)
                return await self.load(tp)
            except RedisUnavailableError:
                return False
            expected = snap.applied
        else:
            windows.snapshot()  # nothing to write: what was loaded is what Redis holds
            if cal is not None:
                cal.snapshot()
        self._states[tp] = PartitionState(windows, expected, stored.fence, cal)
        log.info(
            "%s loaded (owner epoch %d): %d series, applied offset %s, committed %s%s", where,
            stored.fence.epoch, len(windows), windows.applied, committed,
            " (rebuilt from Kafka)" if rebuilt else "",
        )  # fmt: skip
        return True

    def _calibration(self, tp: TopicPartition, cfg: ModelConfig) -> OnlineCalibrator | None:
        if self.settings.interval_calibration != "online":
            return None
        s = self.settings
        return OnlineCalibrator(cfg.horizon, cfg.sequence_length + s.limits.window_history)

    def _windows(self, tp: TopicPartition, cfg: ModelConfig) -> PartitionWindows:
        s = self.settings
        return PartitionWindows(
            tp.topic, tp.partition, sequence_length=cfg.sequence_length, features=cfg.features,
            limits=s.limits, max_event_bytes=s.max_event_bytes, max_future_skew=s.max_future_skew,
            seasonal=cfg.seasonal(), horizon=cfg.horizon,
        )  # fmt: skip

    # ---- persisting ----------------------------------------------------------------------------

    async def persist(
        self, items: dict[TopicPartition, tuple[PartitionState, Snapshot]]
    ) -> list[TopicPartition]:
        """Write each partition's snapshot with its fence; returns the partitions persisted (safe
        to commit). A partition reset since its batch was prepared (``state`` is no longer its
        state) is skipped; one whose write is refused (fence) or abandoned is reset."""

        async def one(tp: TopicPartition, part: PartitionState, snap: Snapshot) -> bool:
            if not self.is_current(tp, part):
                return False
            if snap.applied == part.expected and snap.empty():
                return True
            store = self._store()
            try:
                await self.redis.call(
                    f"window write of {tp.topic}[{tp.partition}]",
                    lambda: store.persist(
                        tp.partition,
                        snap,
                        expected=part.expected,
                        features=part.windows.feature_names,
                        fence=part.fence,
                    ),
                )
            except StateConflictError as exc:
                self.metrics.state_conflicts.inc()
                log.warning("%s; reloading the partition, not committing this batch", exc)
                await self.reset(tp)
                return False
            except RedisUnavailableError as exc:
                log.warning("%s; abandoning the batch of %s[%d]", exc, tp.topic, tp.partition)
                await self.reset(tp)
                return False
            part.expected = snap.applied
            return True

        tps = list(items)
        done: list[bool] = await asyncio.gather(*(one(tp, *items[tp]) for tp in tps))
        return [tp for tp, ok in zip(tps, done, strict=True) if ok]

    async def ensure_loaded(self, tps: Iterable[TopicPartition]) -> bool:
        """Load every partition of ``tps`` not in memory yet. False when one had to be
        abandoned (stopping, or revoked while Redis is down): then all of ``tps`` are reset, so
        that no fetched record is skipped should the partitions stay ours."""
        tps = list(tps)
        for tp in tps:
            if tp not in self._states and not await self.load(tp):
                for other in tps:
                    await self.reset(other)
                return False
        return True
