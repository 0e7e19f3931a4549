"""The ``worker`` command's entry point (``worker = "deploy.cli:main"``; ``python -m deploy.cli``).

It lives in the top layer because it assembles every package's subcommands, each from its own
``commands`` module exposing ``register(subparsers)``: :mod:`stream.commands` (start, topics,
status), :mod:`train.commands` (retrain, evaluate, predict, models), :mod:`deploy.commands`
(serve, plot, dlq, series). Every leaf command declares its settings
class (``stream.config.add_settings_arguments``: one flag per field) and sets ``func`` to a
function taking that resolved settings object and returning an exit code. The layering (flags >
``EVENTCAST_*`` variables > ``--config`` YAML > defaults) is :func:`stream.config.settings_from`.

Exit codes (docs/contract.md): 0 success or clean stop, 1 runtime failure, 2 bad usage or
configuration, 3 no model in the model directory.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence

import deploy.commands
import stream.commands
import train.commands
from deploy.logs import configure_logging
from model.errors import ConfigError, EventcastError, NoModelError
from stream.config import Settings, settings_from

COMMAND_MODULES = (stream.commands, train.commands, deploy.commands)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="worker",
        description="eventcast: streaming forecasts from Kafka events, with uncertainty.",
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("EVENTCAST_LOG_LEVEL", "INFO"),
        help="DEBUG, INFO, WARNING or ERROR (EVENTCAST_LOG_LEVEL)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """The command line alone (the command, its ``func`` and the flags that were given)."""
    return build_parser().parse_args(list(argv))


def settings(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Settings:
    """The settings object the command of ``argv`` runs with: flags, then ``environ`` (default
    ``os.environ``), then the ``--config`` file, then defaults."""
    return settings_from(parse(argv), os.environ if environ is None else environ)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    configure_logging(str(args.log_level))
    try:
        return int(args.func(settings_from(args, os.environ)) or 0)
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
