"""A randomized fault run in the spirit of Jepsen: ``make chaos`` (about 10 minutes) and a short,
seeded version in ``make test`` (tests/stream/test_chaos.py).

    python -m tests.chaos --seed 7 --minutes 10 --guarantee exactly_once

It starts its own Kafka and Redis on free ports (everything on 127.0.0.1, in a temporary folder),
writes a tiny model, runs 2–3 ``worker start`` subprocesses in one consumer group on a
multi-partition topic, and produces a steady load with known values. For the run's duration a
scheduler driven by ``random.Random(seed)`` injects one fault at a time:

- ``worker_kill9``: ``kill -9`` of a worker, restarted a moment later;
- ``worker_freeze``: SIGSTOP of a worker past its session timeout, then SIGCONT (a zombie that
  resumes with a batch in flight);
- ``worker_join`` / ``worker_leave``: a third worker joins the group / a worker stops (SIGTERM);
- ``broker_kill9``: ``kill -9`` of the broker, restarted;
- ``redis_kill9``: ``kill -9`` of redis-server, restarted from its AOF;
- ``redis_kill9_lose_tail``: the same with the AOF's tail cut off (recent writes lost: the worker
  must notice and rebuild from Kafka);
- ``redis_pause``: SIGSTOP of redis-server for a few seconds, then SIGCONT.

Then it stops producing, waits until the group has committed every input offset (lag 0), stops
the workers and checks the whole history in one checker (:func:`check_history`): the input topic
as written is the ground truth (per series, an event is accepted when its ``ts`` is newer than the
last accepted one; from the 48th accepted event on it must be forecast); the output topic is read
``read_committed`` under exactly-once. Anomalies: an acknowledged event missing from the input
topic, an expected forecast missing, a duplicate (exactly-once: by source partition/offset and by
series/ts), repeats that differ (at-least-once: anything but ``emitted_at``; the numbers up to
float32 rounding, as tests/stream/test_faults.py allows), a forecast for a record never produced
or not forecastable, a forecast not computed from the true window (compared with the model run
offline), forecasts out of input order per series (exactly-once), a dead letter for an accepted
event or none for a rejected one, a Redis window not equal to the true last points, a worker that
exited on its own, a drain that did not finish.

The seed is printed first; the same seed replays the same fault sequence (timings vary with the
machine). The table at the end lists faults injected and anomalies found; exit status 0 only when
there are none. Processes and the temporary folder are removed at the end, also on failure or
Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import orjson

from deploy.stack import KafkaServer, RedisServer, create_topics, free_port
from tests.helpers.calibration import replayed_intervals
from tests.helpers.faults import LoadProducer
from tests.stream.conftest import make_events

SESSION_TIMEOUT_S = 6.0  # worker_argv's --session-timeout-ms
WINDOW = 48  # full window: the first forecast comes with a series' 48th accepted event
KEPT = 96  # points a window keeps in Redis (48 + --window-history 48)

FAULTS = (
    "worker_kill9",
    "worker_freeze",
    "worker_join",
    "worker_leave",
    "broker_kill9",
    "redis_kill9",
    "redis_kill9_lose_tail",
    "redis_pause",
)


def log(msg: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- the load: tests/helpers/faults.py's LoadProducer, failed sends not sent again --------------


def chaos_step(n_series: int) -> Any:
    """One step of the load: an event for every series (tests/stream/conftest.py's values)."""
    return lambda i: make_events(n_series, 1, start=i)


# --- the history checker --------------------------------------------------------------------------


@dataclass
class History:
    guarantee: str
    partitions: int
    inputs: list[Any]  # tests.helpers.kafka.Record of the input topic
    acked: dict[tuple[int, int], bytes]
    outputs: list[Any]  # the output topic (read_committed under exactly_once)
    dead_letters: list[Any]
    windows: dict[str, Any]  # series -> stream.store.SeriesWindow | None
    model_dir: Path | None  # None: the offline value check is skipped
    worker_exits: list[str] = field(default_factory=list)
    drained: bool = True


def _flat(x: Any) -> list[float]:
    if isinstance(x, dict):
        return [v for key in sorted(x) for v in x[key]]
    return list(x)


NUMERIC = ("mean", "std", "lower", "upper")


def check_intervals(
    model_dir: Path,
    accepted: dict[str, list[tuple[int, int, float, float]]],
    by_src: dict[tuple[int, int], list[dict[str, Any]]],
) -> list[tuple[tuple[int, int], str]]:
    """The forecasts whose 80/95 % bounds differ from the independent replay of online interval
    calibration over the true accepted points (tests/helpers/calibration.py)."""
    wrong: list[tuple[tuple[int, int], str]] = []
    for src, bounds in replayed_intervals(model_dir, accepted, window=WINDOW, kept=KEPT).items():
        doc = by_src[src][0]
        for side, levels in bounds.items():
            for lv, arr in levels.items():
                got, w = doc[side][lv][0], float(arr[0])
                if not np.isclose(got, w, rtol=1e-4, atol=1e-4):
                    wrong.append((src, f"{side} {lv} {got}, replay {w}"))
    return wrong


def check_history(h: History) -> tuple[Counter[str], dict[str, list[str]]]:
    """Every anomaly of the run, counted by kind, with up to 5 examples of each."""
    anomalies: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}

    def bad(kind: str, what: str, n: int = 1) -> None:
        anomalies[kind] += n
        if len(examples.setdefault(kind, [])) < 5:
            examples[kind].append(what)

    # Ground truth: the input topic as written.
    events: dict[tuple[int, int], tuple[str, float, float]] = {}
    by_series: dict[str, list[tuple[int, int, float, float]]] = {}
    for r in h.inputs:
        doc = orjson.loads(r.value)
        events[(r.partition, r.offset)] = (doc["series_id"], doc["ts"], doc["value"])
        by_series.setdefault(doc["series_id"], []).append(
            (r.partition, r.offset, doc["ts"], doc["value"])
        )
    for src, value in h.acked.items():
        if src not in events:
            bad("acked_event_lost", f"{src}")
        elif orjson.loads(value)["ts"] != events[src][1]:
            bad("acked_event_lost", f"{src}: another event at that offset")
    accepted: dict[str, list[tuple[int, int, float, float]]] = {}
    rejected: set[tuple[int, int]] = set()
    for sid, evs in by_series.items():
        evs.sort(key=lambda e: (e[0], e[1]))
        acc: list[tuple[int, int, float, float]] = []
        for e in evs:
            if acc and e[2] <= acc[-1][2]:
                rejected.add((e[0], e[1]))
            else:
                acc.append(e)
        accepted[sid] = acc
    expected: dict[tuple[int, int], tuple[str, int]] = {
        (e[0], e[1]): (sid, i)
        for sid, acc in accepted.items()
        for i, e in enumerate(acc)
        if i >= WINDOW - 1
    }

    # Forecasts: present, not phantom, repeats identical (exactly once under exactly_once).
    by_src: dict[tuple[int, int], list[dict[str, Any]]] = {}
    by_key: Counter[tuple[str, float]] = Counter()
    order: dict[str, list[int]] = {}
    for r in h.outputs:
        doc = orjson.loads(r.value)
        src = (doc["source"]["partition"], doc["source"]["offset"])
        by_src.setdefault(src, []).append(doc)
        by_key[(doc["series_id"], doc["ts"])] += 1
        order.setdefault(doc["series_id"], []).append(src[1])
        if src not in events:
            bad("forecast_for_unknown_record", f"{src} {doc['series_id']} ts={doc['ts']}")
        elif events[src][:2] != (doc["series_id"], doc["ts"]):
            bad(
                "forecast_for_unknown_record",
                f"{src}: forecast {doc['series_id']} {doc['ts']}, input {events[src][:2]}",
            )
        elif src not in expected:
            bad(
                "forecast_not_expected",
                f"{src} {doc['series_id']} ts={doc['ts']} (rejected or window not full)",
            )
    for src in expected.keys() - by_src.keys():
        bad("missing_forecast", f"{src} {expected[src][0]} #{expected[src][1]}")
    for src, docs in by_src.items():
        if len(docs) > 1:
            if h.guarantee == "exactly_once":
                bad("duplicate_forecast", f"{src} x{len(docs)}", len(docs) - 1)
            first = {k: v for k, v in docs[0].items() if k not in ("emitted_at", *NUMERIC)}
            for d in docs[1:]:
                same = {k: v for k, v in d.items() if k not in ("emitted_at", *NUMERIC)} == first
                close = all(
                    np.allclose(_flat(docs[0][k]), _flat(d[k]), rtol=1e-5, atol=1e-6)
                    for k in NUMERIC
                )
                if not (same and close):
                    bad("repeat_differs", f"{src}: {docs[0]} vs {d}")
    if h.guarantee == "exactly_once":
        for key, n in by_key.items():
            if n > 1:
                bad("duplicate_by_series_ts", f"{key} x{n}", n - 1)
        for sid, offs in order.items():
            if any(b <= a for a, b in itertools.pairwise(offs)):
                bad("out_of_order", f"{sid}: source offsets not increasing on the output")

    # Values: each forecast's mean against the model run offline on the true window.
    picks = [(src, sid, i) for src, (sid, i) in expected.items() if src in by_src]
    if picks and h.model_dir is not None:
        from model.features import build_inputs
        from model.registry import ModelRegistry

        model = ModelRegistry(h.model_dir).load(backend="torch", device="cpu")
        for lo in range(0, len(picks), 2048):
            chunk = picks[lo : lo + 2048]
            ts = np.array(
                [[e[2] for e in accepted[s][i - WINDOW + 1 : i + 1]] for _, s, i in chunk]
            )
            vals = np.array(
                [[e[3] for e in accepted[s][i - WINDOW + 1 : i + 1]] for _, s, i in chunk]
            )
            want = model.predictor.predict(build_inputs(ts, vals, None, model.config)).mean[:, 0]
            for (src, _, _), w in zip(chunk, want, strict=True):
                got = by_src[src][0]["mean"][0]
                if not np.isclose(got, w, rtol=1e-4, atol=1e-5):
                    bad("forecast_from_wrong_window", f"{src}: mean {got}, offline {w}")

    # Intervals: with online calibration, each forecast's bounds against an independent replay of
    # the calibration rule over the true points and the offline forecasts, per partition in offset
    # order. An update lost or applied twice under a fault shifts every later factor of its series.
    online = any((getattr(r, "headers", None) or {}).get("calibration") == "online"
                 for r in h.outputs)  # fmt: skip
    if online and h.model_dir is not None and expected.keys() <= by_src.keys():
        for src, what in check_intervals(h.model_dir, accepted, by_src):
            bad("interval_from_wrong_state", f"{src}: {what}")

    # Dead letters: exactly the rejected events (at least once), never an accepted one.
    dead: set[tuple[int, int]] = set()
    for r in h.dead_letters:
        src = (int(r.headers.get("source.partition", -1)), int(r.headers.get("source.offset", -1)))
        dead.add(src)
        if src not in rejected:
            bad("dead_letter_for_accepted_event", f"{src} {r.headers.get('error.reason')}")
    for src in rejected - dead:
        bad("rejected_event_without_dead_letter", f"{src} {events[src][:2]}")

    # Redis windows: the true last points of every series.
    for sid, acc in accepted.items():
        win = h.windows.get(sid)
        want_pts = acc[-KEPT:]
        if win is None:
            bad("window_mismatch", f"{sid}: no window in Redis")
            continue
        got = (win.offsets.tolist(), win.ts.tolist(), win.values.tolist())
        exp = ([e[1] for e in want_pts], [e[2] for e in want_pts], [e[3] for e in want_pts])
        if got != exp:
            bad(
                "window_mismatch",
                f"{sid}: {len(got[0])} points, last offsets {got[0][-3:]}; "
                f"want {len(exp[0])}, {exp[0][-3:]}",
            )

    for what in h.worker_exits:
        bad("worker_exited_on_its_own", what)
    if not h.drained:
        bad("drain_timeout", "the group did not reach lag 0")
    return anomalies, examples


