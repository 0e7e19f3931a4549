"""The FastAPI app of ``worker serve``: wiring, the body-size limit, error answers and metrics.

Endpoints (docs/contract.md, "HTTP POST /predict"; docs/operations.md §7):

- ``POST /predict`` (:mod:`deploy.http.predict`): a window → the forecast object; bad input →
  422 with one entry per problem (``loc``, ``msg``, ``type``); a body over ``max_body_bytes`` →
  413, enforced while the body is read (chunked bodies too), before anything is parsed.
- ``GET /series/{id}`` (:mod:`deploy.http.series`): the series' window from Redis and its latest
  forecast (from the forecast topic when a feed runs, else computed from the window).
- ``GET /healthz``, ``GET /readyz``, ``GET /metrics``, ``POST /reload`` (:mod:`deploy.http.admin`).
- ``GET /``, ``GET /view/chart.svg``, ``GET /view/view.js``: the live view
  (:mod:`deploy.http.view`).
- ``GET /openapi.json``, ``GET /docs``: the OpenAPI spec (FastAPI's).

The app is built from a frozen :class:`~deploy.http.settings.ServeSettings` and injected
collaborators (model source, window reader, forecast feed), so tests run it in-process.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request, Response

from deploy.http.admin import admin_router
from deploy.http.errors import BodyTooLarge, RequestInvalid, Unavailable, json_response
from deploy.http.feed import ForecastFeed, ForecastHistory
from deploy.http.metrics import ServeMetrics
from deploy.http.predict import predict_router
from deploy.http.series import SeriesState, series_router
from deploy.http.serving import ModelHolder, ModelSource
from deploy.http.settings import ServeSettings
from deploy.http.state import WindowReader
from deploy.http.view import view_router


def create_app(
    settings: ServeSettings,
    source: ModelSource,
    *,
    window_reader: WindowReader | None = None,
    redis_ping: Callable[[], Awaitable[bool]] | None = None,
    history: ForecastHistory | None = None,
    feed: ForecastFeed | None = None,
    load_on_start: bool = True,
) -> FastAPI:
    """The FastAPI app of ``worker serve``.

    ``source`` loads model versions (a ``ModelRegistry``); with ``load_on_start`` the current
    version is loaded here, so NoModelError/ModelLoadError surface to the caller before serving.
    ``window_reader`` reads a series' window from Redis (``GET /series`` answers 503 without it);
    ``redis_ping`` is checked by ``/readyz``; ``feed`` (started and stopped with the app) keeps
    ``history`` filled from the forecast topic.
    """
    metrics = ServeMetrics()
    holder = ModelHolder(source, settings)
    history = history if history is not None else ForecastHistory()
    if load_on_start:
        metrics.set_version(holder.load_initial().version)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if feed is not None:
            await feed.start()
        try:
            yield
        finally:
            if feed is not None:
                await feed.stop()

    app = FastAPI(
        title=f"{settings.title} forecasting service",
        version="1",
        summary="Forecasts with 80 % and 95 % intervals for event series (see docs/contract.md).",
        lifespan=lifespan,
    )
    state = SeriesState(window_reader, history, holder)
    app.state.settings = settings
    app.state.holder = holder
    app.state.history = history
    app.state.metrics = metrics
    app.state.series_state = state

    @app.exception_handler(BodyTooLarge)
    async def too_large(_request: Request, exc: BodyTooLarge) -> Response:
        metrics.rejected.labels(reason="too_large").inc()
        return json_response(413, {"detail": str(exc)})

    @app.exception_handler(RequestInvalid)
    async def invalid(_request: Request, exc: RequestInvalid) -> Response:
        metrics.rejected.labels(reason=exc.reason).inc()
        return json_response(422, {"detail": exc.errors})

    @app.exception_handler(Unavailable)
    async def unavailable(_request: Request, exc: Unavailable) -> Response:
        return json_response(503, {"detail": str(exc)})

    @app.middleware("http")
    async def observe(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        start = time.perf_counter()
        # A declared Content-Length over the limit is refused on every route, before routing.
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > settings.max_body_bytes:
            response = await too_large(
                request,
                BodyTooLarge(
                    f"request body of {declared} bytes exceeds the limit of "
                    f"{settings.max_body_bytes} bytes"
                ),
            )
        else:
            response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        metrics.requests.labels(path, request.method, str(response.status_code)).inc()
        metrics.latency.labels(path).observe(time.perf_counter() - start)
        return response

    app.include_router(predict_router(settings, holder, metrics))
    app.include_router(series_router(state))
    app.include_router(admin_router(settings, holder, metrics, redis_ping))
    app.include_router(view_router(settings, history, state))
    return app
