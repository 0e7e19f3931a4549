"""The trainer's settings: one frozen object per process, built once from flags and YAML.

The YAML file given with ``--config`` is shaped like::

    model:       # ModelConfig fields (hidden_size, num_layers, horizon, distribution, ...)
    training:    # max_epochs, time_budget, seed, gradient_clip_val, accumulate_grad_batches, ...
    hardware:    # accelerator, devices, strategy, num_nodes, precision
    logging:     # logger, mlflow_tracking_uri, mlflow_experiment, wandb_project, run_dir
    data:        # data, features, test_fraction, val_fraction, season, since, until

The CLI layering (``stream.cliconfig``) already turns every scalar key that matches a flag into that
flag's default (flags and ``EVENTCAST_*`` variables win); :func:`settings_from_args` then checks
that no section holds a key nobody reads (a typo must not be silently ignored) and builds the
model config from the ``model:`` section plus the model flags.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from model.config import ModelConfig, as_config
from model.errors import ConfigError
from stream.decode import parse_timestamp
from stream.settings import KafkaSettings, parse_duration
from train.data import SplitSettings
from train.sources import DataSettings

PRECISIONS = ("64", "64-true", "32", "32-true", "16", "16-mixed", "bf16-mixed", "16-true",
              "bf16-true", "transformer-engine")  # fmt: skip
LOGGERS = ("tensorboard", "csv", "mlflow", "wandb", "none")
GRADIENT_CLIP_ALGORITHMS = ("norm", "value")
CALIBRATION_MODES = ("conformal", "widen", "off")  # what each does: train/calibrate.py
# Flags that set ModelConfig fields (None = not given on the command line or in YAML).
MODEL_FLAGS = ("horizon", "hidden_size", "num_layers", "learning_rate", "batch_size",
               "distribution", "dropout", "sequence_length", "calendar_year")  # fmt: skip
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


@dataclass(frozen=True)
class HardwareSettings:
    """Where and how Lightning runs: passed to ``Trainer`` as they are."""

    accelerator: str = "auto"
    devices: str | int | list[int] = "auto"
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "32-true"
    threads: int | None = None  # torch intra-op threads on the CPU (None: torch's default)

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads: must be >= 1, got {self.threads}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision: expected one of {', '.join(PRECISIONS)}")
        if self.num_nodes < 1:
            raise ConfigError(f"--num-nodes: must be >= 1, got {self.num_nodes}")
        if str(self.strategy).startswith("deepspeed"):
            try:
                import deepspeed  # noqa: F401
            except ImportError:
                raise ConfigError(
                    "--strategy: deepspeed is not installed (pip install deepspeed)"
                ) from None


@dataclass(frozen=True)
class TrainingSettings:
    """The training loop: epochs, time budget, clipping, accumulation, callbacks, tuning."""

    max_epochs: int = 100
    time_budget: dt.timedelta | None = None
    seed: int = 0
    gradient_clip_val: float | None = 1.0
    gradient_clip_algorithm: str = "norm"
    accumulate_grad_batches: int = 1
    patience: int = 10
    min_delta: float = 0.001
    train_windows_per_epoch: int | None = None
    num_workers: int = 0
    lr_find: bool = False
    scale_batch_size: bool = False
    plot_every_n_epochs: int = 5
    deterministic: bool = False
    calibration: str = "conformal"  # interval calibration mode (train/calibrate.py)

    def __post_init__(self) -> None:
        if self.max_epochs < 1:
            raise ConfigError(f"--max-epochs: must be >= 1, got {self.max_epochs}")
        if self.gradient_clip_algorithm not in GRADIENT_CLIP_ALGORITHMS:
            raise ConfigError("--gradient-clip-algorithm: expected norm or value")
        if self.accumulate_grad_batches < 1:
            raise ConfigError("--accumulate-grad-batches: must be >= 1")
        if self.patience < 1:
            raise ConfigError("--patience: must be >= 1")
        if self.train_windows_per_epoch is not None and self.train_windows_per_epoch < 1:
            raise ConfigError("--train-windows-per-epoch: must be >= 1")
        if self.num_workers < 0:
            raise ConfigError("--num-workers: must be >= 0")
        if self.calibration not in CALIBRATION_MODES:
            raise ConfigError(
                f"--calibration: expected one of {', '.join(CALIBRATION_MODES)}, "
                f"got {self.calibration!r}"
            )


@dataclass(frozen=True)
class LoggingSettings:
    """Experiment tracking: which loggers, where runs are kept, MLflow and W&B details."""

    loggers: tuple[str, ...] = ("tensorboard",)
    run_dir: Path = Path("runs")
    mlflow_tracking_uri: str | None = None
    mlflow_experiment: str = "eventcast"
    mlflow_model_name: str = "eventcast-forecaster"
    wandb_project: str = "eventcast"
    wandb_offline: bool = True

    def __post_init__(self) -> None:
        bad = [x for x in self.loggers if x not in LOGGERS]
        if bad:
            raise ConfigError(f"--logger: unknown {', '.join(bad)} (use {', '.join(LOGGERS)})")
        if "wandb" in self.loggers:
            import importlib.util

            if importlib.util.find_spec("wandb") is None:
                raise ConfigError(
                    "--logger: wandb requested but the wandb package is not installed "
                    "(pip install wandb)"
                )
        if "mlflow" in self.loggers and not self.mlflow_tracking_uri:
            raise ConfigError("--mlflow-tracking-uri: required with --logger mlflow")
        if self.mlflow_tracking_uri:
            import importlib.util

            # find_spec, not import: mlflow takes seconds to import and is used only at the end.
            if importlib.util.find_spec("mlflow") is None:
                raise ConfigError("--mlflow-tracking-uri: mlflow is not installed")


@dataclass(frozen=True)
class RetrainSettings:
    """Everything one ``worker retrain`` needs."""

    data: DataSettings
    model_dir: Path
    model: ModelConfig = field(default_factory=ModelConfig)
    hardware: HardwareSettings = field(default_factory=HardwareSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    split: SplitSettings = field(default_factory=SplitSettings)
    season: int | None = None
    force: bool = False
    every: dt.timedelta | None = None
    rounds: int | None = None  # with every: stop after this many rounds (None: until signalled)
    sweep: int = 0
    mmap_dir: Path | None = None
    # calendar_year neither set nor refused: decided by the data (train.retrain.year_channels).
    calendar_year_auto: bool = False


def _known_keys(parser_dests: set[str]) -> dict[str, set[str]]:
    model_keys = {f.name for f in fields(ModelConfig)}
    return {"model": model_keys | set(MODEL_FLAGS), "other": parser_dests}


def check_sections(config_data: Mapping[str, Any], parser_dests: set[str]) -> None:
    """ConfigError for a key of the trainer's own sections (``model``, ``training``,
    ``hardware``, ``logging``, ``data``) that neither a flag nor ModelConfig reads: a typo
    there must not be silently ignored. Other sections (a file shared with the worker) are
    left to their readers."""
    known = _known_keys(parser_dests)
    for key, value in config_data.items():
        if key not in SECTIONS or value is None:
            continue
        if not isinstance(value, Mapping):
            raise ConfigError(f"--config: section {key!r} must be a mapping")
        allowed = known["model"] if key == "model" else known["other"]
        for inner in value:
            if str(inner).replace("-", "_") not in allowed:
                raise ConfigError(f"--config: unknown setting {key}.{inner}")


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
            raise ConfigError(f"--devices: cannot read {raw!r}") from None
    return s


def _model_section(args: argparse.Namespace) -> dict[str, Any]:
    """The YAML ``model:`` section with the model flags that were given on top."""
    section = dict((getattr(args, "config_data", None) or {}).get("model") or {})
    section = {str(k).replace("-", "_"): v for k, v in section.items()}
    for name in MODEL_FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            section[name] = value
    return section


def calendar_year_is_auto(args: argparse.Namespace) -> bool:
    """True when neither the YAML (``calendar_year: auto`` or absent) nor ``--[no-]calendar-year``
    decides the year channels: :func:`train.retrain.year_channels` decides them from the data."""
    return _model_section(args).get("calendar_year", "auto") == "auto"


def model_config_from(args: argparse.Namespace, features: tuple[str, ...] | None) -> ModelConfig:
    """ModelConfig from the YAML ``model:`` section, then the model flags that were given, then
    ``features`` when not None. Invalid values raise ConfigError naming the field. An undecided
    ``calendar_year`` (see :func:`calendar_year_is_auto`) is False here."""
    section = _model_section(args)
    if section.get("calendar_year") == "auto":
        del section["calendar_year"]
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


def settings_from_args(
    args: argparse.Namespace, parser_dests: set[str], environ: Mapping[str, str] | None = None
) -> RetrainSettings:
    """Build and validate the trainer's settings from parsed ``worker retrain`` flags.

    ``environ`` (default ``os.environ``) is read only for MLflow's file-store opt-in."""
    environ = os.environ if environ is None else environ
    config_data = getattr(args, "config_data", None) or {}
    check_sections(config_data, parser_dests)

    # Features: --features wins ("auto", "none" or names); otherwise the model section's list.
    # The version's config lists the features the data actually gave, in column order.
    model = model_config_from(args, None)
    feats_flag = getattr(args, "features", None)
    data_features: tuple[str, ...] | str
    if isinstance(feats_flag, list | tuple):  # a YAML list reaches the flag as it is
        data_features = tuple(str(f) for f in feats_flag)
    elif feats_flag in (None, ""):
        data_features = model.features
    elif feats_flag == "auto":
        data_features = "auto"
    elif feats_flag == "none":
        data_features = ()
    else:
        data_features = tuple(f for f in str(feats_flag).replace(",", " ").split() if f)
    kafka = None
    if str(args.data or "").startswith("kafka://"):
        kafka = KafkaSettings.from_args(args)
    data = DataSettings(
        uri=str(args.data or ""),
        features=data_features,
        since=parse_time(getattr(args, "since", None), "--since"),
        until=parse_time(getattr(args, "until", None), "--until"),
        max_event_bytes=int(getattr(args, "max_event_bytes", 65536)),
        kafka=kafka,
    )
    loggers = tuple(x for x in str(args.logger or "tensorboard").replace(",", " ").split() if x)
    if args.mlflow_tracking_uri and "mlflow" not in loggers:
        loggers = (*loggers, "mlflow")
    if "none" in loggers:
        loggers = tuple(x for x in loggers if x == "mlflow")
    uri = args.mlflow_tracking_uri or None
    if uri and _is_file_store(uri) and environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":
        # MLflow 3 refuses its (maintenance-mode) file store unless the user opts in.
        raise ConfigError(
            f"--mlflow-tracking-uri: {uri} is an MLflow file store, which MLflow only opens with "
            "MLFLOW_ALLOW_FILE_STORE=true in the environment; or use sqlite:///PATH/mlflow.db"
        )
    sweep = int(args.sweep or 0)
    if sweep < 0:
        raise ConfigError(f"--sweep: must be >= 0, got {sweep}")
    rounds = getattr(args, "rounds", None)
    if rounds is not None and (int(rounds) < 1 or not args.every):
        raise ConfigError(f"--rounds: needs --every and a count >= 1, got {rounds}")
    return RetrainSettings(
        data=data,
        model_dir=Path(args.model_dir),
        model=model,
        hardware=HardwareSettings(
            accelerator=str(args.accelerator),
            devices=_devices(args.devices),
            strategy=str(args.strategy),
            num_nodes=int(args.num_nodes),
            precision=str(args.precision),
            threads=args.threads,
        ),
        training=TrainingSettings(
            max_epochs=int(args.max_epochs),
            time_budget=parse_duration(args.time_budget, "--time-budget"),
            seed=int(args.seed),
            gradient_clip_val=(
                None if args.gradient_clip_val in (None, 0, 0.0) else float(args.gradient_clip_val)
            ),
            gradient_clip_algorithm=str(args.gradient_clip_algorithm),
            accumulate_grad_batches=int(args.accumulate_grad_batches),
            patience=int(args.patience),
            min_delta=float(args.min_delta),
            train_windows_per_epoch=args.train_windows_per_epoch,
            num_workers=int(args.num_workers),
            lr_find=bool(args.lr_find),
            scale_batch_size=bool(args.scale_batch_size),
            plot_every_n_epochs=int(args.plot_every_n_epochs),
            deterministic=bool(args.deterministic),
            calibration=str(getattr(args, "calibration", None) or TrainingSettings.calibration),
        ),
        logging=LoggingSettings(
            loggers=loggers,
            run_dir=Path(args.run_dir),
            mlflow_tracking_uri=args.mlflow_tracking_uri or None,
            mlflow_experiment=str(args.mlflow_experiment),
            mlflow_model_name=str(args.mlflow_model_name),
            wandb_project=str(args.wandb_project),
        ),
        split=SplitSettings(
            test_fraction=float(args.test_fraction),
            val_fraction=float(args.val_fraction),
            max_gap_factor=float(args.max_gap_factor),
        ),
        season=args.season,
        force=bool(args.force),
        every=parse_duration(args.every, "--every"),
        rounds=int(rounds) if rounds is not None else None,
        sweep=sweep,
        mmap_dir=Path(args.mmap_dir) if args.mmap_dir else None,
        calendar_year_auto=calendar_year_is_auto(args),
    )
