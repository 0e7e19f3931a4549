"""The bodies of ``POST /predict``: :class:`PredictRequest`, the request model that validates a
window itself, and :class:`ForecastResponse`, the answer (both also document the OpenAPI spec).

A body is parsed as standard JSON (orjson: ``NaN``, ``Infinity`` and numbers beyond float range
are not JSON) and validated against the serving model's config, passed as the validation
context: lengths equal to its sequence length, finite numbers within float32, times that parse
and strictly increase, every model feature present. Every problem becomes one 422 entry
``{"loc", "msg", "type"}``.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import numpy as np
import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    model_validator,
)

from deploy.http.errors import RequestInvalid
from deploy.http.serving import PredictInput
from model.config import ModelConfig
from stream.decode import parse_timestamp

MAX_SERIES_ID_CHARS = 256
# The network computes in float32: larger magnitudes become inf on the way in.
FLOAT32_MAX = float(np.finfo(np.float32).max)
# Errors reported per request: enough to fix a body, bounded so a huge bad body stays cheap.
MAX_ERRORS = 20


# --- field types ---------------------------------------------------------------------------------


class Broken(ValueError):
    """A rule of the window is broken; ``kind`` becomes the 422 entry's ``type`` and the message its
    ``msg`` (pydantic keeps the exception in the error's context)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _kind(v: Any) -> str:
    return "null" if v is None else "a boolean" if isinstance(v, bool) else type(v).__name__


def _number(v: Any) -> float:
    """A JSON number the model can take: not a boolean, finite, within float32."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise Broken("float", f"expected a number, got {_kind(v)}")
    try:
        f = float(v)
    except OverflowError:  # an integer beyond float range
        f = math.inf
    else:
        if not math.isfinite(f):
            raise Broken("non_finite", "NaN and ±inf are not allowed")
    if abs(f) > FLOAT32_MAX:
        shown = repr(f) if math.isfinite(f) else "an integer beyond float range"
        raise Broken("out_of_range", f"{shown} is outside the float32 range the model computes in")
    return f


def _timestamp(v: Any) -> float:
    """Epoch seconds from a number or an RFC 3339 string with an offset (stream.decode's rule)."""
    try:
        return parse_timestamp(v)
    except (ValueError, OverflowError) as exc:
        raise Broken("timestamp", str(exc)) from None


def _config(info: ValidationInfo) -> ModelConfig | None:
    """The serving model's config, from the validation context (None: no length/feature rules)."""
    ctx = info.context
    return ctx.get("config") if isinstance(ctx, dict) else None


def _window_length(what: str) -> BeforeValidator:
    """A list must hold exactly the model's sequence length of ``what`` (checked before its
    items, so a wrong length is one error, not one per item)."""

    def check(value: Any, info: ValidationInfo) -> Any:
        config = _config(info)
        if config is not None and isinstance(value, list):
            t = config.sequence_length
            if len(value) != t:
                raise Broken(
                    "length",
                    f"expected exactly {t} {what} (the model's sequence length), got {len(value)}",
                )
        return value

    return BeforeValidator(check)


def _increasing(ts: list[float]) -> list[float]:
    for i in range(1, len(ts)):
        if ts[i] <= ts[i - 1]:
            error = Broken(
                "order",
                f"timestamps must be strictly increasing: ts[{i}] = {ts[i]!r} is not after "
                f"ts[{i - 1}] = {ts[i - 1]!r}",
            )
            # Raised as a ValidationError so that the entry names the index: ("ts", i).
            raise ValidationError.from_exception_data(
                "ts",
                [{"type": "value_error", "loc": (i,), "input": ts[i], "ctx": {"error": error}}],
            )
    return ts


class _MissingFeature:
    """Stands for a model feature the body lacks, so its error is reported at its own loc."""

    def __init__(self, name: str) -> None:
        self.name = name


def _feature_column(value: Any) -> Any:
    if isinstance(value, _MissingFeature):
        raise Broken(
            "missing_feature", f"missing feature {value.name!r} the model was trained with"
        )
    return value


def _model_features(value: Any, info: ValidationInfo) -> Any:
    """Keep exactly the model's features (others are ignored, missing ones are errors)."""
    config = _config(info)
    if config is None or not (value is None or isinstance(value, dict)):
        return value
    given = value or {}
    return {name: given.get(name, _MissingFeature(name)) for name in config.features}


Number = Annotated[
    float,
    BeforeValidator(_number),
    WithJsonSchema({"type": "number", "description": "finite, within float32"}),
]
Timestamp = Annotated[
    float,
    BeforeValidator(_timestamp),
    WithJsonSchema(
        {
            "anyOf": [{"type": "number"}, {"type": "string", "format": "date-time"}],
            "description": "epoch seconds, or RFC 3339 with an offset or Z",
        }
    ),
]
Column = Annotated[list[Number], _window_length("numbers")]
Times = Annotated[list[Timestamp], _window_length("timestamps"), AfterValidator(_increasing)]


class PredictRequest(BaseModel):
    """``POST /predict`` body: one window of the serving model's sequence length."""

    # Lengths and features follow the serving model: validate with
    # ``context={"config": <its ModelConfig>}`` (:func:`validate_predict` does).
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    series_id: str = Field(min_length=1, max_length=MAX_SERIES_ID_CHARS, examples=["sensor-17"])
    ts: Times = Field(
        description="sequence_length timestamps, oldest first, strictly increasing: epoch "
        "seconds or RFC 3339 strings with an offset or Z",
    )
    values: Column = Field(description="sequence_length finite numbers")
    features: Annotated[
        dict[str, Annotated[Column, BeforeValidator(_feature_column)]] | None,
        BeforeValidator(_model_features),
    ] = Field(
        default=None,
        validate_default=True,  # a model feature is required even when ``features`` is absent
        description="name → sequence_length finite numbers, for every model feature",
    )

    @model_validator(mode="before")
    @classmethod
    def _json_object(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise Broken("dict_type", f"expected a JSON object, got {_kind(data)}")
        return data

    def to_input(self) -> PredictInput:
        """The window as float64 arrays."""
        return PredictInput(
            self.series_id,
            np.asarray(self.ts, dtype=np.float64),
            np.asarray(self.values, dtype=np.float64),
            {k: np.asarray(v, dtype=np.float64) for k, v in (self.features or {}).items()},
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


# --- parsing and validation ----------------------------------------------------------------------


def parse_json_strict(body: bytes) -> Any:
    """Parse a JSON body; raise :class:`RequestInvalid` when it is not standard JSON (orjson
    refuses ``NaN``, ``Infinity`` and other non-standard constants) or not UTF-8."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RequestInvalid(
            [{"loc": ["body"], "msg": f"body is not valid JSON: {exc}", "type": "json_invalid"}]
        ) from exc


def validate_predict(obj: Any, config: ModelConfig) -> PredictInput:
    """Validate a parsed body against the serving model's ``config`` (:class:`PredictRequest`).

    Promises: on success every array has ``config.sequence_length`` finite float64 entries
    within float32 range, ``ts`` is strictly increasing, and every feature of ``config.features``
    is present (other features are dropped). Otherwise raises :class:`RequestInvalid` naming
    each problem (at most ``MAX_ERRORS``) — never anything else, whatever ``obj`` is.
    """
    try:
        request = PredictRequest.model_validate(obj, context={"config": config})
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)[:MAX_ERRORS]
        raise RequestInvalid([_entry(e) for e in errors]) from None
    return request.to_input()


def _entry(error: Any) -> dict[str, Any]:
    """A pydantic error as a 422 entry: our own rules keep their type and message as raised."""
    broken = error.get("ctx", {}).get("error")
    if isinstance(broken, Broken):
        return {"loc": ["body", *error["loc"]], "msg": str(broken), "type": broken.kind}
    return {"loc": ["body", *error["loc"]], "msg": error["msg"], "type": error["type"]}
