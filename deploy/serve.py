"""The HTTP service (``worker serve``): predict, series state, health, metrics, reload, live view.

Endpoints (docs/contract.md, "HTTP POST /predict"):

- ``POST /predict``: a window of ``sequence_length`` timestamps and values (plus every feature the
  model was trained with) → the same object as a forecast message, without ``source``. Bad input
  → 422 with one entry per problem (``loc``, ``msg``, ``type``); a body over ``max_body_bytes`` →
  413, enforced while the body is read (chunked bodies too), before anything is parsed.
- ``GET /series/{id}``: the series' current window from Redis and its latest forecast (from the
  forecast topic when ``--bootstrap-servers`` is given, else computed from the window).
- ``GET /healthz`` (process alive), ``GET /readyz`` (model loaded, Redis answering if configured),
  ``GET /metrics`` (Prometheus text format).
- ``POST /reload``: loads the model directory's current version, guarded by
  ``Authorization: Bearer <EVENTCAST_RELOAD_TOKEN>`` (constant-time comparison); without a
  configured token reload is disabled (503).
- ``GET /`` and ``GET /view/chart.svg``: the live forecast view (server-side SVG, a few lines of
  bundled script for the refresh; nothing is fetched from the internet).
- ``GET /openapi.json``, ``GET /docs``: the OpenAPI spec (FastAPI's).

The app is built by :func:`create_app` from a frozen :class:`ServeSettings` and injected
collaborators (model source, window reader, forecast feed), so tests run it in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import html
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import numpy as np
import orjson
from fastapi import FastAPI, Request, Response
from fastapi.responses import HTMLResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from model.config import ModelConfig
from model.errors import EventcastError, ModelLoadError, NoModelError
from model.features import build_inputs
from model.predictor import Forecast, Predictor
from stream.decode import parse_timestamp

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB (docs/contract.md)
MAX_SERIES_ID_CHARS = 256
# The network computes in float32: larger magnitudes become inf on the way in.
FLOAT32_MAX = float(np.finfo(np.float32).max)
# Errors reported per request: enough to fix a body, bounded so a huge bad body stays cheap.
MAX_ERRORS = 20


# --- settings and collaborators ------------------------------------------------------------------


@dataclass(frozen=True)
class ServeSettings:
    """Everything ``worker serve`` needs, built once by the command and passed down."""

    model_dir: Path
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    reload_token: str | None = field(default=None, repr=False)  # never logged
    backend: str = "auto"
    device: str = "auto"
    threads: int | None = None
    refresh_seconds: float = 5.0  # live view refresh period
    title: str = "eventcast"


class LoadedModelLike(Protocol):
    """What :meth:`model.registry.ModelRegistry.load` returns (``LoadedModel``)."""

    version: str
    config: ModelConfig
    predictor: Predictor


class ModelSource(Protocol):
    """Loads the serving version of a model directory (``model.registry.ModelRegistry``)."""

    def load(
        self,
        version: str | None = None,
        *,
        backend: str = "auto",
        device: str = "auto",
        threads: int | None = None,
        expect: Any = None,
    ) -> LoadedModelLike: ...


@dataclass(frozen=True)
class Window:
    """A series' current window: oldest first, ``ts`` in epoch seconds (UTC)."""

    series_id: str
    ts: list[float]
    values: list[float]
    features: dict[str, list[float]] = field(default_factory=dict)


# Reads a series' current window (from Redis); None when the series has no state.
WindowReader = Callable[[str], Awaitable[Window | None]]


