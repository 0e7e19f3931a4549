"""Settings of the deploy commands ``plot``, ``dlq replay``, ``series delete`` (``serve``'s are
:mod:`deploy.http.settings`).

Each field is one setting: its flag, its ``EVENTCAST_*`` variable and its YAML key
(:mod:`stream.config`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BeforeValidator, Field, model_validator
from pydantic_settings import CliPositionalArg

from model.errors import ConfigError
from stream.config import NonNegativeInt, PositiveInt, Settings, split_list
from stream.decode import Reason
from stream.settings import KafkaSettings, RedisSettings


class StoreSettings(Settings):
    """Where the worker keeps windows: its input topic and (optionally) its partition count."""

    input_topic: str = Field(
        "events", description="the worker's input topic (windows are stored per input partition)"
    )
    input_partitions: PositiveInt | None = Field(
        None, description="its partition count (default: discovered from the keys in Redis)"
    )

    def store_args(self) -> dict[str, object]:
        return {"topic": self.input_topic, "partitions": self.input_partitions}


class PlotSettings(KafkaSettings, StoreSettings, RedisSettings):
    """``worker plot``: one series' recent actuals and forecasts as a PNG."""

    series: str = Field(description="series id")
    out: Path = Field(description="PNG file to write")
    forecast_topic: str = "forecasts"
    scan: PositiveInt = Field(
        20_000, description="records read back from the end of the series' forecast partition"
    )


class DlqReplaySettings(KafkaSettings):
    """``worker dlq replay``: re-publish dead letters to the input topic."""

    dlq_topic: str = "events.dlq"
    input_topic: str = "events"
    reason: Annotated[list[Reason] | None, BeforeValidator(split_list)] = Field(
        None, description="only records with this error.reason (repeatable; default: all)"
    )
    from_offset: NonNegativeInt | None = Field(
        None, description="start at this offset in every partition (default: the beginning)"
    )
    dry_run: bool = Field(False, description="count, publish nothing")

    @model_validator(mode="after")
    def _check_replay(self) -> DlqReplaySettings:
        if self.dlq_topic == self.input_topic:
            raise ConfigError("--dlq-topic: must differ from --input-topic")
        return self


class SeriesDeleteSettings(StoreSettings, RedisSettings):
    """``worker series delete ID``: forget one series' window state."""

    series_id: CliPositionalArg[str] = Field(description="the series to delete")
