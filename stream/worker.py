"""The native streaming worker: Kafka → windows (memory + Redis) → micro-batched inference →
forecasts, with commits last. A façade over the pieces, in the order a batch meets them:

- :mod:`stream.runtime`: start-up and the resources both engines share (health endpoint, model
  and inference runner, Redis and the window store, topic check, publisher, hot reload);
- :mod:`stream.pipeline`: the four concurrent stages (fetch → infer → publish → settle), in-flight
  slots and the rebalance gate;
- :mod:`stream.batch`: one batch's steps (prepare → infer → publish → settle and commit);
- :mod:`stream.partitions`: the assigned partitions' windows (load, rebuild, reset, persist);
- :mod:`stream.delivery`: at-least-once or exactly-once (publish, persist, commit);
- :mod:`stream.redis_guard` and :mod:`stream.health`: Redis calls under the retry policy, the
  deliberate pauses and the liveness watchdogs behind ``/readyz`` and ``/healthz``.

The faust engine (:mod:`stream.faust_engine`) uses the same pieces through this class's public
interface, with Faust in place of the consumer and the pipeline.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from model.registry import LoadedModel
from stream.accuracy import OnlineAccuracy
from stream.batch import BatchProcessor
from stream.consumer import Batcher
from stream.delivery import AtLeastOnce, Delivery, DeliveryContext, ExactlyOnce
from stream.errors import KafkaUnavailableError
from stream.faults import FaultInjector
from stream.health import Pauses, Watchdog
from stream.inference import InferenceRunner
from stream.metrics import Metrics
from stream.partitions import ConsumerPort, Partitions
from stream.pipeline import InflightSlots, Pipeline, RebalanceGate
from stream.redis_guard import GuardedRedis
from stream.retry import RetryPolicy
from stream.runtime import Runtime, freeze_startup_objects
from stream.settings import WorkerSettings
from stream.shadow import ShadowRunner

log = logging.getLogger(__name__)

_ANNOUNCE_EVERY = 5.0
_REVOKE_WAIT = 10.0
# The GIL's switch interval while the pipeline runs (CPython's default is 5 ms). The model runs in
# a thread and takes the GIL back after each call into numpy or onnxruntime; while the event loop
# thread computes (decode, windows, encoding), each take waits up to one interval. At 5 ms a batch
# of 67 rows of the small model took 22 ms to infer beside a busy loop (3 ms alone).
SWITCH_INTERVAL = 0.0005


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.worker.on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self.worker.on_assigned(set(assigned))


class Worker:
    """The streaming worker. ``await start()``, ``await run()`` (until :meth:`request_stop`),
    ``await stop()`` (idempotent).

    ``retry`` is the Redis retry policy; it retries until the operation succeeds, the worker is
    stopping, or a revoked partition's batch must be abandoned.
    """

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        retry: RetryPolicy | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = s = settings
        self.retry = retry or RetryPolicy.for_redis()
        self.metrics = m = metrics or Metrics()
        self.stopping = asyncio.Event()
        self.faults = FaultInjector(s.fault)
        self.runtime = Runtime(s, m, self.retry, self.stopping)
        # Fetching paused on purpose (Redis down or out of memory, broker not acknowledging):
        # not ready, still alive. Two watchdogs: the fetch stage winds one each time a fetch
        # returns (records or not); the later stages wind the other as batches move on.
        self.pauses = Pauses(m.paused, self._pause_fetching)
        self._fetching = False  # start-up done: the liveness clocks run
        self.fetch_clock = Watchdog(s.liveness_timeout)
        self.pipeline_clock = Watchdog(s.liveness_timeout)
        self.slots = InflightSlots(on_busy=self.pipeline_clock.beat)
        self._abandoning = False
        self.gate = RebalanceGate(self.slots, self.abandon, timeout=_REVOKE_WAIT)
        redis = GuardedRedis(self.retry, m, self.pauses, give_up=self.giving_up)
        # Online accuracy and the shadow version (None when off: no work at all per batch).
        self.accuracy = (
            OnlineAccuracy(
                m.accuracy,
                window=s.accuracy_window,
                max_series=s.max_series_per_partition,
            )
            if s.online_accuracy
            else None
        )
        self.shadow: ShadowRunner | None = None
        self.partitions = Partitions(
            s, m, redis,
            config=lambda: self._serving().model.config,
            store=lambda: self.runtime.store,  # type: ignore[arg-type,return-value]
            txn=lambda: self.runtime.txn,
            on_progress=self._progress,
            on_drop=self._forget,
            forecast=lambda windows: self._serving().forecast(windows),
        )  # fmt: skip
        self.delivery: Delivery | None = None
        self.processor = BatchProcessor(
            s, m, self.partitions,
            runner=self._serving,
            delivery=lambda: self.delivery,  # type: ignore[arg-type,return-value]
            faults=self.faults, pipeline_clock=self.pipeline_clock, stopping=self.stopping,
            accuracy=self.accuracy, shadow=lambda: self.shadow,
        )  # fmt: skip
        self.consumer: AIOKafkaConsumer | None = None
        self.pipeline: Pipeline | None = None
        self._started = False
        self._stopped = False
        self._last_announce = 0.0
        self._member = f"{socket.gethostname()}:{os.getpid()}"

    # ---- what others read ----------------------------------------------------------------------

    @property
    def model(self) -> LoadedModel | None:
        return self.runtime.model

    @property
    def runner(self) -> InferenceRunner | None:
        return self.runtime.runner

    @property
    def batches(self) -> int:
        """Batches completed (tests wait on it)."""
        return self.processor.completed

    def _serving(self) -> InferenceRunner:
        assert self.runtime.runner is not None, "the worker has not started"
        return self.runtime.runner

    def ready(self) -> bool:
        """Model loaded, joined to the group, not paused on purpose (``/readyz``)."""
        return (
            self.runtime.runner is not None
            and self.partitions.consumer is not None
            and not self.pauses
            and not self.stopping.is_set()
        )

    def alive(self) -> bool:
        """``/healthz`` (see :mod:`stream.health`): False when, for ``--liveness-timeout``, the
        fetch stage has not finished a fetch (it does at least every poll interval, records or
        not: an idle worker stays alive), or batches were in flight and none moved on through
        inference or completion; True whenever the worker is paused on purpose, and while it
        starts (waiting for a model with ``--wait-for-model``, loading it, connecting: those steps
        wait on purpose or fail with their own exit status; the clocks start when they are
        done)."""
        if self.pauses or not self._fetching:
            return True
        stuck = len(self.slots) > 0 and self.pipeline_clock.expired()
        return not stuck and not self.fetch_clock.expired()

    def start_clocks(self) -> None:
        """Start-up is done: from now on ``/healthz``'s clocks run (see :meth:`alive`)."""
        self._fetching = True
        self.fetch_clock.beat()
        self.pipeline_clock.beat()

    def giving_up(self) -> bool:
        """Retry loops end when the worker stops or a rebalance abandons the batch in flight."""
        return self.stopping.is_set() or self._abandoning

    @property
    def abandoning(self) -> bool:
        return self._abandoning

    def abandon(self, flag: bool) -> None:
        """Have the batch in flight give up (True) waiting for Redis or the broker; its offsets
        stay uncommitted. False when the rebalance that needed it is done."""
        self._abandoning = flag

    # ---- life cycle ----------------------------------------------------------------------------

    async def start_resources(
        self,
        consumer: ConsumerPort,
        *,
        ready: Callable[[], bool] | None = None,
        alive: Callable[[], bool] | None = None,
    ) -> None:
        """What both engines start alike (:class:`~stream.runtime.Runtime`), then the delivery
        guarantee over ``consumer`` (commits, seeks). ``ready``/``alive``: what the health
        endpoint asks (default: this worker's). Raises as :meth:`start`."""
        self._started = True
        await self.runtime.start(ready=ready or self.ready, alive=alive or self.alive)
        self.partitions.consumer = consumer
        ctx = DeliveryContext(
            self.partitions, self.metrics, self.faults, self.pauses, self.settings.dlq_topic,
            self.giving_up,
        )  # fmt: skip
        if self.runtime.txn is not None:
            self.delivery = ExactlyOnce(self.runtime.txn, ctx)
        else:
            assert self.runtime.publisher is not None
            self.delivery = AtLeastOnce(self.runtime.publisher, ctx)

    async def start(self) -> None:
        """Load the model, check Redis and Kafka (topics must exist), join the group and serve
        metrics. Raises NoModelError (exit 3), TopicMissingError (2), KafkaUnavailableError or
        RedisUnavailableError (1)."""
        s = self.settings
        self.consumer = AIOKafkaConsumer(
            **s.kafka.client_kwargs(),
            group_id=s.group_id,
            group_instance_id=s.group_instance_id,
            enable_auto_commit=False,
            auto_offset_reset=s.auto_offset_reset,
            isolation_level="read_committed" if s.exactly_once else "read_uncommitted",
            max_poll_records=s.batch.max_batch,
            metadata_max_age_ms=s.metadata_max_age_ms,
            session_timeout_ms=s.session_timeout_ms,
            heartbeat_interval_ms=max(100, s.session_timeout_ms // 3),
            fetch_max_wait_ms=50,
        )
        await self.start_resources(self.consumer)
        if s.shadow_enabled:  # a shadow that cannot start is logged and counted, not fatal
            self.shadow = ShadowRunner(s, self.metrics, self.accuracy)
            await self.shadow.start(self._serving().model)
        try:
            await self.consumer.start()
        except KafkaError as exc:
            raise KafkaUnavailableError(
                f"cannot reach Kafka at {s.kafka.bootstrap_servers}: {exc}"
            ) from exc
        self.consumer.subscribe([s.input_topic], listener=_Listener(self))
        self.start_clocks()
        self.pipeline = Pipeline(
            self.processor, Batcher(self.consumer, s.batch), self.gate, self.slots,
            metrics=self.metrics, fetch_clock=self.fetch_clock, queue_size=s.batch.queue_size,
            swap_model=self.runtime.swap_model, rewind=self.partitions.rewind_pending,
            between_batches=self.housekeeping, stopping=self.stopping,
        )  # fmt: skip
        if s.gc_freeze:
            freeze_startup_objects()
        b = self.pipeline.batcher.settings
        log.info(
            "batching: max_batch=%d max_delay_ms=%g queue_size=%d infer_batch=%d "
            "latency_budget_ms=%g",
            b.max_batch, b.max_delay * 1000, self.pipeline.queue_size, self._serving().cpu_chunk,
            b.latency_budget_ms,
        )  # fmt: skip
        log.info(
            "worker started: %s -> %s (group %s, model %s, %s, %s)", s.input_topic,
            s.output_topic, s.group_id, self._serving().version, s.guarantee, s.emit,
        )  # fmt: skip

    def request_stop(self) -> None:
        """Finish the batch in flight, commit it, then let :meth:`run` return."""
        self.stopping.set()

    def request_reload(self) -> None:
        """Check the model directory now (SIGHUP)."""
        if self.runtime.reloader is not None:
            self.runtime.reloader.request()

    async def run(self) -> None:
        """Process batches until :meth:`request_stop` (see :mod:`stream.pipeline`); the batches
        in flight are finished first."""
        assert self.pipeline is not None, "start() first"
        switch = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL)  # process-wide: given back when the loop ends
        self.metrics.ready.set(1)
        self.partitions.defer_rewinds = True  # the fetch stage rewinds, between two fetches
        try:
            await self.pipeline.run()
        finally:
            sys.setswitchinterval(switch)
            self.partitions.defer_rewinds = False
            self.metrics.ready.set(0)

    async def stop(self) -> None:
        """Release everything (the consumer leaves the group; nothing is committed here)."""
        if self._stopped:
            return
        self._stopped = True
        self.stopping.set()
        await self.runtime.stop(
            self.shadow.stop() if self.shadow else None,
            self.consumer.stop() if self.consumer else None,
        )

    # ---- between batches and rebalances --------------------------------------------------------

    async def housekeeping(self) -> None:
        """Between batches: metrics, idle-series sweep, status announcement for `worker status`."""
        self.metrics.active_series.set(self.partitions.series_count())
        now = time.monotonic()
        store = self.runtime.store
        if now - self._last_announce < _ANNOUNCE_EVERY or store is None:
            return
        self._last_announce = now
        for part in self.partitions.states():
            part.windows.sweep()
        runner = self.runtime.runner
        info = {
            "version": runner.version if runner else None,
            "partitions": sorted(tp.partition for tp in self.partitions.assigned),
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "calibration": self._calibration_status(runner.version if runner else None),
        }
        try:
            await store.announce(self.settings.group_id, self._member, info)
        except Exception as exc:  # status is best effort
            log.debug("status announcement failed: %s", exc)

    def _calibration_status(self, version: str | None) -> dict[str, Any]:
        """For `worker status`: the interval calibration mode, the rolling coverage of the
        serving version's scored forecasts and the last batch's mean adjustment factor."""
        levels = ("80", "95")
        cov: dict[str, float | None] = dict.fromkeys(levels)
        scored = 0
        if self.accuracy is not None and version is not None:
            summary = self.accuracy.board.summary(version)
            scored = summary.points
            cov = {lv: None if math.isnan(c) else c for lv, c in summary.coverage.items()}
        adj = self.metrics.adjustment
        return {
            "mode": self.settings.interval_calibration,
            "coverage": cov,
            "adjustment": {lv: adj.get(lv) for lv in levels},
            "scored": scored,
        }

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        """The batches in flight finish (or are abandoned), then the partitions are forgotten."""
        if not revoked:
            return
        if in_flight := len(self.slots):
            self.metrics.revoked_in_flight.inc(in_flight)
            log.info(
                "rebalance: %d batches in flight; finishing them before giving up partitions %s",
                in_flight, sorted(tp.partition for tp in revoked),
            )  # fmt: skip
        async with self.gate.closed():
            await self.partitions.revoke(revoked)

    async def on_assigned(self, assigned: set[TopicPartition]) -> None:
        self.partitions.assign(assigned)

    def _pause_fetching(self, paused: bool) -> None:
        consumer = self.partitions.consumer
        if consumer is not None:
            assigned = consumer.assignment()
            if paused:
                consumer.pause(*assigned)
            else:
                consumer.resume(*assigned)
        self.metrics.ready.set(0 if paused else 1)

    def _progress(self) -> None:
        self.fetch_clock.beat()
        self.pipeline_clock.beat()

    def _forget(self, partition: int) -> None:
        if self.accuracy is not None:
            self.accuracy.drop(partition)
        if self.shadow is not None:
            self.shadow.drop(partition)