class ForecastHistory:
    """The most recent forecast objects per series, in memory, bounded in series and per series.

    Fed by the forecast-topic feed; read by ``GET /series/{id}`` and the view. The least recently
    updated series is forgotten when more than ``max_series`` are held. Forecasts are kept in the
    order they are added; a forecast whose ``ts`` equals the newest one held replaces it (a repeat
    after a worker restart under at-least-once).
    """

    def __init__(self, per_series: int = 200, max_series: int = 10_000) -> None:
        self.per_series = per_series
        self.max_series = max_series
        self._data: OrderedDict[str, deque[dict[str, Any]]] = OrderedDict()

    def add(self, forecast: Mapping[str, Any]) -> None:
        """Remember ``forecast`` (a forecast object); objects without a string ``series_id`` are
        ignored."""
        sid = forecast.get("series_id")
        if not isinstance(sid, str):
            return
        ring = self._data.get(sid)
        if ring is None:
            ring = self._data[sid] = deque(maxlen=self.per_series)
        self._data.move_to_end(sid)
        if ring and ring[-1].get("ts") == forecast.get("ts"):
            ring[-1] = dict(forecast)
        else:
            ring.append(dict(forecast))
        while len(self._data) > self.max_series:
            self._data.popitem(last=False)

    def recent(self, series_id: str) -> list[dict[str, Any]]:
        """The forecasts held for ``series_id``, oldest first (empty when none)."""
        return list(self._data.get(series_id, ()))

    def latest(self, series_id: str) -> dict[str, Any] | None:
        ring = self._data.get(series_id)
        return ring[-1] if ring else None

    def series(self) -> list[str]:
        """Series ids held, most recently updated first."""
        return list(reversed(self._data))


class ForecastFeed(Protocol):
    """A background reader of the forecast topic feeding a :class:`ForecastHistory`."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class TopicForecastFeed:
    """Keeps a :class:`ForecastHistory` filled from the forecast topic (all partitions, no
    consumer group, ``read_committed``), starting ``backfill`` records before each partition's
    end so the view has history at once.

    Optional for the server: connection errors are logged and retried with a capped backoff, and
    never stop the HTTP service. ``stop()`` is safe to call twice.
    """

    def __init__(
        self, kafka: Any, topic: str, history: ForecastHistory, *, backfill: int = 2000
    ) -> None:
        self.kafka = kafka  # stream.settings.KafkaSettings
        self.topic = topic
        self.history = history
        self.backfill = backfill
        self._task: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()  # set once the backfill position is taken

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="forecast-feed")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        delay = 0.5
        while True:
            try:
                await self._consume()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the feed is best effort: log, back off, retry
                log.warning(
                    "forecast feed on %s failed (%s); retrying in %.1fs", self.topic, exc, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def _consume(self) -> None:
        from aiokafka import AIOKafkaConsumer

        from deploy.plot import assigned_partitions

        consumer = AIOKafkaConsumer(
            self.topic, **self.kafka.client_kwargs(), group_id=None, enable_auto_commit=False,
            isolation_level="read_committed", metadata_max_age_ms=10_000,
        )  # fmt: skip
        await consumer.start()
        try:
            tps = await assigned_partitions(consumer, self.topic)
            begins = await consumer.beginning_offsets(tps)
            ends = await consumer.end_offsets(tps)
            for tp in tps:
                consumer.seek(tp, max(begins[tp], ends[tp] - self.backfill))
            self.ready.set()
            while True:
                batch = await consumer.getmany(timeout_ms=1000, max_records=5000)
                for msgs in batch.values():
                    for msg in msgs:
                        if msg.value is None:
                            continue
                        try:
                            doc = orjson.loads(msg.value)
                        except orjson.JSONDecodeError:
                            continue
                        if isinstance(doc, dict):
                            self.history.add(doc)
        finally:
            await consumer.stop()


# --- request validation --------------------------------------------------------------------------


class RequestInvalid(EventcastError):
    """A request body failed validation; ``errors`` lists every problem found (at most
    ``MAX_ERRORS``) as ``{"loc": [...], "msg": str, "type": str}``, FastAPI's 422 shape."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("; ".join(f"{_loc(e['loc'])}: {e['msg']}" for e in errors))
        self.errors = errors


def _loc(loc: Sequence[str | int]) -> str:
    return ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in loc).replace(".[", "[")


class PredictRequest(BaseModel):
    """``POST /predict`` body (documentation of the OpenAPI spec; validation is
    :func:`validate_predict`, which also checks lengths against the serving model)."""

    series_id: str = Field(min_length=1, max_length=MAX_SERIES_ID_CHARS, examples=["sensor-17"])
    ts: list[float | str] = Field(
        description="sequence_length timestamps, oldest first, strictly increasing: epoch "
        "seconds or RFC 3339 strings with an offset or Z",
    )
    values: list[float] = Field(description="sequence_length finite numbers")
    features: dict[str, list[float]] | None = Field(
        default=None, description="name → sequence_length finite numbers, for every model feature"
    )


