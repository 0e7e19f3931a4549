"""``worker retrain | evaluate | predict | models``: the trainer's subcommands.

Registered by ``deploy.cli`` (``register(subparsers)``); each sets ``func`` taking the resolved
Namespace and returning an exit code. These functions are the only place in ``train/`` that
prints: JSON results go to stdout, human notes to stderr through logging.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path
from typing import Any

from pydantic import Field, NonNegativeInt
from pydantic_settings import CliPositionalArg

from model.errors import ConfigError
from stream.config import Settings, add_settings_arguments
from train.settings import DataOptions, RetrainSettings, Text

DEFAULT_PEER_ORIGINS = 300  # train.peers.DEFAULT_ORIGINS (not imported: numba loads lazily)

log = logging.getLogger(__name__)


class EvaluateOptions(DataOptions):
    """``worker evaluate``: score a version on a data file."""

    model_dir: Text = None
    version: str | None = Field(None, description="version to score (default: CURRENT)")
    out: Text = Field(None, description="also write the JSON report to this file")
    peer_origins: NonNegativeInt = Field(
        DEFAULT_PEER_ORIGINS,
        description="held-out windows (evenly spread) the statsforecast peers AutoETS and MSTL "
        "forecast; 0: no peers, a number over the held-out windows: all of them",
    )
    versus: Text = Field(
        None,
        description="other versions of the model directory (comma-separated) scored on the "
        "same windows, each with its own inputs (e.g. the plain network beside a hybrid): "
        "methods model@VERSION",
    )


class PredictOptions(DataOptions):
    """``worker predict``: batch-predict a data file into JSON lines."""

    model_dir: Text = None
    version: str | None = None
    out: Text = Field(None, description="JSON-lines file of forecast objects")
    latest: bool = Field(False, description="only the newest window of each series")
    backend: str = Field("torch", description="torch, onnx, onnx-int8, torch-int8, auto")


class ModelsOptions(Settings):
    """``worker models ACTION``: the model directory."""

    model_dir: Text = None


class ModelsListOptions(ModelsOptions):
    as_json: bool = Field(False, alias="json", description="JSON instead of a table")


class ModelsPromoteOptions(ModelsOptions):
    version: CliPositionalArg[str]


class ModelsPruneOptions(ModelsOptions):
    keep: int


def _require(args: Any, name: str) -> Any:
    value = getattr(args, name, None)
    if value in (None, ""):
        raise ConfigError(f"--{name.replace('_', '-')}: required")
    return value


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "retrain",
        help="train a model version offline, evaluate it, promote it if it beats the serving one",
        description="Offline retraining with Lightning (see docs/training.md).",
    )
    add_settings_arguments(p, RetrainSettings)
    p.set_defaults(func=cmd_retrain)

    p = subparsers.add_parser("evaluate", help="score a model version on a data file (JSON)")
    add_settings_arguments(p, EvaluateOptions)
    p.set_defaults(func=cmd_evaluate)

    p = subparsers.add_parser("predict", help="batch-predict a data file into JSON lines")
    add_settings_arguments(p, PredictOptions)
    p.set_defaults(func=cmd_predict)

    p = subparsers.add_parser("models", help="list / promote / rollback / prune model versions")
    msub = p.add_subparsers(dest="models_command", metavar="ACTION")
    msub.required = True
    for name, options, helptext in (
        ("list", ModelsListOptions, "versions, newest last, with held-out MAE"),
        ("promote", ModelsPromoteOptions, "make version V the serving one"),
        ("rollback", ModelsOptions, "serve the previously promoted version again"),
        ("prune", ModelsPruneOptions, "delete all but the N newest versions (never CURRENT)"),
    ):
        sp = msub.add_parser(name, help=helptext)
        add_settings_arguments(sp, options)
        sp.set_defaults(func=functools.partial(cmd_models, name))


# ---- command functions ----------------------------------------------------------------------


def cmd_retrain(settings: RetrainSettings) -> int:
    from train.settings import check_environment

    _require(settings, "data")
    _require(settings, "model_dir")
    check_environment(settings)
    if settings.every is not None:
        from train.schedule import run_every

        return run_every(settings, rounds=settings.rounds)
    from train.retrain import retrain_once

    result = retrain_once(settings)
    if result.version is not None:
        print(json.dumps(result.to_dict(), indent=2, default=str))
    return 0


def cmd_evaluate(args: EvaluateOptions) -> int:
    from train.peers import PeerSettings
    from train.retrain import evaluate_version

    model_dir = Path(_require(args, "model_dir"))
    _require(args, "data")
    report = evaluate_version(
        model_dir, args.source(), args.split, version=args.version, season=args.season,
        peers=PeerSettings(origins=args.peer_origins),
        versus=[v for v in (args.versus or "").split(",") if v.strip()],
    )  # fmt: skip
    text = json.dumps(report, indent=2, default=str)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    if report.get("online_calibration"):  # human lines on stderr (issue 17)
        from train.online_eval import summary_lines

        for line in summary_lines(report["online_calibration"]):
            log.info("%s", line)
    return 0


def cmd_predict(args: PredictOptions) -> int:
    from train.predict import predict_file

    model_dir = Path(_require(args, "model_dir"))
    out = Path(_require(args, "out"))
    _require(args, "data")
    summary = predict_file(
        model_dir, args.source(), out, version=args.version, latest=args.latest,
        backend=args.backend,
    )  # fmt: skip
    print(json.dumps(summary, indent=2))
    return 0


def cmd_models(action: str, args: Any) -> int:
    from model.registry import ModelRegistry

    registry = ModelRegistry(Path(_require(args, "model_dir")))
    if action == "list":
        versions = registry.versions()
        if args.as_json:
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
