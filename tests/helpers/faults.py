"""Helpers of the fault-model tests (tests/stream/test_fault_model.py): steady load from a thread,
ground truth rebuilt from the input topic itself, the group's committed offsets, the figures that
prove a fault hit work in flight, and Redis AOF surgery (cut the tail of the append-only file so
that acknowledged writes are really lost, as a power cut would lose them).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

# --- steady load ---------------------------------------------------------------------------------


class LoadProducer:
    """Produces one step of events (``make_step(i)``, e.g. ``make_events(n_series, 1, start=i)``)
    every ``interval`` seconds from a thread of its own, until :meth:`stop`. Each step is awaited
    (acks=all, idempotent producer) before the next is sent. Records whose send failed (the broker
    is down) are sent again after a pause (``resend``), so a resend may land twice; without
    ``resend`` they are counted and left (the chaos run: its event may or may not be on the
    topic). Either way ground truth is taken from the topic (:func:`truth_from_topic`), not from
    what was sent; :attr:`placed` holds what the broker acknowledged."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        make_step: Callable[[int], list[tuple[str, bytes]]],
        *,
        interval: float = 0.05,
        start: int = 0,
        resend: bool = True,
    ) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.make_step = make_step
        self.interval = interval
        self.resend = resend
        self.step = start
        self.acked = 0
        self.send_errors = 0
        self.placed: list[tuple[str, bytes, int, int]] = []  # key, value, partition, offset
        self.error: BaseException | None = None
        self._burst = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True, name="load-producer")

    def start(self) -> LoadProducer:
        self._thread.start()
        return self

    def burst(self, steps: int) -> None:
        """Send the next ``steps`` steps at once (a backlog), then go on at the steady rate."""
        self._burst = steps

    def stop(self, timeout: float = 120.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the load producer did not stop"
        if self.error is not None:
            raise self.error

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # reported by stop()
            self.error = exc

    async def _run(self) -> None:
        from aiokafka import AIOKafkaProducer

        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            acks="all",
            enable_idempotence=True,
            linger_ms=5,
            request_timeout_ms=15000,
            retry_backoff_ms=200,
        )
        await producer.start()
        try:
            next_at = time.monotonic()
            while not self._stop.is_set():
                pending = self.make_step(self.step)
                if self._burst:
                    for _ in range(self._burst - 1):
                        self.step += 1
                        pending += self.make_step(self.step)
                    self._burst = 0
                while pending:
                    futures = []
                    for key, value in pending:
                        try:
                            send = producer.send(self.topic, value=value, key=key.encode())
                            futures.append(await asyncio.wait_for(send, 20))
                        except Exception:
                            futures.append(None)
                    failed = []
                    for (key, value), fut in zip(pending, futures, strict=True):
                        try:
                            if fut is None:
                                raise RuntimeError("send refused")
                            meta = await asyncio.wait_for(fut, 30)
                        except Exception:
                            failed.append((key, value))
                            continue
                        self.placed.append((key, value, meta.partition, meta.offset))
                        self.acked += 1
                    if failed:
                        self.send_errors += len(failed)
                        if not self.resend:
                            break
                        await asyncio.sleep(0.5)
                    pending = failed
                self.step += 1
                next_at += self.interval
                delay = next_at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                else:
                    next_at = time.monotonic()
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), 30)


# --- ground truth --------------------------------------------------------------------------------


def truth_from_topic(bootstrap: str, topic: str) -> Any:
    """:class:`tests.stream.conftest.Truth` from the input topic as the broker holds it: every
    record in (partition, offset) order, an event accepted when its ``ts`` is after the last
    accepted ``ts`` of its series (equal: ``duplicate``, earlier: ``late``: both refused)."""
    from tests.helpers.kafka import consume_all
    from tests.stream.conftest import Truth

    records = sorted(
        consume_all(bootstrap, topic, idle=1.0, timeout=60), key=lambda r: (r.partition, r.offset)
    )
    truth = Truth()
    for r in records:
        doc = orjson.loads(r.value)
        key = r.key.decode()
        evs = truth.events.setdefault(key, [])
        if evs and doc["ts"] <= evs[-1][2]:
            continue
        evs.append((r.partition, r.offset, doc["ts"], doc["value"]))
    return truth


def input_record_count(bootstrap: str, topic: str) -> int:
    from tests.helpers.kafka import end_offsets

    return sum(end_offsets(bootstrap, topic).values())


