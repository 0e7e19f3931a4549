"""``GET /series/{id}``: a series' current window (from Redis) and its latest forecast.

:class:`SeriesState` assembles the answer, and the live view (:mod:`deploy.http.view`) draws from
the same object.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool

from deploy.http.errors import Unavailable, json_response
from deploy.http.feed import ForecastHistory
from deploy.http.serving import ModelHolder, forecast_stored_window
from deploy.http.state import WindowReader


class SeriesState:
    """A series' window and forecasts: the window as stored in Redis (oldest first); the latest
    forecast from the forecast topic (``forecast_origin: "topic"``) or, without one, computed by
    this server from a full window (``"computed"``), else None; the recent ones held from the
    topic."""

    def __init__(
        self, window_reader: WindowReader | None, history: ForecastHistory, holder: ModelHolder
    ) -> None:
        self.window_reader = window_reader
        self.history = history
        self.holder = holder

    async def __call__(self, series_id: str) -> dict[str, Any] | None:
        """The state of ``series_id``, or None when it has neither a window nor a forecast.
        Raises :class:`Unavailable` without a window reader (no ``--redis-url``)."""
        if self.window_reader is None:
            raise Unavailable("no Redis configured (--redis-url)")
        window = await self.window_reader(series_id)
        recent = self.history.recent(series_id)
        forecast: dict[str, Any] | None = recent[-1] if recent else None
        origin = "topic" if forecast is not None else None
        model = self.holder.current
        if forecast is None and window is not None and model is not None:
            forecast = await run_in_threadpool(forecast_stored_window, model, window)
            origin = "computed" if forecast is not None else None
        if window is None and forecast is None:
            return None
        return {
            "series_id": series_id,
            "window": None
            if window is None
            else {"ts": window.ts, "values": window.values, "features": window.features},
            "forecast": forecast,
            "forecast_origin": origin,
            "forecasts": recent,
        }


def series_router(state: SeriesState) -> APIRouter:
    """The ``GET /series/{series_id}`` route of one app."""
    router = APIRouter()

    @router.get("/series/{series_id}", summary="A series' current window and latest forecast")
    async def series(series_id: str) -> Response:
        """``{"series_id", "window": {"ts", "values", "features"}, "forecast", "forecast_origin",
        "forecasts"}``: the window as stored in Redis (oldest first); ``forecast`` the latest from
        the forecast topic (``forecast_origin: "topic"``) or, without one, computed by this
        server from a full window (``"computed"``), else null; ``forecasts`` the recent ones held
        from the topic. 404 when the series is unknown, 503 without Redis."""
        data = await state(series_id)
        if data is None:
            return json_response(
                404, {"detail": f"series {series_id!r} has no window and no forecast"}
            )
        return json_response(200, data)

    return router
