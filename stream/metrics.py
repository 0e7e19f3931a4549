"""Prometheus metrics of the worker and its small HTTP endpoint (/metrics, /healthz, /readyz).

Every metric lives in the worker's own ``CollectorRegistry`` (several workers can run in one test
process) and is prefixed ``eventcast_``. Labels are bounded sets (reason, stage, backend,
partition, version): never a series id.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json as stdlib_json
import logging
import socket
from collections.abc import Callable, Generator
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from stream.accuracy import AccuracyMetrics
from stream.errors import StreamError

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH_BUCKETS = (1, 8, 32, 128, 256, 512, 1024, 2048, 4096, 8192)
JSON_CONTENT_TYPE = "application/json; charset=utf-8"


class Metrics:
    """The worker's metrics (attributes are prometheus_client collectors)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.consumed = Counter("eventcast_events_consumed", "Input records consumed", registry=r)
        self.accepted = Counter(
            "eventcast_events_accepted", "Events applied to a window", registry=r
        )
        self.rejected = Counter(
            "eventcast_events_rejected", "Events refused, by reason", ["reason"], registry=r
        )
        self.dlq = Counter(
            "eventcast_dlq_records", "Records written to the dead-letter topic", registry=r
        )
        self.warming = Counter(
            "eventcast_events_warming", "Accepted events of series with < window points", registry=r
        )
        self.redelivered = Counter(
            "eventcast_events_redelivered", "Records at or below the applied offset", registry=r
        )
        self.not_reemitted = Counter(
            "eventcast_redelivered_not_reemitted",
            "Redelivered events whose window is no longer retained (forecast not repeated)",
            registry=r,
        )
        self.forecasts = Counter("eventcast_forecasts_published", "Forecasts published", registry=r)
        self.batch_size = Histogram(
            "eventcast_batch_size", "Records per batch", buckets=_BATCH_BUCKETS, registry=r
        )
        self.batch_limit = Gauge(
            "eventcast_batch_limit",
            "Most records the batcher takes into its next batch: --max-batch, or fewer under "
            "--latency-budget-ms (native engine)",
            registry=r,
        )  # fmt: skip
        self.stage = Histogram(
            "eventcast_stage_seconds", "Time per batch stage", ["stage"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "eventcast_event_to_forecast_seconds",
            "Kafka record timestamp of the event to forecast acknowledged (sampled per batch)",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.inference = Histogram(
            "eventcast_inference_seconds", "Model call time per batch", ["backend"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.forecast_paths = Counter(
            "eventcast_forecast_paths",
            "Forecasts by path: seasonal (a model with seasons, the series' seasonal state warmed "
            "up: the network saw the window less its seasons, which were added back) or plain",
            ["path"], registry=r,
        )  # fmt: skip
        self.lag = Gauge(
            "eventcast_consumer_lag", "Records behind the end", ["partition"], registry=r
        )
        self.model_info = Gauge(
            "eventcast_model_info", "Serving model version (value 1)",
            ["version", "backend", "device"], registry=r,
        )  # fmt: skip
        self.active_series = Gauge("eventcast_active_series", "Series held in windows", registry=r)
        self.assigned = Gauge("eventcast_assigned_partitions", "Input partitions owned", registry=r)
        self.reloads = Counter("eventcast_model_reloads", "Model versions swapped in", registry=r)
        self.reload_failures = Counter(
            "eventcast_model_reload_failures", "Model versions refused, by reason", ["reason"],
            registry=r,
        )  # fmt: skip
        self.redis_errors = Counter("eventcast_redis_errors", "Failed Redis operations", registry=r)
        self.redis_oom = Counter(
            "eventcast_redis_oom_errors",
            "Redis writes refused with OOM (maxmemory reached; the worker pauses until they pass)",
            registry=r,
        )  # fmt: skip
        self.publish_errors = Counter(
            "eventcast_publish_errors",
            "Publishes not acknowledged by the broker (retried while fetching is paused)",
            registry=r,
        )  # fmt: skip
        self.fetch_errors = Counter(
            "eventcast_fetch_errors", "Fetches that failed (e.g. a corrupt record batch)",
            ["error"], registry=r,
        )  # fmt: skip
        self.paused = Gauge(
            "eventcast_paused", "1 while fetching is paused on purpose, by reason",
            ["reason"], registry=r,
        )  # fmt: skip
        self.decode_unexpected = Counter(
            "eventcast_decode_unexpected",
            "Records turned into `schema` dead letters by decoding's last-resort catch (a bug: "
            "report it)",
            registry=r,
        )  # fmt: skip
        self.dlq_truncated = Counter(
            "eventcast_dlq_truncated",
            "Dead-letter records whose original value was cut (or dropped) to fit the topic",
            registry=r,
        )  # fmt: skip
        self.state_conflicts = Counter(
            "eventcast_state_conflicts",
            "Fenced writes refused (Redis lost data or partition moved)", registry=r,
        )  # fmt: skip
        self.rebuilds = Counter(
            "eventcast_partition_rebuilds", "Partitions rebuilt from the input topic", registry=r
        )
        self.rebuild_records = Counter(
            "eventcast_rebuild_records", "Input records re-read to rebuild windows", registry=r
        )
        self.revoked_in_flight = Counter(
            "eventcast_rebalance_batches_in_flight",
            "Batches in flight when a rebalance took partitions away (finished, or abandoned "
            "after the wait, before the partitions were given up)", registry=r,
        )  # fmt: skip
        self.commits = Counter("eventcast_commits", "Offset commits (or transactions)", registry=r)
        self.ready = Gauge(
            "eventcast_ready", "1 when the worker is ready (model, Redis, Kafka)", registry=r
        )
        # ---- online accuracy (stream/accuracy.py) and the shadow version (stream/shadow.py) ----
        self.accuracy = AccuracyMetrics(r)
        self.shadow_forecasts = Counter(
            "eventcast_shadow_forecasts_published",
            "Shadow-version forecasts acknowledged on the shadow topic", ["version"], registry=r,
        )  # fmt: skip
        self.shadow_failures = Counter(
            "eventcast_shadow_failures",
            "Shadow-version failures (logged, never fatal), by stage: start, infer, publish",
            ["stage"], registry=r,
        )  # fmt: skip
        self.shadow_dropped = Counter(
            "eventcast_shadow_dropped",
            "Windows not forecast by the shadow version because its queue was full", registry=r,
        )  # fmt: skip
        self.shadow_info = Gauge(
            "eventcast_shadow_info", "Shadow model version (value 1 while it runs)", ["version"],
            registry=r,
        )  # fmt: skip
        self.interval_adjustment = Gauge(
            "eventcast_interval_adjustment",
            "Mean factor online calibration applied to the step-1 interval half-widths of the last "
            "batch's forecasts, by level (1 = the model's own intervals)", ["level"], registry=r,
        )  # fmt: skip
        self._version: tuple[str, str, str] | None = None
        self.adjustment: dict[str, float] = {}  # level -> the last batch's mean factor

    def observe_adjustment(self, factors: np.ndarray) -> None:
        """``factors`` (R, levels): the step-1 factors online calibration gave a batch's rows."""
        if len(factors) == 0:
            return
        for level, mean in zip(("80", "95"), factors.mean(axis=0).tolist(), strict=True):
            self.adjustment[level] = mean
            self.interval_adjustment.labels(level).set(mean)

    def set_model(self, version: str, backend: str, device: str) -> None:
        if self._version is not None:
            self.model_info.remove(*self._version)
        self._version = (version, backend, device)
        self.model_info.labels(version, backend, device).set(1)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class HealthServer:
    """``/metrics``, ``/healthz`` (``alive()`` is true: the pipeline makes progress, see
    :mod:`stream.health`) and ``/readyz`` (``ready()`` is true) on ``host:port``: a small FastAPI
    app (the stack of ``worker serve``) served by uvicorn as a task of the worker's event loop.

    uvicorn installs no signal handlers here (the worker installs its own) and logs only
    warnings, no access lines. ``start()`` raises :class:`stream.errors.StreamError` naming
    ``--metrics-port`` when the address cannot be bound; ``stop()`` is idempotent.
    """

    def __init__(
        self,
        metrics: Metrics,
        ready: Callable[[], bool],
        host: str,
        port: int,
        alive: Callable[[], bool] = lambda: True,
    ) -> None:
        self.metrics = metrics
        self.ready = ready
        self.alive = alive
        self.host = host
        self.port = port
        self._server: Any = None
        self._task: asyncio.Task[None] | None = None

    def app(self) -> Any:
        """The ASGI app: the three routes, answered as the worker always answered them."""
        from fastapi import FastAPI, Response

        def json(status: int, body: dict[str, Any]) -> Response:
            return Response(
                stdlib_json.dumps(body), status_code=status, media_type=JSON_CONTENT_TYPE
            )

        async def metrics() -> Response:
            return Response(self.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

        async def healthz() -> Response:
            if self.alive():
                return json(200, {"status": "ok"})
            return json(503, {"status": "stalled"})

        async def readyz() -> Response:
            ok = self.ready()
            return json(200 if ok else 503, {"ready": ok})

        app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
        for path, endpoint in (("/metrics", metrics), ("/healthz", healthz), ("/readyz", readyz)):
            app.add_api_route(path, endpoint, methods=["GET", "HEAD"], include_in_schema=False)
        return app

    async def start(self) -> None:
        import uvicorn

        sockets = bind_sockets(self.host, self.port)
        config = uvicorn.Config(
            self.app(),
            log_config=None,  # the worker's logging stays as the CLI configured it
            log_level="warning",
            access_log=False,
            lifespan="off",
            ws="none",
            timeout_keep_alive=5,
            timeout_graceful_shutdown=5,
        )
        server = embedded_server_class()(config)
        task = asyncio.create_task(server.serve(sockets=sockets), name="health-server")
        self._server, self._task = server, task
        while not server.started:
            if task.done():  # it failed before serving: say why
                self._server = self._task = None
                for sock in sockets:
                    sock.close()
                exc = task.exception()
                raise StreamError(
                    f"--metrics-port: the health endpoint on {self.host}:{self.port} did not "
                    f"start: {exc!r}"
                ) from exc
            await asyncio.sleep(0.005)
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    async def stop(self) -> None:
        server, task = self._server, self._task
        self._server = self._task = None
        if server is None or task is None:
            return
        server.should_exit = True  # uvicorn finishes requests in flight, then closes the sockets
        await task


@functools.cache
def embedded_server_class() -> type[Any]:
    """``uvicorn.Server`` that leaves signal handling to its host (imported on first use: the
    worker's modules import this one, ``worker --help`` should not pay for uvicorn)."""
    import uvicorn

    class EmbeddedServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Generator[None, None, None]:
            yield  # the worker installed its own handlers; uvicorn's would replace them

    return EmbeddedServer


def bind_sockets(host: str, port: int) -> list[socket.socket]:
    """Listening-ready sockets bound to every address of ``host`` (as asyncio would bind them);
    raises :class:`StreamError` naming ``--metrics-port`` when one cannot be bound (e.g. the
    port is in use)."""
    sockets: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        for family, kind, proto, _name, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.setblocking(False)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise StreamError(f"--metrics-port: cannot listen on {host}:{port}: {exc}") from exc
    return sockets
