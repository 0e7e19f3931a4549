"""Drain rate of both engines (``--engine native`` and ``--engine faust``) in the same run.

A backlog of events is produced first (so the producer does not share the cores during the
measurement); then each engine, as a ``worker start`` subprocess with its own group, output topic
and Redis prefix, drains the same input topic. The rate is read at the forecast topic (sum of its
end offsets, sampled every 0.25 s from one client) between 10 % and 90 % of the expected
forecasts, which leaves out start-up and the tail. Engines run alternately, ``--rounds`` times each.

``--rebalance`` also starts a second worker of the same engine once a third of the backlog is
drained and reports the longest stretch without a new forecast after it joined (the rebalance
pause) and how many forecasts were published more than once.

    python bench/engines.py [--series 200] [--events 300] [--rounds 2] [--rebalance]

Needs the local stack (``make stack-up``) or ``--bootstrap-servers`` / ``--redis-url``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.harness import backlog_file, kcat_produce, write_model_dir  # noqa: E402
from deploy.stack import create_topics  # noqa: E402


@dataclass
class Result:
    engine: str
    expected: int
    published: int
    first_s: float  # process start -> first forecast
    rate: float  # forecasts/s between 10 % and 90 %
    pause_s: float | None = None  # longest gap after the second worker joined
    repeats: int = 0


class EndOffsets:
    """Sum of a topic's end offsets, from one long-lived client (cheap to sample often)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        import asyncio

        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self._start(bootstrap, topic))

    async def _start(self, bootstrap: str, topic: str) -> None:
        import asyncio

        from aiokafka import AIOKafkaConsumer, TopicPartition

        self.consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
        await self.consumer.start()
        for _ in range(100):
            parts = self.consumer.partitions_for_topic(topic)
            if parts:
                self.tps = [TopicPartition(topic, p) for p in sorted(parts)]
                return
            await self.consumer._client.force_metadata_update()
            await asyncio.sleep(0.1)
        raise RuntimeError(f"no metadata for {topic}")

    def total(self) -> int:
        ends = self.loop.run_until_complete(self.consumer.end_offsets(self.tps))
        return sum(ends.values())

    def close(self) -> None:
        self.loop.run_until_complete(self.consumer.stop())
        self.loop.close()


