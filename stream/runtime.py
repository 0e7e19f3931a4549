"""Start-up and the resources both engines share, made once, in one order, by :meth:`Runtime.start`:

1. the health endpoint (``/metrics``, ``/healthz``, ``/readyz``), so an orchestrator sees the
   worker while it starts;
2. the model (the directory's CURRENT version, checked: manifest, config, canary) and the
   inference runner with the batch flags (``--infer-batch``);
3. Redis: a client, a ping under the retry policy, the window store, a warning when the
   eviction policy could drop window keys;
4. the three topics, which must exist (the broker never auto-creates them);
5. the publisher of the delivery guarantee (idempotent, or one transactional producer per input
   partition);
6. the hot reloader of model versions.

The native worker (:class:`stream.worker.Worker`) then joins the group with its consumer; the
faust engine starts its Faust app. A flag that one of these reads works on both engines.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from model.errors import NoModelError
from model.registry import LoadedModel, ModelRegistry
from stream.errors import KafkaUnavailableError, RedisUnavailableError, TopicMissingError
from stream.inference import InferenceRunner
from stream.metrics import HealthServer, Metrics
from stream.publisher import Publisher, TransactionalPublisher
from stream.reloader import ModelReloader
from stream.retry import RetryPolicy
from stream.settings import WorkerSettings
from stream.store import WindowStore

log = logging.getLogger(__name__)


class Runtime:
    """The resources of one worker process (see the module docstring). Attributes are None until
    :meth:`start` made them; :meth:`stop` releases what exists and is idempotent."""

    def __init__(
        self, settings: WorkerSettings, metrics: Metrics, retry: RetryPolicy, stopping: Any
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.retry = retry
        self._stopping = stopping  # asyncio.Event: stop waiting for a model
        self.registry = ModelRegistry(settings.model_dir)
        self.model: LoadedModel | None = None
        self.runner: InferenceRunner | None = None
        self.redis: Any = None
        self.store: WindowStore | None = None
        self.publisher: Publisher | None = None
        self.txn: TransactionalPublisher | None = None
        self.reloader: ModelReloader | None = None
        self.health: HealthServer | None = None
        self._stopped = False

    async def start(self, *, ready: Callable[[], bool], alive: Callable[[], bool]) -> None:
        """Steps 1–6 of the module docstring. Raises NoModelError (exit 3), TopicMissingError
        (2), KafkaUnavailableError or RedisUnavailableError (1)."""
        s = self.settings
        if s.metrics_port:
            self.health = HealthServer(
                self.metrics, ready, s.metrics_host, s.metrics_port, alive=alive
            )
            await self.health.start()
        self.model = await self._first_model()
        self.runner = InferenceRunner(self.model, self.metrics, s.batch.infer_batch)
        self.runner.swap(self.model)
        await self._connect_redis()
        await self._check_topics()
        if s.exactly_once:
            self.txn = TransactionalPublisher(s.kafka, s.group_id, s.input_topic)
        else:
            self.publisher = Publisher(s.kafka)
            await self.publisher.start()
        self.reloader = ModelReloader(
            self.registry,
            self.model,
            self.load_model,
            interval=s.reload_interval,
            on_failure=lambda reason: self.metrics.reload_failures.labels(reason).inc(),
        )
        self.reloader.start()

    # ---- the model -----------------------------------------------------------------------------

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
                if not self.settings.wait_for_model or self._stopping.is_set():
                    raise
                log.info("no model in %s yet, waiting (--wait-for-model)", self.settings.model_dir)
                await asyncio.sleep(1.0)

    def swap_model(self) -> None:
        """Serve the version the reloader checked, if there is a new one (call it between
        batches: a batch never mixes versions)."""
        if self.reloader is None or self.runner is None:
            return
        model = self.reloader.take()
        if model is not None:
            old = self.runner.version
            self.model = model
            self.runner.swap(model)
            self.metrics.reloads.inc()
            log.info("model version %s now serving (was %s)", model.version, old)

    # ---- Redis and Kafka -----------------------------------------------------------------------

    async def _connect_redis(self) -> None:
        s = self.settings
        self.redis = s.redis.client()
        self.store = WindowStore(self.redis, s.redis.prefix, s.input_topic)
        try:
            await RetryPolicy(attempts=8, cap=1.0, errors=self.retry.errors).call(self.redis.ping)
        except self.retry.errors as exc:
            raise RedisUnavailableError(f"Redis at {s.redis.url} is unreachable: {exc}") from exc
        policy = await self.store.eviction_policy()
        if policy not in (None, "noeviction"):
            log.warning(
                "Redis maxmemory-policy is %s: Redis may evict window keys under memory pressure "
                "(they would be rebuilt from Kafka); set it to noeviction", policy,
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
        missing = [t for t in (s.input_topic, s.output_topic, s.dlq_topic) if t not in existing]
        if missing:
            raise TopicMissingError(
                f"topic(s) {', '.join(missing)} missing on {s.kafka.bootstrap_servers}; create "
                "them with `worker topics create` (same --input-topic/--output-topic/--dlq-topic)"
            )

    # ---- stop ----------------------------------------------------------------------------------

    async def stop(self, *first: Any) -> None:
        """Release everything; ``first`` are awaitables of the caller to close before (its
        consumer, its shadow). Errors are logged, the rest is closed all the same."""
        if self._stopped:
            return
        self._stopped = True
        for closer in (
            self.reloader.stop() if self.reloader else None,
            *first,
            self.publisher.stop() if self.publisher else None,
            self.txn.stop() if self.txn else None,
            self.redis.aclose() if self.redis is not None else None,
            self.health.stop() if self.health else None,
        ):
            if closer is None:
                continue
            try:
                await closer
            except Exception:  # shutting down: report, keep closing the rest
                log.exception("error while stopping")


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