class ForecastResponse(BaseModel):
    """A forecast object (docs/contract.md "Forecasts"), without ``source``."""

    schema_version: int
    series_id: str
    ts: float
    horizon: int
    target_ts: list[float]
    mean: list[float]
    std: list[float]
    lower: dict[str, list[float]]
    upper: dict[str, list[float]]
    model_version: str
    emitted_at: float


@dataclass(frozen=True)
class PredictInput:
    """A validated ``POST /predict`` body: arrays of the model's sequence length."""

    series_id: str
    ts: np.ndarray  # (T,) float64 epoch seconds, strictly increasing
    values: np.ndarray  # (T,) float64, finite
    features: dict[str, np.ndarray]  # model feature name -> (T,) float64, finite


def parse_json_strict(body: bytes) -> Any:
    """Parse a JSON body; raise :class:`RequestInvalid` when it is not standard JSON (orjson
    refuses ``NaN``, ``Infinity`` and other non-standard constants) or not UTF-8."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RequestInvalid(
            [{"loc": ["body"], "msg": f"body is not valid JSON: {exc}", "type": "json_invalid"}]
        ) from exc


def _number_list(
    obj: Any, loc: list[str | int], length: int, errors: list[dict[str, Any]]
) -> np.ndarray | None:
    if not isinstance(obj, list):
        errors.append({"loc": loc, "msg": "expected a list of numbers", "type": "list_type"})
        return None
    if len(obj) != length:
        errors.append(
            {
                "loc": loc,
                "msg": f"expected exactly {length} numbers (the model's sequence length), "
                f"got {len(obj)}",
                "type": "length",
            }
        )
        return None
    out = np.empty(length, dtype=np.float64)
    for i, v in enumerate(obj):
        if isinstance(v, bool) or not isinstance(v, int | float):
            errors.append(
                {"loc": [*loc, i], "msg": f"expected a number, got {_kind(v)}", "type": "float"}
            )
            continue
        f = float(v)
        if not math.isfinite(f):
            errors.append(
                {"loc": [*loc, i], "msg": "NaN and ±inf are not allowed", "type": "non_finite"}
            )
        elif abs(f) > FLOAT32_MAX:
            errors.append(
                {
                    "loc": [*loc, i],
                    "msg": f"{f!r} is outside the float32 range the model computes in",
                    "type": "out_of_range",
                }
            )
        else:
            out[i] = f
    return out


def _kind(v: Any) -> str:
    return "null" if v is None else "a boolean" if isinstance(v, bool) else type(v).__name__


def validate_predict(obj: Any, config: ModelConfig) -> PredictInput:
    """Check a parsed ``POST /predict`` body against the serving model's ``config``.

    Promises: on success every array has ``config.sequence_length`` finite float64 entries
    within float32 range, ``ts`` is strictly increasing, and every feature of ``config.features``
    is present (other features are dropped). Otherwise raises :class:`RequestInvalid` naming
    each problem (wrong type, wrong length, NaN/inf, unparsable or offset-less time, order,
    missing feature) — never anything else, whatever ``obj`` is.
    """
    t = config.sequence_length
    errors: list[dict[str, Any]] = []
    if not isinstance(obj, dict):
        raise RequestInvalid(
            [
                {
                    "loc": ["body"],
                    "msg": f"expected a JSON object, got {_kind(obj)}",
                    "type": "dict_type",
                }
            ]
        )
    sid = obj.get("series_id")
    if not isinstance(sid, str) or not (1 <= len(sid) <= MAX_SERIES_ID_CHARS):
        errors.append(
            {
                "loc": ["body", "series_id"],
                "msg": f"required: a string of 1–{MAX_SERIES_ID_CHARS} characters",
                "type": "string_type",
            }
        )

    ts_raw = obj.get("ts")
    ts: np.ndarray | None = None
    if not isinstance(ts_raw, list):
        errors.append(
            {"loc": ["body", "ts"], "msg": "required: a list of timestamps", "type": "list_type"}
        )
    elif len(ts_raw) != t:
        errors.append(
            {
                "loc": ["body", "ts"],
                "msg": f"expected exactly {t} timestamps (the model's sequence length), "
                f"got {len(ts_raw)}",
                "type": "length",
            }
        )
    else:
        ts = np.empty(t, dtype=np.float64)
        ok = True
        for i, raw in enumerate(ts_raw):
            try:
                ts[i] = parse_timestamp(raw)
            except (ValueError, OverflowError) as exc:
                ok = False
                errors.append({"loc": ["body", "ts", i], "msg": str(exc), "type": "timestamp"})
        if ok:
            bad = np.flatnonzero(np.diff(ts) <= 0)
            if bad.size:
                i = int(bad[0]) + 1
                errors.append(
                    {
                        "loc": ["body", "ts", i],
                        "msg": f"timestamps must be strictly increasing: ts[{i}] = {ts[i]!r} is "
                        f"not after ts[{i - 1}] = {ts[i - 1]!r}",
                        "type": "order",
                    }
                )
        else:
            ts = None

    values = (
        _number_list(obj["values"], ["body", "values"], t, errors)
        if "values" in obj
        else errors.append(
            {"loc": ["body", "values"], "msg": "required: a list of numbers", "type": "missing"}
        )
    )

    feats: dict[str, np.ndarray] = {}
    raw_feats = obj.get("features")
    if raw_feats is not None and not isinstance(raw_feats, dict):
        errors.append(
            {
                "loc": ["body", "features"],
                "msg": "expected an object name → list",
                "type": "dict_type",
            }
        )
        raw_feats = None
    for name in config.features:
        if raw_feats is None or name not in raw_feats:
            errors.append(
                {
                    "loc": ["body", "features", name],
                    "msg": f"missing feature {name!r} the model was trained with",
                    "type": "missing_feature",
                }
            )
            continue
        col = _number_list(raw_feats[name], ["body", "features", name], t, errors)
        if col is not None:
            feats[name] = col

    if errors:
        raise RequestInvalid(errors[:MAX_ERRORS])
    assert ts is not None and values is not None  # no errors means both were parsed
    return PredictInput(sid, ts, values, feats)


# --- forecasting ---------------------------------------------------------------------------------


def forecast_objects(
    series_ids: Sequence[str],
    ts: np.ndarray,
    forecast: Forecast,
    model_version: str,
) -> list[dict[str, Any]]:
    """Forecast objects (docs/contract.md "Forecasts", without ``source``) for B windows.

    ``ts`` is the (B, T) window timestamps; ``forecast`` the predictor's output for them. Built
    by the worker's own builder (:func:`stream.publisher.forecast_documents`), so an HTTP answer
    is the same object as a forecast message, field for field.
    """
    from stream.publisher import forecast_documents

    return forecast_documents(series_ids, ts, forecast, version=model_version)


def _finite_forecast(obj: Mapping[str, Any]) -> bool:
    """True when every number of a forecast object is finite and every std > 0 (the JSON encoder
    writes NaN as null, so null counts as not finite)."""
    arrays = [obj["mean"], obj["std"], *obj["lower"].values(), *obj["upper"].values()]
    if not all(isinstance(v, int | float) and math.isfinite(v) for a in arrays for v in a):
        return False
    return all(s > 0 for s in obj["std"])


class ModelHolder:
    """The serving model, swapped as a whole on reload (readers see the old or the new one)."""

    def __init__(self, source: ModelSource, settings: ServeSettings) -> None:
        self.source = source
        self.settings = settings
        self.current: LoadedModelLike | None = None
        self._reload_lock = asyncio.Lock()

    def load_initial(self) -> LoadedModelLike:
        """Load the directory's current version; NoModelError/ModelLoadError propagate."""
        s = self.settings
        self.current = self.source.load(backend=s.backend, device=s.device, threads=s.threads)
        log.info("serving model version %s", self.current.version)
        return self.current

    async def reload(self) -> tuple[str | None, LoadedModelLike]:
        """Load the current version again (off the event loop); return (old version, new model).

        A new version must keep the sequence length and features of the one serving (``expect``);
        on any failure the old model keeps serving and the error propagates.
        """
        async with self._reload_lock:
            old = self.current
            s = self.settings
            expect = old.config if old is not None else None
            new = await run_in_threadpool(
                self.source.load,
                backend=s.backend,
                device=s.device,
                threads=s.threads,
                expect=expect,
            )
            self.current = new
            return (old.version if old is not None else None), new


