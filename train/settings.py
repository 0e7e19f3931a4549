"""The trainer's settings: one frozen object per process, every setting one field.

Each field is a flag of ``worker retrain`` (or ``evaluate`` / ``predict``), an ``EVENTCAST_*``
variable and a YAML key (:mod:`stream.config`). The YAML file given with ``--config`` may group the
keys in sections::

    model:       # ModelConfig fields (hidden_size, num_layers, horizon, distribution, ...)
    training:    # max_epochs, time_budget, seed, gradient_clip_val, accumulate_grad_batches, ...
    hardware:    # accelerator, devices, strategy, num_nodes, precision
    logging:     # logger, mlflow_tracking_uri, mlflow_experiment, wandb_project, run_dir
    data:        # data, features, test_fraction, val_fraction, season, since, until

A key of these sections that no setting reads is refused (a typo must not be silently ignored),
and the ``model:`` section may hold any ModelConfig field: the model config is that section with
the model flags on top. The groups (``hardware``, ``training``, ``logging``, ``split``) are what
the Lightning code reads; ``RetrainSettings`` inherits them all.

This module stays light (no torch, no pandas): the CLI imports it to build its parsers.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, model_validator
from pydantic_settings import CliSuppress

from model.config import Distribution, ModelConfig, as_config
from model.errors import ConfigError
from stream.config import NonNegativeInt, OptionalDuration, PositiveInt, Settings, choices
from stream.decode import parse_timestamp
from stream.settings import KafkaSettings
from train.choices import CalibrationMode, GradientClipAlgorithm

Precision = Literal["64", "64-true", "32", "32-true", "16", "16-mixed", "bf16-mixed", "16-true",
                    "bf16-true", "transformer-engine"]  # fmt: skip
PRECISIONS = choices(Precision)
LOGGERS = ("tensorboard", "csv", "mlflow", "wandb", "none")
# Flags that set ModelConfig fields (None = not given on the command line or in YAML).
MODEL_FLAGS = ("horizon", "hidden_size", "num_layers", "learning_rate", "batch_size",
               "distribution", "dropout", "sequence_length", "calendar_year",
               "seasons")  # fmt: skip
SECTIONS = ("model", "training", "hardware", "logging", "data")


def parse_time(text: str | float | None, flag: str) -> float | None:
    """Epoch seconds from a number or an RFC 3339 string with offset; None stays None."""
    if text is None or text == "":
        return None
    try:
        return float(text)
    except (TypeError, ValueError):
        pass
    try:
        return parse_timestamp(str(text))
    except ValueError as exc:
        raise ConfigError(f"{flag}: {exc}") from exc


def _text(value: Any) -> Any:
    """A YAML list or number given for a text setting, as the text a flag would give."""
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return value if value is None or isinstance(value, str) else str(value)


def _devices(raw: Any) -> str | int | list[int]:
    if isinstance(raw, list):
        return [int(x) for x in raw]
    s = str(raw).strip()
    if s.isdigit() or (s.startswith("-") and s[1:].isdigit()):
        return int(s)
    if "," in s:
        try:
            return [int(x) for x in s.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"cannot read {raw!r}") from None
    return s


def _zero_is_none(value: Any) -> Any:
    return None if value in (0, 0.0, "0", "") else value


def _auto_is_none(value: Any) -> Any:
    return None if isinstance(value, str) and value.strip().lower() == "auto" else value


Text = Annotated[str | None, BeforeValidator(_text)]


class SplitSettings(Settings):
    """How each series is cut: the last ``test_fraction`` is test, the ``val_fraction`` before it
    validation; a spacing above ``max_gap_factor`` × the median spacing starts a new segment."""

    test_fraction: float = Field(0.2, description="held-out share at the end of each series")
    val_fraction: float = Field(0.1, description="validation share before the held-out part")
    max_gap_factor: float = Field(
        2.5, description="a spacing above this many median spacings is a gap"
    )

    @model_validator(mode="after")
    def _check_split(self) -> SplitSettings:
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"--test-fraction: must be in (0, 1), got {self.test_fraction}")
        if not 0.0 < self.val_fraction < 1.0 - self.test_fraction:
            raise ConfigError(
                f"--val-fraction: must be in (0, 1 - test_fraction), got {self.val_fraction}"
            )
        if not self.max_gap_factor > 1.0:
            raise ConfigError(f"--max-gap-factor: must be > 1, got {self.max_gap_factor}")
        return self

    @property
    def split(self) -> SplitSettings:
        return self.view(SplitSettings)


class HardwareSettings(Settings):
    """Where and how Lightning runs: passed to ``Trainer`` as they are."""

    accelerator: str = Field("auto", description="auto, cpu, gpu, cuda, mps, tpu")
    devices: Text = Field("auto", description="auto, N, or a list like 0,1")
    strategy: str = Field("auto", description="auto, ddp, ddp_spawn, deepspeed, fsdp")
    num_nodes: PositiveInt = 1
    precision: Annotated[Precision, BeforeValidator(_text)] = "32-true"
    threads: PositiveInt | None = Field(
        None, description="torch CPU threads (1 is fastest on a busy shared CPU)"
    )

    @property
    def lightning_devices(self) -> str | int | list[int]:
        """``devices`` as ``Trainer(devices=...)`` takes it: "auto", a count or a list."""
        return _devices(self.devices)

    @model_validator(mode="after")
    def _check_hardware(self) -> HardwareSettings:
        try:
            _ = self.lightning_devices
        except ValueError as exc:
            raise ConfigError(f"--devices: {exc}") from None
        if str(self.strategy).startswith("deepspeed"):
            try:
                import deepspeed  # noqa: F401
            except ImportError:
                raise ConfigError(
                    "--strategy: deepspeed is not installed (pip install deepspeed)"
                ) from None
        return self

    @property
    def hardware(self) -> HardwareSettings:
        return self.view(HardwareSettings)


class TrainingSettings(Settings):
    """The training loop: epochs, time budget, clipping, accumulation, callbacks, tuning."""

    max_epochs: PositiveInt = 100
    time_budget: OptionalDuration = Field(None, description="stop training after e.g. 10m")
    seed: int = 0
    gradient_clip_val: Annotated[float | None, BeforeValidator(_zero_is_none)] = Field(
        1.0, description="0: no clipping"
    )
    gradient_clip_algorithm: GradientClipAlgorithm = "norm"
    accumulate_grad_batches: PositiveInt = 1
    patience: PositiveInt = Field(10, description="early stopping patience (epochs)")
    min_delta: float = 0.001
    train_windows_per_epoch: PositiveInt | None = None
    num_workers: NonNegativeInt = Field(0, description="DataLoader worker processes")
    lr_find: bool = Field(False, description="Lightning's learning-rate finder")
    scale_batch_size: bool = Field(False, description="Lightning's batch-size finder")
    plot_every_n_epochs: int = 5
    deterministic: bool = False
    calibration: CalibrationMode = Field(
        "conformal",
        description="interval calibration on the validation split: conformal (one factor per "
        "level), widen (the same, only ever widening), off",
    )

    @property
    def max_time(self) -> dt.timedelta | None:
        """``time_budget`` as Lightning's ``Trainer(max_time=...)`` takes it."""
        return None if self.time_budget is None else dt.timedelta(seconds=self.time_budget)

    @property
    def training(self) -> TrainingSettings:
        return self.view(TrainingSettings)


