"""Windows from the input log: a partition's state as Redis stored it (:meth:`Rebuilder.restore`)
and, when Redis is behind the committed offset or lost the partition, the records re-read from
Kafka to bring the windows exactly to the state the committed offset implies
(:meth:`Rebuilder.rebuild`; docs/design.md, "State, fencing and rebuild").
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from aiokafka import TopicPartition

from model.predictor import Forecast
from stream.calibration import OnlineCalibrator
from stream.consumer import PartitionReplayer
from stream.inference import take_forecast
from stream.metrics import Metrics
from stream.settings import WorkerSettings
from stream.store import StoredPartition
from stream.windows import ApplyResult, PartitionWindows, WindowBatch

Forecaster = Callable[[WindowBatch], Awaitable[Forecast]]

log = logging.getLogger(__name__)


class Rebuilder:
    """Restores stored windows and rebuilds missing ones from the input topic (read
    ``read_committed`` under exactly-once, so aborted records never reach a window)."""

    def __init__(
        self,
        settings: WorkerSettings,
        metrics: Metrics,
        on_progress: Callable[[], None],
        forecast: Forecaster | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self._on_progress = on_progress
        self._forecast = forecast  # the serving model (re-forecasts for the calibration state)
        self._replayer = PartitionReplayer(
            settings.kafka, "read_committed" if settings.exactly_once else "read_uncommitted"
        )

    @staticmethod
    def restore(
        windows: PartitionWindows, stored: StoredPartition, calibration: OnlineCalibrator | None
    ) -> list[str]:
        """Load the stored series (and their interval calibration) into ``windows``
        (``calibration``); returns the series whose blob is unreadable (then the state is
        incomplete, and the caller rebuilds the partition). A series without a calibration blob
        (state written by a worker with ``--interval-calibration static``) starts from the
        partition's prior."""
        bad: list[str] = []
        for series_id, blob in stored.blobs.items():
            try:
                windows.load_series(series_id, blob)
            except ValueError:
                bad.append(series_id)
        if calibration is not None:
            bad += calibration.load(stored.calibration)
        assert stored.applied is not None
        windows.applied = stored.applied  # (its clock follows from the series loaded)
        return sorted(bad)

    async def rebuild(
        self,
        tp: TopicPartition,
        windows: PartitionWindows,
        committed: int,
        expected: int | None,
        *,
        resume: bool,
        calibration: OnlineCalibrator | None = None,
    ) -> None:
        """Apply the input records up to ``committed`` that ``windows`` lacks: from
        ``windows.applied + 1`` when they hold Redis's (exact) state at that offset
        (``resume``), otherwise from the start of the partition's log, so that the windows are
        exactly the ones the committed offset implies (the state is a pure function of the
        records applied since the partition was empty). ``--rebuild-lookback`` N > 0 bounds the
        second case to the last N records, knowingly inexact. Records stream through the windows
        in chunks: memory is bounded by the windows, not by the history. With ``calibration``
        (online interval calibration) every window is forecast again with the serving model, in
        offset order, so that the calibration state is the one those forecasts imply (exactly the
        live one when the same model version made them)."""
        lookback = self.settings.limits.rebuild_lookback
        if resume:
            start = windows.applied + 1
        elif lookback:
            start = max(0, committed - lookback)
        else:
            start = 0
        log.warning(
            "%s[%d]: Redis holds offset %s, the group committed %d: rebuilding windows from "
            "offset %d%s", tp.topic, tp.partition, expected, committed, start,
            "" if resume else " (the log start)" if not start else "",
        )  # fmt: skip
        if start > 0 and not resume:
            log.warning(
                "%s[%d]: --rebuild-lookback %d: records before offset %d are not re-read; a "
                "series whose points (or the idle clock, series cap and ordering checks) depend "
                "on them comes back incomplete", tp.topic, tp.partition, lookback, start,
            )  # fmt: skip
        first: list[int] = []

        async def apply(recs: list[Any]) -> None:
            if not first and recs:
                first.append(recs[0].offset)
            res = windows.apply(recs, emit=calibration is not None)
            if calibration is not None:
                await self._recalibrate(calibration, res)
            self._on_progress()  # a long rebuild is progress

        count = await self._replayer.replay(tp, start, committed, apply)
        if not resume and first and first[0] > start:
            log.warning(
                "%s[%d]: the input topic no longer holds offsets %d..%d (retention or "
                "compaction): windows are rebuilt from offset %d on, exact only if nothing "
                "before it still mattered (see docs/design.md on retention)",
                tp.topic, tp.partition, start, first[0] - 1, first[0],
            )  # fmt: skip
        windows.applied = committed - 1
        if calibration is not None:
            held = windows.rings.index
            calibration.forget([n for n in list(calibration.series) if n not in held])
        self.metrics.rebuilds.inc()
        self.metrics.rebuild_records.inc(count)

    async def _recalibrate(self, calibration: OnlineCalibrator, res: ApplyResult) -> None:
        """The calibration pass of a replayed chunk: its windows forecast as the live worker
        forecast them (rows whose forecast is not finite are left out, as live)."""
        assert self._forecast is not None
        w = res.windows
        fc = await self._forecast(w)
        ok = np.flatnonzero(fc.finite_rows())
        series = [w.series[i] for i in ok.tolist()]
        calibration.calibrate_batch(res.points, series, w.offsets[ok], take_forecast(fc, ok))
