"""Forecasts read back from the forecast topic, for ``GET /series/{id}`` and the live view.

:class:`ForecastHistory` holds the most recent forecast objects per series in memory, with the
record headers the view shows (``model_version``, ``calibration``); :class:`TopicForecastFeed`
keeps it filled from the topic in the background (best effort: it never stops the HTTP service).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict, deque
from collections.abc import Mapping
from typing import Any, Protocol

import orjson

log = logging.getLogger(__name__)

# Record headers kept with each forecast (docs/contract.md, "Forecasts"), each cut to this length.
KEPT_HEADERS = ("model_version", "calibration")
MAX_HEADER_CHARS = 64


def kept_headers(headers: Any) -> dict[str, str]:
    """The headers of :data:`KEPT_HEADERS` among a Kafka record's ``(name, bytes)`` pairs, decoded
    (undecodable bytes replaced) and cut to :data:`MAX_HEADER_CHARS`; the last of a repeated name
    wins."""
    kept: dict[str, str] = {}
    for item in headers or ():
        try:
            name, raw = item
        except (TypeError, ValueError):
            continue
        if name in KEPT_HEADERS and isinstance(raw, bytes | bytearray):
            kept[name] = bytes(raw[: 4 * MAX_HEADER_CHARS]).decode("utf-8", "replace")[
                :MAX_HEADER_CHARS
            ]
    return kept


class ForecastHistory:
    """The most recent forecast objects per series, in memory, bounded in series and per series.

    Fed by the forecast-topic feed; read by ``GET /series/{id}`` and the view. The least recently
    updated series is forgotten when more than ``max_series`` are held. Forecasts are kept in the
    order they are added; a forecast whose ``ts`` equals the newest one held replaces it (a repeat
    after a worker restart under at-least-once). Each forecast keeps the record headers it came
    with (:func:`kept_headers`), apart from the object: the forecast objects are served unchanged.
    """

    def __init__(self, per_series: int = 200, max_series: int = 10_000) -> None:
        self.per_series = per_series
        self.max_series = max_series
        self._data: OrderedDict[str, deque[tuple[dict[str, Any], dict[str, str]]]] = OrderedDict()

    def add(self, forecast: Mapping[str, Any], headers: Mapping[str, str] | None = None) -> None:
        """Remember ``forecast`` (a forecast object) and its record ``headers`` (name → text);
        objects without a string ``series_id`` are ignored."""
        sid = forecast.get("series_id")
        if not isinstance(sid, str):
            return
        ring = self._data.get(sid)
        if ring is None:
            ring = self._data[sid] = deque(maxlen=self.per_series)
        self._data.move_to_end(sid)
        entry = (dict(forecast), dict(headers or {}))
        if ring and ring[-1][0].get("ts") == forecast.get("ts"):
            ring[-1] = entry
        else:
            ring.append(entry)
        while len(self._data) > self.max_series:
            self._data.popitem(last=False)

    def recent(self, series_id: str) -> list[dict[str, Any]]:
        """The forecasts held for ``series_id``, oldest first (empty when none)."""
        return [f for f, _ in self._data.get(series_id, ())]

    def latest(self, series_id: str) -> dict[str, Any] | None:
        ring = self._data.get(series_id)
        return ring[-1][0] if ring else None

    def latest_headers(self, series_id: str) -> dict[str, str]:
        """The kept record headers of the newest forecast of ``series_id`` (empty when none)."""
        ring = self._data.get(series_id)
        return dict(ring[-1][1]) if ring else {}

    def series(self) -> list[str]:
        """Series ids held, most recently updated first."""
        return list(reversed(self._data))


class ForecastFeed(Protocol):
    """A background reader of the forecast topic feeding a :class:`ForecastHistory`."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class TopicForecastFeed:
    """Keeps a :class:`ForecastHistory` filled from the forecast topic (all partitions, no
    consumer group, ``read_committed``), starting ``backfill`` records before each partition's
    end so the view has history at once.

    Optional for the server: connection errors are logged and retried with a capped backoff, and
    never stop the HTTP service. ``stop()`` is safe to call twice.
    """

    def __init__(
        self, kafka: Any, topic: str, history: ForecastHistory, *, backfill: int = 2000
    ) -> None:
        self.kafka = kafka  # stream.settings.KafkaSettings
        self.topic = topic
        self.history = history
        self.backfill = backfill
        self._task: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()  # set once the backfill position is taken

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="forecast-feed")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        delay = 0.5
        while True:
            try:
                await self._consume()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the feed is best effort: log, back off, retry
                log.warning(
                    "forecast feed on %s failed (%s); retrying in %.1fs", self.topic, exc, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def _consume(self) -> None:
        from aiokafka import AIOKafkaConsumer

        from deploy.plot import assigned_partitions

        consumer = AIOKafkaConsumer(
            self.topic, **self.kafka.client_kwargs(), group_id=None, enable_auto_commit=False,
            isolation_level="read_committed", metadata_max_age_ms=10_000,
        )  # fmt: skip
        await consumer.start()
        try:
            tps = await assigned_partitions(consumer, self.topic)
            begins = await consumer.beginning_offsets(tps)
            ends = await consumer.end_offsets(tps)
            for tp in tps:
                consumer.seek(tp, max(begins[tp], ends[tp] - self.backfill))
            self.ready.set()
            while True:
                batch = await consumer.getmany(timeout_ms=1000, max_records=5000)
                for msgs in batch.values():
                    for msg in msgs:
                        if msg.value is None:
                            continue
                        try:
                            doc = orjson.loads(msg.value)
                        except orjson.JSONDecodeError:
                            continue
                        if isinstance(doc, dict):
                            self.history.add(doc, kept_headers(msg.headers))
        finally:
            await consumer.stop()
