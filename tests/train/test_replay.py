"""``kafka://TOPIC`` against the real broker: a replay yields exactly the events in the topic (as
the worker would accept them), bounded by time when asked; continuous retraining from it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from deploy.cli import settings as cli_settings
from model.errors import ConfigError
from model.registry import ModelRegistry
from stream.settings import KafkaSettings
from train.schedule import run_every
from train.settings import check_environment
from train.sources import DataSettings, load_data

pytestmark = pytest.mark.integration

T0 = 1_767_225_600  # 2026-01-01T00:00:00Z


def _produce(bootstrap: str, topic: str, records: list[tuple[str | None, bytes, int]]) -> None:
    """Produce ``(key, value, broker timestamp ms)`` in order, acknowledged (acks=all)."""
    from aiokafka import AIOKafkaProducer

    async def run() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        try:
            futs = [
                await producer.send(topic, value=v, key=k.encode() if k else None, timestamp_ms=t)
                for k, v, t in records
            ]
            for f in futs:
                await f
        finally:
            await producer.stop()

    asyncio.run(run())


Record = tuple[str | None, bytes, int]


def _events(
    series: int, points: int, t0_ms: int
) -> tuple[list[Record], set[tuple[str, float, float]]]:
    recs, good = [], set()
    for s in range(series):
        for i in range(points):
            ts, value = T0 + 3600.0 * i, float(s * 100 + np.sin(i / 3.0) * 10 + i * 0.01)
            ev = {"series_id": f"s{s}", "ts": ts, "value": value}
            if i % 2:  # half the events carry RFC 3339 times
                ev["ts"] = _rfc3339(ts)
            recs.append((f"s{s}", json.dumps(ev).encode(), t0_ms + i))
            good.add((f"s{s}", ts, value))
    return recs, good


def _rfc3339(ts: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat()


BAD = [
    ("s0", b"{not json", "invalid_json"),
    (None, json.dumps({"ts": T0, "value": 1}).encode(), "missing_key"),
    ("s1", json.dumps({"ts": T0 + 9e6, "value": "x"}).encode(), "schema"),
    ("s1", b'{"ts": 1767225600, "value": NaN}', "non_finite"),
    ("s2", json.dumps({"series_id": "other", "ts": T0 + 9e6, "value": 1}).encode(), "key_mismatch"),
    ("s2", json.dumps({"ts": "2026-01-01T00:00:00", "value": 1}).encode(), "schema"),  # no offset
    ("s0", json.dumps({"ts": T0, "value": 5}).encode(), "late"),  # s0 is far beyond T0 by now
    ("s0", b"x" * 70_000, "too_large"),
]


def test_replay_yields_exactly_the_events_in_the_topic(
    stack: object, make_topic: Callable[..., str]
) -> None:
    bootstrap = stack.bootstrap  # type: ignore[attr-defined]
    topic = make_topic("replay", partitions=3)
    recs, good = _events(series=5, points=60, t0_ms=1_000_000)
    _produce(bootstrap, topic, recs)
    _produce(bootstrap, topic, [(k, v, 2_000_000) for k, v, _ in BAD])
    # A duplicate of the newest s3 event: the worker refuses it, so does the replay.
    last_s3 = [r for r in recs if r[0] == "s3"][-1]
    _produce(bootstrap, topic, [(last_s3[0], last_s3[1], 2_000_001)])

    settings = DataSettings(f"kafka://{topic}", kafka=KafkaSettings(bootstrap_servers=bootstrap))
    sf = load_data(settings)
    got = set(zip(sf.frame["series_id"], sf.frame["ts"], sf.frame["value"], strict=True))
    assert got == good and len(sf.frame) == len(good)  # every event, once, nothing else
    expected: dict[str, int] = {"duplicate": 1}
    for _, _, reason in BAD:
        expected[reason] = expected.get(reason, 0) + 1
    assert dict(sf.report.rejected) == expected
    assert sf.report.rows == len(recs) + len(BAD) + 1

    # Bounded by broker time: only the good events (produced before the bad ones).
    until = DataSettings(f"kafka://{topic}", kafka=settings.kafka, until=1_500.0)
    bounded = load_data(until)
    assert len(bounded.frame) == len(good) and not bounded.report.rejected
    # From the bad events on: the range starts with no per-series history, so the `late` and
    # `duplicate` events of the full replay are the first of their series here and accepted.
    since = load_data(DataSettings(f"kafka://{topic}?since=1999.9999", kafka=settings.kafka))
    assert sorted(since.frame["series_id"]) == ["s0", "s3"]
    assert since.report.rows == len(BAD) + 1
    assert "late" not in since.report.rejected and "duplicate" not in since.report.rejected

    with pytest.raises(ConfigError, match="does not exist"):
        load_data(DataSettings("kafka://no-such-topic-xyz", kafka=settings.kafka))


def test_every_retrains_from_kafka_and_stops_on_sigterm(
    stack: object, make_topic: Callable[..., str], tmp_path: Path,
    retrain_args: Callable[..., list[str]],
) -> None:  # fmt: skip
    bootstrap = stack.bootstrap  # type: ignore[attr-defined]
    topic = make_topic("train", partitions=2)
    recs, _ = _events(series=2, points=300, t0_ms=1_000_000)
    _produce(bootstrap, topic, recs)
    argv = retrain_args("--every", "1h", "--bootstrap-servers", bootstrap,
                        data=f"kafka://{topic}")  # fmt: skip
    args = cli_settings(argv, environ={})
    settings = check_environment(args, environ={})
    from train.retrain import retrain_once

    rounds: list[str] = []

    def once(s: object) -> object:
        result = retrain_once(s)  # type: ignore[arg-type]
        rounds.append(result.version)
        if len(rounds) == 2:
            # A real SIGTERM: the loop must stop instead of sleeping for an hour.
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    # Between rounds 1 and 2 the loop would wait an hour: shorten it through the settings.
    settings = settings.model_copy(update={"every": 0.2})
    previous = signal.getsignal(signal.SIGTERM)
    assert run_every(settings, once=once) == 0
    assert signal.getsignal(signal.SIGTERM) == previous  # handler restored
    assert len(rounds) == 2
    reg = ModelRegistry(tmp_path / "models")
    assert {v.name for v in reg.versions()} == set(rounds)
    assert reg.current() in rounds
    stored = json.loads((tmp_path / "models" / rounds[0] / "metrics.json").read_text())
    assert stored["data"]["source"] == f"kafka://{topic}" and stored["data"]["accepted"] == 600