def _predict_windows(model: LoadedModelLike, inp: PredictInput) -> dict[str, Any]:
    """Run one window through the model (called in a worker thread)."""
    x = build_inputs(
        inp.ts[None, :],
        inp.values[None, :],
        {k: v[None, :] for k, v in inp.features.items()},
        model.config,
    )  # (1, T, C)
    fc = model.predictor.predict(x)
    return forecast_objects([inp.series_id], inp.ts[None, :], fc, model.version)[0]


# --- the app -------------------------------------------------------------------------------------


class _Metrics:
    """Prometheus metrics of one app (own registry, so several apps can live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "eventcast_http_requests_total",
            "HTTP requests served, by route and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "eventcast_http_request_duration_seconds",
            "HTTP request latency, by route.",
            ["route"],
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
        )
        self.predictions = Counter(
            "eventcast_http_predictions_total", "Forecasts returned by POST /predict.", registry=r
        )
        self.rejected = Counter(
            "eventcast_http_rejected_total",
            "Requests refused, by reason (413, 422, ...).",
            ["reason"],
            registry=r,
        )
        self.model_info = Gauge(
            "eventcast_serve_model_info",
            "1 for the model version this server serves.",
            ["version"],
            registry=r,
        )
        self.reloads = Counter(
            "eventcast_serve_reloads_total", "POST /reload outcomes.", ["outcome"], registry=r
        )

    def set_version(self, version: str | None) -> None:
        self.model_info.clear()
        if version is not None:
            self.model_info.labels(version=version).set(1)


class BodyTooLarge(EventcastError):
    """A request body exceeded the configured limit."""


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


def _json(status: int, payload: Any, headers: Mapping[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(payload),
        status_code=status,
        media_type="application/json",
        headers=dict(headers or {}),
    )


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
    metrics = _Metrics()
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
    app.state.settings = settings
    app.state.holder = holder
    app.state.history = history
    app.state.metrics = metrics

    @app.middleware("http")
    async def observe(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        start = time.perf_counter()
        # A declared Content-Length over the limit is refused on every route, before routing.
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > settings.max_body_bytes:
            metrics.rejected.labels(reason="too_large").inc()
            response: Response = _too_large(
                f"request body of {declared} bytes exceeds the limit of "
                f"{settings.max_body_bytes} bytes"
            )
        else:
            response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        metrics.requests.labels(path, request.method, str(response.status_code)).inc()
        metrics.latency.labels(path).observe(time.perf_counter() - start)
        return response

    def current_model() -> LoadedModelLike:
        if holder.current is None:
            raise NoModelError("no model loaded")
        return holder.current

    @app.post(
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
        try:
            body = await read_body_limited(request, settings.max_body_bytes)
        except BodyTooLarge as exc:
            metrics.rejected.labels(reason="too_large").inc()
            return _too_large(str(exc))
        model = holder.current
        if model is None:
            return _json(503, {"detail": "no model loaded"})
        try:
            inp = validate_predict(parse_json_strict(body), model.config)
        except RequestInvalid as exc:
            metrics.rejected.labels(reason="invalid").inc()
            return _json(422, {"detail": exc.errors})
        obj = await run_in_threadpool(_predict_windows, model, inp)
        if not _finite_forecast(obj):
            metrics.rejected.labels(reason="non_finite_output").inc()
            return _json(
                422,
                {
                    "detail": [
                        {
                            "loc": ["body", "values"],
                            "type": "non_finite_output",
                            "msg": "the model's forecast for this window is not finite; "
                            "values of this magnitude are outside what it handles",
                        }
                    ]
                },
            )
        metrics.predictions.inc()
        return _json(200, obj)

    @app.get("/series/{series_id}", summary="A series' current window and latest forecast")
    async def series(series_id: str) -> Response:
        """``{"series_id", "window": {"ts", "values", "features"}, "forecast", "forecast_origin",
        "forecasts"}``: the window as stored in Redis (oldest first); ``forecast`` the latest from
        the forecast topic (``forecast_origin: "topic"``) or, without one, computed by this
        server from a full window (``"computed"``), else null; ``forecasts`` the recent ones held
        from the topic. 404 when the series is unknown, 503 without Redis."""
        data = await series_state(series_id)
        if data is None:
            return _json(404, {"detail": f"series {series_id!r} has no window and no forecast"})
        return _json(200, data)

    async def series_state(series_id: str) -> dict[str, Any] | None:
        if window_reader is None:
            raise _Unavailable("no Redis configured (--redis-url)")
        window = await window_reader(series_id)
        recent = history.recent(series_id)
        forecast: dict[str, Any] | None = recent[-1] if recent else None
        origin = "topic" if forecast is not None else None
        model = holder.current
        if forecast is None and window is not None and model is not None:
            forecast = await run_in_threadpool(_forecast_window, model, window)
            origin = "computed" if forecast is not None else None
        if window is None and forecast is None:
            return None
        return {
            "series_id": series_id,
            "window": None
            if window is None
            else {
                "ts": window.ts,
                "values": window.values,
                "features": window.features,
            },
            "forecast": forecast,
            "forecast_origin": origin,
            "forecasts": recent,
        }

    app.state.series_state = series_state

    @app.exception_handler(_Unavailable)
    async def unavailable(_request: Request, exc: _Unavailable) -> Response:
        return _json(503, {"detail": str(exc)})

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, str]:
        """200 while the process serves requests."""
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness")
    async def readyz() -> Response:
        """200 when a model is loaded and Redis (when configured) answers; 503 with the reasons
        otherwise."""
        problems = []
        model = holder.current
        if model is None:
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
            "model_version": model.version if model is not None else None,
        }
        if problems:
            body["problems"] = problems
            return _json(503, body)
        return _json(200, body)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics_endpoint() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post(
        "/reload",
        summary="Load the model directory's current version",
        responses={
            401: {"description": "Missing or wrong bearer token"},
            409: {"description": "The new version failed its checks; the old one keeps serving"},
            503: {"description": "Reload disabled: EVENTCAST_RELOAD_TOKEN not set"},
        },
    )
    async def reload(request: Request) -> Response:
        """Needs ``Authorization: Bearer <EVENTCAST_RELOAD_TOKEN>``. Answers
        ``{"previous", "version", "changed"}``; on a failed check the old model keeps serving."""
        token = settings.reload_token
        if not token:
            metrics.reloads.labels(outcome="disabled").inc()
            return _json(
                503,
                {
                    "detail": "reload is disabled: set EVENTCAST_RELOAD_TOKEN for "
                    "worker serve to enable it"
                },
            )
        if not _bearer_ok(request.headers.get("authorization"), token):
            metrics.reloads.labels(outcome="unauthorized").inc()
            return _json(
                401,
                {"detail": "missing or wrong bearer token"},
                {"WWW-Authenticate": 'Bearer realm="eventcast"'},
            )
        try:
            previous, new = await holder.reload()
        except (ModelLoadError, NoModelError) as exc:
            metrics.reloads.labels(outcome="refused").inc()
            log.warning(
                "reload refused, keeping %s: %s",
                holder.current.version if holder.current else None,
                exc,
            )
            return _json(
                409,
                {
                    "detail": f"new model refused, still serving "
                    f"{holder.current.version if holder.current else None}: {exc}"
                },
            )
        metrics.reloads.labels(outcome="ok").inc()
        metrics.set_version(new.version)
        return _json(
            200, {"previous": previous, "version": new.version, "changed": previous != new.version}
        )

    _add_view_routes(app, settings, history, series_state)
    return app


WEB = Path(__file__).resolve().parent / "web"
# The view runs only its own script and talks only to this server.
VIEW_CSP = (
    "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'unsafe-inline'; "
    "img-src 'self' data:; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)


def _add_view_routes(
    app: FastAPI,
    settings: ServeSettings,
    history: ForecastHistory,
    series_state: Callable[[str], Awaitable[dict[str, Any] | None]],
) -> None:
    """``GET /`` (the page), ``GET /view/chart.svg`` (the chart, re-fetched by the page) and
    ``GET /view/view.js`` (the page's refresh script, bundled in ``deploy/web/``)."""
    from deploy.plot import ChartData, render_svg

    template = (WEB / "index.html").read_text(encoding="utf-8")
    script = (WEB / "view.js").read_text(encoding="utf-8")

    async def chart_svg(series_id: str) -> tuple[str, str]:
        try:
            state = await series_state(series_id)
        except _Unavailable as exc:
            return render_svg(ChartData(series_id)), f"unavailable: {exc}"
        if state is None:
            return render_svg(ChartData(series_id)), "unknown series"
        window = state["window"] or {"ts": [], "values": []}
        forecasts = state["forecasts"] or ([state["forecast"]] if state["forecast"] else [])
        chart = ChartData(series_id, window["ts"], window["values"], forecasts)
        return render_svg(chart), f"{len(window['ts'])} points, {len(forecasts)} forecasts"

    @app.get("/", response_class=HTMLResponse, summary="Live forecast view", tags=["view"])
    async def index(series: str | None = None) -> Response:
        """A page showing a series' recent actuals and forecasts with 80 % / 95 % bands,
        refreshed every ``--refresh-seconds``; without ``series``, a list of known series."""
        esc = html.escape
        series = (series or "").strip()[:MAX_SERIES_ID_CHARS]
        known = history.series()[:500]
        chart, status = ("", "choose a series")
        if series:
            chart, status = await chart_svg(series)
        listing = ""
        if not series and known:
            items = "".join(
                f'<li><a href="/?series={quote(s, safe="")}">{esc(s)}</a></li>' for s in known
            )
            listing = f'<ul class="series">{items}</ul>'
        page = (
            template.replace("{{TITLE}}", esc(settings.title))
            .replace("{{OPTIONS}}", "".join(f'<option value="{esc(s)}">' for s in known))
            .replace("{{STATUS}}", esc(status))
            .replace("{{REFRESH_MS}}", str(int(settings.refresh_seconds * 1000)))
            .replace("{{SERIES_LIST}}", listing)
            .replace("{{SERIES}}", esc(series, quote=True))
            .replace("{{CHART}}", chart)  # last: the SVG is already escaped by render_svg
        )
        return HTMLResponse(page, headers={"Content-Security-Policy": VIEW_CSP})

    @app.get("/view/chart.svg", summary="The chart of a series as SVG", tags=["view"])
    async def chart(series: str) -> Response:
        svg, _ = await chart_svg(series[:MAX_SERIES_ID_CHARS])
        return Response(svg, media_type="image/svg+xml", headers={"Cache-Control": "no-store"})

    @app.get("/view/view.js", include_in_schema=False)
    async def view_js() -> Response:
        return Response(script, media_type="text/javascript")


class _Unavailable(EventcastError):
    """A collaborator the endpoint needs is not configured or not reachable (503)."""


def _too_large(message: str) -> Response:
    return _json(413, {"detail": message})


def _bearer_ok(header: str | None, token: str) -> bool:
    """Constant-time check of an ``Authorization: Bearer <token>`` header."""
    if not header:
        return False
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())


