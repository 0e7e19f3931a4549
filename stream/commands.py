"""``worker start``, ``worker topics create`` and ``worker status`` (registered by deploy.cli).

Exit codes (docs/contract.md): 0 clean stop; 1 runtime failure (brokers or Redis unreachable: the
environment, not the command line, is at fault and a retry may succeed); 2 configuration (a bad
flag, or a topic that does not exist: fix the names or run ``worker topics create``); 3 no model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sys
import time
from typing import Any

from pydantic import Field

from stream.config import PositiveInt, add_settings_arguments
from stream.errors import KafkaUnavailableError
from stream.settings import KafkaSettings, RedisSettings, WorkerSettings

log = logging.getLogger(__name__)


class TopicsCreateSettings(KafkaSettings):
    """``worker topics create``: the worker's topics and how many partitions they get."""

    input_topic: str = "events"
    output_topic: str = "forecasts"
    dlq_topic: str = "events.dlq"
    partitions: PositiveInt = Field(6, description="input and output partitions")
    replication_factor: PositiveInt = 1
    shadow_topic: str | None = Field(None, description="also this topic for shadow forecasts")


class StatusSettings(RedisSettings, KafkaSettings):
    """``worker status``: which group and topic to report on."""

    group_id: str = "eventcast"
    input_topic: str = "events"
    interval: float = Field(2.0, description="seconds between the two samples giving throughput")
    as_json: bool = Field(False, alias="json", description="print one JSON object")


def register(subparsers: Any) -> None:
    start = subparsers.add_parser("start", help="run the streaming worker")
    add_settings_arguments(start, WorkerSettings)
    start.set_defaults(func=cmd_start)

    topics = subparsers.add_parser("topics", help="manage the worker's Kafka topics")
    tsub = topics.add_subparsers(dest="topics_command", metavar="ACTION")
    tsub.required = True
    create = tsub.add_parser("create", help="create the input, output and dead-letter topics")
    add_settings_arguments(create, TopicsCreateSettings)
    create.set_defaults(func=cmd_topics_create)

    status = subparsers.add_parser("status", help="lag, throughput, model version, group members")
    add_settings_arguments(status, StatusSettings)
    status.set_defaults(func=cmd_status)


# ---- start -------------------------------------------------------------------------------------


def cmd_start(settings: WorkerSettings) -> int:
    if settings.engine == "faust":
        from stream.faust_engine import serve

        return asyncio.run(serve(settings))
    return asyncio.run(_serve(settings))


async def _serve(settings: WorkerSettings) -> int:
    from stream.diagnostics import install_signal_handlers
    from stream.worker import Worker

    worker = Worker(settings)
    install_signal_handlers(
        asyncio.get_running_loop(),
        worker.request_stop,
        worker.request_reload,
    )
    try:
        await worker.start()
        await worker.run()
    finally:
        await worker.stop()
    log.info("worker stopped cleanly")
    return 0


# ---- topics create -----------------------------------------------------------------------------


def cmd_topics_create(args: TopicsCreateSettings) -> int:
    wanted = {
        args.input_topic: args.partitions,
        args.output_topic: args.partitions,
        args.dlq_topic: 1,
    }
    if args.shadow_topic:  # worker start --shadow-version ... --shadow-topic
        wanted[args.shadow_topic] = args.partitions
    created = asyncio.run(create_topics(args.kafka, wanted, args.replication_factor))
    for name, n in wanted.items():
        state = "created" if name in created else "exists"
        print(f"{name}\t{n if name in created else '-'}\t{state}")
    return 0


