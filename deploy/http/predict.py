"""``POST /predict``: one window in, its forecast object out (docs/contract.md, "HTTP").

The body is read under ``--max-body-bytes`` (413 as soon as it is exceeded, chunked bodies too),
then parsed and validated by :mod:`deploy.http.bodies` against the serving model (422).
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool

from deploy.http.bodies import (
    ForecastResponse,
    PredictRequest,
    parse_json_strict,
    validate_predict,
)
from deploy.http.errors import BodyTooLarge, RequestInvalid, Unavailable, json_response
from deploy.http.metrics import ServeMetrics
from deploy.http.serving import ModelHolder, finite_forecast, predict_window
from deploy.http.settings import ServeSettings


async def read_body_limited(request: Request, limit: int) -> bytes:
    """The request body, read chunk by chunk; raises :class:`BodyTooLarge` as soon as more than
    ``limit`` bytes arrived (a declared ``Content-Length`` over the limit is refused before any
    byte is read), so a chunked body without Content-Length cannot exhaust memory either."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


# --- the route -----------------------------------------------------------------------------------

NON_FINITE_OUTPUT = {
    "loc": ["body", "values"],
    "type": "non_finite_output",
    "msg": "the model's forecast for this window is not finite; values of this magnitude are "
    "outside what it handles",
}


def predict_router(
    settings: ServeSettings, holder: ModelHolder, metrics: ServeMetrics
) -> APIRouter:
    """The ``POST /predict`` route of one app."""
    router = APIRouter()

    @router.post(
        "/predict",
        response_model=ForecastResponse,
        summary="Forecast one window",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": PredictRequest.model_json_schema()}},
            },
            "responses": {
                "413": {"description": "Body over the size limit"},
                "422": {"description": "Invalid body: wrong length, NaN/inf, bad time, ..."},
                "503": {"description": "No model loaded"},
            },
        },
    )
    async def predict(request: Request) -> Response:
        """The forecast object for a window of the model's sequence length (the same object as
        a forecast message, without ``source``)."""
        body = await read_body_limited(request, settings.max_body_bytes)
        model = holder.current
        if model is None:
            raise Unavailable("no model loaded")
        inp = validate_predict(parse_json_strict(body), model.config)
        obj = await run_in_threadpool(predict_window, model, inp)
        if not finite_forecast(obj):
            raise RequestInvalid([dict(NON_FINITE_OUTPUT)], reason="non_finite_output")
        metrics.predictions.inc()
        return json_response(200, obj)

    return router
