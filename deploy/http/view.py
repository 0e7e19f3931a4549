"""The live forecast view: ``GET /`` (the page), ``GET /view/chart.svg`` (the chart, re-fetched by
the page), ``GET /view/stats.json`` (the series' rolling accuracy, re-fetched by the page) and
``GET /view/view.js`` (the page's refresh script).

The page is the Jinja2 template ``deploy/web/index.html``, rendered with autoescaping on; the
chart is server-side SVG (:func:`deploy.plot.render_svg`, which escapes its own text). The page
runs only its own script under a strict Content-Security-Policy and loads nothing from the
internet.

Beside the chart, the series' rolling accuracy (:func:`rolling_accuracy`): each forecast the view
holds (from the forecast topic) joined with the next actual of its series in the window it holds
(from Redis) — the same join as the worker's online accuracy (``stream/accuracy.py``), step 1 —
over the last ``points`` joined forecasts: MAE and the share of actuals inside the 80 % and 95 %
intervals; and the ``calibration`` header of the newest forecast. Every number is formatted on the
server (:mod:`deploy.web.labels`); the script only copies text.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Query, Response
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from deploy.http.bodies import MAX_SERIES_ID_CHARS
from deploy.http.errors import Unavailable, json_response
from deploy.http.feed import ForecastHistory
from deploy.http.series import SeriesState
from deploy.http.settings import ServeSettings
from deploy.web.labels import number_label, percent_label, time_label

WEB = Path(__file__).resolve().parents[1] / "web"
# The view runs only its own script and talks only to this server.
VIEW_CSP = (
    "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'unsafe-inline'; "
    "img-src 'self' data:; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
MAX_LISTED = 500  # series offered on the page
STATS_POINTS = 50  # rolling accuracy over this many joined forecasts, unless ?points= says
MAX_STATS_POINTS = 1000
LEVELS = ("80", "95")
Points = Annotated[int, Query(ge=1, le=MAX_STATS_POINTS, description="joined forecasts to score")]


def rolling_accuracy(
    ts: Sequence[float],
    values: Sequence[float],
    forecasts: Sequence[Mapping[str, Any]],
    points: int = STATS_POINTS,
) -> dict[str, Any]:
    """MAE and 80 % / 95 % coverage of the last ``points`` forecasts joined with their next actual.

    ``ts``/``values``: the series' window, oldest first; ``forecasts``: forecast objects (any
    order; of several with the same ``ts`` the last one counts, as a repeat after a restart). A
    forecast made at ``ts_f`` is answered by the first point of the window after ``ts_f``, and
    only while the window reaches back to ``ts_f`` (else that point may have left it); its first
    step is scored: ``|actual - mean|``, and whether ``lower <= actual <= upper`` per level.
    Malformed forecasts are skipped. Answer: ``{"points", "joined", "mae", "coverage": {level},
    "first_ts", "last_ts"}`` (the forecast times of the oldest and newest joined forecast; None
    and null numbers when nothing joined).
    """
    by_ts: dict[float, Mapping[str, Any]] = {}
    for f in forecasts:
        try:
            made = float(f["ts"])
        except (KeyError, TypeError, ValueError):
            continue
        if math.isfinite(made):
            by_ts[made] = f
    window = [float(t) for t in ts]
    joined: list[tuple[float, float, dict[str, bool]]] = []  # (ts_f, |error|, inside per level)
    for made in sorted(by_ts):
        if not window or made < window[0]:
            continue
        k = bisect.bisect_right(window, made)
        if k >= len(window):
            continue  # not answered yet
        f = by_ts[made]
        try:
            actual, mean = float(values[k]), float(f["mean"][0])
            bounds = {lvl: (float(f["lower"][lvl][0]), float(f["upper"][lvl][0])) for lvl in LEVELS}
        except (KeyError, IndexError, TypeError, ValueError):
            continue
        if not all(map(math.isfinite, (actual, mean, *(b for lh in bounds.values() for b in lh)))):
            continue
        inside = {lvl: lo <= actual <= hi for lvl, (lo, hi) in bounds.items()}
        joined.append((made, abs(actual - mean), inside))
    last = joined[-points:]
    n = len(last)
    return {
        "points": points,
        "joined": n,
        "mae": sum(e for _, e, _ in last) / n if n else None,
        "coverage": {lvl: sum(i[lvl] for _, _, i in last) / n if n else None for lvl in LEVELS},
        "first_ts": last[0][0] if n else None,
        "last_ts": last[-1][0] if n else None,
    }


def accuracy_labels(stats: Mapping[str, Any], calibration: str | None) -> dict[str, str]:
    """The texts the page shows for ``stats`` (:func:`rolling_accuracy`) and the newest
    forecast's ``calibration`` header, ``-`` where unknown."""
    first, last = stats["first_ts"], stats["last_ts"]
    return {
        "joined": f"{stats['joined']} of the last {stats['points']}",
        "mae": "-" if stats["mae"] is None else number_label(stats["mae"]),
        "coverage_80": percent_label(stats["coverage"]["80"]),
        "coverage_95": percent_label(stats["coverage"]["95"]),
        "from": "-" if first is None else time_label(first),
        "to": "-" if last is None else time_label(last),
        "calibration": calibration or "-",
    }


