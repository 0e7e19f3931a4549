"""Fixtures and helpers of the worker tests: event generation, a worker run in a thread of the
test process (fast) or as a subprocess (for kill -9), and readers of what it produced."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from deploy.stack import free_port
from tests.helpers.worker import ThreadWorker

REPO = Path(__file__).resolve().parents[2]
T0 = 1_700_000_000.0
STEP = 300.0


def series_value(s: int, i: int) -> float:
    """A deterministic, non-trivial series: level + daily-ish wave + a little sawtooth."""
    return round(10.0 * s + 3.0 * ((i * 7 + s) % 24) / 24.0 + (i % 5) * 0.25, 4)


def make_events(
    n_series: int, n_events: int, *, prefix: str = "s", start: int = 0
) -> list[tuple[str, bytes]]:
    """Interleaved events (series-major within each step) for steps ``start..start+n_events-1``."""
    out = []
    for i in range(start, start + n_events):
        for s in range(n_series):
            doc = {"series_id": f"{prefix}{s}", "ts": T0 + i * STEP, "value": series_value(s, i)}
            out.append((f"{prefix}{s}", orjson.dumps(doc)))
    return out


@dataclass
class Truth:
    """Accepted events per series, in order, with their (partition, offset)."""

    events: dict[str, list[tuple[int, int, float, float]]] = field(default_factory=dict)

    def add(self, records: Sequence[tuple[str, bytes]], placed: Sequence[tuple[int, int]]) -> None:
        for (key, value), (p, o) in zip(records, placed, strict=True):
            doc = orjson.loads(value)
            self.events.setdefault(key, []).append((p, o, doc["ts"], doc["value"]))

    def expected_sources(self, window: int = 48) -> set[tuple[int, int]]:
        return {(p, o) for evs in self.events.values() for (p, o, _, _) in evs[window - 1 :]}


def forecasts_by_source(records: Sequence[Any]) -> dict[tuple[int, int], list[dict[str, Any]]]:
    out: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for r in records:
        doc = orjson.loads(r.value)
        out.setdefault((doc["source"]["partition"], doc["source"]["offset"]), []).append(doc)
    return out


def wait_for(cond: Callable[[], bool], timeout: float, what: str, every: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def worker_argv(
    bootstrap: str,
    redis_url: str,
    model_dir: Path,
    topics: Any,
    *extra: str,
    group: str | None = None,
) -> list[str]:
    return [
        "start",
        "--bootstrap-servers", bootstrap,
        "--redis-url", redis_url,
        "--model-dir", str(model_dir),
        "--input-topic", topics.input,
        "--output-topic", topics.output,
        "--dlq-topic", topics.dlq,
        "--group-id", group or f"g-{topics.input}",
        "--threads", "1",
        "--session-timeout-ms", "6000",
        "--reload-interval", "0.3",
        *extra,
    ]  # fmt: skip


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def metric_value(text: str, name: str, labels: str = "") -> float:
    """Sum of the samples ``name{labels...}`` in a Prometheus exposition."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + ("{" if labels else "")) or (
            not labels and line.startswith(name + " ")
        ):
            if labels and labels not in line:
                continue
            total += float(line.rsplit(" ", 1)[1])
    return total


def published_total(w: Any) -> float:
    """A running worker's ``eventcast_forecasts_published_total``."""
    return metric_value(w.metrics(), "eventcast_forecasts_published_total")


@pytest.fixture
def thread_worker() -> Iterator[Callable[..., ThreadWorker]]:
    workers: list[ThreadWorker] = []

    def make(argv: list[str], **kwargs: Any) -> ThreadWorker:
        w = ThreadWorker(argv, **kwargs)
        workers.append(w)
        return w.start()

    yield make
    for w in workers:
        with contextlib.suppress(Exception):
            w.stop()


class ProcWorker:
    """``python -m deploy.cli start ...`` as a subprocess (for kill -9 and signal tests)."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.metrics_port = free_port()
        self.argv = [
            sys.executable,
            "-m",
            "deploy.cli",
            *argv,
            "--metrics-port",
            str(self.metrics_port),
        ]
        self.log_path = log_path
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTCAST_")}
        full_env.update(env or {})
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in wait()/kill()
        self.proc = subprocess.Popen(
            self.argv, cwd=REPO, env=full_env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def ready(self) -> bool:
        try:
            return http_get(f"http://127.0.0.1:{self.metrics_port}/readyz", 0.5)[0] == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float = 60) -> ProcWorker:
        wait_for(lambda: self.ready() or self.proc.poll() is not None, timeout, "worker ready")
        assert self.proc.poll() is None, f"worker exited with {self.proc.returncode}: {self.log()}"
        return self

    def metrics(self) -> str:
        return http_get(f"http://127.0.0.1:{self.metrics_port}/metrics")[1].decode()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def check(self) -> None:
        """Fail at once when the worker process has exited (a wait on it would only time out)."""
        if self.proc.poll() is not None:
            raise AssertionError(f"worker exited with {self.proc.returncode}: {self.log()}")

    def dump(self, wait: float = 2.0) -> str:
        """The worker's thread and asyncio task stacks (SIGUSR1, stream/diagnostics.py)."""
        if self.proc.poll() is not None:
            return f"(worker exited with {self.proc.returncode})"
        start = self.log_path.stat().st_size
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + wait
        text = ""
        while time.monotonic() < deadline:
            time.sleep(0.2)
            with open(self.log_path, "rb") as f:
                f.seek(start)
                text = f.read().decode(errors="replace")
            if "end of dump" in text:
                break
        return text[-12000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._log.close()

    def terminate(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout)
        self._log.close()
        return rc

    def wait(self, timeout: float) -> int:
        rc = self.proc.wait(timeout)
        self._log.close()
        return rc


@pytest.fixture
def proc_worker(tmp_path: Path) -> Iterator[Callable[..., ProcWorker]]:
    procs: list[ProcWorker] = []

    def make(argv: list[str], env: dict[str, str] | None = None) -> ProcWorker:
        p = ProcWorker(argv, tmp_path / f"worker-{len(procs)}.log", env)
        procs.append(p)
        return p

    yield make
    for p in procs:
        with contextlib.suppress(Exception):
            p.kill()
