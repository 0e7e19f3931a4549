"""Operational routes of ``worker serve``: ``GET /healthz``, ``GET /readyz``, ``GET /metrics`` and
``POST /reload``.

``POST /reload`` takes ``Authorization: Bearer <EVENTCAST_RELOAD_TOKEN>`` through FastAPI's
:class:`~fastapi.security.HTTPBearer` (which also documents the scheme in the OpenAPI spec) and
compares the token in constant time (:func:`secrets.compare_digest`). Without a configured token
reload is disabled (503, whatever the header); a missing or wrong token is 401 with a
``WWW-Authenticate: Bearer`` challenge.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from deploy.http.errors import json_response
from deploy.http.metrics import ServeMetrics
from deploy.http.serving import ModelHolder
from deploy.http.settings import ServeSettings
from model.errors import ModelLoadError, NoModelError

log = logging.getLogger(__name__)

# auto_error=False: the route answers itself, so that "reload disabled" (503) wins over a missing
# header and every refusal carries the same body and challenge.
bearer = HTTPBearer(auto_error=False, description="EVENTCAST_RELOAD_TOKEN")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def token_matches(credentials: HTTPAuthorizationCredentials | None, token: str) -> bool:
    """True when the bearer credentials equal ``token`` (constant-time comparison)."""
    if credentials is None:
        return False
    return secrets.compare_digest(credentials.credentials.encode(), token.encode())


def admin_router(
    settings: ServeSettings,
    holder: ModelHolder,
    metrics: ServeMetrics,
    redis_ping: Callable[[], Awaitable[bool]] | None,
) -> APIRouter:
    """The health, readiness, metrics and reload routes of one app."""
    router = APIRouter()

    @router.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, str]:
        """200 while the process serves requests."""
        return {"status": "ok"}

    @router.get("/readyz", summary="Readiness")
    async def readyz() -> Response:
        """200 when a model is loaded and Redis (when configured) answers; 503 with the reasons
        otherwise."""
        problems = []
        if holder.current is None:
            problems.append("no model loaded")
        if redis_ping is not None:
            try:
                ok = await asyncio.wait_for(redis_ping(), timeout=2.0)
            except Exception as exc:  # any failure to reach Redis means not ready
                ok = False
                log.warning("readiness: Redis ping failed: %s", exc)
            if not ok:
                problems.append("Redis does not answer")
        body: dict[str, Any] = {
            "status": "ready" if not problems else "not ready",
            "model_version": holder.version,
        }
        if problems:
            body["problems"] = problems
            return json_response(503, body)
        return json_response(200, body)

    @router.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics_endpoint() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @router.post(
        "/reload",
        summary="Load the model directory's current version",
        responses={
            401: {"description": "Missing or wrong bearer token"},
            409: {"description": "The new version failed its checks; the old one keeps serving"},
            503: {"description": "Reload disabled: EVENTCAST_RELOAD_TOKEN not set"},
        },
    )
    async def reload(credentials: Credentials) -> Response:
        """Needs ``Authorization: Bearer <EVENTCAST_RELOAD_TOKEN>``. Answers
        ``{"previous", "version", "changed"}``; on a failed check the old model keeps serving."""
        token = settings.reload_token
        if not token:
            metrics.reloads.labels(outcome="disabled").inc()
            return json_response(
                503,
                {
                    "detail": "reload is disabled: set EVENTCAST_RELOAD_TOKEN for "
                    "worker serve to enable it"
                },
            )
        if not token_matches(credentials, token):
            metrics.reloads.labels(outcome="unauthorized").inc()
            return json_response(
                401,
                {"detail": "missing or wrong bearer token"},
                {"WWW-Authenticate": 'Bearer realm="eventcast"'},
            )
        try:
            previous, new = await holder.reload()
        except (ModelLoadError, NoModelError) as exc:
            metrics.reloads.labels(outcome="refused").inc()
            log.warning("reload refused, keeping %s: %s", holder.version, exc)
            return json_response(
                409, {"detail": f"new model refused, still serving {holder.version}: {exc}"}
            )
        metrics.reloads.labels(outcome="ok").inc()
        metrics.set_version(new.version)
        return json_response(
            200, {"previous": previous, "version": new.version, "changed": previous != new.version}
        )

    return router