def templates() -> Environment:
    """The view's Jinja2 environment (autoescape on; an undefined name is an error)."""
    return Environment(
        loader=FileSystemLoader(WEB), autoescape=True, undefined=StrictUndefined, auto_reload=False
    )


def view_router(settings: ServeSettings, history: ForecastHistory, state: SeriesState) -> APIRouter:
    """The view's routes of one app."""
    from deploy.plot import ChartData, render_svg

    page = templates().get_template("index.html")
    script = (WEB / "view.js").read_text(encoding="utf-8")
    router = APIRouter(tags=["view"])

    async def series_data(series_id: str, points: int) -> tuple[ChartData, str, dict[str, Any]]:
        """The chart data of ``series_id``, a status line and its rolling accuracy."""
        try:
            data = await state(series_id)
        except Unavailable as exc:
            data, status = None, f"unavailable: {exc}"
        else:
            status = "unknown series"
        if data is None:
            return ChartData(series_id), status, accuracy(series_id, [], [], [], points)
        window = data["window"] or {"ts": [], "values": []}
        forecasts = data["forecasts"] or ([data["forecast"]] if data["forecast"] else [])
        chart = ChartData(series_id, window["ts"], window["values"], forecasts)
        status = f"{len(window['ts'])} points, {len(forecasts)} forecasts"
        # Only forecasts read from the topic are scored (not one this server computed).
        stats = accuracy(series_id, window["ts"], window["values"], data["forecasts"], points)
        return chart, status, stats

    def accuracy(
        series_id: str,
        ts: Sequence[float],
        values: Sequence[float],
        forecasts: Sequence[Mapping[str, Any]],
        points: int,
    ) -> dict[str, Any]:
        stats = rolling_accuracy(ts, values, forecasts, points)
        calibration = history.latest_headers(series_id).get("calibration")
        return {
            "series_id": series_id,
            **stats,
            "calibration": calibration,
            "labels": accuracy_labels(stats, calibration),
        }

    @router.get("/", response_class=HTMLResponse, summary="Live forecast view")
    async def index(series: str | None = None, points: Points = STATS_POINTS) -> Response:
        """A page showing a series' recent actuals and forecasts with 80 % / 95 % bands and,
        beside them, its rolling MAE and interval coverage over the last ``points`` forecasts
        joined with their next actual, refreshed every ``--refresh-seconds``; without
        ``series``, a list of known series."""
        series = (series or "").strip()[:MAX_SERIES_ID_CHARS]
        known = history.series()[:MAX_LISTED]
        chart, status, stats = "", "choose a series", None
        if series:
            data, status, stats = await series_data(series, points)
            chart = render_svg(data)
        links = [] if series else [(s, "/?series=" + quote(s, safe="")) for s in known]
        html = page.render(
            title=settings.title,
            series=series,
            known=known,
            status=status,
            refresh_ms=int(settings.refresh_seconds * 1000),
            chart=chart,
            stats=stats,
            points=points,
            links=links,
        )
        return HTMLResponse(html, headers={"Content-Security-Policy": VIEW_CSP})

    @router.get("/view/chart.svg", summary="The chart of a series as SVG")
    async def chart(series: str) -> Response:
        data, _, _ = await series_data(series[:MAX_SERIES_ID_CHARS], 1)
        return Response(
            render_svg(data), media_type="image/svg+xml", headers={"Cache-Control": "no-store"}
        )

    @router.get("/view/stats.json", summary="A series' rolling accuracy, as the view shows it")
    async def stats(series: str, points: Points = STATS_POINTS) -> Response:
        """``{"series_id", "points", "joined", "mae", "coverage": {"80", "95"}, "first_ts",
        "last_ts", "calibration", "labels": {...}}``: MAE and 80 % / 95 % coverage (fractions) of
        the last ``points`` forecasts held from the topic joined with the next actual of the
        series' window (null when none joined); ``calibration`` the header of the newest forecast
        (null when it has none); ``labels`` the texts the page shows."""
        _, _, body = await series_data(series[:MAX_SERIES_ID_CHARS], points)
        return json_response(200, body, headers={"Cache-Control": "no-store"})

    @router.get("/view/view.js", include_in_schema=False)
    async def view_js() -> Response:
        return Response(script, media_type="text/javascript")

    return router
