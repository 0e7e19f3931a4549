"""The ``worker`` command: one entry point, subcommands registered by each package.

Each package owns its own subcommands in a ``commands`` module exposing ``register(subparsers)``:
``stream.commands`` (start, topics, status), ``train.commands`` (retrain, evaluate, predict,
models), ``deploy.commands`` (serve, plot, dlq). Every subparser sets ``func`` to a function taking
the resolved :class:`argparse.Namespace` and returning an exit code.

Settings come from, lowest priority first: built-in defaults, ``--config FILE`` (YAML), environment
variables ``EVENTCAST_<FLAG>`` (upper snake case: ``--bootstrap-servers`` →
``EVENTCAST_BOOTSTRAP_SERVERS``), then the command line. The YAML file may be flat
(``bootstrap-servers: ...``) or sectioned (``model: / training: / hardware:``); scalar keys of any
section that match a flag set that flag, and the parsed document is handed to the command as
``args.config_data`` for whatever else it holds (e.g. the ``model:`` section of ``retrain``).

Exit codes (CONTRACT.md): 0 success or clean stop, 1 runtime failure, 2 bad usage or
configuration, 3 no model in the model directory.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from model.errors import ConfigError, EventcastError, NoModelError

log = logging.getLogger(__name__)

ENV_PREFIX = "EVENTCAST_"
# Packages that contribute subcommands; a package whose ``commands`` module is missing is skipped,
# so the CLI works while the project is assembled piece by piece.
COMMAND_MODULES = ("stream.commands", "train.commands", "deploy.commands")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="worker",
        description="eventcast: streaming forecasts from Kafka events, with uncertainty.",
    )
    parser.add_argument("--log-level", default=os.environ.get("EVENTCAST_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # the module exists but one of its imports is missing: a bug
                raise
            continue
        module.register(sub)
    return parser


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """Give a subcommand the ``--config FILE`` option (YAML) understood by :func:`main`."""
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


def parse(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` with defaults layered from ``--config`` and ``EVENTCAST_*`` variables."""
    environ = os.environ if environ is None else environ
    parser = build_parser()
    first = parser.parse_args(argv)
    yaml_data: dict[str, Any] = {}
    config_path = getattr(first, "config", None) or environ.get(ENV_PREFIX + "CONFIG")
    if config_path:
        yaml_data = _load_yaml(config_path)
    _apply_layered_defaults(_subparser(parser, argv), yaml_data, environ)
    args = parser.parse_args(argv)
    args.config_data = yaml_data
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse(argv)
    except ConfigError as exc:
        print(f"worker: configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=str(args.log_level).upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"worker: configuration error: {exc}", file=sys.stderr)
        return 2
    except NoModelError as exc:
        print(f"worker: {exc}", file=sys.stderr)
        return 3
    except EventcastError as exc:
        print(f"worker: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
