"""``worker`` subcommands of the deploy package: ``serve``, ``plot``, ``dlq replay``,
``series delete`` (registered by :mod:`deploy.cli`).

Each ``func`` takes the resolved :class:`argparse.Namespace` and returns an exit code; errors are
raised as :mod:`model.errors` exceptions and mapped to exit codes by the CLI (ConfigError 2,
NoModelError 3, EventcastError 1). Heavy imports (FastAPI, matplotlib, aiokafka) happen inside
the functions so ``worker --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from model.config import BACKENDS, DEVICES
from model.errors import ConfigError
from stream.cliconfig import add_config_argument
from stream.decode import REASONS
from stream.settings import (
    KafkaSettings,
    RedisSettings,
    add_kafka_arguments,
    add_redis_arguments,
)

RELOAD_TOKEN_ENV = "EVENTCAST_RELOAD_TOKEN"


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``serve``, ``plot``, ``dlq`` and ``series`` to the ``worker`` command."""
    _register_serve(subparsers)
    _register_plot(subparsers)
    _register_dlq(subparsers)
    _register_series(subparsers)


def _add_store_arguments(p: argparse.ArgumentParser) -> None:
    """Where the worker keeps windows: its input topic and (optionally) its partition count."""
    p.add_argument(
        "--input-topic",
        default="events",
        help="the worker's input topic (windows are stored per input partition)",
    )
    p.add_argument(
        "--input-partitions",
        type=int,
        default=None,
        help="its partition count (default: discovered from the keys in Redis)",
    )


def _store_args(args: argparse.Namespace) -> dict[str, Any]:
    n = args.input_partitions
    if n is not None and n < 1:
        raise ConfigError(f"--input-partitions: must be >= 1, got {n}")
    return {"topic": args.input_topic, "partitions": n}


# --- serve ---------------------------------------------------------------------------------------


def _register_serve(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "serve",
        help="HTTP service: predict, series state, health, metrics, reload, live view",
        description="The HTTP service. POST /reload needs Authorization: Bearer "
        f"${RELOAD_TOKEN_ENV} (reload is disabled when the variable is not set).",
    )
    add_config_argument(p)
    p.add_argument("--model-dir", default=None, help="model directory (required)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--max-body-bytes", type=int, default=1 << 20, help="request body limit (413 above it)"
    )
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--threads", type=int, default=None, help="inference threads")
    p.add_argument("--refresh-seconds", type=float, default=5.0, help="live view refresh period")
    add_redis_arguments(p)
    _add_store_arguments(p)
    add_kafka_arguments(p)
    p.add_argument(
        "--forecast-topic",
        default="forecasts",
        help="read recent forecasts from this topic (with --bootstrap-servers)",
    )
    p.add_argument(
        "--forecast-backfill",
        type=int,
        default=2000,
        help="records per partition read back from the end at start",
    )
    # Redis and Kafka are optional for serve: no default address means "not used".
    p.set_defaults(func=cmd_serve, redis_url=None, bootstrap_servers=None)


def _optional_redis(args: argparse.Namespace) -> RedisSettings | None:
    return RedisSettings.from_args(args) if getattr(args, "redis_url", None) else None


def _optional_kafka(args: argparse.Namespace) -> KafkaSettings | None:
    return KafkaSettings.from_args(args) if getattr(args, "bootstrap_servers", None) else None


def _check_port(flag: str, value: int) -> None:
    if not 0 < value <= 65535:
        raise ConfigError(f"{flag}: expected 1..65535, got {value}")


def serve_settings(args: argparse.Namespace, environ: Any = None) -> Any:
    """:class:`deploy.serve.ServeSettings` from the flags (token from ``EVENTCAST_RELOAD_TOKEN``).

    Raises ConfigError naming the flag for a missing model directory or a bad number.
    """
    from deploy.http.settings import ServeSettings

    environ = os.environ if environ is None else environ
    if not args.model_dir:
        raise ConfigError("--model-dir: required (or EVENTCAST_MODEL_DIR)")
    _check_port("--port", args.port)
    if args.max_body_bytes < 1:
        raise ConfigError(f"--max-body-bytes: must be >= 1, got {args.max_body_bytes}")
    if args.refresh_seconds <= 0:
        raise ConfigError(f"--refresh-seconds: must be > 0, got {args.refresh_seconds}")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads: must be >= 1, got {args.threads}")
    return ServeSettings(
        model_dir=Path(args.model_dir),
        host=args.host,
        port=args.port,
        max_body_bytes=args.max_body_bytes,
        reload_token=environ.get(RELOAD_TOKEN_ENV) or None,
        backend=args.backend,
        device=args.device,
        threads=args.threads,
        refresh_seconds=args.refresh_seconds,
    )


