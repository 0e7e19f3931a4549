"""The native streaming worker: Kafka → windows (memory + Redis) → micro-batched inference →
forecasts, with commits last.

One batch, in order (DESIGN.md invariants 1–3):

1. fetch a micro-batch across the assigned partitions (:class:`~stream.consumer.Batcher`);
2. per partition, decode and apply the records to its in-memory windows
   (:class:`~stream.windows.PartitionWindows`); records at or below the partition's applied
   offset are redeliveries and change nothing;
3. run the model on every window to forecast, in a thread
   (:class:`~stream.inference.InferenceRunner`);
4. publish forecasts and dead-letter records and wait for the broker's acknowledgements;
5. write each partition's changed windows and its applied offset to Redis in one fenced script
   call (:class:`~stream.store.WindowStore`);
6. commit the input offsets.

With ``--guarantee exactly_once`` steps 4 and 6 are one Kafka transaction per input partition
(forecasts, dead letters and the offset), and step 5 follows it: a crash in between leaves Redis
behind the committed offset, which the next owner repairs by re-reading the topic (invariant 6).

A partition's windows are loaded from Redis when it is assigned and dropped when it is revoked.
Whenever Redis's copy cannot be trusted (the fenced write is refused, a publish failed), the
partition is reset: its memory is dropped, it is reloaded from Redis, rebuilt from Kafka up to the
committed offset if Redis is behind, and the consumer seeks back to the committed offset.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError, MessageSizeTooLargeError, RecordTooLargeError
from redis.exceptions import OutOfMemoryError

from model.errors import NoModelError
from model.predictor import Forecast
from model.registry import LoadedModel, ModelRegistry
from stream.accuracy import OnlineAccuracy
from stream.consumer import Batch, Batcher, PartitionReplayer
from stream.decode import Rejection
from stream.errors import (
    KafkaUnavailableError,
    RedisUnavailableError,
    StateConflictError,
    TopicMissingError,
)
from stream.faults import FaultInjector
from stream.health import Pauses, Watchdog
from stream.inference import InferenceRunner
from stream.metrics import HealthServer, Metrics
from stream.publisher import (
    OutMessage,
    Publisher,
    PublishError,
    TransactionalPublisher,
    dead_letter,
    dlq_value_limit,
    encode_forecasts,
    headers_only,
)
from stream.reloader import ModelReloader
from stream.retry import RetryPolicy
from stream.settings import WorkerSettings
from stream.shadow import ShadowRunner
from stream.store import WindowStore
from stream.windows import ApplyResult, PartitionWindows, RecordLike, Snapshot, WindowBatch

log = logging.getLogger(__name__)

# Sampled event→forecast latencies per batch: enough for percentiles, cheap at 10k events/s.
_LATENCY_SAMPLES = 32
_ANNOUNCE_EVERY = 5.0
_REVOKE_WAIT = 10.0
_PUBLISH_RETRY = RetryPolicy(base=0.2, cap=5.0)  # backoff while the broker refuses a publish
_TOO_LARGE = (MessageSizeTooLargeError, RecordTooLargeError)


@dataclass
class _Partition:
    windows: PartitionWindows
    expected: int | None  # applied offset Redis holds as far as we know (None: nothing)


@dataclass
class _Prepared:
    """A batch between the stages of the pipeline: its partitions' state objects (a partition
    reset meanwhile has another one, or none), what applying its records produced, the
    snapshots to persist, the windows to forecast and the offsets to commit."""

    parts: dict[TopicPartition, _Partition]
    results: dict[TopicPartition, ApplyResult]
    snaps: dict[TopicPartition, Snapshot]
    combined: WindowBatch
    next_offsets: dict[TopicPartition, int]
    records: Batch
    fc: Forecast | None = None
    version: str = ""
    # Rows whose forecast was not finite (model_output): the records, dead-lettered instead.
    bad_output: dict[TopicPartition, list[RecordLike]] = field(default_factory=dict)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.worker._on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self.worker._on_assigned(set(assigned))


def _take(fc: Forecast, rows: slice | np.ndarray) -> Forecast:
    """The forecast of some rows (a slice, or an index array)."""
    return Forecast(
        fc.mean[rows], fc.std[rows],
        {k: v[rows] for k, v in fc.lower.items()}, {k: v[rows] for k, v in fc.upper.items()},
    )  # fmt: skip


def _finite_rows(fc: Forecast) -> np.ndarray:
    """(R,) bool: the rows whose mean, std and bounds are all finite and whose std is > 0 (the
    contract's forecast); the others must not be published."""
    ok = np.isfinite(fc.mean).all(axis=1) & np.isfinite(fc.std).all(axis=1)
    ok &= (fc.std > 0).all(axis=1)
    for bound in (*fc.lower.values(), *fc.upper.values()):
        ok &= np.isfinite(bound).all(axis=1)
    return ok  # type: ignore[no-any-return]


def _take_windows(w: WindowBatch, rows: np.ndarray) -> WindowBatch:
    return WindowBatch(
        w.partition, [w.series[i] for i in rows.tolist()], w.offsets[rows], w.record_ts_ms[rows],
        w.ts[rows], w.values[rows], {n: f[rows] for n, f in w.features.items()},
    )  # fmt: skip


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
        self.settings = settings
        self.retry = retry or RetryPolicy.for_redis()
        self.metrics = metrics or Metrics()
        self.faults = FaultInjector(settings.fault)
        self.registry = ModelRegistry(settings.model_dir)
        self.topic = settings.input_topic
        self._stop_event = asyncio.Event()
        self._lock = asyncio.Lock()  # held while a batch is prepared or completed
        self._inflight = 0  # batches prepared and not yet completed (the pipeline of run())
        self._drained = asyncio.Event()
        self._drained.set()
        self._hold = asyncio.Event()  # cleared while a rebalance waits for the pipeline
        self._hold.set()
        self._pipelined = False  # run()'s pipeline is running (rewinds go to its fetch stage)
        self._rewind: set[TopicPartition] = set()  # reset partitions the fetch stage rewinds
        self._abandon = False
        self._states: dict[TopicPartition, _Partition] = {}
        self._assigned: set[TopicPartition] = set()
        # Fetching paused on purpose (Redis down or out of memory, broker not acknowledging):
        # not ready, still alive. Two watchdogs: the fetch stage winds one each time a fetch
        # returns (records or not); the later stages wind the other each time they finish a
        # batch in flight (see alive()).
        self.pauses = Pauses(self.metrics.paused, self._pause_fetching)
        self.fetch_clock = Watchdog(settings.liveness_timeout)
        self.pipeline_clock = Watchdog(settings.liveness_timeout)
        self._dlq_limit: int | None = None  # bytes of an original value a dead letter may carry
        self._txn_failures = 0  # consecutive failed transactions (backoff)
        self._started = False
        self._stopped = False
        self._last_announce = 0.0
        self._member = f"{socket.gethostname()}:{os.getpid()}"
        self.runner: InferenceRunner | None = None
        self.model: LoadedModel | None = None
        self.consumer: AIOKafkaConsumer | None = None
        self.publisher: Publisher | None = None
        self.txn: TransactionalPublisher | None = None
        self.store: WindowStore | None = None
        self.reloader: ModelReloader | None = None
        self.health: HealthServer | None = None
        self._redis: Any = None
        self._batcher: Batcher | None = None
        self._replayer = PartitionReplayer(
            settings.kafka, "read_committed" if settings.exactly_once else "read_uncommitted"
        )
        self.batches = 0  # processed batches (tests wait on it)
        # Online accuracy and the shadow version (None when off: no work at all per batch).
        self.accuracy = (
            OnlineAccuracy(
                self.metrics.accuracy,
                window=settings.accuracy.window,
                max_series=settings.limits.max_series,
            )
            if settings.accuracy.enabled
            else None
        )
        self.shadow: ShadowRunner | None = None

    # ---- lifecycle -----------------------------------------------------------------------------

    def load_model(self, version: str | None = None) -> LoadedModel:
        """Load and check a version (default CURRENT) with the serving backend and device; a
        reload passes ``expect`` so that only a compatible version can replace the serving one."""
        s = self.settings
        return self.registry.load(
            version,
            backend=s.backend,
            device=s.device,
            threads=s.threads or os.cpu_count(),
            expect=self.model.config if self.model is not None else None,
        )

    async def _first_model(self) -> LoadedModel:
        while True:
            try:
                return await asyncio.to_thread(self.load_model)
            except NoModelError:
                if not self.settings.wait_for_model:
                    raise
                if self._stop_event.is_set():
                    raise
                log.info("no model in %s yet, waiting (--wait-for-model)", self.settings.model_dir)
                await asyncio.sleep(1.0)

    async def start(self) -> None:
        """Load the model, check Redis and Kafka (topics must exist), join the group and serve
        metrics. Raises NoModelError (exit 3), TopicMissingError (2), KafkaUnavailableError or
        RedisUnavailableError (1)."""
        s = self.settings
        self._started = True
        if s.metrics_port:
            self.health = HealthServer(
                self.metrics, self.ready, s.metrics_host, s.metrics_port, alive=self.alive
            )
            await self.health.start()
        self.model = await self._first_model()
        self.runner = InferenceRunner(self.model, self.metrics, s.batch.infer_batch)
        self.runner.swap(self.model)

        self._redis = s.redis.client()
        self.store = WindowStore(self._redis, s.redis.prefix, self.topic)
        try:
            await RetryPolicy(attempts=8, cap=1.0, errors=self.retry.errors).call(self._redis.ping)
        except self.retry.errors as exc:
            raise RedisUnavailableError(f"Redis at {s.redis.url} is unreachable: {exc}") from exc
        policy = await self.store.eviction_policy()
        if policy not in (None, "noeviction"):
            log.warning(
                "Redis maxmemory-policy is %s: Redis may evict window keys under memory pressure "
                "(they would be rebuilt from Kafka); set it to noeviction", policy,
            )  # fmt: skip

        await self._check_topics()
        if s.exactly_once:
            self.txn = TransactionalPublisher(s.kafka, s.group_id, self.topic)
        else:
            self.publisher = Publisher(s.kafka)
            await self.publisher.start()
        if s.shadow.enabled:  # a shadow that cannot start is logged and counted, not fatal
            self.shadow = ShadowRunner(s, self.metrics, self.accuracy)
            await self.shadow.start(self.model)
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
        try:
            await self.consumer.start()
        except KafkaError as exc:
            raise KafkaUnavailableError(
                f"cannot reach Kafka at {s.kafka.bootstrap_servers}: {exc}"
            ) from exc
        self.consumer.subscribe([self.topic], listener=_Listener(self))
        self._batcher = Batcher(self.consumer, s.batch)
        self.reloader = ModelReloader(
            self.registry,
            self.model,
            self.load_model,
            interval=s.reload_interval,
            on_failure=lambda reason: self.metrics.reload_failures.labels(reason).inc(),
        )
        self.reloader.start()
        if s.gc_freeze:
            freeze_startup_objects()
        log.info(
            "worker started: %s -> %s (group %s, model %s, %s, %s)",
            self.topic, s.output_topic, s.group_id, self.model.version, s.guarantee, s.emit,
        )  # fmt: skip

    async def _check_topics(self) -> None:
        s = self.settings
        admin = AIOKafkaAdminClient(**s.kafka.client_kwargs(), request_timeout_ms=10_000)
        try:
            await admin.start()
        except KafkaError as exc:
            raise KafkaUnavailableError(
                f"cannot reach Kafka at {s.kafka.bootstrap_servers} ({exc}); is the broker running "
                "(`make stack-up`)?"
            ) from exc
        try:
            existing = set(await admin.list_topics())
        except KafkaError as exc:
            raise KafkaUnavailableError(
                f"cannot list topics at {s.kafka.bootstrap_servers}: {exc}"
            ) from exc
        finally:
            await admin.close()
        missing = [t for t in (self.topic, s.output_topic, s.dlq_topic) if t not in existing]
        if missing:
            raise TopicMissingError(
                f"topic(s) {', '.join(missing)} missing on {s.kafka.bootstrap_servers}; create "
                "them with `worker topics create` (same --input-topic/--output-topic/--dlq-topic)"
            )

    def request_stop(self) -> None:
        """Finish the batch in flight, commit it, then let :meth:`run` return."""
        self._stop_event.set()

    def request_reload(self) -> None:
        """Check the model directory now (SIGHUP)."""
        if self.reloader is not None:
            self.reloader.request()

    def ready(self) -> bool:
        """Model loaded, joined to the group, not paused on purpose (``/readyz``)."""
        return (
            self.runner is not None
            and self.consumer is not None
            and not self.pauses
            and not self._stop_event.is_set()
        )

    def alive(self) -> bool:
        """``/healthz`` (see :mod:`stream.health`): False when, for ``--liveness-timeout``, the
        fetch stage has not finished a fetch (it does at least every poll interval, records or
        not: an idle worker stays alive), or batches were in flight and none moved on through
        inference or completion; True whenever the worker is paused on purpose."""
        if self.pauses:
            return True
        stuck = self._inflight > 0 and self.pipeline_clock.expired()
        return not stuck and not self.fetch_clock.expired()

    def _pause_fetching(self, paused: bool) -> None:
        consumer = self.consumer
        if consumer is not None:
            assigned = consumer.assignment()
            if paused:
                consumer.pause(*assigned)
            else:
                consumer.resume(*assigned)
        self.metrics.ready.set(0 if paused else 1)

    async def stop(self) -> None:
        """Release everything (consumer leaves the group; nothing is committed here)."""
        if self._stopped:
            return
        self._stopped = True
        self._stop_event.set()
        for closer in (
            self.shadow.stop() if self.shadow else None,
            self.reloader.stop() if self.reloader else None,
            self.consumer.stop() if self.consumer else None,
            self.publisher.stop() if self.publisher else None,
            self.txn.stop() if self.txn else None,
            self._redis.aclose() if self._redis is not None else None,
            self.health.stop() if self.health else None,
        ):
            if closer is None:
                continue
            try:
                await closer
            except Exception:  # shutting down: report, keep closing the rest
                log.exception("error while stopping")

    # ---- the loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Process batches until :meth:`request_stop`; the batches in flight are finished first.

        Three stages run concurrently, joined by bounded FIFO queues (DESIGN.md "Worker loop"):
        fetch + decode + window update (:meth:`_prepare`, on the event loop) → inference (a
        thread) → publish, persist, commit (:meth:`_complete`). While the model works on one
        batch, the next is fetched and applied and the previous one is published and committed.
        Every stage takes batches in fetch order, so per-partition order and commit-last hold:
        a batch's offsets are committed only after its forecasts are acknowledged and its
        snapshot (taken right after its records were applied) is persisted. When the inference
        queue is full, fetching stops (aiokafka keeps at most one prefetched response per
        partition), so memory stays bounded.
        """
        assert self._batcher is not None and self.consumer is not None
        self.metrics.ready.set(1)
        self._pipelined = True
        depth = self.settings.batch.queue_size
        to_infer: asyncio.Queue[_Prepared | None] = asyncio.Queue(depth)
        to_finish: asyncio.Queue[_Prepared | None] = asyncio.Queue(depth)
        stages = [
            asyncio.create_task(self._fetch_stage(to_infer), name="fetch"),
            asyncio.create_task(self._infer_stage(to_infer, to_finish), name="infer"),
            asyncio.create_task(self._finish_stage(to_finish), name="finish"),
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
            self._pipelined = False
            self.metrics.ready.set(0)

    async def _fetch_stage(self, out: asyncio.Queue[_Prepared | None]) -> None:
        assert self._batcher is not None
        while not self._stop_event.is_set():
            if not self._inflight:
                self._maybe_swap_model()  # idle: no inference in flight (else the infer stage)
            await self._rewind_pending({})
            # Dynamic batching: while the model is busy, records pile up into the next batch
            # (up to max_batch / max_delay); when it is idle, waiting would only add latency.
            try:
                batch = await self._batcher.next(None if self._inflight else 0.0)
            except KafkaError as exc:
                # e.g. a record batch that cannot be decompressed or fails its CRC: nothing is
                # skipped; fetching is tried again, and /healthz fails if it never passes.
                self.metrics.fetch_errors.labels(type(exc).__name__).inc()
                log.error("fetch failed (%r); trying again", exc)
                await asyncio.sleep(1.0)
                continue
            self.fetch_clock.beat()
            await self._hold.wait()  # a rebalance is waiting for the batches in flight
            if any(batch.values()):
                self._begin()
                try:
                    async with self._lock:
                        # Partitions reset by a later stage while these records were fetched:
                        # the records predate the rewind and are read again.
                        await self._rewind_pending(batch)
                        prep = await self._prepare(batch)
                except BaseException:
                    self._end()
                    raise
                if prep is None:
                    self._end()
                else:
                    await out.put(prep)
            await self._idle()
        await out.put(None)

    async def _rewind_pending(self, batch: Batch) -> None:
        """Seek the partitions reset since the last fetch back to their committed offsets and
        drop their records from ``batch``. Runs in the fetch stage between two fetches, so no
        fetch in flight can return records from before the seek."""
        while self._rewind:
            tp = self._rewind.pop()
            batch.pop(tp, None)
            await self._seek_committed(tp)

    async def _infer_stage(
        self, inp: asyncio.Queue[_Prepared | None], out: asyncio.Queue[_Prepared | None]
    ) -> None:
        assert self.runner is not None
        while (prep := await inp.get()) is not None:
            self._maybe_swap_model()  # between batches: a batch never mixes versions
            await self._infer(prep)
            await out.put(prep)
        await out.put(None)

    async def _finish_stage(self, inp: asyncio.Queue[_Prepared | None]) -> None:
        while (prep := await inp.get()) is not None:
            try:
                async with self._lock:
                    await self._complete(prep)
                    self.batches += 1
            finally:
                self._end()

    def _begin(self) -> None:
        if not self._inflight:
            self.pipeline_clock.beat()  # the pipeline was idle: its clock starts now
        self._inflight += 1
        self._drained.clear()

    def _end(self) -> None:
        self._inflight -= 1
        if self._inflight == 0:
            self._drained.set()

    def _maybe_swap_model(self) -> None:
        if self.reloader is None or self.runner is None:
            return
        model = self.reloader.take()
        if model is not None:
            old = self.runner.version
            self.model = model
            self.runner.swap(model)
            self.metrics.reloads.inc()
            log.info("model version %s now serving (was %s)", model.version, old)

    async def _idle(self) -> None:
        """Between batches: metrics, idle-series sweep, status announcement."""
        now = time.monotonic()
        self.metrics.active_series.set(sum(len(p.windows) for p in self._states.values()))
        if now - self._last_announce < _ANNOUNCE_EVERY or self.store is None:
            return
        self._last_announce = now
        for part in self._states.values():
            part.windows.sweep()
        try:
            await self.store.announce(
                self.settings.group_id,
                self._member,
                {
                    "version": self.runner.version if self.runner else None,
                    "partitions": sorted(tp.partition for tp in self._assigned),
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                },
            )
        except Exception as exc:  # status is best effort
            log.debug("status announcement failed: %s", exc)

    async def _process(self, batch: Batch) -> None:
        """One batch through every stage in sequence (the faust engine's path; the native loop
        runs the same stages as a pipeline, see :meth:`run`)."""
        prep = await self._prepare(batch)
        if prep is not None:
            await self._infer(prep)
            await self._complete(prep)

    async def _prepare(self, batch: Batch) -> _Prepared | None:
        """Decode and apply the records of assigned partitions to their windows and take each
        partition's snapshot; None when nothing is left to do (or the batch was abandoned)."""
        assert self.runner is not None
        m = self.metrics
        batch = {tp: recs for tp, recs in batch.items() if tp in self._assigned and recs}
        if not batch:
            return None
        n = sum(len(r) for r in batch.values())
        m.consumed.inc(n)
        m.batch_size.observe(n)

        t0 = time.perf_counter()
        for tp in batch:
            if tp not in self._states and not await self._load(tp):
                # Abandoned (stopping, or revoked while Redis is down): rewind so that no fetched
                # record is skipped should the partition stay ours.
                for other in batch:
                    await self._reset(other)
                return None
        results: dict[TopicPartition, ApplyResult] = {}
        parts: dict[TopicPartition, _Partition] = {}
        snaps: dict[TopicPartition, Snapshot] = {}
        latest = self.settings.emit == "latest"
        for tp, recs in batch.items():
            part = self._states[tp]
            res = part.windows.apply(recs, latest=latest)
            parts[tp] = part
            results[tp] = res
            snaps[tp] = part.windows.snapshot()
            m.accepted.inc(res.accepted)
            m.warming.inc(res.warming)
            m.redelivered.inc(res.redelivered)
            m.not_reemitted.inc(res.not_reemitted)
            for _, rej in res.rejected:
                m.rejected.labels(rej.reason).inc()
                if rej.unexpected:
                    m.decode_unexpected.inc()
                    log.error("decoding raised (a bug; dead-lettered as schema): %s", rej.message)
        cfg = self.runner.model.config
        combined = WindowBatch.concat(
            -1, [res.windows for res in results.values()], cfg.sequence_length, cfg.features
        )
        m.stage.labels("apply").observe(time.perf_counter() - t0)
        next_offsets = {tp: recs[-1].offset + 1 for tp, recs in batch.items()}
        return _Prepared(parts, results, snaps, combined, next_offsets, batch)

    async def _infer(self, prep: _Prepared) -> None:
        assert self.runner is not None
        t0 = time.perf_counter()
        model = self.runner.model
        prep.fc = await self.runner.forecast(prep.combined)
        prep.version = model.version
        await self.faults.stall("infer", until=self._stop_event)
        self.metrics.stage.labels("infer").observe(time.perf_counter() - t0)
        self.pipeline_clock.beat()
        self._drop_bad_outputs(prep)

    def _drop_bad_outputs(self, prep: _Prepared) -> None:
        """Take the rows whose forecast is not finite out of ``prep`` (windows, results, forecast);
        their records go to the dead-letter topic as ``model_output`` instead. A model that
        checked out on its canary windows can still overflow on extreme inputs."""
        assert prep.fc is not None
        ok = _finite_rows(prep.fc)
        if ok.all():
            return
        row = 0
        for tp, res in prep.results.items():
            k = len(res.windows)
            part_ok = ok[row : row + k]
            if not part_ok.all():
                by_offset = {rec.offset: rec for rec in prep.records[tp]}
                bad = res.windows.offsets[~part_ok].tolist()
                prep.bad_output[tp] = [by_offset[o] for o in bad if o in by_offset]
                res.windows = _take_windows(res.windows, np.flatnonzero(part_ok))
            row += k
        keep = np.flatnonzero(ok)
        prep.fc = _take(prep.fc, keep)
        prep.combined = _take_windows(prep.combined, keep)
        n = int((~ok).sum())
        self.metrics.rejected.labels("model_output").inc(n)
        log.warning("%d forecast(s) not finite (model_output): dead-lettered, not published", n)

    async def _complete(self, prep: _Prepared) -> None:
        """Encode, publish, persist the snapshots, commit. A partition reset or reloaded since
        the batch was prepared is left out: its records are read again from the committed
        offset."""
        assert self.consumer is not None and prep.fc is not None
        m = self.metrics
        t2 = time.perf_counter()
        s = self.settings
        fc, version = prep.fc, prep.version
        live = {tp for tp, part in prep.parts.items() if self._states.get(tp) is part}
        messages: dict[TopicPartition, list[OutMessage]] = {}
        row = 0
        limit = await self._dlq_value_limit()
        model_output = Rejection("model_output", f"model {version} gave a non-finite forecast")
        for tp, res in prep.results.items():
            k = len(res.windows)
            if tp in live:
                out = encode_forecasts(
                    res.windows, _take(fc, slice(row, row + k)),
                    version=version, input_topic=self.topic, output_topic=s.output_topic,
                )  # fmt: skip
                bad = prep.bad_output.get(tp, [])
                for rec, rej in [*res.rejected, *((r, model_output) for r in bad)]:
                    msg = dead_letter(
                        rec, rej, input_topic=self.topic, partition=tp.partition,
                        dlq_topic=s.dlq_topic, max_value_bytes=limit,
                    )  # fmt: skip
                    if msg.value is not rec.value and rec.value is not None:
                        m.dlq_truncated.inc()
                    out.append(msg)
                messages[tp] = out
            row += k
        m.stage.labels("encode").observe(time.perf_counter() - t2)

        if s.exactly_once:
            await self._finish_exactly_once(messages, prep)
        else:
            await self._finish_at_least_once(messages, prep)
        self.pipeline_clock.beat()
        self._observe_latency(prep.combined)
        self._after_batch(prep.results, fc, version, prep.combined, prep.parts)
        for tp, nxt in prep.next_offsets.items():
            hw = self.consumer.highwater(tp)
            if hw is not None:
                m.lag.labels(str(tp.partition)).set(max(0, hw - nxt))

    async def _dlq_value_limit(self) -> int:
        if self._dlq_limit is None:
            self._dlq_limit = await dlq_value_limit(self.settings.kafka, self.settings.dlq_topic)
            log.info("dead-letter records carry at most %d bytes of a value", self._dlq_limit)
        return self._dlq_limit

    def _after_batch(
        self,
        results: dict[TopicPartition, ApplyResult],
        fc: Forecast,
        version: str,
        combined: WindowBatch,
        prepared: dict[TopicPartition, _Partition] | None = None,
    ) -> None:
        """Online accuracy and shadow version (stream/accuracy.py, stream/shadow.py): score the
        batch's forecasts and hand its windows to the shadow; nothing when both are off.
        Partitions reset by a failed publish or persist are not scored (reprocessed later)."""
        if self.accuracy is None and self.shadow is None:
            return
        parts = [(tp.partition, res.windows) for tp, res in results.items()]
        if self.shadow is not None:
            self.shadow.submit(combined, parts, version)
        if self.accuracy is not None:
            live = {
                tp.partition
                for tp in results
                if tp in self._states and (prepared is None or self._states[tp] is prepared[tp])
            }
            self.accuracy.serving.observe_batch(parts, fc, version, live.__contains__)
            self.accuracy.update_pending()

    def _observe_latency(self, combined: WindowBatch) -> None:
        if len(combined) == 0:
            return
        idx = np.linspace(0, len(combined) - 1, min(_LATENCY_SAMPLES, len(combined))).astype(int)
        now_ms = time.time() * 1000.0
        for t in combined.record_ts_ms[idx].tolist():
            if t > 0:
                self.metrics.latency.observe(max(0.0, (now_ms - t) / 1000.0))

    def _count_published(self, messages: dict[TopicPartition, list[OutMessage]]) -> None:
        dlq = self.settings.dlq_topic
        n_dlq = sum(1 for msgs in messages.values() for msg in msgs if msg.topic == dlq)
        n_all = sum(len(msgs) for msgs in messages.values())
        self.metrics.dlq.inc(n_dlq)
        self.metrics.forecasts.inc(n_all - n_dlq)

    async def _finish_at_least_once(
        self, messages: dict[TopicPartition, list[OutMessage]], prep: _Prepared
    ) -> None:
        assert self.publisher is not None and self.consumer is not None
        m = self.metrics
        t0 = time.perf_counter()
        if not await self._publish([msg for msgs in messages.values() for msg in msgs]):
            for tp in messages:  # stopping, or the partitions were revoked: not committed
                await self._reset(tp)
            return
        self._count_published(messages)
        t1 = time.perf_counter()
        m.stage.labels("publish").observe(t1 - t0)
        self.faults.hit("after_publish")

        persisted = await self._persist_all(list(messages), prep)
        t2 = time.perf_counter()
        m.stage.labels("persist").observe(t2 - t1)
        self.faults.hit("after_window_write")
        self.faults.hit("before_commit")
        offsets = {tp: prep.next_offsets[tp] for tp in persisted}
        if offsets:
            try:
                await self.consumer.commit(offsets)
                m.commits.inc()
            except KafkaError as exc:
                # A rebalance took the partitions: the next owner re-reads from the last commit.
                log.warning("commit of %s failed: %s", _fmt(offsets), exc)
        m.stage.labels("commit").observe(time.perf_counter() - t2)

    async def _publish(self, messages: list[OutMessage]) -> bool:
        """Publish ``messages`` until the broker acknowledged all of them; False when the worker
        stops or must abandon the batch first (nothing may be committed then).

        While the broker does not acknowledge, fetching is paused (not ready, still alive) and
        only the records not acknowledged are sent again, with backoff: a batch is never skipped
        and never reprocessed from scratch. A dead-letter record refused for its size is sent
        again without its value (:func:`~stream.publisher.headers_only`)."""
        assert self.publisher is not None
        attempt = 0
        try:
            while True:
                try:
                    await self.publisher.publish(messages)
                    return True
                except PublishError as exc:
                    self.metrics.publish_errors.inc()
                    dlq = self.settings.dlq_topic
                    messages = exc.failed
                    if exc.too_large:
                        messages = [headers_only(x) if x.topic == dlq else x for x in messages]
                        self.metrics.dlq_truncated.inc(sum(1 for x in messages if x.topic == dlq))
                    if attempt == 0 or attempt % 20 == 0:
                        log.error(
                            "publishing failed (%r): %d record(s) to send again; fetching paused",
                            exc.cause, len(messages),
                        )  # fmt: skip
                    self.pauses.hold("kafka")
                    if self._stop_event.is_set() or self._abandon:
                        return False
                    await asyncio.sleep(_PUBLISH_RETRY.delay(attempt))
                    attempt += 1
        finally:
            if "kafka" in self.pauses.reasons:
                log.info("the broker acknowledges again; resuming")
                self.pauses.release("kafka")

    async def _finish_exactly_once(
        self, messages: dict[TopicPartition, list[OutMessage]], prep: _Prepared
    ) -> None:
        txn = self.txn
        assert txn is not None
        m = self.metrics
        t0 = time.perf_counter()

        def hook() -> None:
            self.faults.hit("after_publish")
            self.faults.hit("before_commit")

        async def one(tp: TopicPartition) -> TopicPartition | None:
            msgs = messages[tp]
            for attempt in (0, 1):
                try:
                    await txn.publish_and_commit(tp.partition, msgs, prep.next_offsets[tp], hook)
                    return tp
                except KafkaError as exc:
                    self.metrics.publish_errors.inc()
                    if attempt == 0 and isinstance(exc, _TOO_LARGE):
                        # aborted: once more, with its dead-letter records reduced to headers
                        dlq = self.settings.dlq_topic
                        msgs = [headers_only(x) if x.topic == dlq else x for x in msgs]
                        continue
                    log.error(
                        "transaction for %s[%d] failed (%r); reprocessing",
                        tp.topic, tp.partition, exc,
                    )  # fmt: skip
                    await txn.close(tp.partition)
                    await self._reset(tp)
                    break
            return None

        done = [tp for tp in await asyncio.gather(*(one(tp) for tp in messages)) if tp is not None]
        if len(done) < len(messages) and not self._stop_event.is_set():
            # The aborted partitions are reprocessed from their committed offsets: back off
            # first (fetching paused, not ready) so an unreachable broker is not hammered.
            self.pauses.hold("kafka")
            try:
                await asyncio.sleep(_PUBLISH_RETRY.delay(self._txn_failures))
            finally:
                self.pauses.release("kafka")
            self._txn_failures += 1
        elif len(done) == len(messages):
            self._txn_failures = 0
        self._count_published({tp: messages[tp] for tp in done})
        m.commits.inc(len(done))
        t1 = time.perf_counter()
        m.stage.labels("publish").observe(t1 - t0)
        await self._persist_all(done, prep)
        self.faults.hit("after_window_write")
        m.stage.labels("persist").observe(time.perf_counter() - t1)

    # ---- Redis ---------------------------------------------------------------------------------

    async def _redis_call(self, what: str, op: Callable[[], Any]) -> Any:
        """Run a Redis operation under the retry policy. While Redis is unreachable, fetching is
        paused and /readyz says not ready; it resumes by itself. Raises RedisUnavailableError when
        the worker is stopping or must abandon the batch."""
        held: set[str] = set()

        def on_error(exc: BaseException, attempt: int) -> None:
            self.metrics.redis_errors.inc()
            oom = isinstance(exc, OutOfMemoryError)
            reason = "redis_oom" if oom else "redis"
            if oom:
                self.metrics.redis_oom.inc()
            if reason not in held:
                if oom:
                    log.error(
                        "Redis is out of memory (OOM: maxmemory reached) during %s: pausing, "
                        "committing nothing until its writes pass again", what,
                    )  # fmt: skip
                else:
                    log.warning(
                        "Redis unavailable during %s (%s): pausing, committing nothing", what, exc
                    )
                held.add(reason)
                self.pauses.hold(reason)

        try:
            return await self.retry.call(
                op, on_error=on_error, give_up=lambda: self._stop_event.is_set() or self._abandon
            )
        except self.retry.errors as exc:
            raise RedisUnavailableError(f"Redis unavailable during {what}: {exc}") from exc
        finally:
            if held:
                log.info("Redis is back after %s; resuming", what)
            for reason in held:
                self.pauses.release(reason)

    async def _persist_all(
        self, tps: list[TopicPartition], prep: _Prepared
    ) -> list[TopicPartition]:
        """Persist each partition's snapshot of ``prep``; returns those persisted (safe to
        commit). A partition reset since (another state object, or none) is not persisted."""

        async def one(tp: TopicPartition) -> TopicPartition | None:
            part = self._states.get(tp)
            if part is None or part is not prep.parts[tp]:
                return None
            snap = prep.snaps[tp]
            if snap.applied == part.expected and not snap.set and not snap.delete:
                return tp
            try:
                await self._redis_call(
                    f"window write of {tp.topic}[{tp.partition}]",
                    lambda: self.store.persist(  # type: ignore[union-attr]
                        tp.partition,
                        snap,
                        expected=part.expected,
                        features=part.windows.feature_names,
                    ),
                )
            except StateConflictError as exc:
                self.metrics.state_conflicts.inc()
                log.warning("%s; reloading the partition, not committing this batch", exc)
                await self._reset(tp)
                return None
            except RedisUnavailableError as exc:
                log.warning("%s; abandoning the batch of %s[%d]", exc, tp.topic, tp.partition)
                await self._reset(tp)
                return None
            part.expected = snap.applied
            return tp

        return [tp for tp in await asyncio.gather(*(one(tp) for tp in tps)) if tp is not None]

    # ---- partitions ----------------------------------------------------------------------------

    async def _load(self, tp: TopicPartition) -> bool:
        """Bring a partition's windows into memory: from Redis, completed from Kafka when Redis is
        behind the committed offset (or lost it). False when abandoned (stop/revoke)."""
        assert self.consumer is not None and self.store is not None and self.model is not None
        store = self.store
        s = self.settings
        cfg = self.model.config
        if self.txn is not None:
            await self.txn.open(tp.partition)  # fences a previous owner's open transaction first
        committed = await self.consumer.committed(tp)
        try:
            stored = await self._redis_call(
                f"load of {tp.topic}[{tp.partition}]", lambda: store.load(tp.partition)
            )
        except RedisUnavailableError:
            return False
        windows = PartitionWindows(
            tp.topic, tp.partition, sequence_length=cfg.sequence_length, features=cfg.features,
            limits=s.limits, max_event_bytes=s.max_event_bytes, max_future_skew=s.max_future_skew,
        )  # fmt: skip
        expected = stored.applied if stored is not None else None
        usable = stored is not None and stored.features == tuple(cfg.features)
        if stored is not None and not usable:
            log.warning(
                "%s[%d]: stored windows hold features %s, the model needs %s; rebuilding",
                tp.topic, tp.partition, list(stored.features), list(cfg.features),
            )  # fmt: skip
        if usable:
            assert stored is not None
            bad = 0
            for series_id, blob in stored.blobs.items():
                try:
                    windows.load_series(series_id, blob)
                except ValueError:
                    bad += 1
            if bad:
                log.warning(
                    "%s[%d]: %d unreadable window blobs dropped", tp.topic, tp.partition, bad
                )
            windows.applied = stored.applied  # (its clock follows from the series loaded)
        rebuilt = False
        if committed is not None and windows.applied < committed - 1:
            start = windows.applied + 1 if usable else max(0, committed - s.limits.rebuild_lookback)
            log.warning(
                "%s[%d]: Redis holds offset %s, the group committed %d: rebuilding windows from "
                "offset %d", tp.topic, tp.partition, expected, committed, start,
            )  # fmt: skip

            def rebuild(recs: list[Any]) -> None:
                windows.apply(recs, emit=False)
                self.fetch_clock.beat()  # a long rebuild (in the fetch stage) is progress
                self.pipeline_clock.beat()

            count = await self._replayer.replay(tp, start, committed, rebuild)
            windows.applied = committed - 1
            self.metrics.rebuilds.inc()
            self.metrics.rebuild_records.inc(count)
            rebuilt = True
        elif not usable and stored is not None:
            rebuilt = True  # rewrite the unusable copy
        if rebuilt:
            snap = windows.snapshot(full=True)
            try:
                await self._redis_call(
                    f"rebuild write of {tp.topic}[{tp.partition}]",
                    lambda: self.store.persist(  # type: ignore[union-attr]
                        tp.partition,
                        snap,
                        expected=expected,
                        features=tuple(cfg.features),
                        replace=True,
                    ),
                )
            except StateConflictError as exc:
                self.metrics.state_conflicts.inc()
                log.warning("%s during rebuild; retrying the load", exc)
                return await self._load(tp)
            except RedisUnavailableError:
                return False
            expected = snap.applied
        else:
            windows.snapshot()  # nothing to write: what was loaded is what Redis holds
        self._states[tp] = _Partition(windows, expected)
        log.info(
            "%s[%d] loaded: %d series, applied offset %s, committed %s%s",
            tp.topic, tp.partition, len(windows), windows.applied, committed,
            " (rebuilt from Kafka)" if rebuilt else "",
        )  # fmt: skip
        return True

    def _drop(self, tp: TopicPartition) -> None:
        self._states.pop(tp, None)
        if self.accuracy is not None:
            self.accuracy.drop(tp.partition)
        if self.shadow is not None:
            self.shadow.drop(tp.partition)

    async def _reset(self, tp: TopicPartition) -> None:
        """Forget a partition's memory and rewind it to the committed offset; it is reloaded
        (and rebuilt if needed) before its next records are processed. While the pipeline of
        :meth:`run` runs, the rewind is left to its fetch stage (see :meth:`_rewind_pending`)."""
        self._drop(tp)
        if tp not in self._assigned:
            return
        if self._pipelined:
            self._rewind.add(tp)
        else:
            await self._seek_committed(tp)

    async def _seek_committed(self, tp: TopicPartition) -> None:
        assert self.consumer is not None
        if tp not in self._assigned:
            return
        try:
            committed = await self.consumer.committed(tp)
            if committed is not None:
                self.consumer.seek(tp, committed)
            elif self.settings.auto_offset_reset == "earliest":
                await self.consumer.seek_to_beginning(tp)
            else:
                await self.consumer.seek_to_end(tp)
        except (KafkaError, AssertionError, ValueError) as exc:  # partition revoked meanwhile
            log.warning("could not rewind %s[%d]: %s", tp.topic, tp.partition, exc)

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        if not revoked:
            return
        # Let the batches in flight finish (and commit) while we still own the partitions; if
        # Redis keeps them from finishing, abandon them: their offsets stay uncommitted for the
        # next owner. No new batch is prepared meanwhile.
        self._hold.clear()
        try:
            try:
                await asyncio.wait_for(self._quiesce(), timeout=_REVOKE_WAIT)
            except TimeoutError:
                self._abandon = True
                await self._quiesce()
            try:
                for tp in revoked:
                    self._drop(tp)
                    self._assigned.discard(tp)
                    self._rewind.discard(tp)
                    with contextlib.suppress(KeyError):
                        self.metrics.lag.remove(str(tp.partition))
                    if self.txn is not None:
                        await self.txn.close(tp.partition)
            finally:
                self._abandon = False
                self._lock.release()
        finally:
            self._hold.set()
        self.metrics.assigned.set(len(self._assigned))
        log.info("partitions revoked: %s", sorted(tp.partition for tp in revoked))

    async def _quiesce(self) -> None:
        """Wait until no batch is in flight, then take the batch lock."""
        while self._inflight:
            await self._drained.wait()
        await self._lock.acquire()

    async def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        self._assigned |= assigned
        for tp in assigned:
            self._states.pop(tp, None)  # load afresh from Redis before its first batch
        self.metrics.assigned.set(len(self._assigned))
        log.info("partitions assigned: %s", sorted(tp.partition for tp in assigned))


def freeze_startup_objects() -> None:
    """Collect once, then move every surviving object to the permanent generation (gc.freeze).

    torch, onnxruntime, Lightning and aiokafka leave ~0.5 M objects tracked by the cyclic
    collector after import; each *full* collection walks all of them, which took 150–450 ms on
    this project's 2-core machine, and Python runs one whenever enough young objects have
    survived, which a worker allocating record objects keeps doing. The event loop (fetch,
    publish, commit) stalls for that long: a latency tail. Frozen objects are never examined
    again; they are still freed by reference counting. Garbage *cycles* among them (none are
    created after start-up on purpose) would not be collected.
    """
    t0 = time.perf_counter()
    gc.collect()
    gc.freeze()
    log.debug(
        "gc: %d start-up objects frozen in %.0f ms",
        gc.get_freeze_count(), (time.perf_counter() - t0) * 1000,
    )  # fmt: skip


def _fmt(offsets: dict[TopicPartition, int]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]@{o}" for tp, o in sorted(offsets.items()))
