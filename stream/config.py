"""One declaration per setting: every ``worker`` setting is one pydantic field, and
pydantic-settings turns it into its flag, its ``EVENTCAST_*`` variable and its YAML key.

A setting is declared once, as a field of a :class:`Settings` class: its name (``max_batch``), type,
default, constraint and help text. From that one declaration:

- the command line: ``--max-batch`` (pydantic-settings' ``CliSettingsSource`` adds the field to the
  command's argparse parser, kebab-cased; booleans get ``--x`` / ``--no-x``);
- the environment: ``EVENTCAST_MAX_BATCH`` (pydantic-settings' ``EnvSettingsSource``);
- the YAML file of ``--config`` (or ``EVENTCAST_CONFIG``): the key ``max-batch`` or ``max_batch``,
  at the top level or inside one level of sections (``worker:``, ``training:``, ...), so one file
  can serve several commands;
- validation: pydantic, with the few cross-field rules as model validators.

Precedence, highest first: the command line, the environment, the YAML file, the default.

A bad value raises :class:`~model.errors.ConfigError` naming where it came from (``--max-batch``,
``EVENTCAST_MAX_BATCH`` or ``--config key max_batch``) and what is wrong; the CLI turns it into exit
code 2. Related settings are grouped in small classes (``KafkaSettings``, ``BatchSettings``...)
that a command's settings class inherits, so a command's flags are the union of its groups' fields;
``Settings.view(Group)`` hands a group to the code that needs only that part.
"""

from __future__ import annotations

import argparse
import contextvars
import datetime as dt
import re
import typing
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal, TypeVar, get_args

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, ValidationError
from pydantic_core import core_schema
from pydantic_settings import CliSettingsSource, EnvSettingsSource

from model.errors import ConfigError

ENV_PREFIX = "EVENTCAST_"
S = TypeVar("S", bound="Settings")

# Where each value being validated came from (field name -> "--flag", "EVENTCAST_X" or
# "--config key x"), so an error can name the source the user has to fix.
_SOURCES: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar(
    "_SOURCES", default=None
)


def flag(name: str) -> str:
    """``max_batch`` -> ``--max-batch``."""
    return "--" + name.replace("_", "-")


def choices(literal: Any) -> tuple[str, ...]:
    """The values of a ``Literal[...]`` type: each choice list is defined once, as a type."""
    return tuple(get_args(literal))


# ---- value types: the constraints shared by many settings ---------------------------------------


def _positive(value: Any) -> Any:
    if value is not None and value <= 0:
        raise ValueError(f"must be > 0, got {value}")
    return value


def _non_negative(value: Any) -> Any:
    if value is not None and value < 0:
        raise ValueError(f"must be >= 0, got {value}")
    return value


def _upper(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)", re.IGNORECASE)
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def duration_seconds(text: Any) -> float | None:
    """``"10m"``, ``"1h30m"``, ``"90s"``, ``"250ms"``, ``"2d"``, ``"HH:MM:SS"``, a timedelta or
    plain seconds -> seconds; None or "" -> None. ValueError for anything else or <= 0."""
    if text is None or text == "":
        return None
    if isinstance(text, dt.timedelta):
        seconds = text.total_seconds()
    elif isinstance(text, int | float) and not isinstance(text, bool):
        seconds = float(text)
    else:
        seconds = _parse_duration_text(str(text).strip())
    if not seconds > 0:
        raise ValueError(f"must be a positive duration, got {text!r}")
    return seconds


def _parse_duration_text(s: str) -> float:
    try:
        return float(s)
    except ValueError:
        pass
    if ":" in s:
        try:
            seconds = 0.0
            for part in s.split(":"):
                seconds = seconds * 60 + float(part)
            return seconds
        except ValueError:
            raise ValueError(f"cannot read duration {s!r}") from None
    pos, seconds = 0, 0.0
    for m in _DURATION.finditer(s):
        if s[pos : m.start()].strip():
            break
        seconds += float(m.group(1)) * _UNIT_SECONDS[m.group(2).lower()]
        pos = m.end()
    if pos == 0 or s[pos:].strip():
        raise ValueError(f"cannot read duration {s!r} (e.g. 90s, 10m, 1h30m)")
    return seconds


