"""The model ``worker serve`` serves, and forecasting one window with it.

:class:`ModelHolder` keeps the serving version and swaps it as a whole on reload (readers see the
old or the new one). :func:`predict_window` runs one validated window through it and builds the
same forecast object the worker publishes (:func:`stream.publisher.forecast_documents`).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from fastapi.concurrency import run_in_threadpool

from deploy.http.settings import ServeSettings
from deploy.http.state import Window
from model.config import ModelConfig
from model.features import build_inputs
from model.predictor import Forecast, Predictor

log = logging.getLogger(__name__)


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
class PredictInput:
    """A validated window: arrays of the model's sequence length."""

    series_id: str
    ts: np.ndarray  # (T,) float64 epoch seconds, strictly increasing
    values: np.ndarray  # (T,) float64, finite
    features: dict[str, np.ndarray]  # model feature name -> (T,) float64, finite


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

    @property
    def version(self) -> str | None:
        """The serving version, or None before a model is loaded."""
        return self.current.version if self.current is not None else None

    async def reload(self) -> tuple[str | None, LoadedModelLike]:
        """Load the current version again (off the event loop); return (old version, new model).

        A new version must keep the sequence length and features of the one serving (``expect``);
        on any failure the old model keeps serving and the error propagates.
        """
        async with self._reload_lock:
            old = self.current
            s = self.settings
            new = await run_in_threadpool(
                self.source.load,
                backend=s.backend,
                device=s.device,
                threads=s.threads,
                expect=old.config if old is not None else None,
            )
            self.current = new
            return (old.version if old is not None else None), new


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


def finite_forecast(obj: Mapping[str, Any]) -> bool:
    """True when every number of a forecast object is finite and every std > 0 (the JSON encoder
    writes NaN as null, so null counts as not finite)."""
    arrays = [obj["mean"], obj["std"], *obj["lower"].values(), *obj["upper"].values()]
    if not all(isinstance(v, int | float) and math.isfinite(v) for a in arrays for v in a):
        return False
    return all(s > 0 for s in obj["std"])


def predict_window(model: LoadedModelLike, inp: PredictInput) -> dict[str, Any]:
    """Run one window through the model (blocking: call it in a worker thread)."""
    x = build_inputs(
        inp.ts[None, :],
        inp.values[None, :],
        {k: v[None, :] for k, v in inp.features.items()},
        model.config,
    )  # (1, T, C)
    fc = model.predictor.predict(x)
    return forecast_objects([inp.series_id], inp.ts[None, :], fc, model.version)[0]


def forecast_stored_window(model: LoadedModelLike, window: Window) -> dict[str, Any] | None:
    """A forecast computed from a stored window (its newest ``sequence_length`` points), or None
    when the window is not full, lacks a model feature, or the forecast is not finite."""
    t = model.config.sequence_length
    if len(window.values) < t or any(f not in window.features for f in model.config.features):
        return None
    inp = PredictInput(
        window.series_id,
        np.asarray(window.ts[-t:], dtype=np.float64),
        np.asarray(window.values[-t:], dtype=np.float64),
        {f: np.asarray(window.features[f][-t:], dtype=np.float64) for f in model.config.features},
    )
    obj = predict_window(model, inp)
    return obj if finite_forecast(obj) else None