class LoggingSettings(Settings):
    """Experiment tracking: which loggers, where runs are kept, MLflow and W&B details."""

    logger: Text = Field(
        "tensorboard", description="comma-separated: tensorboard, csv, mlflow, wandb, none"
    )
    run_dir: Path = Field(Path("runs"), description="where runs keep logs and checkpoints")
    mlflow_tracking_uri: str | None = Field(
        None, description="e.g. sqlite:///mlflow.db or file:///path/mlruns"
    )
    mlflow_experiment: str = "eventcast"
    mlflow_model_name: str = "eventcast-forecaster"
    wandb_project: str = "eventcast"
    wandb_offline: CliSuppress[bool] = True

    @property
    def loggers(self) -> tuple[str, ...]:
        """The loggers to run: ``--logger``'s list, plus mlflow when a tracking URI is given;
        ``none`` leaves only mlflow (the registry of record when asked for)."""
        names = tuple(x for x in str(self.logger or "tensorboard").replace(",", " ").split() if x)
        if self.mlflow_tracking_uri and "mlflow" not in names:
            names = (*names, "mlflow")
        if "none" in names:
            names = tuple(x for x in names if x == "mlflow")
        return names

    @model_validator(mode="after")
    def _check_logging(self) -> LoggingSettings:
        import importlib.util

        requested = str(self.logger or "").replace(",", " ").split()
        bad = [x for x in requested if x not in LOGGERS]
        if bad:
            raise ConfigError(f"--logger: unknown {', '.join(bad)} (use {', '.join(LOGGERS)})")
        # find_spec, not import: mlflow and wandb take seconds to import.
        if "wandb" in self.loggers and importlib.util.find_spec("wandb") is None:
            raise ConfigError(
                "--logger: wandb requested but the wandb package is not installed "
                "(pip install wandb)"
            )
        if "mlflow" in self.loggers and not self.mlflow_tracking_uri:
            raise ConfigError("--mlflow-tracking-uri: required with --logger mlflow")
        if self.mlflow_tracking_uri and importlib.util.find_spec("mlflow") is None:
            raise ConfigError("--mlflow-tracking-uri: mlflow is not installed")
        return self

    @property
    def logging(self) -> LoggingSettings:
        return self.view(LoggingSettings)


