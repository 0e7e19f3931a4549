"""The forecast view and series state against the real services, and ``worker plot``.

Windows are written to the real Redis by the worker's own code (``PartitionWindows`` +
``WindowStore.persist``); forecasts are produced to a real Kafka topic and read back by the
server's topic feed. The page is rendered by headless Chromium (Debian's package) and the
screenshot is checked for the colours of the 80 % and 95 % bands.
"""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from deploy.cli import main as worker_main
from deploy.http.app import create_app
from deploy.http.feed import ForecastHistory, TopicForecastFeed
from deploy.http.serving import forecast_objects
from deploy.http.settings import ServeSettings
from deploy.http.state import RedisWindows
from deploy.plot import ACTUAL, BAND80, BAND95, ChartData, render_svg
from deploy.web.labels import number_label, percent_label, time_label
from model.features import build_inputs
from model.registry import ModelRegistry
from stream.settings import KafkaSettings, LimitSettings, RedisSettings
from stream.store import WindowStore, partition_for, partition_keys
from stream.windows import PartitionWindows
from tests.helpers.http import serve_in_thread
from tests.helpers.kafka import produce
from tests.helpers.store import sync_client

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

T = 48
T0 = 1_732_600_000.0
STEP = 300.0
PARTITIONS = 6


@dataclass
class Rec:
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int


def series_points(n: int, phase: float = 0.0) -> tuple[list[float], list[float]]:
    ts = [T0 + i * STEP for i in range(n)]
    values = [20.0 + 5.0 * math.sin(i / 6.0 + phase) for i in range(n)]
    return ts, values


async def write_windows(
    redis: str | RedisSettings, series: dict[str, int], topic: str = "events"
) -> None:
    """Store ``series`` (id -> number of points) as the worker does: per input partition, in the
    Redis at that URL or of those settings."""
    settings = RedisSettings(redis_url=redis) if isinstance(redis, str) else redis
    client = settings.client()
    try:
        store = WindowStore(client, settings.prefix, topic)
        by_part: dict[int, list[tuple[str, int]]] = {}
        for sid, n in series.items():
            by_part.setdefault(partition_for(sid, PARTITIONS), []).append((sid, n))
        for p, items in by_part.items():
            pw = PartitionWindows(topic, p, sequence_length=T, features=(), limits=LimitSettings())
            recs, off = [], 0
            for sid, n in items:
                for t, v in zip(*series_points(n), strict=True):
                    value = orjson.dumps({"ts": t, "value": v})
                    recs.append(Rec(off, sid.encode(), value, int(t * 1000)))
                    off += 1
            pw.apply(recs, emit=False)
            await store.persist(p, pw.snapshot(full=True), expected=None, features=())
    finally:
        await client.aclose()


def backtest(model_dir: Path, sid: str, n: int) -> list[dict[str, Any]]:
    """One forecast per point from the 48th on, made by the real model (as the worker would)."""
    loaded = ModelRegistry(model_dir).load(device="cpu", threads=1)
    ts, values = series_points(n)
    wts = np.array([ts[k - T : k] for k in range(T, n + 1)])
    wv = np.array([values[k - T : k] for k in range(T, n + 1)])
    fc = loaded.predictor.predict(build_inputs(wts, wv, None, loaded.config))
    return forecast_objects([sid] * len(wts), wts, fc, loaded.version)


# --- series state from the real Redis ------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("partitions", [PARTITIONS, None], ids=["known", "discovered"])
def test_series_reads_the_workers_redis_window(
    redis_url: str, tiny_model_dir: Path, partitions: int | None
) -> None:
    asyncio.run(write_windows(redis_url, {"alpha": 60, "beta": 10}))
    redis = RedisSettings(redis_url=redis_url)

    async def ping() -> bool:
        return True

    settings = ServeSettings(model_dir=tiny_model_dir, device="cpu", threads=1)
    # A fresh client per app: TestClient runs the app in its own event loop.
    reader = RedisWindows(redis.client(), redis.prefix, "events", partitions)
    with TestClient(
        create_app(settings, ModelRegistry(tiny_model_dir), window_reader=reader, redis_ping=ping)
    ) as c:
        got = c.get("/series/alpha").json()
        ts, values = series_points(60)
        # the store keeps sequence_length + history (48) points; all 60 here
        assert got["window"]["ts"] == ts and got["window"]["values"] == values
        assert got["forecast_origin"] == "computed"
        assert got["forecast"]["ts"] == ts[-1]
        warming = c.get("/series/beta").json()
        assert len(warming["window"]["values"]) == 10 and warming["forecast"] is None
        assert c.get("/series/gamma").status_code == 404


