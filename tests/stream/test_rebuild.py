"""A partition's windows come back exactly when Redis lost them (FLUSHALL) or holds an unreadable
blob, and a stale owner cannot write after a new owner loaded the partition: the worker's
partition loader (:class:`stream.partitions.Partitions`) against the real broker and Redis, with
the committed offset given by a stand-in consumer.

The reference windows are computed from the events themselves (and, for whole partitions, by a
fresh :class:`~stream.windows.PartitionWindows` fed the same records in order), never by the
code under test's rebuild path.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import orjson
import pytest
from aiokafka import TopicPartition

from deploy.cli import settings as cli_settings
from model.config import ModelConfig
from model.predictor import Forecast
from stream.errors import StateConflictError
from stream.health import Pauses
from stream.metrics import Metrics
from stream.partitions import Partitions
from stream.redis_guard import GuardedRedis
from stream.retry import RetryPolicy
from stream.settings import WorkerSettings
from stream.store import WindowStore, partition_keys
from stream.windows import PartitionWindows, WindowBatch
from tests.helpers.kafka import kcat, produce

pytestmark = pytest.mark.integration

T0 = 1_700_000_000.0
NOW_MS = int(time.time() * 1000)  # record timestamps of the reference records


class Committed:
    """The part of the group consumer the loader uses: the committed offset (a constant)."""

    def __init__(self, offset: int | None) -> None:
        self.offset = offset

    async def committed(self, tp: TopicPartition) -> int | None:
        return self.offset

    def seek(self, tp: TopicPartition, offset: int) -> None:  # a reset rewinds the consumer
        pass


def settings(bootstrap: str, redis_url: str, topic: str, *extra: str) -> WorkerSettings:
    argv = ["start", "--bootstrap-servers", bootstrap, "--redis-url", redis_url,
            "--input-topic", topic, *extra]  # fmt: skip
    return cli_settings(argv, environ={})  # type: ignore[no-any-return]


async def last_value_forecast(w: WindowBatch) -> Forecast:
    """A stand-in model for the calibration pass of a rebuild: mean = the window's last value,
    intervals of a unit Gaussian (a pure function of the window, like the real one)."""
    m = w.values[:, -1:].astype(np.float32)
    one = np.ones_like(m)
    return Forecast(m, one, {"80": m - 1.28 * one, "95": m - 1.96 * one},
                    {"80": m + 1.28 * one, "95": m + 1.96 * one})  # fmt: skip


async def make_partitions(s: WorkerSettings, committed: int | None) -> tuple[Partitions, Any]:
    metrics = Metrics()
    client = s.redis.client()
    store = WindowStore(client, s.redis.prefix, s.input_topic)
    guard = GuardedRedis(
        RetryPolicy(attempts=3, base=0.05, cap=0.2, errors=RetryPolicy.for_redis().errors),
        metrics, Pauses(metrics.paused, lambda paused: None), give_up=lambda: False,
    )  # fmt: skip
    parts = Partitions(
        s, metrics, guard, config=lambda: ModelConfig(), store=lambda: store, txn=lambda: None,
        forecast=last_value_forecast,
    )  # fmt: skip
    parts.consumer = Committed(committed)  # type: ignore[assignment]
    parts.assigned.add(TopicPartition(s.input_topic, 0))
    return parts, client


def event(series: str, ts: float, value: float) -> tuple[str, bytes]:
    return series, orjson.dumps({"series_id": series, "ts": ts, "value": value})


def reference(s: WorkerSettings, topic: str, records: Sequence[tuple[int, str, bytes]]) -> Any:
    """Windows of a fresh PartitionWindows fed ``(offset, key, value)`` records in order."""
    pw = PartitionWindows(
        topic, 0, sequence_length=48, features=(), limits=s.limits,
        max_event_bytes=s.max_event_bytes, max_future_skew=s.max_future_skew,
    )  # fmt: skip
    recs = [
        SimpleNamespace(offset=o, key=k.encode(), value=v, timestamp=NOW_MS) for o, k, v in records
    ]
    for i in range(0, len(recs), 10_000):
        pw.apply(recs[i : i + 10_000], emit=False)
    return pw


def assert_same_windows(got: PartitionWindows, want: PartitionWindows) -> None:
    assert sorted(got.series()) == sorted(want.series())
    for sid in want.series():
        for a, b in zip(got.window(sid), want.window(sid), strict=True):
            if isinstance(a, dict):
                assert a.keys() == b.keys()
                continue
            np.testing.assert_array_equal(a, b, err_msg=sid)
    assert got.applied == want.applied and got.max_ts == want.max_ts


def stored_blobs(redis_url: str, s: WorkerSettings, topic: str, key: int = 1) -> dict[bytes, bytes]:
    """The partition's window hash (``key`` 1) or calibration hash (2) as Redis holds it."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        return client.hgetall(partition_keys(s.redis.prefix, topic, 0)[key])  # type: ignore[no-any-return]
    finally:
        client.close()


