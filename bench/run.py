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
   ``latest``, the naive per-event worker and the faust engine;
3. latency: an open-loop producer at half of the measured capacity stamping each event with its
   send time as ``ts``, and a consumer of the forecast topic (latency = arrival − ``ts``);
4. soak: the same at half capacity for ``--soak`` seconds, worker RSS and latency over time.

Every phase is bounded in time; everything it started is stopped at the end.

    python -m bench.run [--quick] [--soak 600] [--only ceilings,drain,latency,soak] [--json F]
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
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from bench import ceilings
from bench.harness import (
    PARTITIONS,
    REPO,
    BenchStack,
    Proc,
    backlog_file,
    committed,
    dumps,
    end_offsets,
    flush_db,
    free_port,
    kcat_produce,
    loadavg,
    percentiles,
    rss_bytes,
    series_name,
    stage_means,
    total,
    unique,
    workdir,
    worker_argv,
    write_model,
)

BACKENDS = ("torch", "torch-bf16", "onnx", "onnx-int8")


class Bench:
    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args = args
        self.root = root
        self.results: dict[str, Any] = {"load": {}}
        self._db = 0
        self.stack: BenchStack | None = None
        self.models: dict[str, Path] = {}
        self.backlog = "backlog"
        self.backlog_events = 0

    def say(self, text: str = "") -> None:
        print(text, flush=True)

    def next_db(self) -> int:
        self._db += 1
        return self._db

    # ---- setup ---------------------------------------------------------------------------------

    def setup(self) -> None:
        a = self.args
        self.say(f"# stack in {self.root}")
        self.stack = BenchStack.start(self.root)
        for name in ("default", "small"):
            self.models[name] = write_model(self.root, name)
        self.stack.topics({self.backlog: PARTITIONS})
        path = self.root / "backlog.tsv"
        self.backlog_events = backlog_file(path, a.series, a.backlog // a.series)
        secs = kcat_produce(self.stack.bootstrap, self.backlog, path)
        path.unlink()
        self.say(
            f"# backlog: {self.backlog_events:,} events of {a.series} series produced beforehand "
            f"with kcat in {secs:.1f} s ({self.backlog_events / secs:,.0f} events/s)"
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

    def drain(self, label: str, argv_for: Any, cwd: Path = REPO) -> dict[str, Any]:
        """Run one worker-like process over the backlog; rates over the measured window."""
        a = self.args
        st = self.stack
        assert st is not None
        out, group, db = unique("fc"), unique("g"), self.next_db()
        st.topics({out: PARTITIONS, f"{out}.dlq": 1})
        flush_db(st, db)
        argv = argv_for(out=out, group=group, db=db)
        name = label.replace(" ", "_").replace("/", "-").replace("(", "").replace(")", "")
        proc = Proc(argv, self.root / f"{name}.log", cwd=cwd)
        row: dict[str, Any] = {"label": label}
        try:
            deadline = time.monotonic() + 180
            while total(asyncio.run(end_offsets(st.bootstrap, out))) == 0:
                if not proc.alive():
                    raise RuntimeError(f"{label}: exited early:\n{proc.tail()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{label}: no forecast within 180 s:\n{proc.tail()}")
                time.sleep(0.5)
            time.sleep(a.warmup)
            f0 = total(asyncio.run(end_offsets(st.bootstrap, out)))
            c0 = total(asyncio.run(committed(st.bootstrap, group, self.backlog)))
            t0 = time.monotonic()
            rss0 = rss_bytes(proc.pid)
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
            c1 = total(asyncio.run(committed(st.bootstrap, group, self.backlog)))
            t1 = time.monotonic()
            row.update(
                seconds=t1 - t0,
                forecasts_per_s=(f1 - f0) / (t1 - t0),
                ingested_per_s=(c1 - c0) / (t1 - t0),
                backlog_left=self.backlog_events - c1,
                rss_mb=max(rss0, rss_bytes(proc.pid)) / 2**20,
                load=loadavg(),
            )
            if c1 >= self.backlog_events:
                row["note"] = "backlog exhausted during the window: rate is a lower bound"
        finally:
            rc = proc.stop()
            row["exit"] = rc
        self.say(
            f"| {label} | {row['forecasts_per_s']:,.0f} | {row['ingested_per_s']:,.0f} | "
            f"{row['seconds']:.0f} | {row['rss_mb']:.0f} | {row['load']} |"
            + (f" {row['note']}" if "note" in row else "")
        )
        return row

    def worker_for(self, model: str, backend: str, *extra: str) -> Any:
        assert self.stack is not None
        a = self.args

        def argv(out: str, group: str, db: int) -> list[str]:
            return worker_argv(
                self.stack, self.models[model], input_topic=self.backlog, output_topic=out,  # type: ignore[arg-type]
                group=group, db=db, backend=backend, threads=a.threads, extra=extra,
            )  # fmt: skip

        return argv

    def naive_for(self, model: str, backend: str) -> Any:
        assert self.stack is not None
        st = self.stack
        a = self.args

        def argv(out: str, group: str, db: int) -> list[str]:
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
        wanted = [w for w in a.drains.split(",") if w]

        def want(key: str) -> bool:
            return not wanted or any(w in key for w in wanted)

        flags = tuple(a.worker_flags.split())
        for model in ("default", "small"):
            for backend in BACKENDS:
                key = f"{model} {backend} emit=every"
                if want(key):
                    rows[key] = self.drain(key, self.worker_for(model, backend, *flags))
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

    # ---- latency and soak ----------------------------------------------------------------------

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
        topic, out, group, db = unique("lat"), unique("latfc"), unique("g"), self.next_db()
        await asyncio.to_thread(st.topics, {topic: PARTITIONS, out: PARTITIONS, f"{out}.dlq": 1})
        flush_db(st, db)
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
    ap.add_argument("--only", default="ceilings,drain,latency,soak")
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
    ap.add_argument("--no-faust", action="store_true")
    ap.add_argument("--drains", default="", help="comma-separated substrings: drains to run")
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
    with workdir(keep=args.keep) as root:
        b = Bench(args, root)
        try:
            b.setup()
            if "ceilings" in only:
                b.run_ceilings()
            if "drain" in only:
                b.run_drains()
            if "latency" in only:
                b.run_latency()
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
