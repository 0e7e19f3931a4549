"""The model's configuration: one frozen, validated dataclass shared by trainer, worker and server.

``ModelConfig`` is what a model version's ``config.json`` holds, field for field (``to_dict``).
Everything that changes the shape of the network's input or output lives here, so a worker can
tell from the config alone whether a new version can replace the one it serves.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args

from model.errors import ConfigError
from model.seasonal import SeasonalSpec

Distribution = Literal["gaussian", "student_t"]
DISTRIBUTIONS: tuple[str, ...] = get_args(Distribution)

# Where and how a version is served (model.predictor; the --backend / --device flags).
Backend = Literal["auto", "torch", "torch-bf16", "torch-int8", "onnx", "onnx-int8"]
Device = Literal["auto", "cpu", "cuda"]
BACKENDS: tuple[str, ...] = get_args(Backend)
CPU_ONLY_BACKENDS: tuple[str, ...] = ("torch-bf16", "torch-int8")
DEVICES: tuple[str, ...] = get_args(Device)

# Values that fields added after the first release take when a *saved* config (a version's
# config.json, a checkpoint's hyperparameters) lacks them: the behaviour those versions were
# trained and exported with. New configs (the constructor, ``as_config``, the trainer's YAML and
# flags) use the dataclass defaults instead.
SAVED_CONFIG_DEFAULTS: dict[str, Any] = {
    "ar_skip": False,
    "interval_scale": 1.0,
    "tail_scale": 1.0,
    "calendar_year": False,
    "seasons": (),
    "season_alpha": 0.1,
    "season_gammas": (),
    "season_spacing_s": 0.0,
    "season_level": False,
}

# Lowest ``tail_scale``: the normal quantile ratio Z80 / Z95 = 0.65386 (model.network), rounded
# up. At or above it the 95 % interval never lies inside the 80 % one (a Student-t's ratio of
# quantiles is always larger than the normal's).
TAIL_SCALE_MIN = 0.6539

# Number of calendar channels: sin/cos of the time of day and of the week phase (``calendar``),
# and sin/cos of the year phase (``calendar_year``).
CALENDAR_CHANNELS = 4
YEAR_CHANNELS = 2


@dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters and input/output spec of an :class:`~model.network.EventForecaster`.

    Invalid values raise :class:`ConfigError` whose message names the field; ``features`` given as
    a list is stored as a tuple so the config stays hashable and comparable.
    """

    sequence_length: int = 48
    hidden_size: int = 256
    num_layers: int = 3
    dropout: float = 0.2
    attention_heads: int = 8
    learning_rate: float = 1e-3
    weight_decay: float = 1e-5
    batch_size: int = 32
    horizon: int = 1
    features: tuple[str, ...] = ()  # exogenous feature names, in channel order
    calendar: bool = True  # 4 channels: sin/cos of time of day and of day of week
    # 2 channels: sin/cos of the time of year. Lets the network tell the seasons apart (e.g. how
    # rough winter weather is beside summer's) once the training data spans most of a year.
    calendar_year: bool = False
    distribution: str = "gaussian"  # or "student_t"
    # Linear autoregressive skip: a Linear(T -> H) on the normalised value channel is added to the
    # location (initialised to persistence). False = the location is last value + head output.
    ar_skip: bool = True
    # Interval calibration (train/calibrate.py, fitted on the validation split after training;
    # 1.0 = uncalibrated), both applied in the graph: the predictive scale, hence ``std`` and both
    # intervals, is multiplied by ``interval_scale`` (fitted so the 80 % interval covers 80 %),
    # and the 95 % interval's half-width further by ``tail_scale`` (fitted so it covers 95 %: the
    # tails of real errors are rarely exactly those of the assumed distribution).
    interval_scale: float = 1.0
    tail_scale: float = 1.0
    # Seasonal memory (model/seasonal.py; issue 18, work in progress): the seasons in steps
    # (ascending; () = none, the plain network), the data's spacing in seconds, and the smoothing
    # coefficients fitted by the trainer for the horizon (level; one per season).
    seasons: tuple[int, ...] = ()
    season_alpha: float = 0.1
    season_gammas: tuple[float, ...] = ()
    season_spacing_s: float = 0.0
    # With seasons: one more input channel, the seasonal state's level (its own forecast of the
    # window less its seasons; model/features.py), read by the network's AR skip in the value
    # channel's units (without ``ar_skip`` nothing reads it). Saved hybrids from before it have no
    # such channel.
    season_level: bool = True

    def __post_init__(self) -> None:
        feats = self.features
        if isinstance(feats, str) or not isinstance(feats, (list, tuple)):
            raise ConfigError(f"features: expected a list of names, got {feats!r}")
        object.__setattr__(self, "features", tuple(feats))

        for name in ("sequence_length", "hidden_size", "num_layers", "attention_heads"):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("batch_size", self.batch_size, minimum=1)
        _check_int("horizon", self.horizon, minimum=1)
        if self.sequence_length < 2:
            # target_times needs two points for a spacing.
            raise ConfigError(f"sequence_length: must be >= 2, got {self.sequence_length}")
        _check_float("dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        _check_float("learning_rate", self.learning_rate, low=0.0, low_open=True)
        _check_float("weight_decay", self.weight_decay, low=0.0)
        if self.hidden_size % self.attention_heads != 0:
            raise ConfigError(
                f"attention_heads: hidden_size {self.hidden_size} is not divisible by "
                f"attention_heads {self.attention_heads}"
            )
        for name in ("calendar", "calendar_year", "season_level"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}: expected true or false, got {getattr(self, name)!r}")
        if not isinstance(self.ar_skip, bool):
            raise ConfigError(f"ar_skip: expected true or false, got {self.ar_skip!r}")
        _check_float("interval_scale", self.interval_scale, low=0.0, low_open=True)
        if self.interval_scale > 1e3:
            raise ConfigError(f"interval_scale: must be <= 1000, got {self.interval_scale}")
        object.__setattr__(self, "interval_scale", float(self.interval_scale))
        _check_float("tail_scale", self.tail_scale, low=TAIL_SCALE_MIN, high=1e3)
        object.__setattr__(self, "tail_scale", float(self.tail_scale))
        if self.distribution not in DISTRIBUTIONS:
            raise ConfigError(
                f"distribution: expected one of {', '.join(DISTRIBUTIONS)}, "
                f"got {self.distribution!r}"
            )
        for name in ("seasons", "season_gammas"):
            v = getattr(self, name)
            if isinstance(v, str) or not isinstance(v, (list, tuple)):
                raise ConfigError(f"{name}: expected a list, got {v!r}")
            object.__setattr__(self, name, tuple(v))
        if self.seasons:
            try:
                self.seasonal()
            except ValueError as e:
                raise ConfigError(f"seasons: {e}") from e
        elif self.season_gammas:
            raise ConfigError("season_gammas: given without seasons")
        seen: set[str] = set()
        for f in self.features:
            if not isinstance(f, str) or not f:
                raise ConfigError(f"features: names must be non-empty strings, got {f!r}")
            if f in seen:
                raise ConfigError(f"features: duplicate feature name {f!r}")
            seen.add(f)

    def seasonal(self) -> SeasonalSpec | None:
        """The seasonal state's spec, or None for a model without seasons (the plain path)."""
        if not self.seasons:
            return None
        return SeasonalSpec(
            tuple(self.seasons), float(self.season_spacing_s), float(self.season_alpha),
            tuple(float(g) for g in self.season_gammas),
        )  # fmt: skip

    @property
    def input_size(self) -> int:
        """Channels of the network input: value, calendar channels, exogenous features, and the
        seasonal state's level (:attr:`level_channel`)."""
        return 1 + self.calendar_channels + len(self.features) + self.level_channel

    @property
    def level_channel(self) -> bool:
        """Whether the input ends with the seasonal state's level: a model with seasons and
        ``season_level``."""
        return bool(self.seasons) and self.season_level

    @property
    def calendar_channels(self) -> int:
        """Calendar channels (4 for ``calendar``, 2 for ``calendar_year``), after the value."""
        return CALENDAR_CHANNELS * self.calendar + YEAR_CHANNELS * self.calendar_year

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with ``changes`` applied (validated; unknown names raise ConfigError)."""
        d = self.to_dict()
        d.update(changes)
        return ModelConfig.from_dict(d)

    # ---- serialisation -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field (``features`` as a list)."""
        d = asdict(self)
        for name in ("features", "seasons", "season_gammas"):
            d[name] = list(getattr(self, name))
        return d

    @classmethod
    def from_dict(cls, d: Any) -> ModelConfig:
        """Build from a *saved* mapping (``config.json``, checkpoint hyperparameters); unknown keys
        or bad values raise ConfigError naming the key.

        Keys missing from ``d`` take the dataclass defaults, except those of
        ``SAVED_CONFIG_DEFAULTS`` (fields added later), which take the value that reproduces what
        a config written before them meant: a version saved without ``ar_skip`` has no AR path.
        To build a *new* config from a partial mapping use :func:`as_config`.
        """
        if not isinstance(d, dict):
            raise ConfigError(f"model config: expected a mapping, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        for key in d:
            if key not in known:
                raise ConfigError(f"{key}: unknown model config key")
        d = {**SAVED_CONFIG_DEFAULTS, **d}
        try:
            return cls(**d)
        except TypeError as e:  # pragma: no cover - defensive, every field has a default
            raise ConfigError(f"model config: {e}") from e

    def to_json(self, path: Path | str) -> None:
        """Write the config as indented JSON to ``path``."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_json(cls, path: Path | str) -> ModelConfig:
        """Read a JSON file written by :meth:`to_json`; unreadable or invalid -> ConfigError."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"model config {path}: cannot read JSON ({e})") from e
        return cls.from_dict(data)

    @classmethod
    def from_yaml(cls, path: Path | str, *, section: str | None = None) -> ModelConfig:
        """Read a YAML file (optionally one top-level ``section`` of it, e.g. ``model``): a new
        config, so keys it leaves out take the dataclass defaults (``ar_skip`` on).

        Needs PyYAML (imported here, not at module import). Unreadable or invalid -> ConfigError.
        """
        import yaml  # local: model/ must import with only torch, numpy and safetensors

        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"model config {path}: cannot read YAML ({e})") from e
        if data is None:
            data = {}
        if section is not None:
            if not isinstance(data, dict) or section not in data:
                raise ConfigError(f"{section}: section missing from {path}")
            data = data[section] or {}
        if isinstance(data, dict):  # a hand-written file: missing keys take the new defaults
            data = {**cls().to_dict(), **data}
        return cls.from_dict(data)


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name}: must be >= {minimum}, got {value}")


def _check_float(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name}: expected a finite number, got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ConfigError(f"{name}: must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ConfigError(f"{name}: must be {'<' if high_open else '<='} {high}, got {value}")


def as_config(config: ModelConfig | dict[str, Any] | None = None, **overrides: Any) -> ModelConfig:
    """Normalise the ways callers pass a *new* config: an instance, a dict, or None (defaults),
    with keyword ``overrides`` applied on top. Keys missing from a dict take the dataclass
    defaults (``ar_skip=True``), unlike :meth:`ModelConfig.from_dict`, which reads saved configs.
    Invalid values raise ConfigError."""
    base: dict[str, Any] = ModelConfig().to_dict()
    if config is None:
        pass
    elif isinstance(config, ModelConfig):
        base = config.to_dict()
    elif isinstance(config, dict):
        base.update(config)
    else:
        raise ConfigError(
            f"config: expected ModelConfig, dict or None, got {type(config).__name__}"
        )
    base.update(overrides)
    return ModelConfig.from_dict(base)