def _required_duration(text: Any) -> float:
    seconds = duration_seconds(text)
    if seconds is None:
        raise ValueError("a duration is required (e.g. 90s, 5m)")
    return seconds


def split_list(value: Any) -> Any:
    """``"a,b c"`` (an environment variable) -> ``["a", "b", "c"]``; lists pass through."""
    if isinstance(value, str):
        return [part for part in value.replace(",", " ").split() if part]
    return value


PositiveInt = Annotated[int, AfterValidator(_positive)]
PositiveFloat = Annotated[float, AfterValidator(_positive)]
NonNegativeInt = Annotated[int, AfterValidator(_non_negative)]
NonNegativeFloat = Annotated[float, AfterValidator(_non_negative)]
Upper = BeforeValidator(_upper)


class Duration(float):
    """Seconds (a float), written as a duration: ``90s``, ``5m``, ``1h30m``, ``250ms`` or a number
    of seconds. A type of its own so that ``--help`` shows ``Duration``, not ``float``."""

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        return core_schema.no_info_before_validator_function(
            _required_duration, core_schema.float_schema()
        )


OptionalDuration = Annotated[Duration | None, BeforeValidator(duration_seconds)]
# A list that an environment variable gives as "a,b" or "a b".
StrList = Annotated[list[str], BeforeValidator(split_list)]


# ---- the base class -----------------------------------------------------------------------------


class Settings(BaseModel):
    """Base of every settings class: frozen, unknown keys refused, a bad value -> ConfigError."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise config_error(exc, type(self)) from None

    def view(self, group: type[S]) -> S:
        """This object's settings of ``group`` (a class it inherits) as a ``group`` object."""
        return group(**{name: getattr(self, name) for name in group.model_fields})


def field_choices(cls: type[BaseModel], name: str) -> tuple[str, ...]:
    """The allowed values of a field typed with a ``Literal`` (empty for any other field)."""
    field = cls.model_fields.get(name)
    if field is None:
        return ()
    found: list[str] = []

    def walk(tp: Any) -> None:
        if typing.get_origin(tp) is Literal:
            found.extend(str(a) for a in get_args(tp))
        for arg in get_args(tp):
            walk(arg)

    walk(field.annotation)
    return tuple(found)


def _reason(error: Mapping[str, Any], cls: type[BaseModel], name: str) -> str:
    """The human reason of one pydantic error, worded as the CLI always worded it."""
    kind, raw = error["type"], error.get("input")
    if kind == "literal_error":
        return f"{raw!r} is not one of {sorted(field_choices(cls, name))}"
    if kind == "bool_parsing":
        return f"expected a boolean, got {raw!r}"
    if kind in ("int_parsing", "float_parsing", "int_from_float", "int_type", "float_type"):
        convert: Callable[[Any], Any] = int if kind.startswith("int") else float
        try:
            convert(raw)
            detail = error["msg"]
        except (TypeError, ValueError) as exc:
            detail = str(exc)
        return f"invalid value {raw!r}: {detail}"
    message = str(error["msg"])
    return message.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def config_error(exc: ValidationError, cls: type[BaseModel]) -> ConfigError:
    """A ConfigError naming the first bad setting's source (flag, variable or YAML key)."""
    error = exc.errors()[0]
    loc = [str(part) for part in error["loc"]]
    if not loc:  # a model-level rule (model_validator) that raised ValueError
        return ConfigError(_reason(error, cls, ""))
    name = loc[0]
    source = (_SOURCES.get() or {}).get(name, flag(name))
    if error["type"] == "missing":
        return ConfigError(f"{source}: required")
    return ConfigError(f"{source}: {_reason(error, cls, name)}")


# ---- sources: YAML file, environment, command line ----------------------------------------------


def load_yaml(path: str) -> dict[str, Any]:
    """The mapping of a YAML settings file; ConfigError when unreadable or not a mapping."""
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config: {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path} must hold a mapping at the top level")
    return data


