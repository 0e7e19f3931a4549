"""``worker`` subcommands of the deploy package: ``serve``, ``plot``, ``dlq replay``,
``series delete`` (registered by :mod:`deploy.cli`).

Each ``func`` takes the command's settings (:mod:`deploy.settings`) and returns an exit code;
errors are raised as :mod:`model.errors` exceptions and mapped to exit codes by the CLI
(ConfigError 2, NoModelError 3, EventcastError 1). Heavy imports (FastAPI, matplotlib, aiokafka)
happen inside the functions so ``worker --help`` stays fast.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from deploy.http.settings import RELOAD_TOKEN_ENV, ServeSettings
from deploy.settings import DlqReplaySettings, PlotSettings, SeriesDeleteSettings
from stream.config import add_settings_arguments


def register(subparsers: Any) -> None:
    """Add ``serve``, ``plot``, ``dlq`` and ``series`` to the ``worker`` command."""
    serve = subparsers.add_parser(
        "serve",
        help="HTTP service: predict, series state, health, metrics, reload, live view",
        description="The HTTP service. POST /reload needs Authorization: Bearer "
        f"${RELOAD_TOKEN_ENV} (reload is disabled when the variable is not set).",
    )
    add_settings_arguments(serve, ServeSettings)
    serve.set_defaults(func=cmd_serve)

    plot = subparsers.add_parser(
        "plot", help="PNG of a series' recent actuals and forecasts with 80/95 %% bands"
    )
    add_settings_arguments(plot, PlotSettings)
    plot.set_defaults(func=cmd_plot)

    dlq = subparsers.add_parser("dlq", help="dead-letter topic tools")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", metavar="ACTION")
    dlq_sub.required = True
    replay = dlq_sub.add_parser(
        "replay",
        help="re-publish dead-letter records (original key and value) to the input topic",
        description="Re-publishes the dead-letter records present when the command starts "
        "(up to each partition's end offset at that moment), optionally only those whose "
        "error.reason is one of --reason, to the input topic, with their original key and value "
        "bytes. Prints a JSON summary.",
    )
    add_settings_arguments(replay, DlqReplaySettings)
    replay.set_defaults(func=cmd_dlq_replay)

    series = subparsers.add_parser("series", help="series state tools")
    series_sub = series.add_subparsers(dest="series_command", metavar="ACTION")
    series_sub.required = True
    delete = series_sub.add_parser("delete", help="delete a series' window state from Redis")
    add_settings_arguments(delete, SeriesDeleteSettings)
    delete.set_defaults(func=cmd_series_delete)


# --- serve ---------------------------------------------------------------------------------------


def build_serve_app(settings: ServeSettings) -> Any:
    """The FastAPI app ``worker serve`` runs, wired from its settings (loads the model: raises
    NoModelError when the directory has no current version)."""
    from deploy.http.app import create_app
    from deploy.http.feed import ForecastHistory, TopicForecastFeed
    from deploy.http.state import redis_collaborators
    from model.registry import ModelRegistry

    redis = settings.redis_or_none()
    kafka = settings.kafka_or_none()
    history = ForecastHistory()
    feed = (
        TopicForecastFeed(
            kafka, settings.forecast_topic, history, backfill=settings.forecast_backfill
        )
        if kafka is not None
        else None
    )
    reader, ping = (
        redis_collaborators(redis, **settings.store_args()) if redis is not None else (None, None)
    )
    return create_app(
        settings,
        ModelRegistry(settings.model_dir),
        window_reader=reader,
        redis_ping=ping,
        history=history,
        feed=feed,
    )


def cmd_serve(settings: ServeSettings) -> int:
    from deploy.http.server import run_server

    app = build_serve_app(settings)
    run_server(app, settings)
    return 0


# --- plot ----------------------------------------------------------------------------------------


def cmd_plot(args: PlotSettings) -> int:
    """Write the PNG; prints what it drew. A series with no data still gets a PNG, exit 1."""
    from deploy.http.state import read_window_sync
    from deploy.plot import ChartData, read_series_forecasts, render_png

    window = read_window_sync(args.redis, args.series, **args.store_args())
    forecasts = read_series_forecasts(args.kafka, args.forecast_topic, args.series, scan=args.scan)
    chart = ChartData(
        args.series,
        window.ts if window else [],
        window.values if window else [],
        forecasts,
    )
    out = render_png(chart, str(args.out))
    points = len(chart.ts)
    print(f"wrote {out}: {points} actuals, {len(forecasts)} forecasts of {args.series}")
    if chart.empty:
        print(f"worker plot: no window and no forecast for series {args.series!r}", file=sys.stderr)
        return 1
    return 0


# --- dlq replay ----------------------------------------------------------------------------------


def cmd_dlq_replay(args: DlqReplaySettings) -> int:
    from deploy.dlq import replay

    report = replay(
        args.kafka,
        dlq_topic=args.dlq_topic,
        input_topic=args.input_topic,
        reasons=set(args.reason) if args.reason else None,
        from_offset=args.from_offset,
        dry_run=args.dry_run,
    )
    print(json.dumps(report.to_dict(), sort_keys=True))
    return 0


# --- series delete -------------------------------------------------------------------------------


def cmd_series_delete(args: SeriesDeleteSettings) -> int:
    """Exit 0 when the series' state was deleted, 1 when there was none."""
    from deploy.http.state import delete_series_sync

    deleted = delete_series_sync(args.redis, args.series_id, **args.store_args())
    print(json.dumps({"series_id": args.series_id, "deleted": deleted}))
    return 0 if deleted else 1
