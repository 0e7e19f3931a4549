"""Serving the app of ``worker serve`` (uvicorn, in the command's own process)."""

from __future__ import annotations

from fastapi import FastAPI

from deploy.http.settings import ServeSettings


def run_server(app: FastAPI, settings: ServeSettings) -> None:
    """Serve ``app`` with uvicorn until SIGINT/SIGTERM (uvicorn drains in-flight requests)."""
    import uvicorn

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        access_log=False,
        # h11 enforces no body limit itself; deploy.http.predict.read_body_limited does.
        # Keep-alive short so idle browser connections of the view do not pile up.
        timeout_keep_alive=5,
    )
    uvicorn.Server(config).run()
