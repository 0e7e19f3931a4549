"""``--data kafka://TOPIC``: replay a topic from the brokers into training rows.

Every partition is read from its beginning (or from the first record at or after ``--since``,
by broker timestamp) up to the end offset taken when the replay starts (or the first record
after ``--until``), so the result is exactly the records in that range: nothing produced during
the replay is read, and the replay ends even on a busy topic. No consumer group is joined and
nothing is committed, so a running worker's group is not disturbed.

Each record goes through the worker's own decoder (:func:`stream.decode.decode_event`) and, per
series in offset order, the worker's ``late`` / ``duplicate`` rule, so training sees exactly the
events the worker accepts; every refused record is counted under its dead-letter reason.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from dataclasses import dataclass
from typing import Any

import pandas as pd

from model.errors import ConfigError, EventcastError
from stream.consumer import offset_bounds, read_ranges
from stream.decode import Event, decode_event
from stream.errors import KafkaUnavailableError
from stream.settings import KafkaSettings
from train.sources import DataReport, DataSettings, SeriesFrame

log = logging.getLogger(__name__)

REPLAY_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class RawRecord:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int


def parse_kafka_uri(uri: str) -> tuple[str, dict[str, str]]:
    """``kafka://TOPIC[?since=...&until=...]`` -> (topic, query). ConfigError for no topic."""
    parsed = urllib.parse.urlparse(uri)
    topic = (parsed.netloc + parsed.path).strip("/")
    if not topic:
        raise ConfigError(f"--data: {uri!r} names no topic (kafka://TOPIC)")
    query = {k: v[-1] for k, v in urllib.parse.parse_qs(parsed.query).items()}
    unknown = set(query) - {"since", "until"}
    if unknown:
        raise ConfigError(f"--data: unknown kafka:// parameter(s) {', '.join(sorted(unknown))}")
    return topic, query


async def read_topic(
    topic: str,
    client_kwargs: dict[str, Any],
    *,
    since: float | None = None,
    until: float | None = None,
    timeout: float = REPLAY_TIMEOUT_S,
) -> list[RawRecord]:
    """Every record of ``topic`` in the range described in the module docstring, per partition
    in offset order. ConfigError when the topic does not exist, EventcastError when the brokers
    cannot be reached or the replay does not finish within ``timeout`` seconds."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.errors import KafkaError

    consumer = AIOKafkaConsumer(
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **client_kwargs,
    )
    try:
        await consumer.start()
    except KafkaError as exc:
        raise EventcastError(
            f"--data kafka://{topic}: cannot reach {client_kwargs.get('bootstrap_servers')}: {exc}"
        ) from exc
    try:
        partitions = await _partitions(topic, client_kwargs)
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        bounds = await offset_bounds(consumer, tps)
        start = {tp: begin for tp, (begin, _) in bounds.items()}
        stop = {tp: end for tp, (_, end) in bounds.items()}
        if since is not None:
            found = await consumer.offsets_for_times({tp: int(since * 1000) for tp in tps})
            start = {tp: (found[tp].offset if found[tp] else stop[tp]) for tp in tps}
        if until is not None:
            # The first record strictly after `until` is where the range stops.
            found = await consumer.offsets_for_times({tp: int(until * 1000) + 1 for tp in tps})
            stop = {tp: min(stop[tp], found[tp].offset if found[tp] else stop[tp]) for tp in tps}
        out: dict[int, list[RawRecord]] = {tp.partition: [] for tp in tps}
        ranges = {tp: (start[tp], stop[tp]) for tp in tps}
        try:
            async for tp, msgs in read_ranges(consumer, ranges, timeout=timeout):
                out[tp.partition].extend(
                    RawRecord(tp.partition, m.offset, m.key, m.value, m.timestamp) for m in msgs
                )
        except KafkaUnavailableError as exc:
            raise EventcastError(
                f"--data kafka://{topic}: replay did not finish in {timeout:.0f} s "
                f"({sum(map(len, out.values()))} records read): {exc}"
            ) from exc
        log.info(
            "replayed %s: %d records from %d partitions",
            topic, sum(map(len, out.values())), len(tps),
        )  # fmt: skip
        return [r for p in partitions for r in out[p]]
    except KafkaError as exc:
        raise EventcastError(f"--data kafka://{topic}: replay failed: {exc}") from exc
    finally:
        await consumer.stop()


async def _partitions(topic: str, client_kwargs: dict[str, Any]) -> list[int]:
    """The topic's partition numbers, from the brokers' metadata (ConfigError if no topic)."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(**client_kwargs)
    await admin.start()
    try:
        described = await admin.describe_topics([topic])
    finally:
        await admin.close()
    for entry in described:
        if entry.get("topic") == topic and entry.get("error_code", 0) == 0:
            parts = sorted(int(p["partition"]) for p in entry.get("partitions", ()))
            if parts:
                return parts
    raise ConfigError(f"--data: topic {topic!r} does not exist")


def decode_records(
    records: list[RawRecord], source: str, features: tuple[str, ...], max_bytes: int
) -> SeriesFrame:
    """Decode records as the worker does (see module docstring) into a :class:`SeriesFrame`.
    ConfigError when no event is usable."""
    report = DataReport(source, rows=len(records), features=features)
    last_ts: dict[str, float] = {}
    rows: list[tuple[Any, ...]] = []
    for r in records:
        ev = decode_event(r.key, r.value, max_bytes=max_bytes, required_features=features)
        if not isinstance(ev, Event):
            report.reject(ev.reason)
            continue
        prev = last_ts.get(ev.series_id)
        if prev is not None and ev.ts <= prev:
            report.reject("duplicate" if ev.ts == prev else "late")
            continue
        last_ts[ev.series_id] = ev.ts
        rows.append((ev.series_id, ev.ts, ev.value, *(ev.features[f] for f in features)))
    frame = pd.DataFrame(rows, columns=["series_id", "ts", "value", *features])
    frame = frame.astype({"ts": "float64", "value": "float64", **{f: "float64" for f in features}})
    frame = frame.sort_values(["series_id", "ts"], kind="stable").reset_index(drop=True)
    report.accepted = len(frame)
    report.series = int(frame["series_id"].nunique()) if len(frame) else 0
    if not len(frame):
        raise ConfigError(f"--data: {source} holds no usable event ({report.summary()})")
    return SeriesFrame(frame, report)


def replay_topic(settings: DataSettings) -> SeriesFrame:
    """Replay ``settings.uri`` (``kafka://TOPIC``) into a SeriesFrame (see module docstring)."""
    topic, query = parse_kafka_uri(settings.uri)
    if isinstance(settings.features, str):
        raise ConfigError("--features: 'auto' is not available for kafka://; name the features")
    from train.settings import parse_time

    since = (
        settings.since if settings.since is not None else parse_time(query.get("since"), "since")
    )
    until = (
        settings.until if settings.until is not None else parse_time(query.get("until"), "until")
    )
    kafka = settings.kafka
    if kafka is None:
        kafka = KafkaSettings()
    records = asyncio.run(read_topic(topic, kafka.client_kwargs(), since=since, until=until))
    return decode_records(records, settings.uri, tuple(settings.features), settings.max_event_bytes)
