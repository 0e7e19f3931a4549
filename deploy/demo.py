"""``make demo``: the whole system on one machine, on real data, then a clean stop.

1. Start the local stack (Kafka KRaft + Redis), or reuse the one that runs.
2. If the model directory has no serving version, export real series shipped in PyPI packages
   (hourly Seattle and San Francisco air temperatures from ``vega_datasets``, 30-minute sea surface
   temperature from ``bokeh_sampledata``) and train a small model on them with ``worker retrain``.
3. Run ``worker start`` on topics of this demo run, replay the last points of each series as events
   at a steady rate, and show a live table of the latest forecasts with their 80 % intervals.
4. Stop the worker with SIGTERM (it drains, commits and exits 0), delete the demo topics and Redis
   keys, and stop the stack if the demo started it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pandas as pd
from pydantic import Field

from deploy.logs import configure_logging
from deploy.stack import REPO, Stack, create_topics, free_port
from model.errors import ConfigError
from stream.config import (
    PositiveFloat,
    PositiveInt,
    Settings,
    add_settings_arguments,
    settings_from,
)

DEMO_DATASETS = ("seattle-temps", "sf-temps", "sea-temp")
WINDOW = 48


@dataclass
class SeriesView:
    """What the live table shows for one series."""

    events: int = 0
    forecasts: int = 0
    last_actual: float | None = None
    last: dict | None = None
    errors: list[float] = field(default_factory=list)  # |actual - previous 1-step mean|
    covered: dict[str, list[bool]] = field(  # level -> was each actual in its interval
        default_factory=lambda: {"80": [], "95": []}
    )
    calibration: str = "-"  # the latest forecast's `calibration` header


RECENT = 100  # the live table's recent coverage: the last this many scored forecasts


def pct(hits: list[bool]) -> str:
    return f"{100 * sum(hits) / len(hits):.0f} %" if hits else "-"


def worker_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "deploy.cli", *args]


def export_data(path: Path) -> pd.DataFrame:
    """Write the demo's real series as one CSV (``series_id, ts, value``) and return them."""
    from train.datasets import load_dataset

    data = pd.concat([load_dataset(name) for name in DEMO_DATASETS], ignore_index=True)
    # The replay should show forecasts, not dead letters: drop the originals' few repeats and gaps.
    data = data.dropna(subset=["value"]).drop_duplicates(["series_id", "ts"])
    path.parent.mkdir(parents=True, exist_ok=True)
    data[["series_id", "ts", "value"]].to_csv(path, index=False)
    return data


def train_if_needed(model_dir: Path, data_csv: Path, budget: str) -> None:
    from model.registry import ModelRegistry

    if ModelRegistry(model_dir).current() is not None:
        print(f"[demo] serving version {ModelRegistry(model_dir).current()} from {model_dir}")
        return
    print(f"[demo] {model_dir} is empty: training a small model on real data ({budget} budget)")
    cmd = worker_cmd(
        "retrain",
        "--data",
        str(data_csv),
        "--model-dir",
        str(model_dir),
        "--hidden-size",
        "64",
        "--num-layers",
        "2",
        "--max-epochs",
        "30",
        "--time-budget",
        budget,
        "--run-dir",
        str(REPO / ".demo" / "runs"),
        "--logger",
        "csv",
    )
    subprocess.run(cmd, check=True)


def replay_events(data: pd.DataFrame, points: int) -> list[tuple[str, float, float]]:
    """The last ``points`` observations of each series, interleaved in time order."""
    tails = [g.sort_values("ts").tail(points) for _, g in data.groupby("series_id")]
    rows = pd.concat(tails).sort_values(["ts", "series_id"])
    return list(
        zip(rows["series_id"], rows["ts"].astype(float), rows["value"].astype(float), strict=True)
    )


