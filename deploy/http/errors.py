"""The HTTP service's refusals and the one JSON response helper.

Routes raise these; :func:`deploy.http.app.create_app` turns them into answers: 413
(:class:`BodyTooLarge`), 422 (:class:`RequestInvalid`, FastAPI's ``{"detail": [{"loc", "msg",
"type"}, ...]}`` shape) and 503 (:class:`Unavailable`), each ``{"detail": ...}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from fastapi import Response

from model.errors import EventcastError


class BodyTooLarge(EventcastError):
    """A request body exceeded ``--max-body-bytes`` (413)."""


class Unavailable(EventcastError):
    """A collaborator the endpoint needs is not configured, not reachable or not loaded (503)."""


class RequestInvalid(EventcastError):
    """A request body failed validation (422); ``errors`` lists every problem found as
    ``{"loc": [...], "msg": str, "type": str}``. ``reason`` labels the refusal in
    ``eventcast_http_rejected_total``."""

    def __init__(self, errors: list[dict[str, Any]], reason: str = "invalid") -> None:
        super().__init__("; ".join(f"{_loc(e['loc'])}: {e['msg']}" for e in errors))
        self.errors = errors
        self.reason = reason


def _loc(loc: Sequence[str | int]) -> str:
    return ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in loc).replace(".[", "[")


def json_response(status: int, payload: Any, headers: Mapping[str, str] | None = None) -> Response:
    """``payload`` as JSON (orjson: NaN would become null; callers check finiteness first)."""
    return Response(
        orjson.dumps(payload),
        status_code=status,
        media_type="application/json",
        headers=dict(headers or {}),
    )
