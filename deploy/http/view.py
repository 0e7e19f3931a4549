"""The live forecast view: ``GET /`` (the page), ``GET /view/chart.svg`` (the chart, re-fetched by
the page) and ``GET /view/view.js`` (the page's refresh script).

The page is the Jinja2 template ``deploy/web/index.html``, rendered with autoescaping on; the
chart is server-side SVG (:func:`deploy.plot.render_svg`, which escapes its own text). The page
runs only its own script under a strict Content-Security-Policy and loads nothing from the
internet.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from fastapi import APIRouter, Response
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from deploy.http.bodies import MAX_SERIES_ID_CHARS
from deploy.http.errors import Unavailable
from deploy.http.feed import ForecastHistory
from deploy.http.series import SeriesState
from deploy.http.settings import ServeSettings

WEB = Path(__file__).resolve().parents[1] / "web"
# The view runs only its own script and talks only to this server.
VIEW_CSP = (
    "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'unsafe-inline'; "
    "img-src 'self' data:; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
MAX_LISTED = 500  # series offered on the page


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

    async def chart_svg(series_id: str) -> tuple[str, str]:
        """The chart of ``series_id`` and a status line."""
        try:
            data = await state(series_id)
        except Unavailable as exc:
            return render_svg(ChartData(series_id)), f"unavailable: {exc}"
        if data is None:
            return render_svg(ChartData(series_id)), "unknown series"
        window = data["window"] or {"ts": [], "values": []}
        forecasts = data["forecasts"] or ([data["forecast"]] if data["forecast"] else [])
        chart = ChartData(series_id, window["ts"], window["values"], forecasts)
        return render_svg(chart), f"{len(window['ts'])} points, {len(forecasts)} forecasts"

    @router.get("/", response_class=HTMLResponse, summary="Live forecast view")
    async def index(series: str | None = None) -> Response:
        """A page showing a series' recent actuals and forecasts with 80 % / 95 % bands,
        refreshed every ``--refresh-seconds``; without ``series``, a list of known series."""
        series = (series or "").strip()[:MAX_SERIES_ID_CHARS]
        known = history.series()[:MAX_LISTED]
        chart, status = ("", "choose a series")
        if series:
            chart, status = await chart_svg(series)
        links = [] if series else [(s, "/?series=" + quote(s, safe="")) for s in known]
        html = page.render(
            title=settings.title,
            series=series,
            known=known,
            status=status,
            refresh_ms=int(settings.refresh_seconds * 1000),
            chart=chart,
            links=links,
        )
        return HTMLResponse(html, headers={"Content-Security-Policy": VIEW_CSP})

    @router.get("/view/chart.svg", summary="The chart of a series as SVG")
    async def chart(series: str) -> Response:
        svg, _ = await chart_svg(series[:MAX_SERIES_ID_CHARS])
        return Response(svg, media_type="image/svg+xml", headers={"Cache-Control": "no-store"})

    @router.get("/view/view.js", include_in_schema=False)
    async def view_js() -> Response:
        return Response(script, media_type="text/javascript")

    return router