def render(views: dict[str, SeriesView], elapsed: float, sent: int, received: int):  # -> rich Table
    from rich.table import Table

    title = f"eventcast live forecasts — {elapsed:5.1f}s, {sent} events, {received} forecasts"
    table = Table(title=title)
    for col in (
        "series",
        "events",
        "forecasts",
        "newest actual",
        "next mean",
        "80 % interval",
        "95 % interval",
        "MAE so far",
        "80 % coverage: all",
        f"last {RECENT}",
        "95 %: all",
        f"last {RECENT}",
        "intervals",
        "model",
    ):
        table.add_column(col, justify="right" if col != "series" else "left")
    for sid, v in sorted(views.items()):
        f = v.last
        n = len(v.errors)
        table.add_row(
            sid,
            str(v.events),
            str(v.forecasts),
            f"{v.last_actual:.2f}" if v.last_actual is not None else "-",
            f"{f['mean'][0]:.2f}" if f else "warming",
            f"[{f['lower']['80'][0]:.2f}, {f['upper']['80'][0]:.2f}]" if f else "-",
            f"[{f['lower']['95'][0]:.2f}, {f['upper']['95'][0]:.2f}]" if f else "-",
            f"{sum(v.errors) / n:.3f}" if n else "-",
            pct(v.covered["80"]),
            pct(v.covered["80"][-RECENT:]),
            pct(v.covered["95"]),
            pct(v.covered["95"][-RECENT:]),
            v.calibration,
            f["model_version"] if f else "-",
        )
    return table


async def stream_demo(
    bootstrap: str, topics: dict[str, str], events, rate: float, duration: float
) -> dict:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from rich.console import Console
    from rich.live import Live

    views: dict[str, SeriesView] = {}
    actual_by_ts: dict[tuple[str, float], float] = {(s, t): v for s, t, v in events}
    expected = sum(
        max(0, n - WINDOW + 1) for n in pd.Series([s for s, _, _ in events]).value_counts()
    )
    sent = received = dlq = 0
    pending: dict[str, dict] = {}  # series -> forecast waiting for its next actual

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    consumer = AIOKafkaConsumer(
        topics["output"],
        topics["dlq"],
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
    )
    await producer.start()
    await consumer.start()
    start = time.monotonic()

    delivered: list[asyncio.Future] = []  # one per event: the broker's acknowledgement

    async def produce() -> None:
        nonlocal sent
        for i, (sid, ts, value) in enumerate(events):
            body = orjson.dumps({"series_id": sid, "ts": ts, "value": value})
            delivered.append(await producer.send(topics["input"], body, key=sid.encode()))
            views.setdefault(sid, SeriesView()).events += 1
            sent = i + 1
            # Pace the replay: a steady rate, like a live feed.
            delay = start + sent / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        await producer.flush()
        await asyncio.gather(*delivered)  # a refused event raises here, not unretrieved

    producing = asyncio.create_task(produce())
    # Off a terminal (a log file, CI) rich assumes 80 columns; the table needs more.
    console = Console() if sys.stdout.isatty() else Console(width=150)
    try:
        with Live(render(views, 0, 0, 0), console=console, refresh_per_second=4) as live:
            while time.monotonic() - start < duration and received < expected:
                batch = await consumer.getmany(timeout_ms=250)
                for tp, messages in batch.items():
                    for m in messages:
                        if tp.topic == topics["dlq"]:
                            dlq += 1
                            continue
                        f = orjson.loads(m.value)
                        sid = f["series_id"]
                        view = views.setdefault(sid, SeriesView())
                        view.forecasts += 1
                        received += 1
                        view.last = f
                        view.last_actual = actual_by_ts.get((sid, f["ts"]))
                        view.calibration = dict(m.headers or ()).get("calibration", b"-").decode()
                        prev = pending.get(sid)
                        if prev is not None and view.last_actual is not None:
                            err = abs(view.last_actual - prev["mean"][0])
                            view.errors.append(err)
                            for lv, hits in view.covered.items():
                                lo, hi = prev["lower"][lv][0], prev["upper"][lv][0]
                                hits.append(lo <= view.last_actual <= hi)
                        pending[sid] = f
                live.update(render(views, time.monotonic() - start, sent, received))
    finally:
        producing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await producing
        for fut in delivered:  # the replay was cut short: nobody awaits these any more
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        await consumer.stop()
        await producer.stop()
    return {"sent": sent, "forecasts": received, "expected": expected, "dlq": dlq}