# --- the harness --------------------------------------------------------------------------------


@dataclass
class ChaosResult:
    seed: int
    guarantee: str
    faults: Counter[str]
    anomalies: Counter[str]
    examples: dict[str, list[str]]
    produced: int
    forecasts: int
    seconds: float

    def table(self) -> str:
        lines = [f"{'fault':<28}{'injected':>10}"]
        lines += [f"{f:<28}{self.faults.get(f, 0):>10}" for f in FAULTS]
        lines += ["", f"{'anomaly':<28}{'count':>10}"]
        if self.anomalies:
            lines += [f"{a:<28}{n:>10}" for a, n in sorted(self.anomalies.items())]
        else:
            lines.append(f"{'(none)':<28}{0:>10}")
        lines.append("")
        lines.append(
            f"events on the input topic: {self.produced}; forecasts read: {self.forecasts}; "
            f"run took {self.seconds:.0f} s"
        )
        for kind, ex in self.examples.items():
            lines.append(f"  {kind}: " + "; ".join(ex)[:2000])
        return "\n".join(lines)


class Chaos:
    def __init__(
        self,
        seed: int,
        seconds: float,
        guarantee: str,
        *,
        workers: int = 2,
        max_workers: int = 3,
        partitions: int = 6,
        series: int = 24,
        interval: float = 0.5,
        gap: tuple[float, float] = (4.0, 12.0),
        drain_timeout: float = 240.0,
        keep: bool = False,
    ) -> None:
        self.seed, self.seconds, self.guarantee = seed, seconds, guarantee
        self.rng = random.Random(seed)
        self.n_workers, self.max_workers = workers, max_workers
        self.partitions, self.series, self.interval = partitions, series, interval
        self.gap, self.drain_timeout, self.keep = gap, drain_timeout, keep
        self.faults: Counter[str] = Counter()
        self.workers: list[Any] = []  # live ProcWorkers
        self.all_workers: list[Any] = []
        self.exits: list[str] = []
        self.frozen: set[int] = set()  # pids under SIGSTOP
        self.n_started = 0

    # processes ---------------------------------------------------------------------------------

    def _start_worker(self) -> Any:
        from tests.stream.conftest import ProcWorker, worker_argv

        argv = worker_argv(
            self.kafka.bootstrap, self.redis.url, self.model_dir, self.topics,
            "--guarantee", self.guarantee, "--max-batch", "200", "--max-delay-ms", "20",
            group=self.group,
        )  # fmt: skip
        self.n_started += 1
        w = ProcWorker(argv, self.dir / f"worker-{self.n_started}.log")
        w.name = f"worker-{self.n_started}"
        self.workers.append(w)
        self.all_workers.append(w)
        try:
            w.wait_ready(90)
        except AssertionError as exc:
            log(f"{w.name} not ready: {str(exc)[:300]}")
        return w

    def _reap(self) -> None:
        """Workers that exited without being told to: an anomaly each, restarted."""
        for w in list(self.workers):
            if w.proc.poll() is not None:
                self.workers.remove(w)
                self.exits.append(f"{w.name} exited with {w.proc.returncode}: {w.log()[-600:]}")
                log(f"{w.name} exited on its own ({w.proc.returncode}); restarting")
                with contextlib.suppress(Exception):
                    w._log.close()
                self._start_worker()

    def _stop_signal(self, pid: int) -> None:
        os.kill(pid, signal.SIGSTOP)
        self.frozen.add(pid)

    def _cont_signal(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        self.frozen.discard(pid)

    # faults ------------------------------------------------------------------------------------

    def _eligible(self) -> list[str]:
        out = ["worker_kill9", "worker_freeze", "broker_kill9", "redis_kill9",
               "redis_kill9_lose_tail", "redis_pause"]  # fmt: skip
        if len(self.workers) < self.max_workers:
            out.append("worker_join")
        if len(self.workers) > self.n_workers:
            out.append("worker_leave")
        return out

    def inject(self, fault: str) -> None:
        rng = self.rng
        log(f"fault: {fault}")
        if fault == "worker_kill9":
            w = rng.choice(self.workers)
            w.kill()
            self.workers.remove(w)
            time.sleep(rng.uniform(0.5, 3.0))
            self._start_worker()
        elif fault == "worker_freeze":
            w = rng.choice(self.workers)
            self._stop_signal(w.proc.pid)
            time.sleep(SESSION_TIMEOUT_S + rng.uniform(1.0, 4.0))
            self._cont_signal(w.proc.pid)
        elif fault == "worker_join":
            self._start_worker()
        elif fault == "worker_leave":
            w = rng.choice(self.workers)
            self.workers.remove(w)
            rc = w.terminate(60)
            if rc != 0:
                self.exits.append(f"{w.name}: SIGTERM exit status {rc}: {w.log()[-600:]}")
        elif fault == "broker_kill9":
            self.kafka.kill()
            time.sleep(rng.uniform(1.0, 5.0))
            self.kafka.start(timeout=120)
        elif fault in ("redis_kill9", "redis_kill9_lose_tail"):
            self.redis.kill()
            if fault == "redis_kill9_lose_tail":
                self._cut_aof_tail(rng.randint(1, 64) * 1024)
            time.sleep(rng.uniform(0.5, 4.0))
            self.redis.start(timeout=60)
        elif fault == "redis_pause":
            pid = self.redis.pid()
            if pid is not None:
                self._stop_signal(pid)
                time.sleep(rng.uniform(1.0, 6.0))
                self._cont_signal(pid)
        self.faults[fault] += 1

    def _cut_aof_tail(self, nbytes: int) -> None:
        """Lose the newest writes: cut ``nbytes`` off the AOF's newest part (redis-server loads a
        truncated AOF up to its last whole command: aof-load-truncated is on by default)."""
        parts = sorted(
            (self.redis.dir / "redis").rglob("*.incr.aof"), key=lambda p: p.stat().st_mtime
        )
        if not parts:
            return
        p = parts[-1]
        size = p.stat().st_size
        with open(p, "r+b") as f:
            f.truncate(max(0, size - nbytes))
        log(f"  cut {min(size, nbytes)} bytes off {p.name} ({size} bytes)")

    # the run -----------------------------------------------------------------------------------

    def _lag(self) -> int | None:
        from aiokafka import TopicPartition
        from aiokafka.admin import AIOKafkaAdminClient

        from tests.helpers.kafka import end_offsets

        async def committed() -> dict[int, int]:
            admin = AIOKafkaAdminClient(bootstrap_servers=self.kafka.bootstrap)
            await admin.start()
            try:
                offs = await admin.list_consumer_group_offsets(self.group)
                return {
                    tp.partition: m.offset
                    for tp, m in offs.items()
                    if isinstance(tp, TopicPartition)
                }
            finally:
                await admin.close()

        try:
            ends = end_offsets(self.kafka.bootstrap, self.topics.input)
            done = asyncio.run(committed())
        except Exception as exc:
            log(f"lag: {exc!r}")
            return None
        return sum(max(0, end - done.get(p, 0)) for p, end in ends.items())

    def run(self) -> ChaosResult:
        from tests.helpers.kafka import consume_all
        from tests.helpers.store import read_window_sync
        from tests.helpers.tiny_model import make_tiny_model_dir

        began = time.monotonic()
        self.dir = Path(tempfile.mkdtemp(prefix=f"eventcast-chaos-{self.seed}-"))
        log(f"working in {self.dir}")
        self.redis = RedisServer(self.dir / "redis", port=free_port())
        self.kafka = KafkaServer(self.dir / "kafka", port=free_port())
        producer: LoadProducer | None = None
        try:
            self.redis.start()
            self.kafka.start(timeout=120)
            suffix = f"{self.seed}-{os.getpid()}"
            self.topics = SimpleNamespace(
                input=f"events-{suffix}", output=f"forecasts-{suffix}", dlq=f"dlq-{suffix}"
            )
            self.group = f"chaos-{suffix}"
            create_topics(
                self.kafka.bootstrap,
                {self.topics.input: self.partitions, self.topics.output: self.partitions,
                 self.topics.dlq: 1},
            )  # fmt: skip
            self.model_dir = self.dir / "models"
            make_tiny_model_dir(self.model_dir)
            for _ in range(self.n_workers):
                self._start_worker()
            producer = LoadProducer(
                self.kafka.bootstrap, self.topics.input, chaos_step(self.series),
                interval=self.interval, resend=False,
            ).start()  # fmt: skip
            log(
                f"{len(self.workers)} workers, producing {self.series / self.interval:.0f} events/s"
            )
            end = time.monotonic() + self.seconds
            # Let every series fill its window before the first fault.
            time.sleep(min(self.seconds / 4, 5.0))
            while True:
                self._reap()
                pause = self.rng.uniform(*self.gap)
                if time.monotonic() + pause >= end:
                    break
                time.sleep(pause)
                self._reap()
                self.inject(self.rng.choice(self._eligible()))
            time.sleep(max(0.0, end - time.monotonic()))
            producer.stop()  # (raises what failed it)
            acked = {(p, o): value for _, value, p, o in producer.placed}
            log(f"produced {producer.step} steps ({len(acked)} acknowledged, "
                f"{producer.send_errors} send errors); draining")  # fmt: skip

            drained = False
            deadline = time.monotonic() + self.drain_timeout
            while time.monotonic() < deadline:
                self._reap()
                lag = self._lag()
                if lag == 0:
                    drained = True
                    break
                time.sleep(2.0)
            log(f"drained: {drained}")
            for w in list(self.workers):
                self.workers.remove(w)
                rc = w.terminate(60)
                if rc != 0:
                    self.exits.append(f"{w.name}: SIGTERM exit status {rc}: {w.log()[-600:]}")
            iso = "read_committed" if self.guarantee == "exactly_once" else "read_uncommitted"
            inputs = consume_all(self.kafka.bootstrap, self.topics.input, idle=2.0, timeout=120)
            outputs = consume_all(
                self.kafka.bootstrap, self.topics.output, idle=2.0, timeout=180, isolation_level=iso
            )
            dead = consume_all(
                self.kafka.bootstrap, self.topics.dlq, idle=1.0, timeout=60, isolation_level=iso
            )
            import redis as redis_lib

            client = redis_lib.Redis.from_url(self.redis.url)
            try:
                windows = {
                    f"s{s}": read_window_sync(
                        client, "eventcast", self.topics.input, f"s{s}", self.partitions
                    )
                    for s in range(self.series)
                }
            finally:
                client.close()
            history = History(
                self.guarantee, self.partitions, inputs, acked, outputs, dead,
                windows, self.model_dir, list(self.exits), drained,
            )  # fmt: skip
            anomalies, examples = check_history(history)
            return ChaosResult(
                self.seed, self.guarantee, self.faults, anomalies, examples, len(inputs),
                len(outputs), time.monotonic() - began,
            )  # fmt: skip
        finally:
            self.cleanup(producer)

    def cleanup(self, producer: LoadProducer | None) -> None:
        for pid in list(self.frozen):
            self._cont_signal(pid)
        if producer is not None and producer._thread.is_alive():
            with contextlib.suppress(Exception):
                producer.stop()
        for w in self.all_workers:
            with contextlib.suppress(Exception):
                w.kill()
        with contextlib.suppress(Exception):
            self.kafka.kill()
        with contextlib.suppress(Exception):
            self.redis.kill()
        if self.keep:
            log(f"kept {self.dir}")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


def run_chaos(seed: int, minutes: float, guarantee: str, **kwargs: Any) -> ChaosResult:
    return Chaos(seed, minutes * 60.0, guarantee, **kwargs).run()


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGTERM/SIGHUP end the run through its cleanup, as Ctrl-C does."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=None, help="default: random (printed first)")
    p.add_argument("--minutes", type=float, default=10.0, help="fault phase length (default 10)")
    p.add_argument("--guarantee", choices=["exactly_once", "at_least_once"], default="exactly_once")
    p.add_argument("--workers", type=int, default=2, help="workers at start (a 3rd may join)")
    p.add_argument("--series", type=int, default=24)
    p.add_argument("--interval", type=float, default=0.5, help="seconds between steps")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (logs)")
    a = p.parse_args(argv)
    seed = a.seed if a.seed is not None else random.SystemRandom().randrange(1 << 31)
    replay = (
        f"python -m tests.chaos --seed {seed} --minutes {a.minutes:g} --guarantee {a.guarantee}"
    )
    print(f"chaos: seed {seed} (replay: {replay})", flush=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import logging

    # The producer's client logs every failed connection while the broker is down on purpose.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    with _signals_raise():
        result = run_chaos(
            seed, a.minutes, a.guarantee, workers=a.workers, max_workers=a.workers + 1,
            series=a.series, interval=a.interval, keep=a.keep,
        )  # fmt: skip
    print(f"\nchaos: seed {seed}, guarantee {a.guarantee}, {a.minutes:g} min of faults")
    print(result.table(), flush=True)
    return 0 if not result.anomalies else 1


if __name__ == "__main__":
    sys.exit(main())