def _forecast_window(model: LoadedModelLike, window: Window) -> dict[str, Any] | None:
    """A forecast computed from a stored window (its newest ``sequence_length`` points), or None
    when the window is not full or lacks a model feature."""
    t = model.config.sequence_length
    if len(window.values) < t or any(f not in window.features for f in model.config.features):
        return None
    inp = PredictInput(
        window.series_id,
        np.asarray(window.ts[-t:], dtype=np.float64),
        np.asarray(window.values[-t:], dtype=np.float64),
        {f: np.asarray(window.features[f][-t:], dtype=np.float64) for f in model.config.features},
    )
    obj = _predict_windows(model, inp)
    return obj if _finite_forecast(obj) else None


class RedisWindows:
    """Reads series windows from the worker's Redis store (layout: :mod:`stream.store`).

    With ``partitions`` (the input topic's partition count) a series is read from the partition
    its key hashes to; without it, the partitions present in Redis are discovered with ``SCAN``
    (cached for ``rescan_seconds``) and the series is looked up in each, so the server needs no
    Kafka connection. ``client`` is a ``redis.asyncio.Redis``.
    """

    def __init__(
        self, client: Any, prefix: str, topic: str, partitions: int | None = None,
        *, rescan_seconds: float = 30.0,
    ) -> None:  # fmt: skip
        from stream.store import WindowStore

        self.client = client
        self.store = WindowStore(client, prefix, topic)
        self.prefix = prefix
        self.topic = topic
        self.partitions = partitions
        self.rescan_seconds = rescan_seconds
        self._known: list[int] = []
        self._scanned_at = -math.inf

    async def known_partitions(self) -> list[int]:
        """Partitions of the input topic that have state in Redis (cached)."""
        if time.monotonic() - self._scanned_at > self.rescan_seconds:
            head = f"{{{self.prefix}:{self.topic}:"
            found = set()
            async for key in self.client.scan_iter(match=f"{_glob(head)}*}}:meta", count=1000):
                text = key.decode() if isinstance(key, bytes) else key
                num = text[len(head) :].split("}", 1)[0]
                if num.isdigit():
                    found.add(int(num))
            self._known = sorted(found)
            self._scanned_at = time.monotonic()
        return self._known

    async def __call__(self, series_id: str) -> Window | None:
        """The series' window, oldest first (every retained point), or None."""
        from stream.windows import decode_series

        if self.partitions is not None:
            got = await self.store.read_window(series_id, self.partitions)
            if got is None:
                return None
            return Window(series_id, got.ts.tolist(), got.values.tolist(),
                          {k: v.tolist() for k, v in got.features.items()})  # fmt: skip
        for p in await self.known_partitions():
            meta_key, win_key = self.store.keys(p)
            blob = await self.client.hget(win_key, series_id)
            if blob is None:
                continue
            names = orjson.loads(await self.client.hget(meta_key, "features") or b"[]")
            _off, ts, values, feats = decode_series(blob, len(names))
            return Window(series_id, ts.tolist(), values.tolist(),
                          {n: feats[:, j].tolist() for j, n in enumerate(names)})  # fmt: skip
        return None

    async def delete(self, series_id: str) -> bool:
        """Remove the series' window from every partition that holds it; True when one did.

        The partition's applied offset is left alone (the worker's fence stays valid). A worker
        that owns the partition still holds the series in memory; see docs/operations.md.
        """
        parts = (
            list(range(self.partitions))
            if self.partitions is not None
            else await self.known_partitions()
        )
        removed = 0
        for p in parts:
            removed += int(await self.client.hdel(self.store.keys(p)[1], series_id))
        return removed > 0


