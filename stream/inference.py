"""The predictor runner: model inputs from windows, inference off the event loop.

Feature building and the model call run in a worker thread (``asyncio.to_thread``): numpy,
onnxruntime and torch release the GIL, so Kafka heartbeats and fetches go on while the model works.
On ``--device cuda`` the registry's torch predictor keeps the model on the GPU and stages inputs
through pinned memory in batch buckets; nothing here changes with the device.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from model.features import build_inputs
from model.predictor import Forecast
from model.registry import LoadedModel
from stream.metrics import Metrics
from stream.windows import WindowBatch


def take_forecast(fc: Forecast, rows: slice | np.ndarray) -> Forecast:
    """The forecast of some rows (a slice, or an index array)."""
    return Forecast(
        fc.mean[rows], fc.std[rows],
        {k: v[rows] for k, v in fc.lower.items()}, {k: v[rows] for k, v in fc.upper.items()},
    )  # fmt: skip


def concat_forecasts(parts: list[Forecast], horizon: int) -> Forecast:
    """The rows of ``parts`` one after another."""
    if len(parts) == 1:
        return parts[0]
    if not parts:
        z = np.zeros((0, horizon), np.float32)
        return Forecast(z, z, {"80": z, "95": z}, {"80": z, "95": z})
    return Forecast(
        np.concatenate([f.mean for f in parts]),
        np.concatenate([f.std for f in parts]),
        {k: np.concatenate([f.lower[k] for f in parts]) for k in parts[0].lower},
        {k: np.concatenate([f.upper[k] for f in parts]) for k in parts[0].upper},
    )


class InferenceRunner:
    """Forecasts for :class:`WindowBatch` rows with the serving model; ``swap`` replaces it
    (between batches only: the caller guarantees no call is in flight)."""

    def __init__(self, model: LoadedModel, metrics: Metrics, cpu_chunk: int = 256) -> None:
        self.model = model
        self.metrics = metrics
        self.cpu_chunk = cpu_chunk

    @property
    def version(self) -> str:
        return self.model.version

    def swap(self, model: LoadedModel) -> None:
        self.model = model
        self.metrics.set_model(model.version, model.predictor.backend, model.predictor.device)

    def _run(self, model: LoadedModel, windows: WindowBatch) -> Forecast:
        seasonal = windows.seasonal  # a model with seasons: the window less its seasonal part
        values, level = windows.values, None
        if seasonal is not None:  # and the state's level beside them (NaN on the plain path)
            values, level = values - seasonal.past, seasonal.level
        x = build_inputs(windows.ts, values, windows.features, model.config, level)  # (B, T, C)
        p = model.predictor
        start = time.perf_counter()
        step = self.cpu_chunk if p.device == "cpu" else len(x)
        if len(x) <= step:
            fc = p.predict(x)
        else:
            parts = [p.predict(x[i : i + step]) for i in range(0, len(x), step)]
            fc = concat_forecasts(parts, model.config.horizon)
        self.metrics.inference.labels(p.backend).observe(time.perf_counter() - start)
        if seasonal is None:
            self.metrics.forecast_paths.labels("plain").inc(len(x))
            return fc
        seasonal_rows = int(seasonal.ready.sum())
        self.metrics.forecast_paths.labels("seasonal").inc(seasonal_rows)
        self.metrics.forecast_paths.labels("plain").inc(len(x) - seasonal_rows)
        return fc.shifted(seasonal.ahead)  # and their part of the next steps added back

    async def forecast(self, windows: WindowBatch) -> Forecast:
        """The model's forecast for every row (B may be 0). Raises InputError on bad windows."""
        model = self.model
        if len(windows) == 0:
            return concat_forecasts([], model.config.horizon)
        return await asyncio.to_thread(self._run, model, windows)