@pytest.mark.integration
def test_series_delete_removes_only_that_series(redis_url: str) -> None:
    from deploy.http.state import delete_series_sync, read_window_sync

    asyncio.run(write_windows(redis_url, {"alpha": 50, "beta": 50}))
    redis = RedisSettings(redis_url=redis_url)
    assert delete_series_sync(redis, "alpha") is True
    assert read_window_sync(redis, "alpha") is None
    assert read_window_sync(redis, "beta", partitions=PARTITIONS) is not None
    assert delete_series_sync(redis, "alpha") is False
    # the partition's applied offset (the worker's fence) is untouched
    client = sync_client(redis)
    try:
        meta = client.hget(
            WindowStore(client, redis.prefix, "events").keys(partition_for("alpha", PARTITIONS))[0],
            "applied",
        )
    finally:
        client.close()
    assert meta is not None


@pytest.mark.integration
def test_series_state_is_found_on_every_primary_of_a_redis_cluster(redis_cluster: Any) -> None:
    """`worker serve`/`plot`/`series delete` with --redis-cluster and no partition count:
    discovery (SCAN) covers every primary, not only the node the URL names."""
    from deploy.http.state import delete_series_sync, read_window_sync
    from tests.conftest import unique

    redis = RedisSettings(
        redis_url=redis_cluster.url, redis_cluster=True, redis_prefix=unique("view")
    )
    series = {f"s{i}": 50 for i in range(30)}
    asyncio.run(write_windows(redis, series))
    assert {partition_for(sid, PARTITIONS) for sid in series} == set(range(PARTITIONS))
    homes = {
        redis_cluster.primary_for(partition_keys(redis.prefix, "events", p)[0])
        for p in range(PARTITIONS)
    }
    assert len(homes) == 3  # the six partitions' slots lie on all three primaries
    for sid in series:
        window = read_window_sync(redis, sid)
        assert window is not None and len(window.values) == 50, sid
    assert delete_series_sync(redis, "s0") is True
    assert read_window_sync(redis, "s0") is None
    assert read_window_sync(redis, "s1", partitions=PARTITIONS) is not None


@pytest.mark.integration
def test_series_delete_command_exit_codes(redis_url: str, capsys: Any) -> None:
    asyncio.run(write_windows(redis_url, {"alpha": 50}))
    argv = ["series", "delete", "alpha", "--redis-url", redis_url]
    assert worker_main(argv) == 0
    assert orjson.loads(capsys.readouterr().out) == {"series_id": "alpha", "deleted": True}
    assert worker_main(argv) == 1


# --- the chart -----------------------------------------------------------------------------------


def test_svg_draws_both_bands_and_escapes_text(tiny_model_dir: Path) -> None:
    sid = '<script>alert("x")</script>'
    ts, values = series_points(70)
    svg = render_svg(ChartData(sid, ts, values, backtest(tiny_model_dir, sid, 70)))
    assert 'class="band95"' in svg and 'class="band80"' in svg and 'class="actual"' in svg
    assert "<script>" not in svg and "&lt;script&gt;" in svg
    assert BAND80 in svg and BAND95 in svg
    empty = render_svg(ChartData("nothing"))
    assert "no data" in empty and "band80" not in empty


