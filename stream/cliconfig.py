"""The ``worker`` command's configuration layering, shared by every package's ``commands`` module.

The entry point itself (``build_parser``, ``parse``, ``main``) is :mod:`deploy.cli`, the top layer,
which imports ``stream.commands``, ``train.commands`` and ``deploy.commands``; this module holds
the generic plumbing they and it use, so the stream layer never imports the layers above it.

Settings come from, lowest priority first: built-in defaults, ``--config FILE`` (YAML), environment
variables ``EVENTCAST_<FLAG>`` (upper snake case: ``--bootstrap-servers`` →
``EVENTCAST_BOOTSTRAP_SERVERS``), then the command line. The YAML file may be flat
(``bootstrap-servers: ...``) or sectioned (``model: / training: / hardware:``); scalar keys of any
section that match a flag set that flag, and the parsed document is handed to the command as
``args.config_data`` for whatever else it holds (e.g. the ``model:`` section of ``retrain``).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

from model.errors import ConfigError

ENV_PREFIX = "EVENTCAST_"


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """Give a subcommand the ``--config FILE`` option (YAML) understood by :func:`parse_layered`."""
    parser.add_argument("--config", default=None, help="YAML file with settings (flags win)")


def _load_yaml(path: str) -> dict[str, Any]:
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


def _flatten(data: Mapping[str, Any]) -> dict[str, Any]:
    """Scalar and list values of the top level and of one level of sections, keyed by dest name."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            for inner, inner_value in value.items():
                if not isinstance(inner_value, Mapping):
                    flat.setdefault(str(inner).replace("-", "_"), inner_value)
        else:
            flat[str(key).replace("-", "_")] = value
    return flat


def _convert(action: argparse.Action, raw: Any, source: str) -> Any:
    if isinstance(
        action,
        argparse._StoreTrueAction | argparse._StoreFalseAction | argparse.BooleanOptionalAction,
    ):
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        three_way = isinstance(action, argparse.BooleanOptionalAction) and action.default is None
        if text == "auto" and three_way:  # "auto" leaves a three-way flag undecided
            return None
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(f"{source}: expected a boolean, got {raw!r}")
    if action.nargs in ("*", "+") and isinstance(raw, str):
        raw = [part for part in raw.replace(",", " ").split() if part]
    convert: Any = action.type or (lambda v: v)
    try:
        value = [convert(v) for v in raw] if isinstance(raw, list) else convert(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: invalid value {raw!r}: {exc}") from exc
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{source}: {value!r} is not one of {sorted(map(str, action.choices))}")
    return value


def _apply_layered_defaults(
    parser: argparse.ArgumentParser, yaml_data: Mapping[str, Any], environ: Mapping[str, str]
) -> None:
    """Set each option's default from the YAML file, then the environment (which wins)."""
    flat = _flatten(yaml_data)
    overrides: dict[str, Any] = {}
    for action in parser._actions:
        dest = action.dest
        if dest in (argparse.SUPPRESS, "help", "config", "func") or not action.option_strings:
            continue
        if dest in flat:
            overrides[dest] = _convert(action, flat[dest], f"--config key {dest}")
        env_name = ENV_PREFIX + dest.upper()
        if env_name in environ:
            overrides[dest] = _convert(action, environ[env_name], env_name)
    parser.set_defaults(**overrides)


def _subparser(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.ArgumentParser:
    """The (possibly nested) subparser that ``argv`` selects."""
    current = parser
    for token in argv:
        sub_actions = [a for a in current._actions if isinstance(a, argparse._SubParsersAction)]
        if not sub_actions or token.startswith("-"):
            continue
        choice = sub_actions[0].choices.get(token)
        if choice is None:
            break
        current = choice
    return current


def parse_layered(
    parser: argparse.ArgumentParser, argv: Sequence[str], environ: Mapping[str, str]
) -> argparse.Namespace:
    """Parse ``argv`` with defaults layered from ``--config`` and ``EVENTCAST_*`` variables.

    Two passes: the first finds the subcommand and ``--config``; the selected (sub)subparser then
    gets its defaults from the YAML file and the environment (which wins), and the second pass
    lets the command line win over both. The YAML document is kept as ``args.config_data``.
    """
    first = parser.parse_args(argv)
    yaml_data: dict[str, Any] = {}
    config_path = getattr(first, "config", None) or environ.get(ENV_PREFIX + "CONFIG")
    if config_path:
        yaml_data = _load_yaml(config_path)
    _apply_layered_defaults(_subparser(parser, argv), yaml_data, environ)
    args = parser.parse_args(argv)
    args.config_data = yaml_data
    return args
