"""All benchmark tables of docs/design.md "Performance targets" in one run (``make bench``).

Starts a private Kafka + Redis on free ports, writes the default (hidden 256, 3 layers) and small
(hidden 64, 2 layers) model versions, produces one backlog topic beforehand with kcat, then:

1. ceilings, each measured alone: model inference (registry-loaded predictor, the worker's
   backend/threads, per batch size), Kafka consume + decode, Redis window updates (the store's Lua
   script), Kafka produce (the worker's publisher), matmul GFLOP/s;
2. end to end drains of the backlog (fresh consumer group, Redis db and output topic each): the
   forecast rate read at the forecast topic's end offsets and the ingest rate read at the group's
   committed offsets, over ``--duration`` seconds after ``--warmup`` seconds past the first
   forecast; per model × backend (torch, torch-bf16, onnx, onnx-int8), ``--emit every`` vs
   ``latest``, the naive per-event worker and the faust engine; for the capacity plan
   (docs/operations.md), the small model's drain with its state on a Redis Cluster of the bench's
   own (3 primaries + 3 replicas, a key prefix per drain) and by 1, 2 and 3 workers of one group
   on a 12-partition copy of the backlog, then three tables: the cluster/single ratio, events per
   CPU-second by worker count, and the cost per event of each stage (the workers' /metrics), of
   the workers', Redis's and the broker's CPU (/proc) and the forecasts' bytes;
3. latency: an open-loop producer at half of the measured capacity stamping each event with its
   send time as ``ts``, and a consumer of the forecast topic (latency = arrival − ``ts``);
4. latency curve: bench/pacer.c (a compiled open-loop producer on librdkafka, built on demand by
   bench/build_pacer.sh) drives a worker at its batcher defaults; capacity = the highest fixed
   rate it holds for ``--curve-hold`` s with bounded lag, the pacer running; then p50/p95/p99/
   p99.9 at 10, 25, 50, 75 and 90 % of it, latency = forecast arrival at the bench's consumer −
   the input record's CreateTime, joined through the forecast's ``source`` (partition, offset);
   per model, at_least_once, exactly_once, and pinned (worker on one core, the rest on another);
5. soak: the same as 3. at half capacity for ``--soak`` seconds, worker RSS and latency over time.

Every phase is bounded in time; everything it started is stopped at the end.

    python -m bench.run [--quick] [--soak 600] [--only ceilings,drain,latency,curve,soak]
                        [--json F]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from bench import ceilings
from bench.harness import (
    PARTITIONS,
    REPO,
    SEASONAL_READY,
    WIDE_PARTITIONS,
    BenchStack,
    ForecastReader,
    LagProbe,
    Proc,
    affinity,
    backlog_file,
    build_pacer,
    can_pin,
    committed,
    cpu_seconds,
    dumps,
    end_offsets,
    flush_db,
    free_port,
    kcat_produce,
    loadavg,
    pacer_argv,
    percentiles,
    pin,
    read_deliveries,
    record_sizes,
    rss_bytes,
    scrape,
    series_name,
    stage_means,
    thread_affinities,
    total,
    unique,
    workdir,
    worker_argv,
    write_model,
)

BACKENDS = ("torch", "torch-bf16", "onnx", "onnx-int8")
GUARANTEES = ("at_least_once", "exactly_once")
WARM_POINTS = 48  # the worker forecasts a series once it holds this many points
WORKER_COUNTS = (1, 2, 3)  # workers of one group draining the WIDE_PARTITIONS backlog
STAGES = ("apply", "infer", "encode", "publish", "persist", "commit")  # eventcast_stage_seconds


@dataclass
class CurveRun:
    """What one latency curve's steps share: its worker, the forecast reader and the lag probe on
    its topics, and where the pacer runs (``pacer_cpus``: the rest of the stack's core when
    pinned)."""

    label: str
    pacer: Path  # the pacer binary
    topic: str
    proc: Proc
    reader: ForecastReader
    probe: LagProbe
    pacer_cpus: str | None
    metrics_port: int  # the worker's /metrics: each point's batch columns (0: none)


class Bench:
    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args = args
        self.root = root
        self.results: dict[str, Any] = {"load": {}}
        self._db = 0
        self.stack: BenchStack | None = None
        self.models: dict[str, Path] = {}
        self.backlog = "backlog"
        # The same backlog on WIDE_PARTITIONS partitions, for the drains by 1-3 workers of one
        # group (produced only when one of them runs).
        self.wide_backlog = "backlog-wide"
        self.partitions = {self.backlog: PARTITIONS, self.wide_backlog: WIDE_PARTITIONS}
        self.backlog_events = 0

    def say(self, text: str = "") -> None:
        print(text, flush=True)

    def next_db(self) -> int:
        self._db += 1
        return self._db

    def want_drain(self, key: str) -> bool:
        """Whether ``--drains`` (comma-separated substrings, or ``=NAME`` for that drain alone;
        empty: every drain) selects ``key``."""
        wanted = [w for w in self.args.drains.split(",") if w]
        return not wanted or any(key == w[1:] if w[0] == "=" else w in key for w in wanted)

    def cluster_key(self) -> str:
        return f"small {self.args.backend} emit=every, redis cluster"

    def workers_key(self, n: int) -> str:
        return (
            f"small {self.args.backend} emit=every, {WIDE_PARTITIONS} partitions, "
            f"{n} worker{'s' if n > 1 else ''}"
        )

    # ---- setup ---------------------------------------------------------------------------------

    def setup(self, backlog: bool = True) -> None:
        """Stack and models; the backlog topic only when a phase reads it (ceilings, drains)."""
        a = self.args
        self.say(f"# stack in {self.root}")
        self.stack = BenchStack.start(self.root)
        for name in ("default", "small", "small-seasonal", "default-seasonal"):
            self.models[name] = write_model(self.root, name)
        if not backlog:
            return
        drains = "drain" in a.only.split(",")
        wide = drains and any(self.want_drain(self.workers_key(n)) for n in WORKER_COUNTS)
        topics = {
            self.backlog: PARTITIONS,
            **({self.wide_backlog: WIDE_PARTITIONS} if wide else {}),
        }
        self.stack.topics(topics)
        path = self.root / "backlog.tsv"
        self.backlog_events = backlog_file(path, a.series, a.backlog // a.series)
        line_bytes = path.stat().st_size / self.backlog_events
        for topic, parts in topics.items():
            secs = kcat_produce(self.stack.bootstrap, topic, path)
            on_disk = self.stack.log_bytes(topic) / self.backlog_events
            self.say(
                f"# backlog {topic} ({parts} partitions): {self.backlog_events:,} events of "
                f"{a.series} series produced beforehand with kcat in {secs:.1f} s "
                f"({self.backlog_events / secs:,.0f} events/s); {line_bytes - 2:.1f} B key + value "
                f"per event, {on_disk:.1f} B per event in the broker's log (record batches)"
            )
            self.results.setdefault("input_bytes", {"key_value": line_bytes - 2})[topic] = on_disk
        path.unlink()
        if drains and self.want_drain(self.cluster_key()):
            t0 = time.monotonic()
            cluster = self.stack.start_cluster()
            self.say(
                f"# redis cluster: {len(cluster.ports)} nodes ({len(cluster.ports) // 2} primaries "
                f"+ 1 replica each) on ports {','.join(map(str, cluster.ports))}, up in "
                f"{time.monotonic() - t0:.1f} s"
            )

    # ---- ceilings ------------------------------------------------------------------------------

    def run_ceilings(self) -> None:
        a = self.args
        assert self.stack is not None
        self.say("\n## Ceilings, each alone (stack up, nothing else of ours running)")
        self.results["load"]["ceilings"] = loadavg()
        res: dict[str, Any] = {}
        gf = ceilings.matmul(a.min_time)
        res["matmul_gflops"] = gf
        self.say("| compute: 1024² fp32 matmul | GFLOP/s |\n|---|---:|")
        for k, v in gf.items():
            self.say(f"| {k} | {v:,.1f} |")
        self.say(
            f"\n| model inference only (forecasts/s, {a.threads} threads) | batch | "
            + " | ".join(BACKENDS) + " |\n|---|---:|" + "---:|" * len(BACKENDS)
        )  # fmt: skip
        inf: dict[str, dict[str, dict[int, float]]] = {}
        for name, mdir in self.models.items():
            per = {
                b: ceilings.inference(mdir, b, a.threads, a.batches, a.min_time) for b in BACKENDS
            }
            inf[name] = per
            for bs in a.batches:
                cells = " | ".join(f"{per[b][bs]:,.0f}" for b in BACKENDS)
                self.say(f"| {name} | {bs} | {cells} |")
        res["inference"] = inf
        cd = asyncio.run(ceilings.consume_decode(self.stack.bootstrap, self.backlog, a.io_count))
        rd = asyncio.run(ceilings.redis_updates(self.stack, self.backlog, a.io_count // 2))
        self.stack.topics({"produce-ceiling": PARTITIONS})
        pr = asyncio.run(ceilings.produce(self.stack.bootstrap, "produce-ceiling", a.io_count))
        res.update(consume_decode=cd, redis=rd, produce=pr)
        self.say("\n| I/O ceiling | rate |\n|---|---:|")
        self.say(f"| Kafka consume + decode (getmany, orjson, validation) | "
                 f"{cd['consume+decode']:,.0f} events/s |")  # fmt: skip
        self.say(f"| Kafka consume alone | {cd['consume only']:,.0f} events/s |")
        self.say(
            f"| Redis window update (fenced Lua, 1 call/partition/batch) | {rd['events/s']:,.0f} "
            f"events/s ({rd['series updates/s']:,.0f} series blobs/s) |"
        )
        self.say(f"| Kafka produce (Publisher, acks=all, {pr['bytes/msg']:.0f} B forecasts) | "
                 f"{pr['messages/s']:,.0f} messages/s |")  # fmt: skip
        self.results["ceilings"] = res

    # ---- drains --------------------------------------------------------------------------------

    def drain(
        self,
        label: str,
        argv_for: Any,
        cwd: Path = REPO,
        *,
        workers: int = 1,
        topic: str | None = None,
        cluster: bool = False,
        ready_events: int = 0,
    ) -> dict[str, Any]:
        """Run ``workers`` worker-like processes of one group over a backlog topic (``topic``,
        default the 6-partition one); rates over the measured window. With ``cluster`` their
        state is on the Redis Cluster under a key prefix of this drain's own. ``ready_events``:
        the warm-up starts only once the group has committed that many input records (a seasonal
        model's series on the seasonal path).

        Besides the rates: CPU seconds of the workers, of Redis (every cluster node) and of the
        broker over the window (/proc/PID/stat), and, from the workers' /metrics, the events
        consumed and each stage's seconds over the window; the forecasts' sizes at the end."""
        a = self.args
        st = self.stack
        assert st is not None
        topic = topic or self.backlog
        parts = self.partitions[topic]
        out, group, db = unique("fc"), unique("g"), self.next_db()
        prefix = unique("bench") if cluster else None
        st.topics({out: parts, f"{out}.dlq": 1})
        flush_db(st, db)
        name = label.replace(" ", "_").replace("/", "-").replace("(", "").replace(")", "")
        name = name.replace(",", "").replace("=", "-")
        ports = [free_port() for _ in range(workers)]
        procs = [
            Proc(
                argv_for(out=out, group=group, db=db, port=port, prefix=prefix),
                self.root / (f"{name}.log" if workers == 1 else f"{name}-{i}.log"),
                cwd=cwd,
            )
            for i, port in enumerate(ports)
        ]
        proc = procs[0]
        row: dict[str, Any] = {"label": label, "workers": workers, "partitions": parts,
                               "redis": "cluster" if cluster else "single"}  # fmt: skip

        def metrics() -> list[dict[str, float]] | None:
            try:
                return [scrape(port) for port in ports]
            except Exception:  # a worker without /metrics (naive, faust)
                return None

        primaries = st.redis_pids(cluster, primaries=True) if cluster else []

        def cpu() -> dict[str, float]:
            kafka = st.kafka.pid()
            got = {
                "workers": sum(cpu_seconds(p.pid) for p in procs),
                "redis": sum(cpu_seconds(pid) for pid in st.redis_pids(cluster)),
                "kafka": cpu_seconds(kafka) if kafka is not None else 0.0,
            }
            if primaries:  # of "redis", what the cluster's primaries spent
                got["redis_primaries"] = sum(cpu_seconds(pid) for pid in primaries)
            return got

        try:
            deadline = time.monotonic() + 180
            while True:
                if total(asyncio.run(end_offsets(st.bootstrap, out))) > 0:
                    # Several workers: every one consuming (the group's rebalances are over).
                    got = metrics() if workers > 1 else None
                    if workers == 1 or (got and all(m.get("consumed", 0) > 0 for m in got)):
                        break
                for p in procs:
                    if not p.alive():
                        raise RuntimeError(f"{label}: exited early:\n{p.tail()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{label}: no forecast within 180 s:\n{proc.tail()}")
                time.sleep(0.5)
            while total(asyncio.run(committed(st.bootstrap, group, topic))) < ready_events:
                if not proc.alive():
                    raise RuntimeError(f"{label}: exited early:\n{proc.tail()}")
                if time.monotonic() > deadline + 300:
                    raise RuntimeError(f"{label}: {ready_events:,} records not consumed in time")
                time.sleep(0.5)
            time.sleep(a.warmup)
            f0 = total(asyncio.run(end_offsets(st.bootstrap, out)))
            c0 = total(asyncio.run(committed(st.bootstrap, group, topic)))
            m0, cpu0, net0 = metrics(), cpu(), st.redis_net_bytes(cluster)
            t0 = time.monotonic()
            rss0 = sum(rss_bytes(p.pid) for p in procs)
            spy = None
            if a.profile and "native" not in label and "faust" not in label:
                out_path = self.root / f"profile-{label.replace(' ', '_')}.txt"
                spy = subprocess.Popen(
                    [str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(proc.pid),
                     "-d", str(int(a.duration)), "-r", "50", "-f", "raw", "-o", str(out_path),
                     "--nonblocking"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
                row["profile"] = str(out_path)
            time.sleep(a.duration)
            if spy is not None:
                spy.wait(30)
            f1 = total(asyncio.run(end_offsets(st.bootstrap, out)))
            c1 = total(asyncio.run(committed(st.bootstrap, group, topic)))
            m1, cpu1, net1 = metrics(), cpu(), st.redis_net_bytes(cluster)
            t1 = time.monotonic()
            row.update(
                seconds=t1 - t0,
                forecasts_per_s=(f1 - f0) / (t1 - t0),
                ingested_per_s=(c1 - c0) / (t1 - t0),
                backlog_left=self.backlog_events - c1,
                rss_mb=max(rss0, sum(rss_bytes(p.pid) for p in procs)) / 2**20,
                load=loadavg(),
                cpu_s={k: cpu1[k] - cpu0[k] for k in cpu0},
                redis_bytes={k: net1[k] - net0[k] for k in net0},
            )
            if c1 - c0 > 0 and row["cpu_s"]["workers"] > 0:
                row["events_per_cpu_s"] = (c1 - c0) / row["cpu_s"]["workers"]
            if m0 is not None and m1 is not None:
                row["cost"] = _cost(m0, m1, row["cpu_s"], row["redis_bytes"])
            notes = []
            paths = row.get("cost", {}).get("paths", {})
            if paths.get("seasonal"):
                row["seasonal_share"] = paths["seasonal"] / sum(paths.values())
                notes.append(f"{row['seasonal_share']:.1%} of its forecasts on the seasonal path")
            if c1 >= self.backlog_events:
                notes.append("backlog exhausted during the window: rate is a lower bound")
            if notes:
                row["note"] = "; ".join(notes)
            # What a forecast weighs: its record's key and value (a sample read from the topic's
            # beginning) and the topic's log bytes per forecast (record batches, headers).
            forecasts = total(asyncio.run(end_offsets(st.bootstrap, out)))
            sizes = asyncio.run(record_sizes(st.bootstrap, out, 1000))
            sizes["log_bytes"] = st.log_bytes(out) / max(forecasts, 1)
            row["forecast_bytes"] = sizes
        finally:
            row["exit"] = [p.stop() for p in procs] if workers > 1 else proc.stop()
        self.say(
            f"| {label} | {row['forecasts_per_s']:,.0f} | {row['ingested_per_s']:,.0f} | "
            f"{row['seconds']:.0f} | {row['rss_mb']:.0f} | {row['load']} |"
            + (f" {row['note']}" if "note" in row else "")
        )
        return row

    def worker_for(self, model: str, backend: str, *extra: str, topic: str | None = None) -> Any:
        assert self.stack is not None
        a = self.args

        def argv(
            out: str, group: str, db: int, port: int = 0, prefix: str | None = None
        ) -> list[str]:
            return worker_argv(
                self.stack, self.models[model], input_topic=topic or self.backlog,  # type: ignore[arg-type]
                output_topic=out, group=group, db=db, backend=backend, threads=a.threads,
                extra=extra, metrics_port=port, cluster_prefix=prefix,
            )  # fmt: skip

        return argv

    def naive_for(self, model: str, backend: str) -> Any:
        assert self.stack is not None
        st = self.stack
        a = self.args

        def argv(
            out: str, group: str, db: int, port: int = 0, prefix: str | None = None
        ) -> list[str]:
            assert prefix is None, "the naive worker has no Redis Cluster"
            return [
                sys.executable, "-m", "bench.naive_worker",
                "--bootstrap-servers", st.bootstrap, "--redis-url", st.redis_url(db),
                "--model-dir", str(self.models[model]), "--input-topic", self.backlog,
                "--output-topic", out, "--group-id", group, "--backend", backend,
                "--threads", str(a.threads),
            ]  # fmt: skip

        return argv

    def run_drains(self) -> None:
        a = self.args
        self.say(
            f"\n## End to end: drain of the backlog (rates over {a.duration:.0f} s after "
            f"{a.warmup:.0f} s of warm-up; fresh group, Redis db and output topic each)"
        )
        self.say("| run | forecasts/s | events/s ingested | s | worker RSS MB | load avg |")
        self.say("|---|---:|---:|---:|---:|---|")
        rows: dict[str, Any] = {}
        self.results["load"]["drain_start"] = loadavg()
        want = self.want_drain
        flags = tuple(a.worker_flags.split())
        for model in ("default", "small"):
            for backend in BACKENDS:
                key = f"{model} {backend} emit=every"
                if want(key):
                    rows[key] = self.drain(key, self.worker_for(model, backend, *flags))
        # Capacity inputs (docs/operations.md "Capacity plan"): the same drain with the state on
        # a Redis Cluster (3 primaries + 3 replicas) instead of the single Redis, right after it,
        # and 1-3 workers of one group on the WIDE_PARTITIONS backlog.
        key = self.cluster_key()
        if want(key):
            argv = self.worker_for("small", a.backend, *flags)
            rows[key] = self.drain(key, argv, cluster=True)
        for n in WORKER_COUNTS:
            key = self.workers_key(n)
            if want(key):
                argv = self.worker_for("small", a.backend, *flags, topic=self.wide_backlog)
                rows[key] = self.drain(key, argv, workers=n, topic=self.wide_backlog)
        # Seasonal memory (docs/training.md): the small and default models with the seasonal
        # state of hourly data (24 and 168 steps), measured once every series is on the seasonal
        # path; beside "small|default ... emit=every", the cost of the state.
        for model in ("small", "default"):
            key = f"{model}-seasonal {a.backend} emit=every"
            if want(key):
                argv = self.worker_for(f"{model}-seasonal", a.backend, *flags)
                rows[key] = self.drain(key, argv, ready_events=a.series * SEASONAL_READY)
        # Online interval calibration (the default) against the model's static intervals.
        key = f"small {a.backend} emit=every, --interval-calibration static"
        if want(key):
            static = (*flags, "--interval-calibration", "static")
            rows[key] = self.drain(key, self.worker_for("small", a.backend, *static))
        key = f"small {a.backend} emit=latest"
        if want(key):
            latest = (*flags, "--emit", "latest", *a.latest_flags.split())
            rows[key] = self.drain(key, self.worker_for("small", a.backend, *latest))
        key = f"small {a.backend} naive per-event worker"
        if want(key):
            rows[key] = self.drain(key, self.naive_for("small", a.backend))
        if a.before:
            # The same drains with the worker of an earlier commit (a git worktree of it).
            tree = self.root / "before"
            subprocess.run(
                ["git", "worktree", "add", "--detach", str(tree), a.before],
                cwd=REPO, check=True, capture_output=True,
            )  # fmt: skip
            # Only the worker differs: both runs load the model with today's model/ package.
            shutil.copytree(REPO / "model", tree / "model", dirs_exist_ok=True)
            try:
                for model in ("small",):
                    key = f"{model} {a.backend} emit=every (before: {a.before})"
                    if want(key):
                        argv = self.worker_for(model, a.backend)
                        rows[key] = self.drain(key, argv, cwd=tree)
                key = f"small {a.backend} emit=latest (before: {a.before})"
                if want(key):
                    argv = self.worker_for(
                        "small", a.backend, "--emit", "latest", *a.latest_flags.split()
                    )
                    rows[key] = self.drain(key, argv, cwd=tree)
            finally:
                subprocess.run(
                    ["git", "worktree", "remove", "--force", str(tree)],
                    cwd=REPO, capture_output=True,
                )  # fmt: skip
        key = f"small {a.backend} faust engine"
        if not a.no_faust and want(key):
            try:
                faust = self.worker_for("small", a.backend, *flags, "--engine", "faust")
                rows[key] = self.drain(key, faust)
            except RuntimeError as exc:
                self.say(f"| {key} | failed: {str(exc).splitlines()[0]} |")
                rows[key] = {"error": str(exc)[-2000:]}
        self.results["drain"] = rows
        self.capacity_tables(rows)

    def capacity_tables(self, rows: dict[str, Any]) -> None:
        """The capacity plan's inputs from the drains that ran: Redis Cluster / single Redis,
        events per CPU-second by worker count, and the cost per event of each stage."""
        a = self.args
        base = rows.get(f"small {a.backend} emit=every", {})
        clu = rows.get(self.cluster_key(), {})
        if base.get("ingested_per_s") and clu.get("ingested_per_s"):
            ratio = {k: clu[k] / base[k] for k in ("forecasts_per_s", "ingested_per_s")}
            self.results["cluster_ratio"] = ratio
            self.say(
                f"\nredis cluster / single Redis (small {a.backend} emit=every): forecasts/s "
                f"{ratio['forecasts_per_s']:.2f}, events/s ingested {ratio['ingested_per_s']:.2f}"
            )
        multi = [
            rows[k] for k in map(self.workers_key, WORKER_COUNTS) if "cpu_s" in rows.get(k, {})
        ]
        if multi:
            self.say(
                f"\n| workers of one group, {WIDE_PARTITIONS} partitions ({os.cpu_count()} cores "
                "shared with Kafka and Redis: more workers show their overhead, not a speed-up) | "
                "events/s ingested | workers' CPU s (cores busy) | events per worker CPU-second | "
                "Redis CPU s | broker CPU s | events per CPU-second (workers + Redis + broker) |"
            )
            self.say("|---|---:|---:|---:|---:|---:|---:|")
            for r in multi:
                c = r["cpu_s"]
                events = r["ingested_per_s"] * r["seconds"]
                every = c["workers"] + c["redis"] + c["kafka"]
                self.say(
                    f"| {r['workers']} | {r['ingested_per_s']:,.0f} | {c['workers']:.1f} "
                    f"({c['workers'] / r['seconds']:.2f}) | {_num(r.get('events_per_cpu_s'))} | "
                    f"{c['redis']:.1f} | {c['kafka']:.1f} | "
                    f"{_num(events / every if every else None)} |"
                )
        costs = {k: r["cost"] for k, r in rows.items() if r.get("cost", {}).get("events")}
        if costs:
            self.say(
                "\n| cost per consumed event, µs (over the window; stages: wall time in the "
                "worker, waits included; CPU: /proc, every thread) | "
                + " | ".join(STAGES)
                + " | model call | worker CPU | Redis CPU | broker CPU | Redis B in / out / "
                "replication | forecast B (key + value) | forecast B in the log |"
            )
            self.say("|---" + "|---:" * (len(STAGES) + 7) + "|")
            for k, c in costs.items():
                fb = rows[k].get("forecast_bytes", {})
                model = " + ".join(f"{v:.1f}" for v in c["inference_us"].values()) or "—"
                self.say(
                    f"| {k} | "
                    + " | ".join(f"{c['stage_us'][s]:.1f}" for s in STAGES)
                    + f" | {model} | {c['cpu_us']['workers']:.1f} | {c['cpu_us']['redis']:.1f}"
                    + (
                        f" ({c['cpu_us']['redis_primaries']:.1f} primaries)"
                        if "redis_primaries" in c["cpu_us"]
                        else ""
                    )
                    + " | "
                    f"{c['cpu_us']['kafka']:.1f} | "
                    + " / ".join(f"{c['redis_bytes'].get(d, 0):.0f}" for d in ("in", "out", "repl"))
                    + f" | {fb.get('key_bytes', 0) + fb.get('value_bytes', 0):.0f} | "
                    f"{fb.get('log_bytes', 0):.0f} |"
                )

    # ---- latency and soak ----------------------------------------------------------------------

    async def _fresh_worker_place(self, prefix: str) -> tuple[str, str, str, int]:
        """A worker's own input topic, output topic (with its dead-letter topic), consumer group
        and flushed Redis db: ``(input, output, group, db)``."""
        st = self.stack
        assert st is not None
        topic, out, group, db = unique(prefix), unique(f"{prefix}fc"), unique("g"), self.next_db()
        await asyncio.to_thread(st.topics, {topic: PARTITIONS, out: PARTITIONS, f"{out}.dlq": 1})
        flush_db(st, db)
        return topic, out, group, db

    async def _open_loop(
        self, model: str, rate: float, duration: float, label: str, soak: bool = False
    ) -> dict[str, Any]:
        """Worker on a fresh topic; warm every series' window, then produce at ``rate`` events/s
        (open loop: sends are scheduled by the clock, never wait for acknowledgements), each
        event's ``ts`` its send time; latency = forecast arrival − ``ts``."""
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

        a = self.args
        st = self.stack
        assert st is not None
        topic, out, group, db = await self._fresh_worker_place("lat")
        series = a.latency_series
        names = [series_name(i) for i in range(series)]
        keys = [n.encode() for n in names]
        port = free_port()
        proc = Proc(
            worker_argv(
                st, self.models[model], input_topic=topic, output_topic=out, group=group, db=db,
                backend=a.backend, threads=a.threads, extra=tuple(a.latency_flags.split()),
                metrics_port=port,
            ),
            self.root / f"{label}.log",
        )  # fmt: skip
        producer = AIOKafkaProducer(bootstrap_servers=st.bootstrap, linger_ms=1, acks=1)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=st.bootstrap, enable_auto_commit=False, fetch_max_wait_ms=20
        )
        await producer.start()
        await consumer.start()
        lat: list[tuple[float, float]] = []  # (arrival monotonic offset, latency s)
        seen = 0
        live_from = float("inf")
        stop = asyncio.Event()

        async def read() -> None:
            nonlocal seen
            tps = [TopicPartition(out, p) for p in range(PARTITIONS)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            while not stop.is_set():
                got = await consumer.getmany(timeout_ms=100, max_records=5000)
                now = time.time()
                for recs in got.values():
                    seen += len(recs)
                    for r in recs:
                        ts = orjson.loads(r.value)["ts"]
                        if ts >= live_from:
                            lat.append((now, now - ts))

        reader = asyncio.create_task(read())
        samples: list[tuple[float, int]] = []
        stages: dict[str, float] = {}
        try:
            # Warm-up: 48 points per series, one second apart, ending just before now.
            base = time.time() - 60.0
            for k in range(48):
                for key, name in zip(keys, names, strict=True):
                    v = orjson.dumps({"series_id": name, "ts": base + k, "value": 50.0 + k % 7})
                    await producer.send(topic, v, key)
            await producer.flush()
            deadline = time.monotonic() + 180
            while seen < series:
                if not proc.alive():
                    raise RuntimeError(f"{label}: worker exited:\n{proc.tail()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{label}: warm-up forecasts missing:\n{proc.tail()}")
                await asyncio.sleep(0.2)
            # Open loop.
            start = time.time()
            live_from = start
            t_end = start + duration
            sent = 0
            next_rss = start
            i = 0
            while True:
                now = time.time()
                if now >= t_end:
                    break
                due = int((now - start) * rate) - sent
                for _ in range(due):
                    k = i % series
                    i += 1
                    ts = time.time()
                    v = b'{"series_id":"%s","ts":%.6f,"value":%.3f}' % (
                        keys[k],
                        ts,
                        50.0 + (i % 13),
                    )
                    await producer.send(topic, v, keys[k])
                sent += max(0, due)
                if now >= next_rss:
                    samples.append((now - start, rss_bytes(proc.pid)))
                    next_rss = now + (10.0 if soak else 2.0)
                await asyncio.sleep(0.002)
            await producer.flush()
            await asyncio.sleep(2.0)  # the last forecasts arrive
            with contextlib.suppress(Exception):
                stages = await asyncio.to_thread(stage_means, port)
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(reader, 5)
            await producer.stop()
            await consumer.stop()
            rc = await asyncio.to_thread(proc.stop)
        skip = start + a.latency_skip
        vals = [v for t, v in lat if t >= skip]
        p50, p95, p99 = (x * 1000 for x in percentiles(vals))
        row: dict[str, Any] = {
            "label": label, "rate": rate, "sent": sent, "received": len(lat),
            "p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "load": loadavg(), "exit": rc,
            "stage_means": stages,
        }  # fmt: skip
        if soak:
            per_min: list[dict[str, float]] = []
            minute = 60.0
            n_min = int(duration // minute)
            for m in range(n_min):
                w = [v for t, v in lat if start + m * minute <= t < start + (m + 1) * minute]
                q = percentiles(w)
                rss = [r for s, r in samples if m * minute <= s < (m + 1) * minute]
                per_min.append(
                    {"minute": m + 1, "p50_ms": q[0] * 1000, "p99_ms": q[2] * 1000,
                     "rss_mb": (max(rss) if rss else 0) / 2**20, "n": len(w)}
                )  # fmt: skip
            row["per_minute"] = per_min
            row["rss_samples"] = samples
        return row

    def run_latency(self) -> None:
        a = self.args
        drains = self.results.get("drain", {})
        self.say(
            f"\n## Latency event→forecast at half of the sustained capacity (open loop, "
            f"{a.latency_series} series, {a.latency_duration:.0f} s; first {a.latency_skip:.0f} s "
            f"not counted; worker flags: {a.latency_flags or '(defaults)'})"
        )
        self.say("| model | rate events/s | p50 ms | p95 ms | p99 ms | load avg |")
        self.say("|---|---:|---:|---:|---:|---|")
        rows = {}
        for model in ("default", "small"):
            cap = drains.get(f"{model} {a.backend} emit=every", {}).get("forecasts_per_s")
            rate = (cap or a.fallback_capacity[model]) / 2
            r = asyncio.run(self._open_loop(model, rate, a.latency_duration, f"latency-{model}"))
            rows[model] = r
            self.say(
                f"| {model} ({a.backend}) | {rate:,.0f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | "
                f"{r['p99_ms']:.1f} | {r['load']} |"
            )
            stages = ", ".join(f"{k} {v * 1000:.2f} ms" if k != "batch size" else f"{k} {v:.0f}"
                               for k, v in r["stage_means"].items())  # fmt: skip
            self.say(f"|   mean per batch: {stages} | | | | | |")
        self.results["latency"] = rows

    def run_soak(self) -> None:
        a = self.args
        drains = self.results.get("drain", {})
        cap = drains.get(f"small {a.backend} emit=every", {}).get("forecasts_per_s")
        rate = (cap or a.fallback_capacity["small"]) / 2
        self.say(
            f"\n## Soak: small model ({a.backend}), {a.soak:.0f} s at {rate:,.0f} events/s "
            "(half capacity)"
        )
        r = asyncio.run(self._open_loop("small", rate, a.soak, "soak", soak=True))
        self.say("| minute | p50 ms | p99 ms | worker RSS MB (max) | forecasts |")
        self.say("|---:|---:|---:|---:|---:|")
        for m in r.get("per_minute", []):
            self.say(
                f"| {m['minute']} | {m['p50_ms']:.1f} | {m['p99_ms']:.1f} | {m['rss_mb']:.1f} | "
                f"{m['n']:,} |"
            )
        rss = [x for _, x in r["rss_samples"] if x]
        if len(rss) >= 4:
            first = float(np.median(rss[1:4]))  # after the first sample (start-up)
            last = float(np.median(rss[-3:]))
            r["rss_growth"] = (last - first) / first
            self.say(
                f"\nRSS {first / 2**20:.1f} MB (start) → {last / 2**20:.1f} MB (end): "
                f"{100 * r['rss_growth']:+.1f} %; overall p99 {r['p99_ms']:.1f} ms"
            )
        self.results["soak"] = r

    # ---- latency curve (paced producer, latency from the input record's CreateTime) ------------

    async def _run_pacer(self, argv: list[str], timeout: float, tick: Any = None) -> dict[str, Any]:
        """Run the pacer to its end, calling ``tick()`` about once a second meanwhile; its
        one-line JSON summary, with ``exit``."""
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        comm = asyncio.ensure_future(proc.communicate())
        deadline = time.monotonic() + timeout
        try:
            while not comm.done():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"pacer ran past {timeout:.0f} s: {' '.join(argv)}")
                if tick is not None:
                    await tick()
                await asyncio.wait({comm}, timeout=1.0)
        finally:
            if not comm.done():
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await comm
        out, err = comm.result()
        lines = out.decode().strip().splitlines()
        if not lines:
            raise RuntimeError(
                f"pacer: no summary (exit {proc.returncode}):\n{err.decode()[-2000:]}"
            )
        summary: dict[str, Any] = orjson.loads(lines[-1])
        summary["exit"] = proc.returncode
        if proc.returncode:
            summary["stderr"] = err.decode()[-2000:]
        return summary

    async def _wait_drained(self, run: CurveRun, timeout: float) -> int | None:
        """Wait until the worker's group has committed everything produced (lag 0); the lag
        left when ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        lag: int | None = None
        while time.monotonic() < deadline:
            if not run.proc.alive():
                raise RuntimeError(f"{run.label}: worker exited:\n{run.proc.tail()}")
            lag = await run.probe.lag()
            if lag == 0:
                return 0
            await asyncio.sleep(0.5)
        return lag

    async def _hold(self, run: CurveRun, rate: float) -> dict[str, Any]:
        """One capacity step: the pacer at ``rate`` for ``--curve-hold`` s, the group's lag
        sampled every second. Held: the pacer kept its rate (achieved ≥ 97 %), every acknowledged,
        and the lag over the last third of the hold (and just after it) stayed within
        ``--lag-bound-s`` seconds of input."""
        a = self.args
        lags: list[tuple[float, int]] = []
        t0 = time.monotonic()

        async def tick() -> None:
            if not run.proc.alive():
                raise RuntimeError(f"{run.label}: worker exited:\n{run.proc.tail()}")
            lag = await run.probe.lag()
            if lag is not None:
                lags.append((time.monotonic() - t0, lag))

        argv = pacer_argv(
            run.pacer, self.stack.bootstrap, run.topic, series=a.latency_series,  # type: ignore[union-attr]
            rate=rate, duration=a.curve_hold, cpus=run.pacer_cpus,
        )  # fmt: skip
        summary = await self._run_pacer(argv, a.curve_hold + 120, tick)
        await tick()  # the lag once the last event was acknowledged
        tail = [lag for t, lag in lags if t >= a.curve_hold * 2 / 3]
        bound = max(rate * a.lag_bound_s, 200.0)
        held = (
            summary["exit"] == 0
            and summary["achieved_rate"] >= 0.97 * rate
            and bool(tail)
            and max(tail) <= bound
        )
        return {
            "rate": rate, "held": held, "lag_end": lags[-1][1] if lags else None,
            "lag_tail_max": max(tail) if tail else None, "lag_bound": bound, "lags": lags,
            "pacer": summary, "load": loadavg(),
        }  # fmt: skip

    async def _capacity(
        self, run: CurveRun, guess: float
    ) -> tuple[float, float, list[dict[str, Any]]]:
        """The highest fixed rate held (``_hold``), searched from 70 % of ``guess``: up by 1.3×
        until a step fails, down by 0.6× until one holds, then halving the interval; at most
        ``--curve-steps`` steps (3 more while none held), stopping once the interval is within
        8 %. Between steps the worker drains what it is behind. Returns the highest rate held,
        the lowest not held (inf when every step held: the capacity is then a lower bound) and
        the steps."""
        a = self.args
        lo, hi = 0.0, float("inf")
        rate = _round_rate(0.7 * guess)
        steps: list[dict[str, Any]] = []
        self.say(
            f"| {run.label}: rate events/s | held | lag at end | max lag, last third (bound) "
            "| pacer achieved/s | late sends | max late ms | load avg |"
        )
        self.say("|---|---|---:|---:|---:|---:|---:|---|")
        while len(steps) < a.curve_steps or (lo == 0 and len(steps) < a.curve_steps + 3):
            r = await self._hold(run, rate)
            steps.append(r)
            p = r["pacer"]
            self.say(
                f"| {rate:,.0f} | {'yes' if r['held'] else 'no'} | {_num(r['lag_end'])} | "
                f"{_num(r['lag_tail_max'])} ({r['lag_bound']:,.0f}) | {p['achieved_rate']:,.0f} | "
                f"{p['late']:,} | {p['max_late_ms']:.1f} | {r['load']} |"
            )
            if r["held"]:
                lo = rate
            else:
                hi = rate
            r["lag_after_drain"] = await self._wait_drained(run, max(30.0, 2 * a.curve_hold))
            if hi == float("inf"):
                rate = _round_rate(rate * 1.3)
            elif lo == 0:
                rate = _round_rate(rate * 0.6)
            elif hi / lo <= 1.08:
                break
            else:
                rate = _round_rate((lo + hi) / 2)
        if lo == 0:
            raise RuntimeError(f"{run.label}: no rate held down to {rate:,.0f} events/s")
        return lo, hi, steps

    async def _point(self, run: CurveRun, pct: float, rate: float) -> dict[str, Any]:
        """One point of the curve: the pacer at ``rate`` for ``--curve-duration`` s writing its
        delivery records; each record joined to its forecast through ``source`` (partition,
        offset); latency = forecast arrival at the reader − the record's CreateTime (the pacer's
        wall clock at the send; the reader's ``time.time()``: one clock, one machine). Records
        of the first ``--curve-skip`` s are not counted."""
        a = self.args
        deliveries = self.root / f"{unique('deliveries')}.bin"
        run.reader.clear()
        run.reader.recording = True

        async def tick() -> None:
            if not run.proc.alive():
                raise RuntimeError(f"{run.label}: worker exited:\n{run.proc.tail()}")

        argv = pacer_argv(
            run.pacer, self.stack.bootstrap, run.topic, series=a.latency_series,  # type: ignore[union-attr]
            rate=rate, duration=a.curve_duration, deliveries=deliveries, cpus=run.pacer_cpus,
        )  # fmt: skip
        before = await asyncio.to_thread(scrape, run.metrics_port) if run.metrics_port else {}
        try:
            summary = await self._run_pacer(argv, a.curve_duration + 120, tick)
            d = read_deliveries(deliveries)
        finally:
            deliveries.unlink(missing_ok=True)
        # Every partition's newest record of this run forecast (per partition the forecasts
        # come in input order), bounded; then a moment for the other output partitions.
        newest: dict[int, int] = {}
        for p, o in zip(d["partition"].tolist(), d["offset"].tolist(), strict=True):
            newest[p] = max(o, newest.get(p, -1))
        deadline = time.monotonic() + max(30.0, a.curve_duration)
        while time.monotonic() < deadline and any(
            run.reader.high.get(p, -1) < o for p, o in newest.items()
        ):
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.5)
        run.reader.recording = False
        batches = (
            _batch_columns(before, await asyncio.to_thread(scrape, run.metrics_port))
            if run.metrics_port
            else {}
        )
        counted = d[d["create_ms"] >= d["create_ms"].min() + a.curve_skip * 1000] if len(d) else d
        keys = ForecastReader.key(counted["partition"], counted["offset"]).tolist()
        arrivals = run.reader.arrivals
        lat = [
            arrivals[k] - c / 1000.0
            for k, c in zip(keys, counted["create_ms"].tolist(), strict=True)
            if k in arrivals
        ]
        qs = [x * 1000 for x in percentiles(lat, (50, 95, 99, 99.9))]
        run.reader.clear()
        return {
            "pct": pct, "rate": rate, "sent": summary["sent"], "counted": len(counted),
            "joined": len(lat), "p50_ms": qs[0], "p95_ms": qs[1], "p99_ms": qs[2],
            "p99_9_ms": qs[3], "max_ms": max(lat) * 1000 if lat else float("nan"),
            "pacer": summary, "load": loadavg(), "batches": batches,
        }  # fmt: skip

    async def _curve(
        self, model: str, guarantee: str, pinned: bool, guess: float, label: str, pacer: Path
    ) -> dict[str, Any]:
        """One curve: a worker on fresh topics (batcher defaults), warmed by the pacer; capacity
        searched with the pacer running; then the points at ``--curve-points`` % of it."""
        a = self.args
        st = self.stack
        assert st is not None
        topic, out, group, db = await self._fresh_worker_place("cin")
        port = free_port()
        argv = worker_argv(
            st, self.models[model], input_topic=topic, output_topic=out, group=group, db=db,
            backend=a.backend, threads=1 if pinned else a.threads,
            extra=("--guarantee", guarantee), metrics_port=port,
        )  # fmt: skip
        restore: dict[int, str] = {}
        if pinned:
            argv = ["taskset", "-c", a.pin_worker, *argv]
            # The rest of the stack on the other core: every thread of the broker's JVM, Redis,
            # and this process (the forecast reader and the lag probe); the pacer starts there.
            for pid in (st.kafka.pid(), st.redis.pid(), os.getpid()):
                if pid is not None:
                    restore[pid] = affinity(pid)
                    pin(pid, a.pin_rest)
        name = label.replace(" ", "_")
        proc = Proc(argv, self.root / f"curve-{name}.log")
        reader = ForecastReader(st.bootstrap, out, read_committed=guarantee == "exactly_once")
        probe = LagProbe(st.bootstrap, topic, group)
        run = CurveRun(
            label, pacer, topic, proc, reader, probe, a.pin_rest if pinned else None, port
        )
        row: dict[str, Any] = {"label": label, "model": model, "guarantee": guarantee,
                               "pinned": pinned, "search_from": guess}  # fmt: skip
        try:
            await reader.start()
            await probe.start()
            warm = pacer_argv(
                run.pacer, st.bootstrap, topic, series=a.latency_series, warmup=WARM_POINTS,
                cpus=run.pacer_cpus,
            )  # fmt: skip
            row["warmup"] = await self._run_pacer(warm, 120)
            deadline = time.monotonic() + 240
            while reader.seen < a.latency_series:  # each series' 48th point is forecast
                if not proc.alive():
                    raise RuntimeError(f"{label}: worker exited:\n{proc.tail()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{label}: warm-up forecasts missing:\n{proc.tail()}")
                await asyncio.sleep(0.5)
            if pinned:  # what each process runs on, every thread, once the worker is up
                row["affinity"] = {
                    what: thread_affinities(pid)
                    for what, pid in (("worker", proc.pid), ("kafka", st.kafka.pid()),
                                      ("redis", st.redis.pid()), ("bench", os.getpid()))
                    if pid is not None
                }  # fmt: skip
                self.say("CPUs: " + ", ".join(f"{k} {v}" for k, v in row["affinity"].items()))
            await self._wait_drained(run, 60)
            cap, not_held, steps = await self._capacity(run, guess)
            row.update(capacity=cap, steps=steps, capacity_lower_bound=not_held == float("inf"))
            row["lowest_not_held"] = None if row["capacity_lower_bound"] else not_held
            self.say(
                f"\ncapacity: **{cap:,.0f} events/s** held {a.curve_hold:.0f} s"
                + (" (a lower bound: every step held)" if row["capacity_lower_bound"]
                   else f" ({not_held:,.0f} was not held)")
                + "\n"
            )  # fmt: skip
            self.say(
                f"| {label}: % of capacity | events/s | p50 ms | p95 ms | p99 ms | p99.9 ms | "
                "forecasts joined / counted | late sends | batches: rows each (limit at end) | "
                "ms per batch: apply / infer / publish / persist / commit (batches per commit) | "
                "load avg |"
            )
            self.say("|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|")
            points = []
            for pct in a.curve_points:
                pt = await self._point(run, pct, _round_rate(cap * pct / 100))
                points.append(pt)
                b = pt["batches"]
                self.say(
                    f"| {pct:g} | {pt['rate']:,.0f} | {pt['p50_ms']:.1f} | {pt['p95_ms']:.1f} | "
                    f"{pt['p99_ms']:.1f} | {pt['p99_9_ms']:.1f} | {pt['joined']:,} / "
                    f"{pt['counted']:,} | {pt['pacer']['late']:,} | {b['batches']:,.0f}: "
                    f"{b['rows']:.0f} ({b['limit']:,.0f}) | "
                    + " / ".join(f"{b['ms'][s]:.1f}" for s in BATCH_STAGES)
                    + f" ({b['per_commit']:.1f}) | {pt['load']} |"
                )
            row["points"] = points
        finally:
            await reader.stop()
            await probe.stop()
            row["exit"] = await asyncio.to_thread(proc.stop)
            for pid, cpus in restore.items():
                with contextlib.suppress(Exception):
                    pin(pid, cpus)
        return row

    def run_floor(self, pacer: Path) -> None:
        """The latency floor: the curve's points at ``--floor-rates`` with a pass-through group
        member (bench/echo_worker.py) in place of the worker: what a forecast's latency cannot go
        below on this machine with these clients (two trips through the broker, no model)."""
        a = self.args
        rates = [float(r) for r in a.floor_rates.split(",") if r]
        self.say(
            f"\n## Latency floor (pacer, {a.latency_series} series, open loop; a pass-through "
            "group member in place of the worker: each record straight back out naming its "
            f"source, the worker's client settings; points {a.curve_duration:.0f} s, first "
            f"{a.curve_skip:.0f} s not counted)"
        )
        self.say("| events/s | p50 ms | p95 ms | p99 ms | p99.9 ms | joined / counted | late sends "
                 "| load avg |")  # fmt: skip
        self.say("|---:|---:|---:|---:|---:|---:|---:|---|")
        points = asyncio.run(self._floor(pacer, rates))
        for pt in points:
            self.say(
                f"| {pt['rate']:,.0f} | {pt['p50_ms']:.1f} | {pt['p95_ms']:.1f} | "
                f"{pt['p99_ms']:.1f} | {pt['p99_9_ms']:.1f} | {pt['joined']:,} / "
                f"{pt['counted']:,} | {pt['pacer']['late']:,} | {pt['load']} |"
            )
        self.results["floor"] = points

    async def _floor(self, pacer: Path, rates: list[float]) -> list[dict[str, Any]]:
        a = self.args
        st = self.stack
        assert st is not None
        topic, out, group, _ = await self._fresh_worker_place("flin")
        argv = [
            sys.executable, "-m", "bench.echo_worker", "--bootstrap-servers", st.bootstrap,
            "--input-topic", topic, "--output-topic", out, "--group-id", group,
        ]  # fmt: skip
        proc = Proc(argv, self.root / "floor-echo.log")
        reader = ForecastReader(st.bootstrap, out)
        # (the lag probe serves only the capacity search, which the floor does not run)
        run = CurveRun("floor", pacer, topic, proc, reader, LagProbe(st.bootstrap, topic, group),
                       None, 0)  # fmt: skip
        try:
            await reader.start()
            warm = pacer_argv(pacer, st.bootstrap, topic, series=a.latency_series, warmup=1)
            await self._run_pacer(warm, 120)
            deadline = time.monotonic() + 120
            while reader.seen < a.latency_series:
                if not proc.alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"floor: the echo member is not forwarding:\n{proc.tail()}")
                await asyncio.sleep(0.5)
            return [await self._point(run, 0.0, rate) for rate in rates]
        finally:
            await reader.stop()
            await asyncio.to_thread(proc.stop)

    def run_curve(self, pacer: Path) -> None:
        a = self.args
        drains = self.results.get("drain", {})
        variants = [v for v in a.curve_variants.split(",") if v]
        self.say(
            f"\n## Latency curve (pacer: open loop on librdkafka, {a.latency_series} series, "
            f"{a.backend}, batcher defaults; capacity = highest rate held {a.curve_hold:.0f} s "
            f"with lag ≤ {a.lag_bound_s:g} s of input, the pacer running; points "
            f"{a.curve_duration:.0f} s, first {a.curve_skip:.0f} s not counted; latency = forecast "
            "arrival at the bench's consumer − input CreateTime, joined through source)"
        )
        if "pinned" in variants:
            why = can_pin(_cpu_set(a.pin_worker) | _cpu_set(a.pin_rest))
            if why:
                self.say(f"pinned curves skipped: {why}")
                variants.remove("pinned")
            else:
                self.say(
                    f"pinned: worker `taskset -c {a.pin_worker}` with --threads 1; Kafka (every "
                    f"JVM thread), Redis, the pacer and this process (forecast reader, lag probe) "
                    f"on CPU {a.pin_rest}"
                )
        rows: dict[str, Any] = {}
        for variant in variants:
            guarantee = "at_least_once" if variant == "pinned" else variant
            if guarantee not in GUARANTEES:
                raise SystemExit(f"--curve-variants: unknown {variant!r}")
            for model in a.curve_models.split(","):
                label = f"{model} {a.backend} {guarantee}" + (
                    " pinned" if variant == "pinned" else ""
                )
                drain = drains.get(f"{model} {a.backend} emit=every", {}).get("forecasts_per_s")
                alo = rows.get(f"{model} {a.backend} at_least_once", {}).get("capacity")
                guess = alo or drain or a.fallback_capacity[model]
                if variant == "pinned":
                    # One core for the worker instead of two shared with the rest: the first
                    # quick run held 59 % of the unpinned capacity pinned (both models).
                    guess *= 0.75
                self.say(f"\n### {label} (search from {guess:,.0f} events/s)")
                try:
                    rows[label] = asyncio.run(
                        self._curve(model, guarantee, variant == "pinned", guess, label, pacer)
                    )
                except RuntimeError as exc:
                    self.say(f"failed: {str(exc)[-1500:]}")
                    rows[label] = {"error": str(exc)[-2000:]}
                rows[label]["drain_forecasts_per_s"] = drain
        self.say(f"\n| curve | capacity events/s (held {a.curve_hold:.0f} s) | drain forecasts/s |")
        self.say("|---|---:|---:|")
        for label, r in rows.items():
            cap = f"{r['capacity']:,.0f}" if "capacity" in r else "failed"
            if r.get("capacity_lower_bound"):
                cap = f"≥ {cap}"
            drain = r.get("drain_forecasts_per_s")
            self.say(f"| {label} | {cap} | {f'{drain:,.0f}' if drain else 'not run'} |")
        self.results["curve"] = rows


def _cost(
    m0: list[dict[str, float]],
    m1: list[dict[str, float]],
    cpu_s: dict[str, float],
    redis_bytes: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Cost per consumed event over a drain's window, summed over its workers: each stage's
    seconds (wall time in the worker: it includes waiting for the broker, Redis, the CPU and
    the GIL), the model call's seconds per backend, and the CPU seconds of the workers, Redis
    and the broker, all in µs per event; Redis's network bytes per event (``redis_bytes``); the
    forecasts by path (``paths``: seasonal, plain; counts, not per event)."""
    diff: dict[str, float] = {}
    for before, after in zip(m0, m1, strict=True):
        for k, v in after.items():
            diff[k] = diff.get(k, 0.0) + v - before.get(k, 0.0)
    events = diff.get("consumed", 0.0)
    if events <= 0:
        return {"events": 0}
    us = 1e6 / events
    return {
        "events": events,
        "forecasts": diff.get("forecasts", 0.0),
        "stage_us": {s: diff.get(f"stage:{s}", 0.0) * us for s in STAGES},
        "inference_us": {
            k.split(":", 1)[1]: v * us for k, v in diff.items() if k.startswith("inference:")
        },
        "paths": {k.split(":", 1)[1]: v for k, v in diff.items() if k.startswith("path:")},
        "cpu_us": {k: v * us for k, v in cpu_s.items()},
        "redis_bytes": {k: v / events for k, v in (redis_bytes or {}).items()},
    }


BATCH_STAGES = ("apply", "infer", "publish", "persist", "commit")


def _batch_columns(m0: dict[str, float], m1: dict[str, float]) -> dict[str, Any]:
    """What the worker did during one curve point, from two scrapes of its /metrics: batches,
    their mean records, the batcher's limit at the end, each stage's mean ms per batch (its own
    count: persist and commit run once per settled group) and batches per commit."""

    def d(key: str) -> float:
        return m1.get(key, 0.0) - m0.get(key, 0.0)

    n = d("batches")
    ms = {s: 1000 * d(f"stage:{s}") / max(1.0, d(f"batches:{s}")) for s in BATCH_STAGES}
    return {
        "batches": n, "rows": d("batch_rows") / n if n else 0.0,
        "limit": m1.get("batch_limit", 0.0), "ms": ms,
        "per_commit": n / d("commits") if d("commits") else 0.0,
    }  # fmt: skip


def _round_rate(x: float) -> float:
    """Three significant digits: rates that read well in a table."""
    if x <= 0:
        return 0.0
    return float(round(x, 2 - int(np.floor(np.log10(x)))))


def _cpu_set(text: str) -> set[int]:
    """A taskset CPU list ("1", "0,2", "2-3") as a set."""
    out: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        out.update(range(int(first), int(last or first) + 1))
    return out


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:,.0f}"