def _glob(text: str) -> str:
    """``text`` with Redis glob metacharacters escaped."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def redis_collaborators(
    redis: Any, topic: str = "events", partitions: int | None = None
) -> tuple[RedisWindows, Callable[[], Awaitable[bool]]]:
    """The window reader and the readiness ping of a :class:`stream.settings.RedisSettings`."""
    client = redis.client()

    async def ping() -> bool:
        return bool(await client.ping())

    return RedisWindows(client, redis.prefix, topic, partitions), ping


def read_window_sync(
    redis: Any, series_id: str, topic: str = "events", partitions: int | None = None
) -> Window | None:
    """Synchronous read of one series' window (for commands); Redis errors propagate."""

    async def run() -> Window | None:
        client = redis.client()
        try:
            return await RedisWindows(client, redis.prefix, topic, partitions)(series_id)
        finally:
            await client.aclose()

    return asyncio.run(run())


def delete_series_sync(
    redis: Any, series_id: str, topic: str = "events", partitions: int | None = None
) -> bool:
    """Synchronous :meth:`RedisWindows.delete` (for ``worker series delete``)."""

    async def run() -> bool:
        client = redis.client()
        try:
            return await RedisWindows(client, redis.prefix, topic, partitions).delete(series_id)
        finally:
            await client.aclose()

    return asyncio.run(run())


def run_server(app: FastAPI, settings: ServeSettings) -> None:
    """Serve ``app`` with uvicorn until SIGINT/SIGTERM (uvicorn drains in-flight requests)."""
    import uvicorn

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        access_log=False,
        # h11 enforces no body limit itself; read_body_limited does. Keep-alive short so idle
        # browser connections of the view do not pile up.
        timeout_keep_alive=5,
    )
    uvicorn.Server(config).run()


__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "ForecastHistory",
    "ModelHolder",
    "PredictInput",
    "RequestInvalid",
    "ServeSettings",
    "Window",
    "create_app",
    "forecast_objects",
    "parse_json_strict",
    "parse_timestamp",
    "run_server",
    "validate_predict",
]