async def create_topics(
    kafka: KafkaSettings, wanted: dict[str, int], replication: int = 1
) -> list[str]:
    """Create the topics of ``wanted`` (name → partitions) that are missing; return their names."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import KafkaError, TopicAlreadyExistsError

    admin = AIOKafkaAdminClient(**kafka.client_kwargs(), request_timeout_ms=15_000)
    try:
        await admin.start()
    except KafkaError as exc:
        raise KafkaUnavailableError(
            f"cannot reach Kafka at {kafka.bootstrap_servers}: {exc}"
        ) from exc
    try:
        existing = set(await admin.list_topics())
        todo = [NewTopic(n, p, replication) for n, p in wanted.items() if n not in existing]
        if todo:
            # Created concurrently by someone else: that is what we wanted.
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(todo)
        return [t.name for t in todo]
    finally:
        await admin.close()


# ---- status ------------------------------------------------------------------------------------


def cmd_status(args: StatusSettings) -> int:
    import orjson

    report = asyncio.run(
        group_status(args.kafka, args.redis, args.group_id, args.input_topic, args.interval)
    )
    if args.as_json:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
        return 0
    print(f"group {report['group']} ({report['state']}) on {report['topic']}")
    print(f"  total lag {report['total_lag']}  throughput {report['throughput']:.1f} records/s")
    for m in report["members"]:
        print(f"  member {m['client_id']}@{m['host']}  partitions {m['partitions']}")
    for w in report["workers"]:
        print(f"  worker {w['member']}  model {w.get('version')}  partitions {w.get('partitions')}")
        print(f"    {calibration_text(w.get('calibration'))}")
    for p in report["partitions"]:
        print(f"  [{p['partition']}] committed {p['committed']}  end {p['end']}  lag {p['lag']}")
    return 0


async def group_status(
    kafka: KafkaSettings, redis: RedisSettings, group: str, topic: str, interval: float
) -> dict[str, Any]:
    """Lag per partition, throughput (committed offsets sampled ``interval`` s apart), members
    and, from Redis, each running worker's model version."""
    import orjson
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaError
    from aiokafka.protocol.group import MemberAssignment

    admin = AIOKafkaAdminClient(**kafka.client_kwargs(), request_timeout_ms=10_000)
    consumer = AIOKafkaConsumer(**kafka.client_kwargs(), group_id=None, enable_auto_commit=False)
    try:
        await admin.start()
        await consumer.start()
    except KafkaError as exc:
        raise KafkaUnavailableError(
            f"cannot reach Kafka at {kafka.bootstrap_servers}: {exc}"
        ) from exc
    try:
        described = await admin.describe_topics([topic])
        parts = {
            p["partition"] for d in described if d.get("error_code") == 0 for p in d["partitions"]
        }
        tps = [TopicPartition(topic, p) for p in sorted(parts)]

        async def committed() -> dict[int, int]:
            offs = await admin.list_consumer_group_offsets(group, partitions=tps)
            return {tp.partition: om.offset for tp, om in offs.items() if om.offset >= 0}

        first, t0 = await committed(), time.monotonic()
        await asyncio.sleep(interval)
        second, t1 = await committed(), time.monotonic()
        ends = await consumer.end_offsets(tps) if tps else {}
        rows = []
        for tp in tps:
            c = second.get(tp.partition)
            end = ends.get(tp, 0)
            rows.append(
                {"partition": tp.partition, "committed": c, "end": end, "lag": end - (c or 0)}
            )
        moved = sum(second.get(p, 0) - first.get(p, 0) for p in second)
        desc = await admin.describe_consumer_groups([group])
        state, members = "unknown", []
        for resp in desc:
            for g in resp.groups:
                # v0..: (error_code, group_id, state, protocol_type, protocol, members)
                state = g[2]
                for mem in g[5]:
                    member_id, client_id, host = (
                        mem[0],
                        mem[-4] if len(mem) > 5 else mem[1],
                        mem[-3],
                    )
                    assigned: list[int] = []
                    try:
                        ma = MemberAssignment.decode(mem[-1])
                        for t, ps in ma.assignment:
                            if t == topic:
                                assigned.extend(ps)
                    except Exception:
                        pass
                    members.append({"member_id": member_id, "client_id": client_id, "host": host,
                                    "partitions": sorted(assigned)})  # fmt: skip
    finally:
        await consumer.stop()
        await admin.close()

    workers: list[dict[str, Any]] = []
    try:
        client = redis.client()
        try:
            raw = await client.hgetall(f"{redis.prefix}:workers:{group}")
        finally:
            await client.aclose()
        now = time.time()
        for member, blob in sorted(raw.items()):
            info = orjson.loads(blob)
            if now - info.get("at", 0) < 30:
                calibration = calibration_record(info.get("calibration"))
                workers.append({"member": member.decode(), **info, "calibration": calibration})
    except Exception as exc:  # Redis is optional for status
        print(f"worker status: Redis not readable ({exc}); model versions unknown", file=sys.stderr)
    return {
        "group": group,
        "topic": topic,
        "state": state,
        "members": members,
        "workers": workers,
        "partitions": rows,
        "total_lag": sum(r["lag"] for r in rows),
        "throughput": moved / max(1e-9, t1 - t0),
    }


# The announce record's ``calibration`` (docs/contract.md, "worker status"): the worker's interval
# calibration mode, its rolling coverage per level over its last scored forecasts and the mean
# factor applied to the interval half-widths. Workers of older versions do not write it.
_LEVELS = ("80", "95")


def calibration_record(raw: Any) -> dict[str, Any] | None:
    """The announce record's ``calibration`` as ``worker status`` reports it: ``{"mode",
    "coverage": {level: float | None}, "adjustment": {level: float | None}, "scored"}``, every
    part that is missing or malformed set to None; None when the record has no such key (a worker
    of an older version) or it is not an object."""
    if not isinstance(raw, dict):
        return None

    def number(value: Any) -> float | None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        return float(value) if math.isfinite(value) else None

    def per_level(value: Any) -> dict[str, float | None]:
        value = value if isinstance(value, dict) else {}
        return {lvl: number(value.get(lvl)) for lvl in _LEVELS}

    mode = raw.get("mode")
    scored = raw.get("scored")
    return {
        "mode": mode if isinstance(mode, str) and mode else None,
        "coverage": per_level(raw.get("coverage")),
        "adjustment": per_level(raw.get("adjustment")),
        "scored": scored if isinstance(scored, int) and not isinstance(scored, bool) else None,
    }


def calibration_text(calibration: dict[str, Any] | None) -> str:
    """One line for a worker's calibration, ``-`` wherever a part is unknown, e.g.
    ``calibration online  coverage 80 % 79.4 %  95 % 95.1 %  adjustment 80 % 1.082  95 % 0.973
    (1000 scored)`` (adjustment: the mean factor applied to the interval half-widths)."""
    if calibration is None:
        return "calibration -  coverage -  adjustment -"
    cov = calibration["coverage"]
    adj = calibration["adjustment"]

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f} %"

    def factor(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    coverage = "  ".join(f"{lvl} % {pct(cov[lvl])}" for lvl in _LEVELS)
    adjustment = "  ".join(f"{lvl} % {factor(adj[lvl])}" for lvl in _LEVELS)
    scored = calibration["scored"]
    return (
        f"calibration {calibration['mode'] or '-'}  coverage {coverage}  "
        f"adjustment {adjustment}  ({'-' if scored is None else scored} scored)"
    )