# ---- (b) a sparse series after FLUSHALL ---------------------------------------------------------


def produce_filler(bootstrap: str, topic: str, n: int, first_offset: int) -> list[tuple[str, str]]:
    """``n`` events of 100 dense series, in order to partition 0 (kcat, idempotent: in order)."""
    lines = []
    for i in range(n):
        sid = f"f{i % 100}"
        lines.append((sid, orjson.dumps({"ts": T0 + 10 + i * 0.1, "value": float(i)}).decode()))
    payload = "".join(f"{k}\t{v}\n" for k, v in lines).encode()
    argv = [kcat(), "-b", bootstrap, "-P", "-t", topic, "-K", "\t", "-p", "0",
            "-X", "acks=all", "-X", "enable.idempotence=true", "-z", "lz4",
            "-X", "linger.ms=50"]  # fmt: skip
    subprocess.run(argv, input=payload, check=True, timeout=300)
    return lines


@pytest.mark.parametrize(
    "filler",
    [
        pytest.param(3_000, id="3k"),
        # Beyond the old default bound (--rebuild-lookback 1000000): the sparse series' points
        # lie before the last million records of its partition.
        pytest.param(1_000_050, id="1M", marks=[pytest.mark.slow, pytest.mark.timeout(600)]),
    ],
)
def test_a_sparse_series_is_rebuilt_exactly_after_flushall(
    stack: Any, make_topic: Any, redis_url: str, filler: int
) -> None:
    import redis

    topic = make_topic("events", 1)
    # (the 1M case checks the windows only: re-forecasting a million windows for the calibration
    # state is the 3k case's job)
    extra = ("--interval-calibration", "static") if filler > 100_000 else ()
    s = settings(stack.bootstrap, redis_url, topic, *extra)
    sparse = [event("sparse", T0 + i, 100.0 + i) for i in range(3)]
    placed = produce(stack.bootstrap, topic, sparse, partition=0)
    assert [o for _, o in placed] == [0, 1, 2]
    lines = produce_filler(stack.bootstrap, topic, filler, 3)
    committed = 3 + filler

    async def body() -> tuple[PartitionWindows, dict[bytes, bytes], Metrics]:
        tp = TopicPartition(topic, 0)
        parts, client = await make_partitions(s, committed)
        try:
            assert await parts.load(tp)  # Redis empty, offsets committed: built from Kafka
            first = parts.state(tp)
            assert first is not None
            before = stored_blobs(redis_url, s, topic), stored_blobs(redis_url, s, topic, 2)
            redis.Redis.from_url(redis_url).flushdb()  # (FLUSHALL, for this test's db)
            parts.drop(tp)  # a new owner, or this one after a conflict: Redis lost everything
            assert await parts.load(tp)
            state = parts.state(tp)
            assert state is not None
            assert_same_windows(state.windows, first.windows)
            return state.windows, before, parts.metrics
        finally:
            await client.aclose()

    windows, before, metrics = asyncio.run(body())
    # The sparse series: exactly its three points, from the events.
    off, ts, val, _ = windows.window("sparse")
    assert off.tolist() == [0, 1, 2]
    assert ts.tolist() == [T0, T0 + 1, T0 + 2] and val.tolist() == [100.0, 101.0, 102.0]
    # Every dense series: its last 96 points, from the events.
    for j in range(100):
        idx = [i for i in range(j, filler, 100)][-96:]
        off, ts, val, _ = windows.window(f"f{j}")
        assert off.tolist() == [3 + i for i in idx], j
        assert val.tolist() == [orjson.loads(lines[i][1])["value"] for i in idx], j
    assert len(windows) == 101 and windows.applied == committed - 1
    # Redis holds again what it held before the flush, byte for byte: the windows and, with
    # online calibration, every series' calibration state (101 series and the prior).
    assert stored_blobs(redis_url, s, topic) == before[0]
    assert stored_blobs(redis_url, s, topic, 2) == before[1]
    assert len(before[1]) == (0 if extra else 102)
    assert metrics.rebuilds._value.get() >= 2  # (more if a load had to be retried)
    assert metrics.rebuild_records._value.get() >= 2 * committed