# --- the group's committed offsets ---------------------------------------------------------------


def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """The group's committed offset of each partition of ``topic`` (absent: none committed),
    read with an admin client (no group membership: it disturbs nothing)."""
    from aiokafka.admin import AIOKafkaAdminClient

    async def run() -> dict[int, int]:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
        await admin.start()
        try:
            offsets = await admin.list_consumer_group_offsets(group)
        finally:
            await admin.close()
        return {tp.partition: m.offset for tp, m in offsets.items() if tp.topic == topic}

    return asyncio.run(run())


# --- metrics of a worker process -----------------------------------------------------------------


def sample(metrics_text: str, name: str, labels: str = "") -> float:
    """Sum of the samples named exactly ``name`` (a counter: ``..._total``) whose labels
    contain ``labels``, in a Prometheus exposition."""
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, rest = head.partition("{")
        if metric == name and labels in rest:
            total += float(value)
    return total


_LAG = re.compile(r'^eventcast_consumer_lag\{partition="(\d+)"\}', re.M)


def owned_partitions(metrics_text: str) -> set[int]:
    """The input partitions a worker reports a lag for (those it owns and completed a batch of)."""
    return {int(p) for p in _LAG.findall(metrics_text)}


def _stage_count(metrics_text: str, stage: str) -> float:
    return sample(metrics_text, "eventcast_stage_seconds_count", f'stage="{stage}"')


def batches_in_flight(metrics_text: str) -> float:
    """Batches prepared (stage ``apply`` observed) but not finished (stage ``persist``, the last
    stage both guarantees observe for every batch they deliver)."""
    return _stage_count(metrics_text, "apply") - _stage_count(metrics_text, "persist")


@dataclass
class InFlight:
    """What a worker had fetched and not committed when a fault hit: ``consumed`` (its
    ``eventcast_events_consumed``, read *before* the fault) less the group's committed offsets of
    its partitions (read *after*, or at the latest just before, the fault) — a lower bound of
    the records fetched-but-uncommitted at the fault (input offsets start at 0 and the worker
    owned ``partitions`` since the load began)."""

    consumed: float
    partitions: set[int]
    committed: dict[int, int] = field(default_factory=dict)
    batches: float = 0.0

    @property
    def records(self) -> int:
        return int(self.consumed - sum(self.committed.get(p, 0) for p in self.partitions))


# --- output checks ----------------------------------------------------------------------------


@dataclass
class OutputFigures:
    expected: int
    delivered: int
    distinct: int
    duplicates: int
    missing: int
    unexpected: int

    def line(self) -> str:
        return (
            f"expected={self.expected} delivered={self.delivered} distinct={self.distinct} "
            f"duplicates={self.duplicates} missing={self.missing} unexpected={self.unexpected}"
        )


def output_figures(records: Sequence[Any], truth: Any) -> OutputFigures:
    from tests.stream.conftest import forecasts_by_source

    by_src = forecasts_by_source(records)
    expected = truth.expected_sources()
    return OutputFigures(
        expected=len(expected),
        delivered=len(records),
        distinct=len(by_src),
        duplicates=len(records) - len(by_src),
        missing=len(expected - set(by_src)),
        unexpected=len(set(by_src) - expected),
    )


def series_ts_repeats(records: Sequence[Any]) -> int:
    """Forecasts beyond the first of each (series, ts)."""
    seen: set[tuple[str, float]] = set()
    repeats = 0
    for r in records:
        doc = orjson.loads(r.value)
        k = (doc["series_id"], doc["ts"])
        if k in seen:
            repeats += 1
        seen.add(k)
    return repeats


# --- Redis AOF surgery ------------------------------------------------------------------------


@dataclass
class AofCommand:
    start: int  # byte offset of the command in the file
    end: int
    args: list[bytes]


def parse_aof(data: bytes) -> list[AofCommand]:
    """The RESP commands of an AOF file (multi-part AOF's ``.incr.aof``), with byte spans; stops
    at a torn tail."""
    out: list[AofCommand] = []
    i, n = 0, len(data)
    while i < n:
        start = i
        try:
            if data[i : i + 1] != b"*":
                break
            eol = data.index(b"\r\n", i)
            argc = int(data[i + 1 : eol])
            i = eol + 2
            args = []
            for _ in range(argc):
                if data[i : i + 1] != b"$":
                    raise ValueError
                eol = data.index(b"\r\n", i)
                size = int(data[i + 1 : eol])
                i = eol + 2
                if i + size + 2 > n:
                    raise ValueError
                args.append(data[i : i + size])
                i += size + 2
        except ValueError:
            break
        out.append(AofCommand(start, i, args))
    return out


