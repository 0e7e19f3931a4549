"""The worker's health endpoint (``stream.metrics.HealthServer``): ``/metrics``, ``/healthz`` and
``/readyz`` on uvicorn in the caller's event loop, with the answers the worker has always given,
no signal handlers of its own, no access log, a clear error for a port in use, a clean stop.

These run in the main thread on purpose: that is where uvicorn would install its signal handlers.
"""

from __future__ import annotations

import asyncio
import http.client
import logging
import signal
import socket

import pytest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from deploy.stack import free_port
from stream.errors import StreamError
from stream.metrics import HealthServer, Metrics


def request(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


async def get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    return await asyncio.to_thread(request, port, path, method)


class Flags:
    def __init__(self) -> None:
        self.ready = True
        self.alive = True


async def started(flags: Flags, metrics: Metrics | None = None) -> tuple[HealthServer, int]:
    port = free_port()
    server = HealthServer(
        metrics or Metrics(), lambda: flags.ready, "127.0.0.1", port, alive=lambda: flags.alive
    )
    await server.start()
    return server, port


async def test_answers_are_the_workers_own() -> None:
    flags = Flags()
    metrics = Metrics()
    metrics.forecasts.inc(3)
    server, port = await started(flags, metrics)
    try:
        status, headers, body = await get(port, "/healthz")
        assert (status, body) == (200, b'{"status": "ok"}')
        assert headers["content-type"] == "application/json; charset=utf-8"
        assert await get(port, "/readyz") == (
            200,
            headers | {"content-length": "15"},
            b'{"ready": true}',
        )

        status, headers, body = await get(port, "/metrics")
        assert status == 200 and headers["content-type"] == CONTENT_TYPE_LATEST
        assert b"eventcast_forecasts_published_total 3.0" in body

        flags.ready = flags.alive = False
        status, _, body = await get(port, "/healthz")
        assert (status, body) == (503, b'{"status": "stalled"}')
        status, _, body = await get(port, "/readyz")
        assert (status, body) == (503, b'{"ready": false}')
        assert (await get(port, "/readyz", "HEAD"))[::2] == (503, b"")
        assert (await get(port, "/metrics", "POST"))[0] == 405
        assert (await get(port, "/docs"))[0] == 404  # no OpenAPI pages on the worker
    finally:
        await server.stop()


async def test_no_signal_handlers_no_access_log_and_a_clean_stop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    caplog.set_level(logging.DEBUG)
    server, port = await started(Flags())
    try:
        assert {sig: signal.getsignal(sig) for sig in before} == before
        for _ in range(3):
            assert (await get(port, "/healthz"))[0] == 200
    finally:
        await server.stop()
    await server.stop()  # idempotent
    assert {sig: signal.getsignal(sig) for sig in before} == before
    assert not [r for r in caplog.records if r.name.startswith("uvicorn.access")]
    with pytest.raises(ConnectionRefusedError):
        request(port, "/healthz")
    # the port is free again
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


async def test_a_port_in_use_fails_start_up_naming_the_flag() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = HealthServer(Metrics(), lambda: True, "127.0.0.1", port)
        with pytest.raises(
            StreamError, match=rf"--metrics-port: cannot listen on 127\.0\.0\.1:{port}"
        ):
            await server.start()
        await server.stop()  # nothing to stop: fine
