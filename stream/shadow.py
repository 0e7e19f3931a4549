"""The shadow (challenger) version: a second model run on the serving path's windows, its forecasts
published to a topic of their own, so two versions are compared on live traffic before
``worker models promote``.

``worker start --shadow-version V [--shadow-model-dir DIR] [--shadow-topic T]``. The worker hands
every batch's windows to :meth:`ShadowRunner.submit` once the serving forecasts are acknowledged;
that call only enqueues. A task of its own then runs the shadow model in a thread, encodes the
forecasts exactly as the serving ones (:func:`stream.publisher.encode_forecasts`, same JSON, the
shadow's ``model_version``, same ``source``) and publishes them with a producer of its own
(idempotent, ``acks=all``), and feeds the ``shadow`` lane of the online accuracy.

What it never does: change the serving forecasts, offsets or commits, or make the serving path
wait. Its queue is bounded (``--shadow-queue-size`` batches): when full, new batches are dropped
and counted (``eventcast_shadow_dropped_total``). A failure (start, inference, publish) is logged
and counted (``eventcast_shadow_failures_total{stage}``), never fatal: at start it leaves the
worker serving without a shadow; later it loses that batch's shadow forecasts.

Delivery: at-least-once while the worker runs (a redelivered event is forecast again, as on the
serving topic); on a clean stop the queue is drained (bounded wait); a crash loses what was still
queued, since input offsets are committed without waiting for the shadow. Under
``--guarantee exactly_once`` the shadow producer is not transactional: shadow forecasts are
at-least-once. The shadow runs only while its version differs from the serving one (after
``worker models promote V`` of the shadow version it idles, rather than scoring V twice).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Sequence

from aiokafka.admin import AIOKafkaAdminClient

from model.features import build_inputs
from model.predictor import Forecast
from model.registry import LoadedModel, ModelRegistry
from stream.accuracy import AccuracyLane, OnlineAccuracy, first_step
from stream.metrics import Metrics
from stream.publisher import OutMessage, Publisher, encode_forecasts
from stream.settings import WorkerSettings
from stream.windows import WindowBatch

log = logging.getLogger(__name__)

_LOG_EVERY = 30.0  # seconds between two failure logs of one stage
_DRAIN_TIMEOUT = 10.0


class _Item:
    __slots__ = ("combined", "gens", "parts")

    def __init__(
        self, combined: WindowBatch, parts: list[tuple[int, WindowBatch]], gens: dict[int, int]
    ) -> None:
        self.combined = combined
        self.parts = parts
        self.gens = gens


class ShadowRunner:
    """Runs the shadow version beside the serving one (see module docstring).

    ``accuracy``: the worker's online accuracy (None when disabled). ``start`` returns False (and
    the runner stays idle) when the shadow cannot run; ``stop`` is idempotent.
    """

    def __init__(
        self, settings: WorkerSettings, metrics: Metrics, accuracy: OnlineAccuracy | None
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.accuracy = accuracy
        self.lane: AccuracyLane | None = accuracy.lane("shadow") if accuracy is not None else None
        self.topic = settings.shadow_topic_name
        self.model: LoadedModel | None = None
        self._publisher: Publisher | None = None
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(settings.shadow_queue_size)
        self._task: asyncio.Task[None] | None = None
        self._gens: dict[int, int] = {}
        self._last_log: dict[str, float] = {}
        self._stopped = False

    @property
    def version(self) -> str | None:
        return self.model.version if self.model is not None else None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._stopped

    # ---- lifecycle -----------------------------------------------------------------------------

    async def start(self, serving: LoadedModel) -> bool:
        """Load and check the shadow version against the serving config (same checks as a hot
        reload), check its topic exists, start its producer and task. False when any of it
        fails (logged, counted): the worker then serves without a shadow."""
        s = self.settings
        model_dir = s.shadow_model_dir or s.model_dir
        try:
            self.model = await asyncio.to_thread(
                ModelRegistry(model_dir).load,
                s.shadow_version,
                backend=s.backend,
                device=s.device,
                threads=s.threads or os.cpu_count(),
                expect=serving.config,
            )
            await self._check_topic()
            self._publisher = Publisher(s.kafka)
            await self._publisher.start()
        except Exception as exc:
            self.metrics.shadow_failures.labels("start").inc()
            log.error(
                "shadow version %s from %s not started, serving without a shadow: %s",
                s.shadow_version or "CURRENT", model_dir, exc,
            )  # fmt: skip
            await self._close_publisher()
            self.model = None
            return False
        self.metrics.shadow_info.labels(self.model.version).set(1)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="shadow")
        if self.model.version == serving.version:
            log.warning(
                "shadow version %s is the serving version: it idles until another one serves",
                self.model.version,
            )
        log.info(
            "shadow version %s (%s) -> %s", self.model.version, model_dir, self.topic
        )  # fmt: skip
        return True

    async def _check_topic(self) -> None:
        admin = AIOKafkaAdminClient(
            **self.settings.kafka.client_kwargs(), request_timeout_ms=10_000
        )
        await admin.start()
        try:
            existing = set(await admin.list_topics())
        finally:
            await admin.close()
        if self.topic not in existing:
            raise RuntimeError(
                f"shadow topic {self.topic} does not exist; create it (`worker topics create "
                f"--shadow-topic {self.topic}`)"
            )

    async def stop(self, drain_timeout: float = _DRAIN_TIMEOUT) -> None:
        """Publish what is queued (at most ``drain_timeout`` s), then stop. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        task, self._task = self._task, None
        if task is not None:
            if not task.done():
                try:
                    await asyncio.wait_for(self._queue.join(), drain_timeout)
                except TimeoutError:
                    log.warning(
                        "shadow: %d batches not published at stop", self._queue.qsize()
                    )  # fmt: skip
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._close_publisher()
        if self.model is not None:
            with contextlib.suppress(KeyError):
                self.metrics.shadow_info.remove(self.model.version)

    async def _close_publisher(self) -> None:
        pub, self._publisher = self._publisher, None
        if pub is not None:
            try:
                await pub.stop()
            except Exception:  # shutting down: report only
                log.exception("shadow: error while stopping its producer")

    # ---- the serving path's side: enqueue only -------------------------------------------------

    def submit(
        self,
        combined: WindowBatch,
        parts: Sequence[tuple[int, WindowBatch]],
        serving_version: str,
    ) -> None:
        """Queue one batch's windows (``combined`` = ``parts`` concatenated in order) for the
        shadow model. Never waits: a full queue drops the batch (counted)."""
        if self._task is None or self.model is None or len(combined) == 0:
            return
        if self.model.version == serving_version:
            return  # promoted: the serving lane scores this version already
        item = _Item(combined, list(parts), {p: self._gens.get(p, 0) for p, _ in parts})
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            self.metrics.shadow_dropped.inc(len(combined))
            self._log_failure(
                "queue", "queue full (%d batches): windows dropped", self._queue.maxsize
            )

    def drop(self, partition: int) -> None:
        """A partition was revoked or reset: queued batches of it are still published (at least
        once), but no longer scored; its pending shadow forecasts are forgotten."""
        self._gens[partition] = self._gens.get(partition, 0) + 1
        if self.lane is not None:
            self.lane.drop(partition)

    # ---- the shadow task -----------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            item = await self._queue.get()
            try:
                await self._one(item)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug: same outcome as a failure, the task lives on
                self.metrics.shadow_failures.labels("error").inc()
                self._log_failure("error", "shadow batch failed: %r", exc)
            finally:
                self._queue.task_done()

    async def _one(self, item: _Item) -> None:
        model = self.model
        assert model is not None
        try:
            fc = await asyncio.to_thread(_predict, model, item.combined)
        except Exception as exc:
            self.metrics.shadow_failures.labels("infer").inc()
            self._log_failure("infer", "shadow inference failed: %r", exc)
            return
        s = self.settings
        messages: list[OutMessage] = []
        row = 0
        for _, windows in item.parts:
            k = len(windows)
            part = _slice(fc, row, row + k)
            messages += encode_forecasts(
                windows, part, version=model.version, input_topic=s.input_topic,
                output_topic=self.topic,
            )  # fmt: skip
            row += k
        assert self._publisher is not None
        try:
            await self._publisher.publish(messages)
        except Exception as exc:
            self.metrics.shadow_failures.labels("publish").inc()
            self._log_failure("publish", "shadow publish to %s failed: %r", self.topic, exc)
            return
        self.metrics.shadow_forecasts.labels(model.version).inc(len(messages))
        if self.lane is not None and self.accuracy is not None:
            steps = first_step(fc)
            row = 0
            for partition, windows in item.parts:
                k = len(windows)
                if self._gens.get(partition, 0) == item.gens[partition]:  # not revoked since
                    self.lane.observe(partition, windows, steps[row : row + k], model.version)
                row += k
            self.accuracy.update_pending()

    def _log_failure(self, stage: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last_log.get(stage, -_LOG_EVERY) >= _LOG_EVERY:
            self._last_log[stage] = now
            log.warning(msg + " (the serving path is not affected)", *args)


def _predict(model: LoadedModel, windows: WindowBatch) -> Forecast:
    x = build_inputs(windows.ts, windows.values, windows.features, model.config)  # (B, T, C)
    return model.predictor.predict(x)


def _slice(fc: Forecast, a: int, b: int) -> Forecast:
    return Forecast(
        fc.mean[a:b], fc.std[a:b],
        {k: v[a:b] for k, v in fc.lower.items()}, {k: v[a:b] for k, v in fc.upper.items()},
    )  # fmt: skip