def incr_aof(redis_dir: Path) -> Path:
    """The newest incremental AOF file of a Redis 7 data folder (``appendonlydir``)."""
    files = sorted((redis_dir / "appendonlydir").glob("*.incr.aof"))
    assert files, f"no incremental AOF in {redis_dir}"
    return max(files, key=lambda p: int(p.name.split(".")[-3]))


@dataclass
class WindowWrite:
    """One fenced window write (the store's script, replicated as MULTI ... EXEC)."""

    start: int  # byte offset of its MULTI (or of the HSET when not wrapped)
    partition: int
    applied: int


def window_writes(commands: Sequence[AofCommand], topic: str) -> list[WindowWrite]:
    """The fenced writes of ``topic``'s partitions: ``HSET {P:topic:N}:meta applied X ...``."""
    out: list[WindowWrite] = []
    multi_at: int | None = None
    suffix = f":{topic}:".encode()
    for c in commands:
        name = c.args[0].upper() if c.args else b""
        if name == b"MULTI":
            multi_at = c.start
        elif name == b"EXEC":
            multi_at = None
        elif name == b"HSET" and c.args[1].endswith(b"}:meta") and suffix in c.args[1]:
            fields = dict(zip(c.args[2::2], c.args[3::2], strict=False))
            if b"applied" in fields:
                part = int(c.args[1].rsplit(b":", 2)[-2].rstrip(b"}"))
                at = multi_at if multi_at is not None else c.start
                out.append(WindowWrite(at, part, int(fields[b"applied"])))
    return out


@dataclass
class AofCut:
    file: Path
    size_before: int
    size_after: int
    writes_lost: int  # fenced window writes cut off
    applied_before: dict[int, int]  # partition -> last applied offset in the file before the cut
    applied_after: dict[int, int]  # ... and after (absent: none left)

    @property
    def offsets_lost(self) -> int:
        return sum(a - self.applied_after.get(p, -1) for p, a in self.applied_before.items())


def cut_aof_tail(redis_dir: Path, topic: str, committed: dict[int, int], torn: int = 7) -> AofCut:
    """Cut the incremental AOF (Redis stopped) so that, for every partition with a committed
    offset, the write that brought its applied offset up to the committed one is lost (and
    everything after the earliest such write): Redis then holds each of those partitions behind
    the group's committed offset, which only a rebuild from Kafka repairs. ``torn`` bytes of the
    first lost command are left behind, a torn write Redis must drop at load (its
    ``aof-load-truncated yes``, incomplete MULTI reverted)."""
    path = incr_aof(redis_dir)
    data = path.read_bytes()
    writes = window_writes(parse_aof(data), topic)
    assert writes, "no window write in the AOF"
    cut_at: int | None = None
    for p, c in committed.items():
        reach = [w for w in writes if w.partition == p and w.applied >= c - 1]
        if reach:
            cut_at = reach[0].start if cut_at is None else min(cut_at, reach[0].start)
    assert cut_at is not None, f"no write reaching a committed offset ({committed})"
    before: dict[int, int] = {}
    after: dict[int, int] = {}
    for w in writes:
        before[w.partition] = w.applied
        if w.start < cut_at:
            after[w.partition] = w.applied
    end = min(len(data), cut_at + torn)
    with open(path, "r+b") as f:
        f.truncate(end)
    return AofCut(
        path,
        len(data),
        end,
        sum(1 for w in writes if w.start >= cut_at),
        before,
        after,
    )


# --- the group's assignment, as the broker holds it -------------------------------------------


