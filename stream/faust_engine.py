"""The faust-streaming engine: ``worker start --engine faust``.

For teams that already run Faust. Everything that decides *what* is computed is the native
engine's core, reused as is (:class:`stream.worker.Worker`): decoding (:mod:`stream.decode`),
per-partition windows and their fenced Redis persistence with applied offsets
(:mod:`stream.windows`, :mod:`stream.store`), the rebuild from Kafka when Redis is behind, the
predictor (``model.registry`` + :class:`stream.inference.InferenceRunner`), forecast and
dead-letter encoding and the idempotent publisher (:mod:`stream.publisher`), hot reload, metrics,
health endpoints and fault-injection points. Faust replaces only the Kafka consumer: group
membership, fetching, micro-batching (``stream.take_events(max_batch, within=max_delay)``) and
offset commits. Topics, message formats and the Redis layout are therefore identical, and a
running system can switch engines (stop one, start the other in the same group and Redis).

How the guarantees of docs/design.md are kept on top of Faust:

- **Commit last.** Faust commits the offsets of *acknowledged* events, contiguous from the last
  commit, every ``broker_commit_interval``. ``take_events`` acknowledges a batch only when the
  agent's loop body returns, and the body returns only after the core has published the batch's
  forecasts and dead letters (broker acks, ``acks=all``) and persisted its windows and applied
  offsets to Redis.
- **Nothing skipped silently.** Faust also acknowledges a batch when the body raises (the ack is
  in a ``finally``). So the body never lets a partition's events be acknowledged unless the core
  finished them: a partition whose batch failed (publish error, fenced write refused) is retried
  in place from its first record, as the native engine does by seeking back; one the core had to
  abandon (stopping, or a rebalance while Redis is down) or an unexpected error *withholds* the
  events' acknowledgement (their message is marked handled without telling the consumer), which
  leaves a gap Faust never commits past: they are read again after a restart or by the next
  owner. An unexpected error also stops the engine (exit 1), as it does the native loop.
- **Windows exactly once.** The core's fenced writes and applied offsets. Where the native engine
  asks the broker for the committed offset when it loads a partition, this engine answers with
  the first offset of the batch in hand: every earlier offset of the partition was finished
  (forecast, persisted) by this process or committed by the group, so that is where a rebuild
  from Kafka must stop (the native engine seeks back to the committed offset instead, which Faust
  does not let an agent do).

Guarantees Faust cannot keep are refused at startup (:func:`check_supported`), never weakened.

**The latency budget is not applied** (``--latency-budget-ms``, :mod:`stream.budget`): batches
are always ``--max-batch`` events or ``--max-delay-ms``, and ``eventcast_batch_limit`` stays at
``--max-batch``. Faust's ``Stream.take_events(max_, within)`` fixes both when the agent starts
(they are locals of the one generator the agent iterates for its whole life), and the same
generator acknowledges each batch's events when the agent's loop body returns, which is what
"commit last" above rests on. Sizing batches one by one would mean replacing ``take_events``
with our own buffering and acknowledgement of Faust's events: the part of the consumer this
engine leaves to Faust. The flag is accepted (it is on by default) and the start-up line says
that it is not applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiokafka import TopicPartition

from model.errors import ConfigError
from stream.errors import StreamError
from stream.metrics import Metrics
from stream.retry import RetryPolicy
from stream.runtime import freeze_startup_objects
from stream.settings import KafkaSettings, WorkerSettings
from stream.worker import Worker

log = logging.getLogger(__name__)

# Faust commits acknowledged offsets on a timer: after a crash up to this much finished work is
# read again (at-least-once repeats). The native engine commits after every batch.
COMMIT_INTERVAL = 1.0
_TICK = 0.5  # status announcement, idle sweep, model swap and crash watch while idle
_REVOKE_WAIT = 10.0  # as the native engine: abandon a batch that blocks a rebalance this long


def check_supported(settings: WorkerSettings) -> None:
    """Refuse (ConfigError, exit 2) settings whose guarantee the Faust engine cannot keep."""
    if settings.exactly_once:
        raise ConfigError(
            "--guarantee exactly_once: not available with --engine faust. Exactly-once needs "
            "forecasts, dead letters and the input offsets in one Kafka transaction per input "
            "partition, committed before the windows are written to Redis; Faust commits the "
            "input offsets itself, on a timer, outside such a transaction. Use --engine native "
            "for exactly_once, or --guarantee at_least_once with --engine faust (forecasts may "
            "repeat after a failure; source.topic/partition/offset is the deduplication key)."
        )


class _Record:
    """What the core reads of an input record (see :class:`stream.windows.RecordLike`)."""

    __slots__ = ("key", "offset", "timestamp", "value")

    def __init__(self, offset: int, key: bytes | None, value: bytes | None, timestamp: int):
        self.offset = offset
        self.key = key
        self.value = value
        self.timestamp = timestamp  # Kafka record timestamp, milliseconds


class _FaustPartitions:
    """The consumer as the core's batch processing sees it, answered for Faust.

    The core calls ``committed`` when it loads a partition (where a rebuild from Kafka stops),
    ``seek`` when a partition's batch must be processed again, ``commit`` with the partitions
    whose batch is finished, and ``pause``/``resume`` while Redis is down. Faust owns fetching
    and commits, so these record what the engine must do with the batch in hand.
    """

    def __init__(self, engine: FaustEngine) -> None:
        self.engine = engine
        self.positions: dict[TopicPartition, int] = {}
        self.done: set[TopicPartition] = set()
        self.rewound: set[TopicPartition] = set()

    def begin(self, batch: dict[TopicPartition, list[_Record]]) -> None:
        self.positions = {tp: recs[0].offset for tp, recs in batch.items()}
        self.done = set()
        self.rewound = set()

    def assignment(self) -> set[TopicPartition]:
        return set(self.engine.core.partitions.assigned)

    async def committed(self, tp: TopicPartition) -> int | None:
        return self.positions.get(tp)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.rewound.add(tp)

    async def seek_to_beginning(self, *tps: TopicPartition) -> None:
        self.rewound.update(tps)

    async def seek_to_end(self, *tps: TopicPartition) -> None:
        self.rewound.update(tps)

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        # Faust commits these offsets once the batch's events are acknowledged.
        self.done.update(offsets)

    def pause(self, *tps: TopicPartition) -> None:
        # The agent is blocked on Redis; Faust's bounded stream buffer stops the fetcher.
        pass

    def resume(self, *tps: TopicPartition) -> None:
        pass

    def highwater(self, tp: TopicPartition) -> int | None:
        app = self.engine.app
        if app is None:
            return None
        try:
            return app.consumer.highwater(tp)  # type: ignore[no-any-return]
        except Exception:  # not assigned any more, consumer stopping: lag is best effort
            return None

    async def stop(self) -> None:
        pass


def faust_broker_settings(kafka: KafkaSettings) -> dict[str, Any]:
    """Faust's broker URL list and credentials from the shared Kafka settings."""
    import faust

    conf: dict[str, Any] = {
        "broker": [f"kafka://{hp.strip()}" for hp in kafka.bootstrap_servers.split(",")],
        "broker_client_id": kafka.client_id,
    }
    if kafka.security_protocol.startswith("SASL"):
        conf["broker_credentials"] = faust.SASLCredentials(
            username=kafka.sasl_username,
            password=kafka.sasl_password,
            ssl_context=kafka.ssl_context(),
            mechanism=kafka.sasl_mechanism,
        )
    elif kafka.uses_tls:
        conf["broker_credentials"] = faust.SSLCredentials(kafka.ssl_context())
    return conf