async def delete_topics(bootstrap: str, names: list[str]) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics(names)
    finally:
        await admin.close()


class DemoSettings(Settings):
    """``make demo`` (``python -m deploy.demo``): flags, ``EVENTCAST_*`` variables or
    ``--config``, like every ``worker`` command."""

    model_dir: Path = Field(Path("models"), description="train here when it holds no version")
    points: PositiveInt = Field(
        720,
        description="events replayed per series (30 days of the hourly series: enough for the "
        "online interval calibration to show its coverage settling near 80 %)",
    )
    rate: PositiveFloat = Field(120.0, description="events per second")
    duration: PositiveFloat = Field(120.0, description="seconds at most")
    train_budget: str = Field("3m", description="time budget of the training run, e.g. 3m")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__.split("\n")[0])
    add_settings_arguments(parser, DemoSettings)
    try:
        args = settings_from(parser.parse_args(argv), os.environ)
    except ConfigError as exc:
        print(f"demo: configuration error: {exc}", file=sys.stderr)
        return 2
    # This process's own log lines (its Kafka clients'), like the worker's it starts: warnings
    # and errors only, between the live table's refreshes.
    configure_logging("WARNING")

    stack = Stack.from_env()
    started_stack = not (stack.kafka.running() and stack.redis.running())
    print(
        "[demo] starting the local stack" if started_stack else "[demo] reusing the running stack"
    )
    stack.up()
    model_dir = args.model_dir.resolve()
    data = export_data(REPO / ".demo" / "data.csv")
    train_if_needed(model_dir, REPO / ".demo" / "data.csv", args.train_budget)

    run = time.strftime("%Y%m%d%H%M%S")
    topics = {
        "input": f"demo-{run}.events",
        "output": f"demo-{run}.forecasts",
        "dlq": f"demo-{run}.dlq",
    }
    create_topics(
        stack.kafka.bootstrap, {topics["input"]: 6, topics["output"]: 6, topics["dlq"]: 1}
    )
    prefix = f"eventcast-demo-{run}"
    worker = subprocess.Popen(
        worker_cmd(
            "--log-level",
            "WARNING",
            "start",
            "--bootstrap-servers",
            stack.kafka.bootstrap,
            "--redis-url",
            stack.redis.url,
            "--redis-prefix",
            prefix,
            "--model-dir",
            str(model_dir),
            "--input-topic",
            topics["input"],
            "--output-topic",
            topics["output"],
            "--dlq-topic",
            topics["dlq"],
            "--group-id",
            f"demo-{run}",
            "--metrics-port",
            str(free_port()),
        )
    )
    events = replay_events(data, args.points)
    try:
        summary = asyncio.run(
            stream_demo(stack.kafka.bootstrap, topics, events, args.rate, args.duration)
        )
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            code = worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
            code = worker.wait()
        asyncio.run(delete_topics(stack.kafka.bootstrap, list(topics.values())))
        import redis

        r = redis.Redis.from_url(stack.redis.url)
        for key in r.scan_iter(match=f"*{prefix}*", count=1000):
            r.delete(key)
        r.close()
        if started_stack:
            stack.down()
            print("[demo] stack stopped")
    print(
        f"[demo] {summary['sent']} events replayed, {summary['forecasts']} of "
        f"{summary['expected']} expected forecasts received, {summary['dlq']} dead-letter "
        f"records; worker exited {code}"
    )
    return 0 if code == 0 and summary["forecasts"] >= summary["expected"] else 1


if __name__ == "__main__":
    sys.exit(main())