@dataclass(frozen=True)
class GroupView:
    """One reading of a consumer group through the admin API (DescribeGroups): its state
    (``Stable``, ``PreparingRebalance``, ``CompletingRebalance``, ``Empty``, ``Dead``) and each
    member's partitions of one topic (empty while a rebalance has not handed them out)."""

    at: float  # time.monotonic() of the reading
    state: str
    members: dict[str, tuple[int, ...]]  # member id -> its partitions of the topic, sorted

    def owners(self) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for member, parts in self.members.items():
            for p in parts:
                out.setdefault(p, []).append(member)
        return out

    def whole(self, partitions: int) -> bool:
        """Every partition ``0..partitions-1`` owned by exactly one member, and no other."""
        owners = self.owners()
        return sorted(owners) == list(range(partitions)) and all(
            len(m) == 1 for m in owners.values()
        )

    def split(self) -> list[int]:
        """Partitions per member, largest first."""
        return sorted((len(p) for p in self.members.values()), reverse=True)

    def even(self) -> bool:
        """Each member within one partition of the others (4/4/4 of 12 with three, 6/6 with two)."""
        split = self.split()
        return bool(split) and split[0] - split[-1] <= 1

    def keyed(self, key: Callable[[str], str]) -> dict[str, tuple[int, ...]]:
        """The assignment by ``key(member id)`` (e.g. :func:`static_instance`)."""
        return {key(m): parts for m, parts in self.members.items()}


_UUID_TAIL = re.compile(r"-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def static_instance(member_id: str) -> str:
    """The group instance id a broker built a static member's id from
    (``<group.instance.id>-<uuid>``: a restart gets a new member id, the same prefix); a dynamic
    member's id (``<client.id>-<uuid>``) gives its client id."""
    return _UUID_TAIL.sub("", member_id)


async def _describe_group(admin: Any, group: str, topic: str) -> GroupView:
    from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment

    at = time.monotonic()
    responses = await admin.describe_consumer_groups([group])
    state, members = "unknown", {}
    for resp in responses:
        for g in resp.groups:
            # (error_code, group, state, protocol_type, protocol, members[, ...]); each member
            # (member_id, client_id, client_host, member_metadata, member_assignment) up to v3
            if g[0] != 0:
                state = f"error {g[0]}"
                continue
            state = g[2]
            for mem in g[5]:
                parts: list[int] = []
                if mem[-1]:  # empty until the leader's SyncGroup handed the partitions out
                    assignment = ConsumerProtocolMemberAssignment.decode(mem[-1])
                    for t, ps in assignment.assignment:
                        if t == topic:
                            parts.extend(ps)
                members[mem[0]] = tuple(sorted(parts))
    return GroupView(at, state, members)


def describe_group(bootstrap: str, group: str, topic: str) -> GroupView:
    """The group's state and assignment now (an admin client: no membership, disturbs nothing)."""
    from aiokafka.admin import AIOKafkaAdminClient

    async def run() -> GroupView:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
        await admin.start()
        try:
            return await _describe_group(admin, group, topic)
        finally:
            await admin.close()

    return asyncio.run(run())


class GroupSampler:
    """Reads the group's assignment (:class:`GroupView`) every ``every`` seconds from a thread of
    its own, with one admin client, until :meth:`stop`. A failed reading is counted
    (:attr:`errors`) and skipped."""

    def __init__(self, bootstrap: str, group: str, topic: str, every: float = 1.0) -> None:
        self.bootstrap, self.group, self.topic, self.every = bootstrap, group, topic, every
        self.views: list[GroupView] = []
        self.errors = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True, name="group-sampler")

    def start(self) -> GroupSampler:
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> list[GroupView]:
        self._stop.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the group sampler did not stop"
        if self.error is not None:
            raise self.error
        return self.views

    def since(self, t: float) -> list[GroupView]:
        return [v for v in list(self.views) if v.at >= t]

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # reported by stop()
            self.error = exc

    async def _run(self) -> None:
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=5000)
        await admin.start()
        try:
            next_at = time.monotonic()
            while not self._stop.is_set():
                try:
                    view = await asyncio.wait_for(_describe_group(admin, self.group, self.topic), 5)
                    self.views.append(view)
                except Exception:
                    self.errors += 1
                next_at += self.every
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(admin.close(), 10)


def assignment_changes(views: Sequence[GroupView], key: Callable[[str], str] = lambda m: m) -> int:
    """How many times the assignment (by ``key(member id)``: member -> partitions) differs from
    the reading before."""
    maps = [v.keyed(key) for v in views]
    return sum(1 for a, b in itertools.pairwise(maps) if a != b)


_JOINED = re.compile(r"Joined group '([^']*)' \(generation (\d+)\)")


def joined_generations(log_text: str, group: str) -> list[int]:
    """The generations a worker's log says it joined ``group`` in (aiokafka's INFO line, once
    per JoinGroup answered: a new generation is a rebalance; a static member coming back
    without one joins the current generation again)."""
    return [int(g) for name, g in _JOINED.findall(log_text) if name == group]