def build_serve_app(args: argparse.Namespace, environ: Any = None) -> Any:
    """The FastAPI app ``worker serve`` runs, wired from the flags (loads the model: raises
    NoModelError when the directory has no current version)."""
    from deploy.http.app import create_app
    from deploy.http.feed import ForecastHistory, TopicForecastFeed
    from deploy.http.state import redis_collaborators
    from model.registry import ModelRegistry

    settings = serve_settings(args, environ)
    redis = _optional_redis(args)
    kafka = _optional_kafka(args)
    history = ForecastHistory()
    feed = (
        TopicForecastFeed(kafka, args.forecast_topic, history, backfill=args.forecast_backfill)
        if kafka is not None
        else None
    )
    reader, ping = (
        redis_collaborators(redis, **_store_args(args)) if redis is not None else (None, None)
    )
    return create_app(
        settings,
        ModelRegistry(settings.model_dir),
        window_reader=reader,
        redis_ping=ping,
        history=history,
        feed=feed,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from deploy.http.server import run_server

    app = build_serve_app(args)
    run_server(app, app.state.settings)
    return 0


# --- plot ----------------------------------------------------------------------------------------


def _register_plot(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "plot", help="PNG of a series' recent actuals and forecasts with 80/95 %% bands"
    )
    add_config_argument(p)
    p.add_argument("--series", required=True, help="series id")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--forecast-topic", default="forecasts")
    p.add_argument(
        "--scan",
        type=int,
        default=20_000,
        help="records read back from the end of the series' forecast partition",
    )
    add_redis_arguments(p)
    _add_store_arguments(p)
    add_kafka_arguments(p)
    p.set_defaults(func=cmd_plot)


def cmd_plot(args: argparse.Namespace) -> int:
    """Write the PNG; prints what it drew. A series with no data still gets a PNG, exit 1."""
    from deploy.http.state import read_window_sync
    from deploy.plot import ChartData, read_series_forecasts, render_png

    if args.scan < 1:
        raise ConfigError(f"--scan: must be >= 1, got {args.scan}")
    redis = RedisSettings.from_args(args)
    kafka = KafkaSettings.from_args(args)
    window = read_window_sync(redis, args.series, **_store_args(args))
    forecasts = read_series_forecasts(kafka, args.forecast_topic, args.series, scan=args.scan)
    chart = ChartData(
        args.series,
        window.ts if window else [],
        window.values if window else [],
        forecasts,
    )
    out = render_png(chart, args.out)
    points = len(chart.ts)
    print(f"wrote {out}: {points} actuals, {len(forecasts)} forecasts of {args.series}")
    if chart.empty:
        print(f"worker plot: no window and no forecast for series {args.series!r}", file=sys.stderr)
        return 1
    return 0


# --- dlq replay ----------------------------------------------------------------------------------


def _register_dlq(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("dlq", help="dead-letter topic tools")
    sub = p.add_subparsers(dest="dlq_command", metavar="ACTION")
    sub.required = True
    r = sub.add_parser(
        "replay",
        help="re-publish dead-letter records (original key and value) to the input topic",
        description="Re-publishes the dead-letter records present when the command starts "
        "(up to each partition's end offset at that moment), optionally only those whose "
        "error.reason is one of --reason, to the input topic, with their original key and value "
        "bytes. Prints a JSON summary.",
    )
    add_config_argument(r)
    add_kafka_arguments(r)
    r.add_argument("--dlq-topic", default="events.dlq")
    r.add_argument("--input-topic", default="events")
    r.add_argument(
        "--reason",
        action="append",
        choices=REASONS,
        default=None,
        help="only records with this error.reason (repeatable; default: all)",
    )
    r.add_argument(
        "--from-offset",
        type=int,
        default=None,
        help="start at this offset in every partition (default: the beginning)",
    )
    r.add_argument("--dry-run", action="store_true", help="count, publish nothing")
    r.set_defaults(func=cmd_dlq_replay)


def cmd_dlq_replay(args: argparse.Namespace) -> int:
    from deploy.dlq import replay

    if args.from_offset is not None and args.from_offset < 0:
        raise ConfigError(f"--from-offset: must be >= 0, got {args.from_offset}")
    if args.dlq_topic == args.input_topic:
        raise ConfigError("--dlq-topic: must differ from --input-topic")
    report = replay(
        KafkaSettings.from_args(args),
        dlq_topic=args.dlq_topic,
        input_topic=args.input_topic,
        reasons=set(args.reason) if args.reason else None,
        from_offset=args.from_offset,
        dry_run=args.dry_run,
    )
    print(json.dumps(report.to_dict(), sort_keys=True))
    return 0


# --- series delete -------------------------------------------------------------------------------


def _register_series(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("series", help="series state tools")
    sub = p.add_subparsers(dest="series_command", metavar="ACTION")
    sub.required = True
    d = sub.add_parser("delete", help="delete a series' window state from Redis")
    add_config_argument(d)
    add_redis_arguments(d)
    _add_store_arguments(d)
    d.add_argument("series_id", metavar="ID")
    d.set_defaults(func=cmd_series_delete)


def cmd_series_delete(args: argparse.Namespace) -> int:
    """Exit 0 when the series' state was deleted, 1 when there was none."""
    from deploy.http.state import delete_series_sync

    deleted = delete_series_sync(RedisSettings.from_args(args), args.series_id, **_store_args(args))
    print(json.dumps({"series_id": args.series_id, "deleted": deleted}))
    return 0 if deleted else 1