def machine() -> str:
    import onnxruntime as ort
    import torch

    name = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return (
        f"# {name or platform.processor()}, {os.cpu_count()} logical cores; load avg {loadavg()}\n"
        f"# python {sys.version.split()[0]}, torch {torch.__version__}, onnxruntime "
        f"{ort.__version__}, numpy {np.__version__}"
    )


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short runs for development")
    ap.add_argument("--only", default="ceilings,drain,latency,curve,soak")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument(
        "--backend", default="onnx",
        help="backend of latency/soak/baselines (torch-bf16 drains faster on AMX CPUs but its "
        "latency at half capacity is far worse: docs/benchmarks.md)",
    )  # fmt: skip
    ap.add_argument("--series", type=int, default=1000)
    ap.add_argument("--backlog", type=int, default=None)
    ap.add_argument("--warmup", type=float, default=None)
    ap.add_argument("--duration", type=float, default=None)
    ap.add_argument("--soak", type=float, default=None)
    ap.add_argument("--latency-duration", type=float, default=None)
    ap.add_argument("--latency-skip", type=float, default=5.0)
    ap.add_argument("--latency-series", type=int, default=1000)
    ap.add_argument("--latency-flags", default="", help="extra worker flags in latency runs")
    ap.add_argument(
        "--capacity", default="",
        help="MODEL=FORECASTS_PER_S,... used for latency/soak when this run has no drain of "
        "that model (e.g. default=723,small=6864 to repeat a run's half-capacity rates)",
    )  # fmt: skip
    ap.add_argument("--curve-models", default="default,small")
    ap.add_argument(
        "--curve-variants", default="at_least_once,exactly_once,pinned",
        help="latency curves to run: at_least_once, exactly_once, pinned (at_least_once, worker "
        "on one core, the rest of the stack on another)",
    )  # fmt: skip
    ap.add_argument("--curve-hold", type=float, default=None, help="s per capacity step (60)")
    ap.add_argument("--curve-steps", type=int, default=None, help="capacity steps (5)")
    ap.add_argument("--curve-duration", type=float, default=None, help="s per curve point (30)")
    ap.add_argument("--curve-skip", type=float, default=None, help="s not counted per point (5)")
    ap.add_argument("--curve-points", default="10,25,50,75,90", help="%% of capacity")
    ap.add_argument(
        "--floor-rates", default="340,450,1700,2250,3400",
        help="events/s of the latency floor (--only floor: a pass-through group member, "
        "bench/echo_worker.py, in place of the worker; the default rates are the 10 and 50 %% "
        "points of the 2026-12-02 curves)",
    )  # fmt: skip
    ap.add_argument(
        "--lag-bound-s", type=float, default=2.0,
        help="a capacity step holds while the group's lag stays within this many seconds of input",
    )  # fmt: skip
    ap.add_argument(
        "--pin-cores", default="0:1", help="pinned curves: WORKER_CPUS:REST_CPUS (taskset lists)"
    )
    ap.add_argument("--no-faust", action="store_true")
    ap.add_argument(
        "--drains", default="",
        help="comma-separated substrings (or =NAME, that drain alone): drains to run",
    )  # fmt: skip
    ap.add_argument("--worker-flags", default="", help="extra flags of every worker drain")
    ap.add_argument(
        "--latest-flags", default="--max-batch 8192",
        help="extra flags of the --emit latest drains (default %(default)s: with 1000 series, "
        "a batch of 8192 events coalesces into at most 1000 forecasts)",
    )  # fmt: skip
    ap.add_argument("--profile", action="store_true", help="py-spy the workers (raw stacks)")
    ap.add_argument(
        "--before", default="", help="git ref: also drain with the worker of that commit"
    )
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    q = args.quick
    args.backlog = args.backlog or (600_000 if q else 7_000_000)
    args.warmup = args.warmup if args.warmup is not None else (5.0 if q else 15.0)
    args.duration = args.duration if args.duration is not None else (12.0 if q else 60.0)
    args.soak = args.soak if args.soak is not None else (60.0 if q else 600.0)
    args.latency_duration = args.latency_duration or (15.0 if q else 40.0)
    args.min_time = 0.5 if q else 1.5
    args.batches = (64, 256, 1024) if q else (64, 256, 512, 1024, 2048)
    args.io_count = 100_000 if q else 400_000
    args.curve_hold = args.curve_hold or (15.0 if q else 60.0)
    args.curve_steps = args.curve_steps or (3 if q else 5)
    args.curve_duration = args.curve_duration or (10.0 if q else 30.0)
    args.curve_skip = args.curve_skip if args.curve_skip is not None else (2.0 if q else 5.0)
    args.curve_points = [float(x) for x in args.curve_points.split(",") if x]
    args.pin_worker, _, args.pin_rest = args.pin_cores.partition(":")
    if not args.pin_worker or not args.pin_rest:
        ap.error("--pin-cores: WORKER_CPUS:REST_CPUS, e.g. 0:1")
    args.fallback_capacity = {"default": 1000.0, "small": 8000.0}
    for item in filter(None, args.capacity.split(",")):
        name, _, rate = item.partition("=")
        if name not in args.fallback_capacity:
            ap.error(f"--capacity: unknown model {name!r} (default, small)")
        try:
            args.fallback_capacity[name] = float(rate)
        except ValueError:
            ap.error(f"--capacity: {item!r} is not MODEL=FORECASTS_PER_S")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    only = set(args.only.split(","))
    print("# eventcast benchmarks" + (" (--quick)" if args.quick else ""), flush=True)
    print(machine(), flush=True)
    t0 = time.monotonic()
    # The pacer first (a compile, or apt-get when root and the compiler or librdkafka-dev is
    # missing): a machine that cannot build it fails now, not after the other phases.
    pacer = build_pacer() if only & {"curve", "floor"} else None
    with workdir(keep=args.keep) as root:
        b = Bench(args, root)
        try:
            b.setup(backlog=bool(only & {"ceilings", "drain"}))
            if "ceilings" in only:
                b.run_ceilings()
            if "drain" in only:
                b.run_drains()
            if "latency" in only:
                b.run_latency()
            if pacer is not None:
                if "curve" in only:
                    b.run_curve(pacer)
                if "floor" in only:
                    b.run_floor(pacer)
            if "soak" in only:
                b.run_soak()
        finally:
            if b.stack is not None:
                b.stack.stop()
            b.results["load"]["end"] = loadavg()
            b.results["seconds"] = time.monotonic() - t0
            if args.json:
                args.json.write_text(dumps(b.results).decode())
    print(f"\n# total {time.monotonic() - t0:.0f} s; load avg at the end {loadavg()}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