def worker(engine: str, args: argparse.Namespace, model_dir: Path, out: str, group: str,
           prefix: str, log: Path) -> subprocess.Popen[bytes]:  # fmt: skip
    argv = [
        sys.executable, "-m", "deploy.cli", "start", "--engine", engine,
        "--bootstrap-servers", args.bootstrap_servers, "--redis-url", args.redis_url,
        "--redis-prefix", prefix, "--model-dir", str(model_dir), "--input-topic", args.input,
        "--output-topic", out, "--dlq-topic", args.dlq, "--group-id", group,
        "--threads", str(args.threads), "--metrics-port", "0", "--max-batch", str(args.max_batch),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTCAST_")}
    env["EVENTCAST_LOG_LEVEL"] = "WARNING"
    with open(log, "ab") as fh:
        return subprocess.Popen(argv, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)


def cleanup(args: argparse.Namespace, prefix: str, topics: list[str]) -> None:
    """Delete a run's Redis keys and topics (best effort)."""
    import asyncio

    import redis
    from aiokafka.admin import AIOKafkaAdminClient

    client = redis.Redis.from_url(args.redis_url)
    try:
        keys = list(client.scan_iter(match=f"*{prefix}*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])
    finally:
        client.close()

    async def drop() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=args.bootstrap_servers)
        await admin.start()
        try:
            await admin.delete_topics(topics)
        finally:
            await admin.close()

    try:
        asyncio.run(drop())
    except Exception as exc:  # a leftover bench topic is harmless
        print(f"(could not delete {topics}: {exc})", file=sys.stderr)


def run_engine(engine: str, args: argparse.Namespace, model_dir: Path, expected: int,
               logs: Path) -> Result:  # fmt: skip
    tag = uuid.uuid4().hex[:8]
    out = f"bench-forecasts-{engine}-{tag}"
    create_topics(args.bootstrap_servers, {out: 6})
    group, prefix = f"bench-{engine}-{tag}", f"bench-{tag}"
    sampler = EndOffsets(args.bootstrap_servers, out)
    t0 = time.monotonic()
    procs = [worker(engine, args, model_dir, out, group, prefix, logs / f"{engine}-{tag}.log")]
    samples: list[tuple[float, int]] = []
    joined: float | None = None
    try:
        while True:
            n = sampler.total()
            now = time.monotonic()
            samples.append((now, n))
            if procs[0].poll() is not None:
                raise RuntimeError(f"{engine} worker exited with {procs[0].returncode}")
            if args.rebalance and joined is None and n >= expected // 3:
                log = logs / f"{engine}-{tag}-2.log"
                procs.append(worker(engine, args, model_dir, out, group, prefix, log))
                joined = now
            if n >= expected or now - t0 > args.timeout:
                break
            time.sleep(0.25)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
    published = sampler.total()
    sampler.close()
    cleanup(args, prefix, [out])
    first = next(t for t, n in samples if n > 0)

    def at(frac: float) -> float:
        return next(t for t, n in samples if n >= frac * expected)

    lo, hi = at(0.1), at(0.9)
    res = Result(engine, expected, published, first - t0, 0.8 * expected / (hi - lo))
    if joined is not None:
        after = [(t, n) for t, n in samples if t >= joined]
        gaps, last_t, last_n = [], after[0][0], after[0][1]
        for t, n in after[1:]:
            if n > last_n:
                gaps.append(t - last_t)
                last_t, last_n = t, n
        res.pause_s = max(gaps) if gaps else None
    res.repeats = published - expected
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bootstrap-servers", default="127.0.0.1:9092")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--series", type=int, default=200)
    p.add_argument("--events", type=int, default=300, help="events per series")
    p.add_argument("--rounds", type=int, default=2, help="runs of each engine, alternating")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-batch", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--rebalance", action="store_true")
    p.add_argument("--timeout", type=float, default=300.0)
    args = p.parse_args()

    tag = uuid.uuid4().hex[:8]
    args.input, args.dlq = f"bench-events-{tag}", f"bench-dlq-{tag}"
    create_topics(args.bootstrap_servers, {args.input: 6, args.dlq: 1})
    with tempfile.TemporaryDirectory(prefix="bench-engines-") as tmp:
        model_dir = Path(tmp) / "models"
        heads = max(1, args.hidden // 16)
        write_model_dir(model_dir, hidden_size=args.hidden, num_layers=args.layers,
                        attention_heads=heads)  # fmt: skip
        n_events = backlog_file(Path(tmp) / "backlog.tsv", args.series, args.events)
        t = time.monotonic()
        kcat_produce(args.bootstrap_servers, args.input, Path(tmp) / "backlog.tsv")
        print(f"backlog: {n_events} events ({args.series} series x {args.events}) produced in "
              f"{time.monotonic() - t:.1f}s to {args.input}; model h{args.hidden} x{args.layers}, "
              f"onnx, {args.threads} threads, max batch {args.max_batch}, "
              f"cpus {os.cpu_count()}", flush=True)  # fmt: skip
        expected = args.series * (args.events - 47)
        results: list[Result] = []
        for _ in range(args.rounds):
            for engine in ("native", "faust"):
                r = run_engine(engine, args, model_dir, expected, Path(tmp))
                results.append(r)
                print(f"  {engine}: {r.rate:,.0f} forecasts/s", flush=True)

    cleanup(args, "bench-nothing", [args.input, args.dlq])
    print()
    print(
        "| engine | run | forecasts | start → first forecast (s) | drain rate (forecasts/s) |"
        + (" rebalance pause (s) | repeated forecasts |" if args.rebalance else "")
    )
    print("|---|---|---|---|---|" + ("---|---|" if args.rebalance else ""))
    runs: dict[str, int] = {}
    for r in results:
        runs[r.engine] = runs.get(r.engine, 0) + 1
        row = (f"| {r.engine} | {runs[r.engine]} | {r.published} | {r.first_s:.1f} | "
               f"{r.rate:,.0f} |")  # fmt: skip
        if args.rebalance:
            pause = f"{r.pause_s:.2f}" if r.pause_s is not None else "-"
            row += f" {pause} | {r.repeats} |"
        print(row)
    mean = {e: sum(r.rate for r in results if r.engine == e) / runs[e] for e in ("native", "faust")}
    print(f"\nmean drain rate: native {mean['native']:,.0f}/s, faust {mean['faust']:,.0f}/s; "
          f"faust / native = {mean['faust'] / mean['native']:.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