def test_chart_axes_read_like_numbers_and_dates(tmp_path: Path) -> None:
    """Values around 33,760 are labelled 33,714 ... 33,806, never 3.376e+04; times as UTC dates."""
    import re

    from deploy.plot import render_png

    ts = [1_700_000_000.0 + 3600 * i for i in range(60)]
    values = [33_760.0 + 40 * math.sin(i / 5) for i in range(60)]
    svg = render_svg(ChartData("big", ts, values))
    labels = re.findall(r'text-anchor="end" fill="[^"]+">([^<]+)<', svg)[:5]  # (the y axis)
    assert all(re.fullmatch(r"33,[78]\d\d(\.\d+)?", x) for x in labels), labels
    assert "e+" not in svg and "2023-11-" in svg
    png = render_png(ChartData("big", ts, values), tmp_path / "big.png")
    assert png.stat().st_size > 1000  # (its tick labels use the same formatter)


def test_page_escapes_the_series_and_sets_a_strict_csp(tiny_model_dir: Path) -> None:
    settings = ServeSettings(model_dir=tiny_model_dir, device="cpu", threads=1)
    with TestClient(create_app(settings, ModelRegistry(tiny_model_dir))) as c:
        r = c.get("/", params={"series": '"><script>alert(1)</script>'})
        assert r.status_code == 200
        assert "<script>alert(1)" not in r.text
        assert "script-src 'self'" in r.headers["content-security-policy"]
        assert "http://" not in r.text.replace("http://www.w3.org/2000/svg", "")
        js = c.get("/view/view.js")
        assert js.status_code == 200 and "fetch(" in js.text and "http" not in js.text
        assert (
            c.get("/view/chart.svg", params={"series": "x"})
            .headers["content-type"]
            .startswith("image/svg+xml")
        )


def test_page_lists_known_series_escaped_and_linked(tiny_model_dir: Path) -> None:
    history = ForecastHistory()
    for sid in ["a/b", 'x"<y>&', "plain"]:
        history.add({"series_id": sid, "ts": 1.0})
    settings = ServeSettings(model_dir=tiny_model_dir, device="cpu", threads=1)
    with TestClient(create_app(settings, ModelRegistry(tiny_model_dir), history=history)) as c:
        page = c.get("/").text
    assert '<a href="/?series=x%22%3Cy%3E%26">x&#34;&lt;y&gt;&amp;</a>' in page
    assert '<a href="/?series=a%2Fb">a/b</a>' in page
    assert '<option value="x&#34;&lt;y&gt;&amp;">' in page
    assert 'x"<y>' not in page


