"""One micro-batch through the worker: prepare → infer → publish → settle.

1. **prepare** (event loop): per input partition, load its windows if needed, decode and apply
   the records (:class:`~stream.windows.PartitionWindows`: records at or below the partition's
   applied offset are redeliveries and change nothing) and take the snapshot to persist;
2. **infer** (a thread, :class:`~stream.inference.InferenceRunner`): the model on every window to
   forecast; rows whose forecast is not finite are taken out (dead letters ``model_output``);
3. **publish**: encode forecasts and dead letters and hand them to the delivery guarantee
   (:mod:`stream.delivery`: acknowledged, or one transaction per partition), then the latency
   metric, online accuracy and the shadow version;
4. **settle**: persist the published partitions' snapshots, then **commit** their offsets (under
   ``at_least_once``; the native pipeline commits once for every batch settled while the next
   were published).

A partition reset between prepare and publish or settle (a failed write, a rebalance) is left
out: its records are read again from the committed offset.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from aiokafka import TopicPartition

from model.predictor import Forecast
from stream.accuracy import OnlineAccuracy
from stream.consumer import Batch
from stream.decode import Rejection
from stream.delivery import Delivery
from stream.faults import FaultInjector
from stream.health import Watchdog
from stream.inference import InferenceRunner, concat_forecasts, take_forecast
from stream.metrics import Metrics
from stream.partitions import Partitions, PartitionState
from stream.publisher import OutMessage, dead_letter, dlq_value_limit, encode_forecasts
from stream.settings import WorkerSettings
from stream.shadow import ShadowRunner
from stream.windows import ApplyResult, RecordLike, Snapshot, WindowBatch

log = logging.getLogger(__name__)

# Sampled event→forecast latencies per batch: enough for percentiles, cheap at 10k events/s.
_LATENCY_SAMPLES = 32


@dataclass
class Prepared:
    """A batch between the steps: its partitions' state objects (a partition reset meanwhile
    has another one, or none), what applying its records produced, the snapshots to persist, the
    windows to forecast and the offsets to commit; then the forecast."""

    parts: dict[TopicPartition, PartitionState]
    results: dict[TopicPartition, ApplyResult]
    snaps: dict[TopicPartition, Snapshot]
    combined: WindowBatch
    next_offsets: dict[TopicPartition, int]
    records: Batch
    fc: Forecast | None = None
    version: str = ""
    # Rows whose forecast was not finite (model_output): the records, dead-lettered instead.
    bad_output: dict[TopicPartition, list[RecordLike]] = field(default_factory=dict)
    # The input partitions whose messages were published (acknowledged, or their transaction
    # committed): the ones to persist.
    published: list[TopicPartition] = field(default_factory=list)
    slot: Any = None  # its place in the native pipeline (stream.pipeline.Slot)


def take_windows(w: WindowBatch, rows: np.ndarray) -> WindowBatch:
    return WindowBatch(
        w.partition, [w.series[i] for i in rows.tolist()], w.offsets[rows], w.record_ts_ms[rows],
        w.ts[rows], w.values[rows], {n: f[rows] for n, f in w.features.items()},
        None if w.seasonal is None else w.seasonal.take(rows),
    )  # fmt: skip


class BatchProcessor:
    """The steps of a batch (see the module docstring). ``runner()`` and ``delivery()``
    give the objects made at start-up; ``shadow()`` the shadow version's runner, if any."""

    def __init__(
        self,
        settings: WorkerSettings,
        metrics: Metrics,
        partitions: Partitions,
        *,
        runner: Callable[[], InferenceRunner],
        delivery: Callable[[], Delivery],
        faults: FaultInjector,
        pipeline_clock: Watchdog,
        stopping: Any,
        accuracy: OnlineAccuracy | None,
        shadow: Callable[[], ShadowRunner | None],
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.partitions = partitions
        self._runner = runner
        self._delivery = delivery
        self.faults = faults
        self.pipeline_clock = pipeline_clock
        self._stopping = stopping  # asyncio.Event: a stalled stage (test fault) ends with it
        self.accuracy = accuracy
        self._shadow = shadow
        self._dlq_limit: int | None = None  # bytes of an original value a dead letter may carry
        self.completed = 0  # batches settled (published, persisted, committed)

    async def process(self, batch: Batch) -> None:
        """One batch through every step in sequence (the faust engine's path; the native engine
        runs the same steps as a pipeline, :mod:`stream.pipeline`)."""
        prep = await self.prepare(batch)
        if prep is not None:
            await self.infer(prep)
            await self.complete(prep)

    # ---- prepare -------------------------------------------------------------------------------

    async def prepare(self, batch: Batch) -> Prepared | None:
        """Decode and apply the records of assigned partitions to their windows and take each
        partition's snapshot; None when nothing is left to do (or the batch was abandoned)."""
        m = self.metrics
        batch = {tp: recs for tp, recs in batch.items() if tp in self.partitions.assigned and recs}
        if not batch:
            return None
        n = sum(len(r) for r in batch.values())
        m.consumed.inc(n)
        m.batch_size.observe(n)

        t0 = time.perf_counter()
        if not await self.partitions.ensure_loaded(batch):
            return None
        results: dict[TopicPartition, ApplyResult] = {}
        parts: dict[TopicPartition, PartitionState] = {}
        snaps: dict[TopicPartition, Snapshot] = {}
        latest = self.settings.emit == "latest"
        for tp, recs in list(batch.items()):
            part = self.partitions.state(tp)
            if part is None or self.partitions.rewinding(tp):
                # Reset by a later batch's publish or persist while others loaded: its records
                # are read again from the committed offset. Reset and then loaded again here
                # (it was reset before ensure_loaded reached it): the reloaded state stops at
                # the committed offset, and these records, fetched before the rewind, start
                # further on; applied, they would leave a gap in its windows.
                del batch[tp]
                continue
            res = part.windows.apply(recs, latest=latest)
            parts[tp], results[tp], snaps[tp] = part, res, part.windows.snapshot()
            self._count(res)
        cfg = self._runner().model.config
        combined = WindowBatch.concat(
            -1, [res.windows for res in results.values()], cfg.sequence_length, cfg.features
        )
        m.stage.labels("apply").observe(time.perf_counter() - t0)
        if not batch:
            return None
        next_offsets = {tp: recs[-1].offset + 1 for tp, recs in batch.items()}
        return Prepared(parts, results, snaps, combined, next_offsets, batch)

    def _count(self, res: ApplyResult) -> None:
        m = self.metrics
        m.accepted.inc(res.accepted)
        m.warming.inc(res.warming)
        m.redelivered.inc(res.redelivered)
        m.not_reemitted.inc(res.not_reemitted)
        for _, rej in res.rejected:
            m.rejected.labels(rej.reason).inc()
            if rej.unexpected:
                m.decode_unexpected.inc()
                log.error("decoding raised (a bug; dead-lettered as schema): %s", rej.message)

    # ---- infer ---------------------------------------------------------------------------------

    async def infer(self, prep: Prepared) -> None:
        runner = self._runner()
        t0 = time.perf_counter()
        model = runner.model
        prep.fc = await runner.forecast(prep.combined)
        prep.version = model.version
        await self.faults.stall("infer", until=self._stopping)
        await self.faults.slow("infer")
        self.metrics.stage.labels("infer").observe(time.perf_counter() - t0)
        self.pipeline_clock.beat()
        self._drop_bad_outputs(prep)
        if self.settings.interval_calibration == "online":
            self._calibrate(prep)

    def _calibrate(self, prep: Prepared) -> None:
        """Online interval calibration (stream/calibration.py), partition by partition in offset
        order: score earlier forecasts against the batch's accepted points, scale the new
        forecasts' intervals, and add the changed state to the partition's snapshot (persisted
        with its windows). Partitions reset since the batch was prepared are left as they are
        (not published; their state is loaded again)."""
        assert prep.fc is not None
        h = prep.fc.mean.shape[1]
        out: list[Forecast] = []
        factors: list[np.ndarray] = []
        row = 0
        for tp, res in prep.results.items():
            k = len(res.windows)
            fc = take_forecast(prep.fc, slice(row, row + k))
            row += k
            part = prep.parts[tp]
            if self.partitions.is_current(tp, part):
                cal = part.calibrator(h)
                fc, f = cal.calibrate_batch(res.points, res.windows.series, res.windows.offsets, fc)
                snap = prep.snaps[tp]
                cal.forget(snap.delete)
                done = cal.snapshot()
                snap.cal_set, snap.cal_delete = done.set, done.delete
                factors.append(f)
            out.append(fc)
        prep.fc = concat_forecasts(out, h)
        if factors:
            self.metrics.observe_adjustment(np.concatenate(factors))

    def _drop_bad_outputs(self, prep: Prepared) -> None:
        """Take the rows whose forecast is not finite out of ``prep`` (windows, results, forecast);
        their records go to the dead-letter topic as ``model_output`` instead. A model that
        checked out on its canary windows can still overflow on extreme inputs."""
        assert prep.fc is not None
        ok = prep.fc.finite_rows()
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
                res.windows = take_windows(res.windows, np.flatnonzero(part_ok))
            row += k
        keep = np.flatnonzero(ok)
        prep.fc = take_forecast(prep.fc, keep)
        prep.combined = take_windows(prep.combined, keep)
        n = int((~ok).sum())
        self.metrics.rejected.labels("model_output").inc(n)
        log.warning("%d forecast(s) not finite (model_output): dead-lettered, not published", n)

    # ---- publish, settle, commit ---------------------------------------------------------------

    async def complete(self, prep: Prepared) -> None:
        """:meth:`publish`, :meth:`settle` and :meth:`commit` in sequence (the faust engine's
        path; the native pipeline runs them as two stages, settling and committing behind the
        next batch's publish)."""
        await self.publish(prep)
        await self.commit(await self.settle(prep))
        self.settled()

    async def publish(self, prep: Prepared) -> None:
        """Encode, then publish (:meth:`stream.delivery.Delivery.publish`: acknowledged, or one
        transaction per partition with its offset); then the latency metric, online accuracy and
        the shadow version. A partition reset or reloaded since the batch was prepared is left
        out: its records are read again from the committed offset."""
        assert prep.fc is not None
        t0 = time.perf_counter()
        messages = await self._encode(prep)
        self.metrics.stage.labels("encode").observe(time.perf_counter() - t0)
        prep.published = await self._delivery().publish(messages, prep.next_offsets)
        self.pipeline_clock.beat()
        self._observe_latency(prep.combined)
        self._after_batch(prep)
        consumer = self.partitions.consumer
        if consumer is not None:
            for tp, nxt in prep.next_offsets.items():
                hw = consumer.highwater(tp)
                if hw is not None:
                    self.metrics.lag.labels(str(tp.partition)).set(max(0, hw - nxt))

    async def settle(self, prep: Prepared) -> dict[TopicPartition, int]:
        """Persist the published partitions' snapshots (fenced); returns the offsets that may
        be committed now (published and persisted), none under ``exactly_once`` (committed in
        the transaction)."""
        persisted = await self._delivery().persist(
            {tp: (prep.parts[tp], prep.snaps[tp]) for tp in prep.published}
        )
        return {tp: prep.next_offsets[tp] for tp in persisted}

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        """Commit the input offsets of one or more settled batches (the newest per partition)."""
        await self._delivery().commit(offsets)

    def settled(self, batches: int = 1) -> None:
        """``batches`` went all the way through (published, persisted, committed)."""
        self.completed += batches
        self.pipeline_clock.beat()

    async def _encode(self, prep: Prepared) -> dict[TopicPartition, list[OutMessage]]:
        assert prep.fc is not None
        s = self.settings
        fc, version = prep.fc, prep.version
        limit = await self._dlq_value_limit()
        model_output = Rejection("model_output", f"model {version} gave a non-finite forecast")
        messages: dict[TopicPartition, list[OutMessage]] = {}
        row = 0
        for tp, res in prep.results.items():
            k = len(res.windows)
            if self.partitions.is_current(tp, prep.parts[tp]):
                out = encode_forecasts(
                    res.windows, take_forecast(fc, slice(row, row + k)),
                    version=version, input_topic=s.input_topic, output_topic=s.output_topic,
                    calibration=s.interval_calibration,
                )  # fmt: skip
                bad = prep.bad_output.get(tp, [])
                for rec, rej in [*res.rejected, *((r, model_output) for r in bad)]:
                    msg = dead_letter(
                        rec, rej, input_topic=s.input_topic, partition=tp.partition,
                        dlq_topic=s.dlq_topic, max_value_bytes=limit,
                    )  # fmt: skip
                    if msg.value is not rec.value and rec.value is not None:
                        self.metrics.dlq_truncated.inc()
                    out.append(msg)
                messages[tp] = out
            row += k
        return messages

    async def _dlq_value_limit(self) -> int:
        if self._dlq_limit is None:
            s = self.settings
            self._dlq_limit = await dlq_value_limit(s.kafka, s.dlq_topic)
            log.info("dead-letter records carry at most %d bytes of a value", self._dlq_limit)
        return self._dlq_limit

    def _after_batch(self, prep: Prepared) -> None:
        """Online accuracy and shadow version (stream/accuracy.py, stream/shadow.py): score the
        batch's forecasts and hand its windows to the shadow; nothing when both are off.
        Partitions reset by a failed publish or persist are not scored (reprocessed later)."""
        shadow = self._shadow()
        if self.accuracy is None and shadow is None:
            return
        assert prep.fc is not None
        parts = [(tp.partition, res.windows) for tp, res in prep.results.items()]
        if shadow is not None:
            shadow.submit(prep.combined, parts, prep.version)
        if self.accuracy is not None:
            live = {
                tp.partition
                for tp in prep.results
                if self.partitions.is_current(tp, prep.parts[tp])
            }
            self.accuracy.serving.observe_batch(parts, prep.fc, prep.version, live.__contains__)
            self.accuracy.update_pending()

    def _observe_latency(self, combined: WindowBatch) -> None:
        if len(combined) == 0:
            return
        idx = np.linspace(0, len(combined) - 1, min(_LATENCY_SAMPLES, len(combined))).astype(int)
        now_ms = time.time() * 1000.0
        for t in combined.record_ts_ms[idx].tolist():
            if t > 0:
                self.metrics.latency.observe(max(0.0, (now_ms - t) / 1000.0))
