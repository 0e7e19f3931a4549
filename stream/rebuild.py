"""Windows from the input log: a partition's state as Redis stored it (:meth:`Rebuilder.restore`)
and, when Redis is behind the committed offset or lost the partition, the records re-read from
Kafka to bring the windows exactly to the state the committed offset implies
(:meth:`Rebuilder.rebuild`; docs/design.md, "State, fencing and rebuild").
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from aiokafka import TopicPartition

from stream.consumer import PartitionReplayer
from stream.metrics import Metrics
from stream.settings import WorkerSettings
from stream.store import StoredPartition
from stream.windows import PartitionWindows

log = logging.getLogger(__name__)


class Rebuilder:
    """Restores stored windows and rebuilds missing ones from the input topic (read
    ``read_committed`` under exactly-once, so aborted records never reach a window)."""

    def __init__(
        self, settings: WorkerSettings, metrics: Metrics, on_progress: Callable[[], None]
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self._on_progress = on_progress
        self._replayer = PartitionReplayer(
            settings.kafka, "read_committed" if settings.exactly_once else "read_uncommitted"
        )

    @staticmethod
    def restore(windows: PartitionWindows, stored: StoredPartition) -> list[str]:
        """Load the stored series into ``windows``; returns the series whose blob is unreadable
        (then ``windows`` is incomplete, and the caller rebuilds the partition)."""
        bad: list[str] = []
        for series_id, blob in stored.blobs.items():
            try:
                windows.load_series(series_id, blob)
            except ValueError:
                bad.append(series_id)
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
    ) -> None:
        """Apply the input records up to ``committed`` that ``windows`` lacks: from
        ``windows.applied + 1`` when they hold Redis's (exact) state at that offset
        (``resume``), otherwise from the start of the partition's log, so that the windows are
        exactly the ones the committed offset implies (the state is a pure function of the
        records applied since the partition was empty). ``--rebuild-lookback`` N > 0 bounds the
        second case to the last N records, knowingly inexact. Records stream through the windows
        in chunks: memory is bounded by the windows, not by the history."""
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

        def apply(recs: list[Any]) -> None:
            if not first and recs:
                first.append(recs[0].offset)
            windows.apply(recs, emit=False)
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
        self.metrics.rebuilds.inc()
        self.metrics.rebuild_records.inc(count)