def _colour_pixels(png: Path, hex_colour: str, tol: int = 6) -> int:
    from PIL import Image

    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    want = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(rgb - want).max(axis=2) <= tol).sum())


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def screenshot(url: str, out: Path, tmp: Path, size: str = "1000,600") -> None:
    exe = chromium()
    assert exe is not None
    profile = tmp / "chromium-profile"
    profile.mkdir()
    cmd = [
        exe,
        "--headless",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--screenshot={out}",
        f"--window-size={size}",
        url,
    ]
    if os.geteuid() == 0:
        cmd.insert(2, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0 and out.exists(), result.stderr[-2000:]


@pytest.mark.integration
@pytest.mark.skipif(chromium() is None, reason="Debian's chromium package is not installed")
def test_view_renders_bands_in_headless_chromium(
    stack: Any, make_topic: Any, redis_url: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    n = 96  # the store keeps 48 + 48 points
    asyncio.run(write_windows(redis_url, {"sensor-1": n}))
    topic = make_topic("forecasts", PARTITIONS)
    forecasts = backtest(tiny_model_dir, "sensor-1", n)[-40:]
    produce(stack.bootstrap, topic, [("sensor-1", orjson.dumps(f)) for f in forecasts])

    history = ForecastHistory()
    feed = TopicForecastFeed(KafkaSettings(bootstrap_servers=stack.bootstrap), topic, history)
    redis = RedisSettings(redis_url=redis_url)
    settings = ServeSettings(model_dir=tiny_model_dir, device="cpu", threads=1, refresh_seconds=1.0)
    app = create_app(
        settings,
        ModelRegistry(tiny_model_dir),
        history=history,
        feed=feed,
        window_reader=RedisWindows(redis.client(), redis.prefix, "events"),
    )
    with serve_in_thread(app) as url:
        deadline = time.monotonic() + 30
        while len(history.recent("sensor-1")) < len(forecasts) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(history.recent("sensor-1")) == len(forecasts), "feed did not catch up"
        import httpx

        state = httpx.get(f"{url}/series/sensor-1", timeout=10).json()
        assert state["forecast_origin"] == "topic" and state["forecast"] == forecasts[-1]
        assert len(state["window"]["values"]) == n
        png = tmp_path / "view.png"
        screenshot(f"{url}/?series=sensor-1", png, tmp_path)

    band95, band80 = _colour_pixels(png, BAND95), _colour_pixels(png, BAND80)
    actual = _colour_pixels(png, ACTUAL)
    # 40 forecasts over ~40 % of an 860-px plot: both bands cover thousands of pixels.
    assert band95 > 2000, band95
    assert band80 > 2000, band80
    assert actual > 300, actual


# --- rolling accuracy beside the chart ------------------------------------------------------------


def produce_with_headers(
    bootstrap: str, topic: str, records: list[tuple[str, dict[str, Any], dict[str, str]]]
) -> None:
    """Produce ``(key, forecast object, headers)`` in order, as the worker does (headers as
    UTF-8 bytes)."""
    from aiokafka import AIOKafkaProducer

    async def run() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        try:
            for key, doc, headers in records:
                await producer.send_and_wait(
                    topic, orjson.dumps(doc), key=key.encode(),
                    headers=[(k, v.encode()) for k, v in headers.items()],
                )  # fmt: skip
        finally:
            await producer.stop()

    asyncio.run(run())


def hand_forecast(sid: str, ts: float, mean: float, w80: float, w95: float) -> dict[str, Any]:
    return {
        "schema_version": 1, "series_id": sid, "ts": ts, "horizon": 1, "target_ts": [ts + STEP],
        "mean": [mean], "std": [w80 / 1.2816],
        "lower": {"80": [mean - w80], "95": [mean - w95]},
        "upper": {"80": [mean + w80], "95": [mean + w95]},
        "model_version": "v-hand", "source": {"topic": "events", "partition": 0, "offset": 0},
        "emitted_at": ts + 0.5,
    }  # fmt: skip


@pytest.mark.integration
def test_view_shows_rolling_mae_and_coverage_of_the_joined_forecasts(
    stack: Any, make_topic: Any, redis_url: str, tiny_model_dir: Path
) -> None:
    """A known sequence: the window (60 points, Redis) and hand-made persistence forecasts (the
    topic), each forecast at point k answered by point k + 1; the expected numbers are computed
    here with plain loops, not with the view's code."""
    sid, n = "acc-1", 60
    asyncio.run(write_windows(redis_url, {sid: n}))
    ts, values = series_points(n)
    w80, w95 = 0.79, 0.83  # the errors here run from 0.05 to 0.94: both outcomes at both levels
    made = list(range(40, n))  # the last one (k = 59) has no next actual yet
    records = [
        (sid, hand_forecast(sid, ts[k], values[k], w80, w95), {"calibration": "static"})
        for k in made
    ]
    # before the window's first point: its next actual may have left the window, not scored
    records.insert(0, (sid, hand_forecast(sid, ts[0] - STEP, 0.0, w80, w95), {}))
    # a repeat of the forecast at k = 50 after a restart, with another mean: the later one counts
    repeat = hand_forecast(sid, ts[50], values[50] + 0.5, w80, w95)
    records.append((sid, repeat, {"calibration": "online"}))
    topic = make_topic("forecasts", PARTITIONS)
    produce_with_headers(stack.bootstrap, topic, records)

    def expected(last: int) -> dict[str, Any]:
        rows = []
        for k in made[:-1]:
            mean = values[50] + 0.5 if k == 50 else values[k]
            err = values[k + 1] - mean
            rows.append((abs(err), abs(err) <= w80, abs(err) <= w95))
        rows = rows[-last:]
        return {
            "joined": len(rows),
            "mae": sum(r[0] for r in rows) / len(rows),
            "80": sum(r[1] for r in rows) / len(rows),
            "95": sum(r[2] for r in rows) / len(rows),
        }

    history = ForecastHistory()
    feed = TopicForecastFeed(KafkaSettings(bootstrap_servers=stack.bootstrap), topic, history)
    redis = RedisSettings(redis_url=redis_url)
    settings = ServeSettings(model_dir=tiny_model_dir, device="cpu", threads=1)
    app = create_app(
        settings, ModelRegistry(tiny_model_dir), history=history, feed=feed,
        window_reader=RedisWindows(redis.client(), redis.prefix, "events"),
    )  # fmt: skip
    import httpx

    with serve_in_thread(app) as url:
        deadline = time.monotonic() + 30
        while history.latest_headers(sid) != {"calibration": "online"}:
            assert time.monotonic() < deadline, "feed did not catch up"
            time.sleep(0.1)
        for points in (50, 5):
            want = expected(points)
            got = httpx.get(
                f"{url}/view/stats.json", params={"series": sid, "points": points}, timeout=10
            )
            assert got.status_code == 200 and got.headers["cache-control"] == "no-store"
            body = got.json()
            assert body["joined"] == want["joined"] == min(points, len(made) - 1), body
            assert body["mae"] == pytest.approx(want["mae"], rel=1e-12)
            assert body["coverage"] == {
                "80": pytest.approx(want["80"], rel=1e-12),
                "95": pytest.approx(want["95"], rel=1e-12),
            }
            assert 0 < want["80"] < want["95"] <= 1, want  # the sequence tests both outcomes
            assert body["calibration"] == "online"
            labels = body["labels"]
            assert labels["coverage_80"] == f"{100 * want['80']:.1f} %"
            assert labels["coverage_95"] == f"{100 * want['95']:.1f} %"
            assert labels["mae"] == f"{want['mae']:.4g}" and "e" not in labels["mae"]
            first = made[-1 - want["joined"]]
            assert body["first_ts"] == ts[first] and body["last_ts"] == ts[made[-2]]
            assert labels["to"] == time.strftime("%Y-%m-%d %H:%M", time.gmtime(ts[made[-2]]))
        page = httpx.get(f"{url}/", params={"series": sid, "points": 5}, timeout=10)
        assert page.status_code == 200
        assert "script-src 'self'" in page.headers["content-security-policy"]
        want = expected(5)
        text = page.text
        assert "Last 5 forecasts joined with the next actual" in text
        assert f'data-stat="mae">{want["mae"]:.4g}</dd>' in text
        assert f'data-stat="coverage_80">{100 * want["80"]:.1f} %</dd>' in text
        assert f'data-stat="coverage_95">{100 * want["95"]:.1f} %</dd>' in text
        assert 'data-stat="calibration">online</dd>' in text
        assert 'data-points="5"' in text
        # a series without forecasts from the topic: nothing joined, "-" shown
        unknown = httpx.get(f"{url}/view/stats.json", params={"series": "nobody"}, timeout=10)
        assert unknown.json()["joined"] == 0 and unknown.json()["labels"]["mae"] == "-"
        too_many = httpx.get(
            f"{url}/view/stats.json", params={"series": sid, "points": 10**6}, timeout=10
        )
        assert too_many.status_code == 422


def test_rolling_accuracy_join_rules() -> None:
    """The join itself on a tiny sequence: next actual after ts, repeats, the unanswered last
    forecast, malformed objects, non-finite bounds."""
    from deploy.http.view import rolling_accuracy

    def fc(t: float, mean: float, w: float) -> dict[str, Any]:
        return hand_forecast("s", t, mean, w, 2 * w)

    ts, values = [10.0, 20.0, 30.0, 40.0], [1.0, 2.0, 4.0, 8.0]
    forecasts = [
        fc(5.0, 1.0, 1.0),  # before the window: skipped
        fc(10.0, 1.0, 1.0),  # answered by 2.0: error 1, inside 80 (bounds inclusive) and 95
        fc(20.0, 2.0, 1.0),  # answered by 4.0: error 2, outside 80, inside 95
        fc(25.0, 5.0, 0.4),  # answered by 4.0 (first point after 25): error 1, outside both
        {"series_id": "s", "ts": 30.0, "mean": ["x"]},  # malformed: skipped
        fc(40.0, 8.0, 1.0),  # no next actual yet
        fc(20.0, 3.0, 0.5),  # a repeat of ts 20 (later wins): error 1, outside 80, inside 95
    ]
    got = rolling_accuracy(ts, values, forecasts, points=50)
    assert got["joined"] == 3 and got["mae"] == pytest.approx(1.0)
    assert got["coverage"] == {"80": pytest.approx(1 / 3), "95": pytest.approx(2 / 3)}
    assert (got["first_ts"], got["last_ts"]) == (10.0, 25.0)
    last2 = rolling_accuracy(ts, values, forecasts, points=2)
    assert last2["joined"] == 2 and last2["coverage"] == {"80": 0.0, "95": 0.5}
    empty = rolling_accuracy([], [], forecasts)
    assert empty["joined"] == 0 and empty["mae"] is None and empty["coverage"]["80"] is None


def test_labels_are_readable() -> None:
    """The server-side formatter (deploy/web/labels.py) the view's texts use; the page's script
    only copies these texts. (The chart's axis ticks are drawn by deploy/plot.py.)"""
    assert number_label(33760) == "33,760"
    assert number_label(33760.0, step=2500.0) == "33,760"
    assert number_label(1_234_567.891) == "1,234,568"
    assert number_label(21.4371) == "21.44" and number_label(20.123, step=0.25) == "20.12"
    assert number_label(0.0012345) == "0.001234" and number_label(0) == "0"
    assert number_label(-0.00001, step=0.5) == "0.00"  # no "-0"
    assert number_label(float("nan")) == "-" and number_label(float("inf")) == "-"
    for v in np.geomspace(1e-3, 1e9, 400):
        for x in (float(v), -float(v)):
            for step in (None, abs(x) / 4, abs(x) * 10):
                label = number_label(x, step)
                assert "e" not in label.lower(), (x, step, label)
                back = float(label.replace(",", ""))
                tol = 5.01e-4 * abs(x) if step is None else step  # 4 significant digits / ticks
                assert abs(back - x) <= tol, (x, step, label)
    assert percent_label(0.7941) == "79.4 %" and percent_label(None) == "-"
    t = 1_764_601_200.0  # 2025-12-01 15:00:00 UTC
    assert time_label(t) == "2025-12-01 15:00"
    assert time_label(t + 5, span=300) == "15:00:05"
    assert time_label(t, span=3600) == "2025-12-01 15:00"


# --- worker plot ---------------------------------------------------------------------------------


@pytest.mark.integration
def test_worker_plot_draws_from_redis_and_the_forecast_topic(
    stack: Any,
    make_topic: Any,
    redis_url: str,
    tiny_model_dir: Path,
    tmp_path: Path,
    capsys: Any,
) -> None:
    n = 80
    asyncio.run(write_windows(redis_url, {"sensor-2": n}))
    topic = make_topic("forecasts", PARTITIONS)
    forecasts = backtest(tiny_model_dir, "sensor-2", n)
    others = backtest(tiny_model_dir, "other", 50)
    produce(
        stack.bootstrap,
        topic,
        [("sensor-2", orjson.dumps(f)) for f in forecasts]
        + [("other", orjson.dumps(f)) for f in others],
    )
    out = tmp_path / "plot.png"
    argv = [
        "plot",
        "--series",
        "sensor-2",
        "--out",
        str(out),
        "--redis-url",
        redis_url,
        "--bootstrap-servers",
        stack.bootstrap,
        "--forecast-topic",
        topic,
    ]
    assert worker_main(argv) == 0
    assert f"{n} actuals, {len(forecasts)} forecasts of sensor-2" in capsys.readouterr().out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _colour_pixels(out, BAND95) > 1000 and _colour_pixels(out, BAND80) > 500
    assert _colour_pixels(out, ACTUAL) > 200

    argv[2] = "nobody"
    assert worker_main(argv) == 1
    assert "no window and no forecast" in capsys.readouterr().err
