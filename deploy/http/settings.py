"""The settings of ``worker serve``: one field per setting (flag, ``EVENTCAST_*`` variable, YAML
key; :mod:`stream.config`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, model_validator
from pydantic_settings import CliSuppress

from deploy.settings import StoreSettings
from model.config import Backend, Device
from model.errors import ConfigError
from stream.config import NonNegativeInt, PositiveFloat, PositiveInt
from stream.settings import KafkaSettings, RedisSettings

DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB (docs/contract.md)
RELOAD_TOKEN_ENV = "EVENTCAST_RELOAD_TOKEN"


class ServeSettings(KafkaSettings, StoreSettings, RedisSettings):
    """Everything ``worker serve`` needs. Redis and Kafka are optional: without
    ``--redis-url`` there are no series routes, without ``--bootstrap-servers`` no live feed.
    ``reload_token`` comes only from ``EVENTCAST_RELOAD_TOKEN`` (never a flag: it would show in
    ``ps``); without it ``POST /reload`` is disabled."""

    model_dir: Path | None = Field(None, description="model directory (required)")
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    max_body_bytes: PositiveInt = Field(
        DEFAULT_MAX_BODY_BYTES, description="request body limit (413 above it)"
    )
    backend: Backend = "auto"
    device: Device = "auto"
    threads: PositiveInt | None = Field(None, description="inference threads")
    refresh_seconds: PositiveFloat = Field(5.0, description="live view refresh period")
    bootstrap_servers: str | None = Field(  # type: ignore[assignment]
        None, description="comma-separated HOST:PORT list (default: no live forecast feed)"
    )
    redis_url: str | None = Field(  # type: ignore[assignment]
        None, description="redis://[user:pass@]host:port/db (default: no series routes)"
    )
    forecast_topic: str = Field(
        "forecasts", description="read recent forecasts from this topic (with --bootstrap-servers)"
    )
    forecast_backfill: NonNegativeInt = Field(
        2000, description="records per partition read back from the end at start"
    )
    reload_token: CliSuppress[str | None] = Field(None, repr=False)
    title: CliSuppress[str] = "eventcast"

    @model_validator(mode="after")
    def _check_serve(self) -> ServeSettings:
        if not self.model_dir:
            raise ConfigError("--model-dir: required (or EVENTCAST_MODEL_DIR)")
        return self

    def redis_or_none(self) -> RedisSettings | None:
        return self.redis if self.redis_url else None

    def kafka_or_none(self) -> KafkaSettings | None:
        return self.kafka if self.bootstrap_servers else None