# ---- (c) an unreadable blob triggers the rebuild ------------------------------------------------


def test_an_unreadable_blob_triggers_an_exact_rebuild(
    stack: Any, make_topic: Any, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    import redis

    topic = make_topic("events", 1)
    s = settings(stack.bootstrap, redis_url, topic)
    evs = [event(f"s{j}", T0 + 300 * i, float(10 * j + i)) for i in range(70) for j in range(3)]
    placed = produce(stack.bootstrap, topic, evs, partition=0)
    committed = placed[-1][1] + 1
    want = reference(s, topic, [(o, k, v) for (k, v), (_, o) in zip(evs, placed, strict=True)])
    tp = TopicPartition(topic, 0)

    async def load_once() -> tuple[Partitions, PartitionWindows]:
        parts, client = await make_partitions(s, committed)
        try:
            assert await parts.load(tp)
            state = parts.state(tp)
            assert state is not None
            return parts, state.windows
        finally:
            await client.aclose()

    _, windows = asyncio.run(load_once())
    assert_same_windows(windows, want)
    good = stored_blobs(redis_url, s, topic)
    assert set(good) == {b"s0", b"s1", b"s2"}
    win_key = partition_keys(s.redis.prefix, topic, 0)[1]
    redis.Redis.from_url(redis_url).hset(win_key, "s1", b"\x01\x02not a window blob")
    caplog.set_level("WARNING", logger="stream.partitions")
    parts, windows = asyncio.run(load_once())
    assert parts.metrics.rebuilds._value.get() == 1
    assert any("unreadable" in r.getMessage() and "'s1'" in r.getMessage() for r in caplog.records)
    assert_same_windows(windows, want)  # s1 is back, exactly: nothing silently dropped
    assert stored_blobs(redis_url, s, topic) == good  # and Redis holds the good blob again


# ---- (a) a stale owner cannot write after a new owner loaded ------------------------------------


def test_a_stale_owner_is_fenced_after_a_new_owner_loaded(
    stack: Any, make_topic: Any, redis_url: str
) -> None:
    """Two loaders of one partition (the zombie, then the new owner): the zombie's next write,
    with the applied offset it rightly believes stored, is refused and changes nothing; the
    zombie resets its partition; the new owner writes on."""
    import redis

    topic = make_topic("events", 1)
    s = settings(stack.bootstrap, redis_url, topic)
    evs = [event("a", T0 + 300 * i, float(i)) for i in range(60)]
    placed = produce(stack.bootstrap, topic, evs, partition=0)
    recs = [SimpleNamespace(offset=o, key=k.encode(), value=v, timestamp=NOW_MS)
            for (k, v), (_, o) in zip(evs, placed, strict=True)]  # fmt: skip
    tp = TopicPartition(topic, 0)
    sync = redis.Redis.from_url(redis_url)

    def redis_state() -> tuple[dict[bytes, bytes], dict[bytes, bytes]]:
        meta_key, win_key, _ = partition_keys(s.redis.prefix, topic, 0)
        return sync.hgetall(meta_key), sync.hgetall(win_key)

    async def body() -> None:
        zombie, zc = await make_partitions(s, 50)
        owner, oc = await make_partitions(s, 50)
        try:
            assert await zombie.load(tp)
            zstate = zombie.state(tp)
            assert zstate is not None and zstate.windows.applied == 49
            assert await owner.load(tp)  # takes the partition: a new owner epoch
            ostate = owner.state(tp)
            assert ostate is not None and ostate.expected == zstate.expected == 49
            before = redis_state()
            zstate.windows.apply(recs[50:55], emit=False)
            done = await zombie.persist({tp: (zstate, zstate.windows.snapshot())})
            assert done == [] and zombie.state(tp) is None  # refused, and reset
            assert zombie.metrics.state_conflicts._value.get() == 1
            assert redis_state() == before  # nothing written
            ostate.windows.apply(recs[50:60], emit=False)
            assert await owner.persist({tp: (ostate, ostate.windows.snapshot())}) == [tp]
            meta, _ = redis_state()
            assert meta[b"applied"] == b"59"
            # The store itself: the zombie's claim is refused even with the right offset.
            assert zstate.fence is not None
            with pytest.raises(StateConflictError, match="owner epoch"):
                await zombie._store().persist(
                    0, zstate.windows.snapshot(full=True), expected=59, features=(),
                    fence=zstate.fence,
                )  # fmt: skip
            assert redis_state()[0][b"applied"] == b"59"
        finally:
            await zc.aclose()
            await oc.aclose()
            sync.close()

    asyncio.run(body())


def test_records_fetched_before_a_rewind_skip_a_partition_reset_and_reloaded_meanwhile(
    stack: Any, make_topic: Any, redis_url: str
) -> None:
    """The race of CI stop 26 (Redis killed, its AOF tail cut: every partition's write refused in
    turn). A batch holds records of p1 (not loaded) and of p0 (loaded, past its committed
    offset); while the batch loads p1, the settle stage's refused write resets p0, so the batch
    loads p0 again too, at its committed offset. p0's records in the batch were fetched before
    the reset, from further on: applied, the windows would skip the records in between (the
    failing run's window held 87 points, not 96). They are dropped and read again after the
    rewind; the reloaded state stays exactly at the committed offset."""
    from model.config import ModelConfig
    from stream.batch import BatchProcessor
    from stream.faults import FaultInjector
    from stream.health import Watchdog

    topic = make_topic("events", 2)
    s = settings(stack.bootstrap, redis_url, topic)
    tp0, tp1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
    recs: dict[TopicPartition, list[Any]] = {}
    for tp, sid in ((tp0, "a"), (tp1, "b")):
        evs = [event(sid, T0 + 300 * i, float(i)) for i in range(60)]
        placed = produce(stack.bootstrap, topic, evs, partition=tp.partition)
        recs[tp] = [SimpleNamespace(offset=o, key=k.encode(), value=v, timestamp=NOW_MS)
                    for (k, v), (_, o) in zip(evs, placed, strict=True)]  # fmt: skip

    async def body() -> None:
        parts, client = await make_partitions(s, 50)  # both partitions committed at offset 50
        parts.assigned.add(tp1)
        parts.defer_rewinds = True  # as under the native pipeline
        runner = SimpleNamespace(model=SimpleNamespace(config=ModelConfig()))
        processor = BatchProcessor(
            s, parts.metrics, parts, runner=lambda: runner, delivery=lambda: None,  # type: ignore[arg-type,return-value]
            faults=FaultInjector(None), pipeline_clock=Watchdog(60.0), stopping=asyncio.Event(),
            accuracy=None, shadow=lambda: None,
        )  # fmt: skip
        try:
            assert await parts.load(tp0)
            before = parts.state(tp0)
            assert before is not None and before.windows.applied == 49
            before.windows.apply(recs[tp0][50:55], emit=False)  # a batch in flight, unpersisted
            load = parts.load

            async def load_racing(tp: TopicPartition) -> bool:
                if tp == tp1:  # meanwhile the settle stage's write of p0 is refused
                    await parts.reset(tp0)
                return await load(tp)

            parts.load = load_racing  # type: ignore[method-assign]
            # Fetched before the reset: p0 goes on from offset 55 (50..54 are in flight).
            prep = await processor.prepare({tp1: recs[tp1][50:60], tp0: recs[tp0][55:60]})
            assert prep is not None and list(prep.records) == [tp1]
            assert parts.rewinding(tp0)  # sought back to offset 50 before the next fetch
            again = parts.state(tp0)
            assert again is not None and again is not before
            assert again.windows.applied == 49  # not 59 with 50..54 missing
            assert len(again.windows.window("a")[0]) == 50
            got = parts.state(tp1)
            assert got is not None and got.windows.applied == 59
        finally:
            await client.aclose()

    asyncio.run(body())
