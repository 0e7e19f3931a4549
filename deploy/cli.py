"""The ``worker`` command's entry point (``worker = "deploy.cli:main"``; ``python -m deploy.cli``).

It lives in the top layer because it assembles every package's subcommands, each from its own
``commands`` module exposing ``register(subparsers)``: :mod:`stream.commands` (start, topics,
status), :mod:`train.commands` (retrain, evaluate, predict, models), :mod:`deploy.commands`
(serve, plot, dlq, series). Every subparser sets ``func`` to a function taking the resolved
:class:`argparse.Namespace` and returning an exit code. The configuration layering (``--config``
YAML, ``EVENTCAST_*`` variables, flags) is :mod:`stream.cliconfig`.

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
from stream.cliconfig import parse_layered

COMMAND_MODULES = (stream.commands, train.commands, deploy.commands)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="worker",
        description="eventcast: streaming forecasts from Kafka events, with uncertainty.",
    )
    parser.add_argument("--log-level", default=os.environ.get("EVENTCAST_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def parse(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` with defaults layered from ``--config`` and ``EVENTCAST_*`` variables."""
    return parse_layered(build_parser(), argv, os.environ if environ is None else environ)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse(argv)
    except ConfigError as exc:
        print(f"worker: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(str(args.log_level))
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