def _flat_yaml(document: Mapping[str, Any]) -> dict[str, Any]:
    """Top-level keys, then keys of one level of sections (a top-level key wins), by field name."""
    flat: dict[str, Any] = {}
    for value in document.values():
        if isinstance(value, Mapping):
            for inner, inner_value in value.items():
                if not isinstance(inner_value, Mapping):
                    flat.setdefault(str(inner).replace("-", "_"), inner_value)
    for key, value in document.items():
        if not isinstance(value, Mapping):
            flat[str(key).replace("-", "_")] = value
    return flat


class _Environment(EnvSettingsSource):
    """pydantic-settings' environment source over a given mapping (tests pass their own)."""

    def __init__(self, settings_cls: type[BaseModel], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls, case_sensitive=False, env_prefix=ENV_PREFIX)  # type: ignore[arg-type]

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {name.lower(): value for name, value in self._environ.items()}


CLI_OPTIONS: dict[str, Any] = {
    "cli_kebab_case": True,  # --max-batch, not --max_batch
    "cli_implicit_flags": True,  # a bool is --x / --no-x, not --x true
    "cli_hide_none_type": True,
    "cli_avoid_json": True,
    "cli_exit_on_error": True,  # argparse's own usage error, exit 2
}


def add_settings_arguments(parser: argparse.ArgumentParser, settings_cls: type[Settings]) -> None:
    """Give ``parser`` ``--config FILE`` and one flag per field of ``settings_cls``."""
    parser.add_argument("--config", default=None, help="YAML file with settings (flags win)")
    source: CliSettingsSource[Any] = CliSettingsSource(
        settings_cls,  # type: ignore[arg-type]
        root_parser=parser,
        **CLI_OPTIONS,
    )
    parser.set_defaults(settings_source=source, settings_cls=settings_cls)


def _keys(cls: type[BaseModel]) -> dict[str, str]:
    """Field name -> the key users write (the alias when a field has one, e.g. ``json``)."""
    return {name: field.alias or name for name, field in cls.model_fields.items()}


def _given(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the command line gave (pydantic-settings leaves the others out)."""
    keys = set(_keys(args.settings_cls).values())
    parsed = {k: v for k, v in vars(args).items() if k in keys}
    values: dict[str, Any] = args.settings_source(parsed_args=parsed)()
    return values


def settings_from(args: argparse.Namespace, environ: Mapping[str, str], **extra: Any) -> Settings:
    """The command's settings object from its parsed command line, ``environ`` and the YAML file
    of ``--config`` / ``EVENTCAST_CONFIG``. ``extra`` values (not settable by users) go in as
    they are."""
    cls: type[Settings] = args.settings_cls
    config_path = getattr(args, "config", None) or environ.get(ENV_PREFIX + "CONFIG")
    document = load_yaml(config_path) if config_path else {}
    fields = set(_keys(cls).values())
    layers = (
        ({k: v for k, v in _flat_yaml(document).items() if k in fields}, "--config key {}"),
        ({k: v for k, v in _Environment(cls, environ)().items() if k in fields}, "env"),
        (_given(args), "flag"),
    )
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for layer, label in layers:
        for name, value in layer.items():
            values[name] = value
            if label == "env":
                sources[name] = ENV_PREFIX + name.upper()
            elif label == "flag":
                sources[name] = flag(name)
            else:
                sources[name] = label.format(name)
    if "config_document" in fields:
        values["config_document"] = document
    values.update(extra)
    token = _SOURCES.set(sources)
    try:
        return cls(**values)
    finally:
        _SOURCES.reset(token)


def settings_from_environment(cls: type[S], environ: Mapping[str, str]) -> S:
    """``cls`` from ``EVENTCAST_*`` variables alone (for tools without a command line)."""
    fields = set(_keys(cls).values())
    values = {k: v for k, v in _Environment(cls, environ)().items() if k in fields}
    token = _SOURCES.set({name: ENV_PREFIX + name.upper() for name in values})
    try:
        return cls(**values)
    finally:
        _SOURCES.reset(token)