class DataOptions(SplitSettings, KafkaSettings):
    """Where the trainer's data comes from (``--data``) and how each series is split."""

    data: Text = Field(
        None,
        description="CSV/Parquet file (series_id, ts, value [, features]), kafka://TOPIC, "
        "synthetic://N, dataset://NAME (bundled real data) or an array-store folder",
    )
    features: Text = Field(
        None, description="feature columns: names (comma-separated), 'auto' or 'none'"
    )
    season: int | None = Field(
        None,
        description="seasonal naive season in steps (default: one day; a week for daily data, "
        "a year for weekly or monthly data)",
    )
    since: Text = Field(None, description="kafka:// replay: first broker timestamp")
    until: Text = Field(None, description="kafka:// replay: last broker timestamp")
    max_event_bytes: PositiveInt = 65536

    def source(self, features: Any = ()) -> Any:
        """:class:`train.sources.DataSettings` of ``--data`` (``features``: what to read)."""
        from train.sources import DataSettings

        uri = str(self.data or "")
        if not uri:
            raise ConfigError("--data: required")
        return DataSettings(
            uri=uri,
            features=features,
            since=parse_time(self.since, "--since"),
            until=parse_time(self.until, "--until"),
            max_event_bytes=self.max_event_bytes,
            kafka=self.kafka if uri.startswith("kafka://") else None,
        )


class RetrainSettings(LoggingSettings, HardwareSettings, TrainingSettings, DataOptions):
    """Everything one ``worker retrain`` needs (the YAML sections model/training/hardware/
    logging/data hold the same keys; ``model:`` may also hold any ModelConfig field)."""

    config_document: CliSuppress[dict[str, Any]] = Field(default_factory=dict)
    model_dir: Path | None = Field(None, description="model directory (versions + CURRENT)")
    force: bool = Field(False, description="promote even if not better")
    every: OptionalDuration = Field(None, description="retrain on a schedule, e.g. 1h")
    rounds: PositiveInt | None = Field(
        None, description="with --every: stop after N rounds (default: until SIGTERM)"
    )
    sweep: NonNegativeInt = Field(0, description="Optuna trials; the best one is kept")
    mmap_dir: Path | None = Field(None, description="keep training arrays here, memory-mapped")
    # The model (None: from the YAML model: section, else ModelConfig's default).
    horizon: int | None = None
    sequence_length: int | None = None
    hidden_size: int | None = None
    num_layers: int | None = None
    dropout: float | None = None
    learning_rate: float | None = None
    batch_size: int | None = None
    distribution: Distribution | None = None
    calendar_year: Annotated[bool | None, BeforeValidator(_auto_is_none)] = Field(
        None,
        description="sin/cos of the year phase as inputs (default auto: on when the data span "
        "52 weeks or more)",
    )

    seasons: Text = Field(
        None,
        description="per-series seasonal memory, the hybrid (model/seasonal.py): auto (the "
        "data's seasons from its spacing, e.g. a day and a week for half-hourly data), none, or "
        "steps, e.g. 48,336; the smoothing coefficients are fitted on the training split "
        "(default: none)",
    )

    @model_validator(mode="after")
    def _check_retrain(self) -> RetrainSettings:
        check_sections(self.config_document, set(type(self).model_fields))
        if self.rounds is not None and self.every is None:
            raise ConfigError(f"--rounds: needs --every and a count >= 1, got {self.rounds}")
        model_config_from(self, None)  # a bad model section fails here, naming the field
        return self

    @property
    def model(self) -> ModelConfig:
        """The model config: the YAML ``model:`` section, then the model flags."""
        return model_config_from(self, None)

    @property
    def calendar_year_auto(self) -> bool:
        """Neither the YAML nor ``--[no-]calendar-year`` decides the year channels:
        :func:`train.retrain.year_channels` decides them from the data."""
        return calendar_year_is_auto(self)

    @property
    def data_features(self) -> tuple[str, ...] | str:
        """What to read from the data: ``--features`` ("auto", "none" or names), else the model
        section's list. The version's config lists the features the data actually gave."""
        flag = self.features
        if flag in (None, ""):
            return self.model.features
        if flag == "auto":
            return "auto"
        if flag == "none":
            return ()
        return tuple(f for f in str(flag).replace(",", " ").split() if f)

    @property
    def data_source(self) -> Any:
        return self.source(self.data_features)