class FaustEngine:
    """The worker on Faust. Same life cycle as :class:`stream.worker.Worker`: ``await start()``,
    ``await run()`` (until :meth:`request_stop`, or raises when the engine failed),
    ``await stop()`` (idempotent; drains the batch in flight)."""

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        retry: RetryPolicy | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        check_supported(settings)
        self.settings = settings
        # The native engine's core: its Kafka consumer is never created (see start()).
        self.core = Worker(settings, retry=retry, metrics=metrics)
        self.metrics = self.core.metrics
        self.view = _FaustPartitions(self)
        self.app: Any = None
        self._datadir: Path | None = None
        self._stop = asyncio.Event()
        self._failure: BaseException | None = None
        self._batch_started: float | None = None
        self._tick_task: asyncio.Task[None] | None = None
        self._app_started = False
        self._stopped = False
        self.batches = 0
        self.withheld = 0  # events whose acknowledgement was withheld (read again later)

    # ---- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """The native worker's shared start-up (:mod:`stream.runtime`: metrics, model and
        inference runner with the batch flags, Redis, topics, publisher, reloader), then the
        Faust app joins the group. Raises NoModelError (exit 3), TopicMissingError (2),
        KafkaUnavailableError or RedisUnavailableError (1)."""
        core, s = self.core, self.settings
        await core.start_resources(self.view, ready=self.ready, alive=self.alive)
        self.app = self._make_app()
        await self.app.start()
        self._app_started = True
        self._tick_task = asyncio.get_running_loop().create_task(self._tick(), name="faust-tick")
        if s.gc_freeze:
            freeze_startup_objects()
        conf = self.app.conf
        self.metrics.batch_limit.set(s.batch.max_batch)  # take_events' fixed size (see above)
        log.info(
            "batching: max_batch=%d max_delay_ms=%g queue_size=%d infer_batch=%d "
            "latency_budget_ms=%g (faust: broker_max_poll_records %d, stream buffer %d; "
            "the latency budget is not applied: take_events(max_batch, within=max_delay))",
            s.batch.max_batch, s.batch.max_delay * 1000, s.batch.queue_size,
            core.runner.cpu_chunk if core.runner else -1, s.batch.latency_budget_ms,
            conf.broker_max_poll_records, conf.stream_buffer_maxsize,
        )  # fmt: skip
        log.info(
            "faust engine started: %s -> %s (group %s, model %s, %s, %s)", s.input_topic,
            s.output_topic, s.group_id, core.runner.version if core.runner else None,
            s.guarantee, s.emit,
        )  # fmt: skip

    def _make_app(self) -> Any:
        import faust

        s = self.settings
        self._datadir = Path(tempfile.mkdtemp(prefix="eventcast-faust-"))
        session = s.session_timeout_ms / 1000.0
        app = faust.App(
            s.group_id,  # Faust's consumer group is the app id: the same group as native
            **faust_broker_settings(s.kafka),
            autodiscover=False,
            web_enabled=False,
            datadir=str(self._datadir),  # Faust insists on one; nothing is stored (no tables)
            store="memory://",
            # No tables, no leader topic, no topic creation: the broker does not auto-create
            # topics, and this app needs none besides the worker's own three.
            topic_allow_declare=False,
            topic_disable_leader=True,
            table_standby_replicas=0,
            processing_guarantee="at_least_once",
            consumer_auto_offset_reset=s.auto_offset_reset,
            consumer_group_instance_id=s.group_instance_id,
            consumer_metadata_max_age_ms=s.metadata_max_age_ms,
            broker_session_timeout=session,
            broker_heartbeat_interval=max(0.1, session / 3),
            broker_commit_interval=COMMIT_INTERVAL,
            broker_max_poll_records=s.batch.max_batch,
            # Bounded buffer between fetcher and agent: when the agent waits (Redis down), the
            # fetcher stops at this many events.
            stream_buffer_maxsize=max(s.batch.max_batch * s.batch.queue_size, 64),
            stream_wait_empty=True,  # rebalance/stop wait for the batch in flight
        )
        topic = app.topic(
            s.input_topic,
            key_type=bytes,
            value_type=bytes,
            key_serializer="raw",  # bytes as they are: decoding/validation is the core's
            value_serializer="raw",
            allow_empty=True,
        )
        app.agent(topic, name=f"eventcast-{s.input_topic}")(self._agent)
        app.on_partitions_revoked.connect(self._on_revoked)  # type: ignore[arg-type]
        app.on_partitions_assigned.connect(self._on_assigned)  # type: ignore[arg-type]
        return app

    def request_stop(self) -> None:
        """Finish the batch in flight (Faust then commits it), then let :meth:`run` return."""
        self._stop.set()
        self.core.request_stop()

    def request_reload(self) -> None:
        self.core.request_reload()

    def ready(self) -> bool:
        """Model loaded, Faust app running, Redis reachable."""
        return self._app_started and self._failure is None and self.core.ready()

    def alive(self) -> bool:
        """``/healthz``: False when a batch has been in the agent for ``--liveness-timeout``
        without finishing, unless the worker is paused on purpose (Redis, broker)."""
        started = self._batch_started
        if self.core.pauses or started is None:
            return True
        return time.monotonic() - started <= self.settings.liveness_timeout

    async def run(self) -> None:
        """Wait until :meth:`request_stop`; raises StreamError when the engine failed."""
        self.metrics.ready.set(1)
        await self._stop.wait()
        self.metrics.ready.set(0)
        if self._failure is not None:
            raise StreamError(f"faust engine failed: {self._failure!r}") from self._failure

    async def stop(self) -> None:
        """Stop Faust (it waits for the batch in flight and commits what is finished), then
        release the core's resources. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self.request_stop()
        if self._tick_task is not None:
            self._tick_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tick_task
        if self.app is not None:
            try:
                await self.app.stop()
            except Exception:  # shutting down: report, keep closing the rest
                log.exception("error while stopping the faust app")
        await self.core.stop()
        if self._datadir is not None:
            shutil.rmtree(self._datadir, ignore_errors=True)

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = exc
        self.request_stop()

    # ---- the agent -----------------------------------------------------------------------------

    async def _agent(self, stream: Any) -> None:
        s = self.settings.batch
        within = max(s.max_delay, 0.001)  # None would let a partial batch wait forever
        async for events in stream.take_events(s.max_batch, within=within):
            try:
                await self._on_events(events)
            except Exception as exc:  # the events were withheld; stop as the native loop would
                log.exception("faust engine: batch processing failed; stopping")
                self._fail(exc)

    async def _on_events(self, events: Sequence[Any]) -> None:
        """Process one micro-batch; a partition's events are acknowledged (and so committed by
        Faust) only when the core finished it, otherwise withheld."""
        by_tp: dict[TopicPartition, list[Any]] = {}
        for ev in events:
            m = ev.message
            by_tp.setdefault(TopicPartition(m.topic, m.partition), []).append(ev)
        finished: set[TopicPartition] = set()
        try:
            await self._process(by_tp, finished)
        finally:
            for tp, evs in by_tp.items():
                if tp not in finished:
                    for ev in evs:
                        ev.message.acked = True  # handled, but never reported to the consumer
                    self.withheld += len(evs)
                    log.warning(
                        "%s[%d]: %d events not finished, not acknowledged: offsets from %d stay "
                        "uncommitted and are read again", tp.topic, tp.partition, len(evs),
                        evs[0].message.offset,
                    )  # fmt: skip

    async def _process(
        self, by_tp: dict[TopicPartition, list[Any]], finished: set[TopicPartition]
    ) -> None:
        core = self.core
        pending = {
            tp: [
                _Record(
                    ev.message.offset,
                    ev.message.key,
                    ev.message.value,
                    int((ev.message.timestamp or 0.0) * 1000.0),  # Faust gives seconds
                )
                for ev in evs
            ]
            for tp, evs in by_tp.items()
        }
        attempt = 0
        while pending:
            if self._failure is not None:
                return
            self.view.begin(pending)
            async with core.gate.batch_lock:
                self._batch_started = time.monotonic()
                core.abandon(False)
                try:
                    core.runtime.swap_model()
                    # Faust delivers only assigned partitions' events to the agent (a revoke
                    # first waits for the batch in flight), so every partition here is ours.
                    core.partitions.adopt(set(pending))
                    await core.processor.process(pending)
                finally:
                    self._batch_started = None
                abandoned = core.abandoning
            for tp in list(pending):
                if tp in self.view.done:
                    finished.add(tp)
                    del pending[tp]
            if not pending:
                break
            if abandoned or core.stopping.is_set():
                return  # stop or rebalance during a Redis outage: withheld, read again later
            delay = core.retry.delay(attempt)
            attempt += 1
            log.warning(
                "processing again from their first offset: %s (attempt %d, in %.2fs)",
                ", ".join(f"{tp.topic}[{tp.partition}]@{r[0].offset}" for tp, r in pending.items()),
                attempt, delay,
            )  # fmt: skip
            await asyncio.sleep(delay)
        self.batches += 1

    # ---- rebalances and housekeeping -----------------------------------------------------------

    async def _on_revoked(self, sender: Any, revoked: Any, **kwargs: Any) -> None:
        # Faust has already waited for the batch in flight (stream_wait_empty) and committed it.
        await self.core.on_revoked({TopicPartition(tp.topic, tp.partition) for tp in revoked})

    async def _on_assigned(self, sender: Any, assigned: Any, **kwargs: Any) -> None:
        tps = {TopicPartition(tp.topic, tp.partition) for tp in assigned}
        tps = {tp for tp in tps if tp.topic == self.settings.input_topic}
        async with self.core.gate.batch_lock:  # never under a batch in flight
            await self.core.on_assigned(tps)

    async def _tick(self) -> None:
        """Between batches: model swap, idle sweep, status announcement; abandon a batch that
        holds up a rebalance for too long (Redis down); notice a crashed Faust app."""
        core = self.core
        while True:
            await asyncio.sleep(_TICK)
            started = self._batch_started
            if (
                started is not None
                and getattr(self.app, "rebalancing", False)
                and time.monotonic() - started > _REVOKE_WAIT
            ):
                core.abandon(True)
            if self.app is not None and self.app.crashed:
                self._fail(self.app.crash_reason or StreamError("the faust app crashed"))
                return
            if core.gate.batch_lock.locked():
                continue
            async with core.gate.batch_lock:
                core.runtime.swap_model()
                await core.housekeeping()


async def serve(settings: WorkerSettings) -> int:
    """``worker start --engine faust``: run until SIGTERM/SIGINT (drain, commit, exit 0); a
    second signal exits at once; SIGHUP checks the model directory; SIGUSR1 dumps stacks."""
    from stream.diagnostics import install_signal_handlers

    engine = FaustEngine(settings)
    install_signal_handlers(
        asyncio.get_running_loop(),
        engine.request_stop,
        engine.request_reload,
    )
    try:
        await engine.start()
        await engine.run()
    finally:
        await engine.stop()
    log.info("faust engine stopped cleanly")
    return 0
