"""``worker retrain | evaluate | predict | models``: the trainer's subcommands.

Registered by ``deploy.cli`` (``register(subparsers)``); each sets ``func`` taking the resolved
Namespace and returning an exit code. These functions are the only place in ``train/`` that
prints: JSON results go to stdout, human notes to stderr through logging.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from model.errors import ConfigError
from stream.cliconfig import add_config_argument
from stream.settings import KafkaSettings, add_kafka_arguments

log = logging.getLogger(__name__)


def _dests(parser: argparse.ArgumentParser) -> set[str]:
    return {a.dest for a in parser._actions if a.option_strings}


def _add_data_arguments(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        required=False,
        default=None,
        help="CSV/Parquet file (series_id, ts, value [, features]), kafka://TOPIC, "
        "synthetic://N, dataset://NAME (bundled real data) or an array-store folder",
    )
    g.add_argument("--features", default=None,
                   help="feature columns: names (comma-separated), 'auto' or 'none'")  # fmt: skip
    g.add_argument("--test-fraction", type=float, default=0.2,
                   help="held-out share at the end of each series")  # fmt: skip
    g.add_argument("--val-fraction", type=float, default=0.1,
                   help="validation share before the held-out part")  # fmt: skip
    g.add_argument("--max-gap-factor", type=float, default=2.5,
                   help="a spacing above this many median spacings is a gap")  # fmt: skip
    g.add_argument("--season", type=int, default=None,
                   help="seasonal naive season in steps (default: one day; a week for "
                        "daily data, a year for weekly or monthly data)")  # fmt: skip
    g.add_argument("--since", default=None, help="kafka:// replay: first broker timestamp")
    g.add_argument("--until", default=None, help="kafka:// replay: last broker timestamp")
    g.add_argument("--max-event-bytes", type=int, default=65536)
    add_kafka_arguments(p)


def _require(args: argparse.Namespace, name: str) -> Any:
    value = getattr(args, name, None)
    if value in (None, ""):
        raise ConfigError(f"--{name.replace('_', '-')}: required")
    return value


def register(subparsers: Any) -> None:
    # ---- retrain --------------------------------------------------------------------------------
    p = subparsers.add_parser(
        "retrain",
        help="train a model version offline, evaluate it, promote it if it beats the serving one",
        description="Offline retraining with Lightning (see docs/training.md).",
    )
    add_config_argument(p)
    _add_data_arguments(p)
    p.add_argument("--model-dir", default=None, help="model directory (versions + CURRENT)")
    p.add_argument("--force", action="store_true", help="promote even if not better")
    p.add_argument("--every", default=None, help="retrain on a schedule, e.g. 1h (until SIGTERM)")
    p.add_argument("--rounds", type=int, default=None,
                   help="with --every: stop after N rounds (default: until SIGTERM)")  # fmt: skip
    p.add_argument("--sweep", type=int, default=0, help="Optuna trials; the best one is kept")
    p.add_argument("--mmap-dir", default=None,
                   help="keep training arrays here, memory-mapped")  # fmt: skip
    m = p.add_argument_group("model (override the YAML model: section)")
    m.add_argument("--horizon", type=int, default=None)
    m.add_argument("--sequence-length", type=int, default=None)
    m.add_argument("--hidden-size", type=int, default=None)
    m.add_argument("--num-layers", type=int, default=None)
    m.add_argument("--dropout", type=float, default=None)
    m.add_argument("--learning-rate", type=float, default=None)
    m.add_argument("--batch-size", type=int, default=None)
    m.add_argument("--distribution", choices=("gaussian", "student_t"), default=None)
    m.add_argument("--calendar-year", action=argparse.BooleanOptionalAction, default=None,
                   help="sin/cos of the year phase as inputs (default auto: on when the "
                        "data span 52 weeks or more)")  # fmt: skip
    t = p.add_argument_group("training")
    t.add_argument("--max-epochs", type=int, default=100)
    t.add_argument("--time-budget", default=None, help="stop training after e.g. 10m")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--gradient-clip-val", type=float, default=1.0)
    t.add_argument("--gradient-clip-algorithm", choices=("norm", "value"), default="norm")
    t.add_argument("--accumulate-grad-batches", type=int, default=1)
    t.add_argument("--patience", type=int, default=10, help="early stopping patience (epochs)")
    t.add_argument("--min-delta", type=float, default=0.001)
    t.add_argument("--train-windows-per-epoch", type=int, default=None)
    t.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    t.add_argument("--lr-find", action="store_true", help="Lightning's learning-rate finder")
    t.add_argument("--scale-batch-size", action="store_true", help="Lightning's batch-size finder")
    t.add_argument("--plot-every-n-epochs", type=int, default=5)
    t.add_argument("--deterministic", action="store_true")
    t.add_argument("--calibration", default=None,
                   help="interval calibration on the validation split: conformal (one factor per "
                   "level, the default), widen (the same, only ever widening), off")  # fmt: skip
    h = p.add_argument_group("hardware (Lightning Trainer)")
    h.add_argument("--accelerator", default="auto", help="auto, cpu, gpu, cuda, mps, tpu")
    h.add_argument("--devices", default="auto", help="auto, N, or a list like 0,1")
    h.add_argument("--strategy", default="auto", help="auto, ddp, ddp_spawn, deepspeed, fsdp")
    h.add_argument("--num-nodes", type=int, default=1)
    h.add_argument("--precision", default="32-true", help="32, 16-mixed, bf16-mixed, ...")
    h.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 is fastest on a busy shared CPU)")  # fmt: skip
    lg = p.add_argument_group("logging")
    lg.add_argument("--logger", default="tensorboard",
                    help="comma-separated: tensorboard, csv, mlflow, wandb, none")  # fmt: skip
    lg.add_argument("--run-dir", default="runs", help="where runs keep logs and checkpoints")
    lg.add_argument("--mlflow-tracking-uri", default=None,
                    help="e.g. sqlite:///mlflow.db or file:///path/mlruns")  # fmt: skip
    lg.add_argument("--mlflow-experiment", default="eventcast")
    lg.add_argument("--mlflow-model-name", default="eventcast-forecaster")
    lg.add_argument("--wandb-project", default="eventcast")
    p.set_defaults(func=cmd_retrain, _dests=_dests(p))

    # ---- evaluate -------------------------------------------------------------------------------
    p = subparsers.add_parser("evaluate", help="score a model version on a data file (JSON)")
    add_config_argument(p)
    _add_data_arguments(p)
    p.add_argument("--model-dir", default=None)
    p.add_argument("--version", default=None, help="version to score (default: CURRENT)")
    p.add_argument("--out", default=None, help="also write the JSON report to this file")
    p.set_defaults(func=cmd_evaluate)

    # ---- predict --------------------------------------------------------------------------------
    p = subparsers.add_parser("predict", help="batch-predict a data file into JSON lines")
    add_config_argument(p)
    _add_data_arguments(p)
    p.add_argument("--model-dir", default=None)
    p.add_argument("--version", default=None)
    p.add_argument("--out", default=None, help="JSON-lines file of forecast objects")
    p.add_argument("--latest", action="store_true", help="only the newest window of each series")
    p.add_argument("--backend", default="torch", help="torch, onnx, onnx-int8, torch-int8, auto")
    p.set_defaults(func=cmd_predict)

    # ---- models ---------------------------------------------------------------------------------
    p = subparsers.add_parser("models", help="list / promote / rollback / prune model versions")
    add_config_argument(p)
    msub = p.add_subparsers(dest="models_command", metavar="ACTION")
    msub.required = True
    for name, helptext in (
        ("list", "versions, newest last, with held-out MAE"),
        ("promote", "make version V the serving one"),
        ("rollback", "serve the previously promoted version again"),
        ("prune", "delete all but the N newest versions (never CURRENT)"),
    ):
        sp = msub.add_parser(name, help=helptext)
        add_config_argument(sp)
        sp.add_argument("--model-dir", default=None)
        if name == "promote":
            sp.add_argument("version")
        if name == "prune":
            sp.add_argument("--keep", type=int, required=True)
        if name == "list":
            sp.add_argument("--json", action="store_true", help="JSON instead of a table")
        sp.set_defaults(func=cmd_models, models_command=name)


# ---- command functions ----------------------------------------------------------------------


def cmd_retrain(args: argparse.Namespace) -> int:
    from train.settings import settings_from_args

    _require(args, "data")
    _require(args, "model_dir")
    settings = settings_from_args(args, args._dests)
    if settings.every is not None:
        from train.schedule import run_every

        return run_every(settings, rounds=settings.rounds)
    from train.retrain import retrain_once

    result = retrain_once(settings)
    if result.version is not None:
        print(json.dumps(result.to_dict(), indent=2, default=str))
    return 0


def _data_settings(args: argparse.Namespace) -> Any:
    from train.data import SplitSettings
    from train.settings import parse_time
    from train.sources import DataSettings

    uri = str(_require(args, "data"))
    kafka = None
    if uri.startswith("kafka://"):
        kafka = KafkaSettings.from_args(args)
    data = DataSettings(
        uri=uri,
        since=parse_time(args.since, "--since"),
        until=parse_time(args.until, "--until"),
        max_event_bytes=int(args.max_event_bytes),
        kafka=kafka,
    )
    split = SplitSettings(
        test_fraction=float(args.test_fraction),
        val_fraction=float(args.val_fraction),
        max_gap_factor=float(args.max_gap_factor),
    )
    return data, split


def cmd_evaluate(args: argparse.Namespace) -> int:
    from train.retrain import evaluate_version

    model_dir = Path(_require(args, "model_dir"))
    data, split = _data_settings(args)
    report = evaluate_version(model_dir, data, split, version=args.version, season=args.season)
    text = json.dumps(report, indent=2, default=str)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from train.predict import predict_file

    model_dir = Path(_require(args, "model_dir"))
    out = Path(_require(args, "out"))
    data, _ = _data_settings(args)
    summary = predict_file(model_dir, data, out, version=args.version, latest=bool(args.latest),
                           backend=str(args.backend))  # fmt: skip
    print(json.dumps(summary, indent=2))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from model.registry import ModelRegistry

    registry = ModelRegistry(Path(_require(args, "model_dir")))
    action = args.models_command
    if action == "list":
        versions = registry.versions()
        if args.json:
            print(json.dumps([v.to_dict() for v in versions], indent=2, default=str))
            return 0
        print(f"{'':2}{'version':<24}{'created (UTC)':<22}{'horizon':>8}{'MAE':>12}"
              f"{'vs naive':>10}")  # fmt: skip
        for v in versions:
            m = v.metrics or {}
            mae = ((m.get("metrics") or {}).get("model") or {}).get("mae")
            ratio = (m.get("quality") or {}).get("mae_ratio")
            print(
                f"{'*' if v.is_current else ' ':2}{v.name:<24}"
                f"{v.created.strftime('%Y-%m-%d %H:%M:%S'):<22}{m.get('horizon', ''):>8}"
                f"{'' if mae is None else f'{mae:.4g}':>12}"
                f"{'' if ratio is None else f'{ratio:.3f}':>10}"
            )
        if not versions:
            print("(no versions: run `worker retrain`)", file=sys.stderr)
        return 0
    if action == "promote":
        registry.promote(args.version)
        print(f"promoted {args.version}")
        return 0
    if action == "rollback":
        print(f"rolled back to {registry.rollback()}")
        return 0
    if action == "prune":
        removed = registry.prune(int(args.keep))
        print(json.dumps({"removed": removed}))
        return 0
    raise ConfigError(f"models: unknown action {action!r}")  # pragma: no cover