def _known_keys(setting_names: set[str]) -> dict[str, set[str]]:
    model_keys = {f.name for f in fields(ModelConfig)}
    return {"model": model_keys | set(MODEL_FLAGS), "other": setting_names}


def check_sections(config_data: Mapping[str, Any], setting_names: set[str]) -> None:
    """ConfigError for a key of the trainer's own sections (``model``, ``training``,
    ``hardware``, ``logging``, ``data``) that neither a setting nor ModelConfig reads: a typo
    there must not be silently ignored. Other sections (a file shared with the worker) are
    left to their readers."""
    known = _known_keys(setting_names)
    for key, value in config_data.items():
        if key not in SECTIONS or value is None:
            continue
        if not isinstance(value, Mapping):
            raise ConfigError(f"--config: section {key!r} must be a mapping")
        allowed = known["model"] if key == "model" else known["other"]
        for inner in value:
            if str(inner).replace("-", "_") not in allowed:
                raise ConfigError(f"--config: unknown setting {key}.{inner}")


def _model_section(settings: RetrainSettings) -> dict[str, Any]:
    """The YAML ``model:`` section with the model flags that were given on top."""
    section = dict(settings.config_document.get("model") or {})
    section = {str(k).replace("-", "_"): v for k, v in section.items()}
    for name in MODEL_FLAGS:
        value = getattr(settings, name, None)
        if value is not None:
            section[name] = value
    return section


def calendar_year_is_auto(settings: RetrainSettings) -> bool:
    """True when neither the YAML (``calendar_year: auto`` or absent) nor ``--[no-]calendar-year``
    decides the year channels."""
    return _model_section(settings).get("calendar_year", "auto") == "auto"


def seasons_request(settings: RetrainSettings) -> str | tuple[int, ...]:
    """What ``--seasons`` (or the YAML ``model: seasons:``) asks: ``"auto"``, or the seasons in
    steps (``()``: none, the default). :func:`train.seasons.seasonal_config` resolves it against
    the data and fits the coefficients."""
    raw = _model_section(settings).get("seasons")
    if raw is None:
        return ()
    if isinstance(raw, str):
        text = raw.strip().lower()
        if text == "auto":
            return "auto"
        if text in ("", "none"):
            return ()
        raw = text.replace(",", " ").split()
    try:
        steps = tuple(int(v) for v in raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"--seasons: auto, none or steps like 48,336, got {raw!r}") from exc
    if list(steps) != sorted(set(steps)) or not all(v >= 2 for v in steps):
        raise ConfigError(f"--seasons: ascending distinct steps >= 2, got {list(steps)}")
    return steps


def model_config_from(settings: RetrainSettings, features: tuple[str, ...] | None) -> ModelConfig:
    """ModelConfig from the YAML ``model:`` section, then the model flags that were given, then
    ``features`` when not None. Invalid values raise ConfigError naming the field. An undecided
    ``calendar_year`` (see :func:`calendar_year_is_auto`) is False here; so are the seasons
    (resolved against the data by :func:`train.seasons.seasonal_config`) unless the section
    gives their coefficients too (a saved version's config)."""
    section = _model_section(settings)
    if section.get("calendar_year") == "auto":
        del section["calendar_year"]
    if not section.get("season_gammas"):  # a request, resolved with the data
        seasons_request(settings)  # a bad request fails here, naming the flag
        section.pop("seasons", None)
    if features is not None:
        section["features"] = list(features)
    if isinstance(section.get("features"), str):
        section["features"] = [f for f in section["features"].replace(",", " ").split() if f]
    # as_config, not from_dict: keys the YAML leaves out take the defaults of a *new* model
    # (ar_skip on), not the values that mean "saved before the field existed".
    return as_config(section)


def _is_file_store(uri: str) -> bool:
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    return scheme in ("", "file")


def check_environment(
    settings: RetrainSettings, environ: Mapping[str, str] | None = None
) -> RetrainSettings:
    """``settings``, after the checks that read the environment (default ``os.environ``): MLflow 3
    refuses its (maintenance-mode) file store unless ``MLFLOW_ALLOW_FILE_STORE=true``."""
    environ = os.environ if environ is None else environ
    uri = settings.mlflow_tracking_uri
    if uri and _is_file_store(uri) and environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":
        raise ConfigError(
            f"--mlflow-tracking-uri: {uri} is an MLflow file store, which MLflow only opens with "
            "MLFLOW_ALLOW_FILE_STORE=true in the environment; or use sqlite:///PATH/mlflow.db"
        )
    return settings
