"""Charts of a series: recent actuals and forecasts with 80 % and 95 % bands.

One data model (:class:`ChartData`) and two renderers: :func:`render_svg` (the live view of
``worker serve``, drawn on the server, so the browser fetches nothing else) and
:func:`render_png` (``worker plot``, matplotlib with the Agg backend). Both use the colours below,
which the view's screenshot test looks for.

:func:`read_series_forecasts` reads a series' recent forecasts from the forecast topic (only the
partition its key hashes to, and only the last ``scan`` records of it).
"""

from __future__ import annotations

import asyncio
import html
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from deploy.web.labels import number_label, time_label

log = logging.getLogger(__name__)

# Opaque colours (no alpha), so a screenshot shows exactly these where the bands are drawn.
BACKGROUND = "#ffffff"
BAND95 = "#bcd7f0"
BAND80 = "#6a9fd4"
MEAN = "#0b3c78"
ACTUAL = "#e0591b"
GRID = "#e6e6e6"
TEXT = "#333333"


@dataclass(frozen=True)
class ChartData:
    """What a chart shows: the window's actuals (oldest first) and forecast objects
    (docs/contract.md "Forecasts"; any order)."""

    series_id: str
    ts: Sequence[float] = ()
    values: Sequence[float] = ()
    forecasts: Sequence[Mapping[str, Any]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.ts and not self.forecasts

    def model_version(self) -> str | None:
        """The model version of the newest forecast, if any."""
        newest = max(self.forecasts, key=lambda f: f.get("ts", 0.0), default=None)
        return None if newest is None else str(newest.get("model_version"))


@dataclass(frozen=True)
class Band:
    """Forecast points sorted by target time: for each, mean and the two intervals."""

    x: list[float]
    mean: list[float]
    lower: dict[str, list[float]]
    upper: dict[str, list[float]]


def forecast_band(forecasts: Iterable[Mapping[str, Any]]) -> Band:
    """Flatten forecast objects into one band over target times.

    Where several forecasts cover the same target time (horizon > 1), the one made last (largest
    ``ts``) wins: it saw the most data. Malformed forecast objects are skipped.
    """
    best: dict[float, tuple[float, float, dict[str, float], dict[str, float]]] = {}
    for f in forecasts:
        try:
            made = float(f["ts"])
            for k, t in enumerate(f["target_ts"]):
                point = (
                    made,
                    float(f["mean"][k]),
                    {lvl: float(f["lower"][lvl][k]) for lvl in ("80", "95")},
                    {lvl: float(f["upper"][lvl][k]) for lvl in ("80", "95")},
                )
                t = float(t)
                if t not in best or best[t][0] <= made:
                    best[t] = point
        except (KeyError, IndexError, TypeError, ValueError):
            continue
    xs = sorted(best)
    return Band(
        x=xs,
        mean=[best[x][1] for x in xs],
        lower={lvl: [best[x][2][lvl] for x in xs] for lvl in ("80", "95")},
        upper={lvl: [best[x][3][lvl] for x in xs] for lvl in ("80", "95")},
    )


def _finite(values: Iterable[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def _time_label(t: float, span: float) -> str:
    return time_label(t, span)


def render_svg(chart: ChartData, width: int = 900, height: int = 360) -> str:
    """The chart as a standalone SVG document (text is escaped; no external references).

    An empty chart (no actuals, no forecasts) is a frame with a "no data" note.
    """
    band = forecast_band(chart.forecasts)
    title = f"{chart.series_id}"
    version = chart.model_version()
    if version:
        title += f" — model {version}"
    parts: list[str] = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="forecast chart of {html.escape(chart.series_id, quote=True)}" '
        f'font-family="sans-serif" font-size="12">',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="{BACKGROUND}"/>',
        f'<text x="12" y="20" font-size="14" fill="{TEXT}">{html.escape(title)}</text>',
    ]
    left, right, top, bottom = 70, 20, 34, 46
    pw, ph = width - left - right, height - top - bottom
    xs = _finite([*chart.ts, *band.x])
    ys = _finite([*chart.values, *band.lower["95"], *band.upper["95"], *band.mean])
    if not xs or not ys:
        parts.append(
            f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" fill="{TEXT}">'
            "no data for this series yet</text></svg>"
        )
        return "".join(parts)
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1.0, x1 + 1.0
    pad = (y1 - y0) * 0.08 or max(abs(y0) * 0.05, 1.0)
    y0, y1 = y0 - pad, y1 + pad

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return top + (y1 - y) / (y1 - y0) * ph

    # grid and ticks
    for i in range(5):
        yv = y0 + (y1 - y0) * i / 4
        py = sy(yv)
        parts.append(
            f'<line x1="{left}" y1="{py:.1f}" x2="{left + pw}" y2="{py:.1f}" stroke="{GRID}"/>'
        )
        parts.append(
            f'<text x="{left - 6}" y="{py + 4:.1f}" text-anchor="end" fill="{TEXT}">'
            f"{html.escape(number_label(yv, step=(y1 - y0) / 4))}</text>"
        )
        xv = x0 + (x1 - x0) * i / 4
        px = sx(xv)
        anchor = "start" if i == 0 else "end" if i == 4 else "middle"
        parts.append(
            f'<text x="{px:.1f}" y="{top + ph + 16}" text-anchor="{anchor}" '
            f'fill="{TEXT}">{html.escape(_time_label(xv, x1 - x0))}</text>'
        )
    parts.append(
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999999"/>'
    )

    # bands: 95 % under 80 %; a single point is drawn as a bar so it stays visible
    for lvl, colour in (("95", BAND95), ("80", BAND80)):
        lo, hi = band.lower[lvl], band.upper[lvl]
        if len(band.x) == 1:
            px = sx(band.x[0])
            parts.append(
                f'<rect class="band{lvl}" x="{px - 5:.1f}" y="{sy(hi[0]):.1f}" width="10" '
                f'height="{max(sy(lo[0]) - sy(hi[0]), 1.0):.1f}" fill="{colour}"/>'
            )
        elif band.x:
            pts = [f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(band.x, hi, strict=True)]
            pts += [
                f"{sx(x):.1f},{sy(y):.1f}"
                for x, y in zip(reversed(band.x), reversed(lo), strict=True)
            ]
            parts.append(f'<polygon class="band{lvl}" points="{" ".join(pts)}" fill="{colour}"/>')
    if band.x:
        pts = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(band.x, band.mean, strict=True))
        parts.append(
            f'<polyline class="mean" points="{pts}" fill="none" stroke="{MEAN}" '
            'stroke-width="1.5" stroke-dasharray="5,3"/>'
        )
        for x, y in zip(band.x, band.mean, strict=True):
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{MEAN}"/>')
    if chart.ts:
        pts = " ".join(
            f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(chart.ts, chart.values, strict=False)
        )
        parts.append(
            f'<polyline class="actual" points="{pts}" fill="none" stroke="{ACTUAL}" '
            'stroke-width="2"/>'
        )

    # legend
    lx = left + 10
    for label, colour in (
        ("actual", ACTUAL),
        ("forecast mean", MEAN),
        ("80 %", BAND80),
        ("95 %", BAND95),
    ):
        parts.append(f'<rect x="{lx}" y="{top + 6}" width="12" height="12" fill="{colour}"/>')
        parts.append(f'<text x="{lx + 16}" y="{top + 16}" fill="{TEXT}">{label}</text>')
        lx += 30 + 7 * len(label)
    parts.append("</svg>")
    return "".join(parts)


def render_png(
    chart: ChartData, out: Path | str, *, width_px: int = 1000, height_px: int = 420
) -> Path:
    """Draw the chart with matplotlib (Agg) into a PNG file at ``out``; return the path.

    An empty chart still writes a PNG (with a "no data" note) so scripts can rely on the file.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    out = Path(out)
    band = forecast_band(chart.forecasts)
    dpi = 100
    fig, ax = plt.subplots(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
    try:

        def dates(xs: Sequence[float]) -> list[datetime]:
            return [datetime.fromtimestamp(x, UTC) for x in xs]

        if band.x:
            bx = dates(band.x)
            ax.fill_between(
                bx, band.lower["95"], band.upper["95"], color=BAND95, lw=0, label="95 %", step=None
            )
            ax.fill_between(
                bx, band.lower["80"], band.upper["80"], color=BAND80, lw=0, label="80 %"
            )
            ax.plot(
                bx, band.mean, color=MEAN, ls="--", marker="o", ms=3, lw=1.2, label="forecast mean"
            )
        if chart.ts:
            ax.plot(dates(chart.ts), list(chart.values), color=ACTUAL, lw=2, label="actual")
        if chart.empty:
            ax.text(
                0.5,
                0.5,
                "no data for this series yet",
                ha="center",
                va="center",
                transform=ax.transAxes,
            )
        else:
            ax.legend(loc="upper left", fontsize=8)
            ax.xaxis.set_major_formatter(mdates.DateFormatter("%Y-%m-%d %H:%M", tz=UTC))
            ticks = ax.get_yticks()
            step = float(ticks[1] - ticks[0]) if len(ticks) > 1 else None
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: number_label(v, step=step)))
            fig.autofmt_xdate()
        title = chart.series_id
        if chart.model_version():
            title += f" — model {chart.model_version()}"
        ax.set_title(title)
        ax.grid(True, color=GRID)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, format="png", facecolor=BACKGROUND)
    finally:
        plt.close(fig)
    return out


# --- reading forecasts from the topic ------------------------------------------------------------


async def read_series_forecasts_async(
    kafka: Any, topic: str, series_id: str, *, scan: int = 20_000, timeout: float = 15.0
) -> list[dict[str, Any]]:
    """The forecasts of ``series_id`` among the last ``scan`` records of the partition its key
    hashes to, in offset order (= the series' input order). ``kafka`` is a
    :class:`stream.settings.KafkaSettings`. Records that are not JSON objects are skipped.

    Reads up to the end offset seen at start, so it returns even while the topic keeps growing.
    Raises :class:`model.errors.EventcastError` when the topic does not exist or the broker does
    not answer within ``timeout``.
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from model.errors import EventcastError
    from stream.consumer import offset_bounds, read_ranges
    from stream.errors import KafkaUnavailableError
    from stream.store import partition_for

    key = series_id.encode()
    consumer = AIOKafkaConsumer(
        topic, **kafka.client_kwargs(), group_id=None, enable_auto_commit=False,
        isolation_level="read_committed",
    )  # fmt: skip
    try:
        await asyncio.wait_for(consumer.start(), timeout)
    except Exception as exc:
        await consumer.stop()
        detail = await kafka_failure_detail(kafka) or repr(exc)
        raise EventcastError(f"cannot reach Kafka at {kafka.bootstrap_servers}: {detail}") from exc
    try:
        tps = await assigned_partitions(consumer, topic, timeout)
        tp = TopicPartition(topic, partition_for(key, len(tps)))
        # Only the key's partition is read: the others stay paused.
        consumer.pause(*[other for other in tps if other != tp])
        begin, end = (await offset_bounds(consumer, [tp]))[tp]
        out: list[dict[str, Any]] = []
        try:
            ranges = {tp: (max(begin, end - scan), end)}
            async for _, batch in read_ranges(consumer, ranges, timeout=timeout):
                for msg in batch:
                    if msg.key != key or msg.value is None:
                        continue
                    try:
                        doc = orjson.loads(msg.value)
                    except orjson.JSONDecodeError:
                        continue
                    if isinstance(doc, dict):
                        out.append(doc)
        except KafkaUnavailableError as exc:
            raise EventcastError(f"timed out reading {topic}[{tp.partition}] up to {end}") from exc
        return out
    finally:
        await consumer.stop()


async def assigned_partitions(consumer: Any, topic: str, timeout: float = 15.0) -> list[Any]:
    """The partitions of ``topic`` that a started, group-less consumer subscribed to it was
    assigned (all of them), sorted. Raises EventcastError when the topic does not appear within
    ``timeout`` (it does not exist, or the client may not describe it)."""
    from model.errors import EventcastError

    deadline = time.monotonic() + timeout
    while not consumer.assignment():
        if time.monotonic() > deadline:
            raise EventcastError(f"topic {topic!r} not found (or not authorized)")
        await asyncio.sleep(0.05)
    return sorted(consumer.assignment(), key=lambda tp: tp.partition)


def read_series_forecasts(
    kafka: Any, topic: str, series_id: str, *, scan: int = 20_000, timeout: float = 15.0
) -> list[dict[str, Any]]:
    """Synchronous :func:`read_series_forecasts_async`."""
    return asyncio.run(
        read_series_forecasts_async(kafka, topic, series_id, scan=scan, timeout=timeout)
    )


async def kafka_failure_detail(kafka: Any, timeout: float = 10.0) -> str | None:
    """Why a Kafka client could not start, in words: connects once to the first bootstrap server
    with the same security settings and returns the broker's refusal (e.g. "SaslAuthentication
    Failed: ... invalid credentials") or the connection error; None when that connection works.

    aiokafka logs the cause of a failed bootstrap but raises only "Unable to bootstrap", which
    does not tell an operator that the password, not the network, is wrong.
    """
    from aiokafka.conn import create_conn

    host, _, port = str(kafka.bootstrap_servers).split(",")[0].strip().rpartition(":")
    kwargs = {k: v for k, v in kafka.client_kwargs().items() if k != "bootstrap_servers"}
    try:
        conn = await asyncio.wait_for(
            create_conn(host, int(port), request_timeout_ms=int(timeout * 1000), **kwargs),
            timeout,
        )
    except Exception as exc:  # the point is to describe whatever went wrong
        return f"{type(exc).__name__}: {exc}" if str(exc) else repr(exc)
    conn.close()
    return None
