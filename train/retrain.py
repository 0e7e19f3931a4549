"""The ``worker retrain`` flow: data → fit → evaluate → write a version → promote only if better.

    load_data ──► SeriesArrays (optionally memory-mapped) ──► EventDataModule
        ──► fit_model (Lightning Trainer) or run_sweep (Optuna) ──► best weights
        ──► interval calibration on the validation split (train.calibrate: a conformal factor
            per level, stored as the config's interval_scale / tail_scale, applied in the graph)
        ──► evaluate on the held-out split, beside the baselines (report + PNG)
        ──► evaluate the serving version on the very same windows (the gate)
        ──► ModelRegistry.write_version (atomic: a hidden temp folder renamed into place)
        ──► ModelRegistry.promote (atomic replace of CURRENT) if the new version's MAE is lower
            (or it is the first version, or --force)
        ──► MLflow: metrics, artifacts and a registered model version (when configured)

A crash anywhere leaves ``CURRENT`` and every existing version untouched: the new version is
invisible until its folder is renamed into place, and ``CURRENT`` changes by one rename.

Under distributed data parallel every rank runs this function: they train together, then rank 0
alone carries on from calibration to the registry under the one run directory and version name
it broadcast, while the others wait at a barrier and return without a version
(train.distributed).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from model.config import ModelConfig
from model.errors import ConfigError, EventcastError, ModelLoadError
from model.registry import ModelRegistry, new_version_name
from train.data import STORE_META, EventDataModule, SeriesArrays, SplitSettings, describe
from train.evaluate import HeldOut, evaluate, held_out
from train.peers import PeerSettings
from train.seasons import seasonal_config
from train.settings import RetrainSettings, seasons_request
from train.sources import DataReport, DataSettings, SeriesFrame, load_data

log = logging.getLogger(__name__)

# calendar_year "auto": on when the data span at least 52 weeks, so that every phase of the year
# the model will serve has been seen (a calendar year of hourly data spans 364.96 days).
YEAR_SPAN_DAYS = 364.0

CANARY_WINDOWS = 16
INT8_HOLDOUT_WINDOWS = 1024


@dataclass
class RetrainResult:
    """The outcome of one retrain: the version written (None on a non-zero DDP rank), whether
    it now serves and why, and the evaluation report stored as its ``metrics.json``."""

    version: str | None
    promoted: bool
    reason: str
    report: dict[str, Any] = field(default_factory=dict)
    run_dir: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "promoted": self.promoted,
            "reason": self.reason,
            "run_dir": str(self.run_dir) if self.run_dir else None,
            "quality": self.report.get("quality"),
            "training": self.report.get("training"),
            "total_seconds": self.report.get("total_seconds"),
        }


def prepare_arrays(
    data: DataSettings, split: SplitSettings, mmap_dir: Path | None = None
) -> tuple[SeriesArrays, DataReport]:
    """Read ``--data`` into flat arrays (memory-mapped under ``mmap_dir`` when given). A folder
    holding an array store (``arrays.json``) is opened memory-mapped as it is."""
    uri = data.uri
    if uri and "://" not in uri and (Path(uri) / STORE_META).is_file():
        arrays = SeriesArrays.open(uri, mmap=True)
        n = len(arrays)
        report = DataReport(uri, rows=n, accepted=n, series=arrays.n_series,
                            features=tuple(arrays.features))  # fmt: skip
        report.notes.append("array store opened memory-mapped")
        return arrays, report
    sf: SeriesFrame = load_data(data)
    log.info("%s", sf.report.summary())
    arrays = SeriesArrays.from_frame(sf.frame, sf.features, split)
    if mmap_dir is not None:
        arrays = arrays.to_memmap(mmap_dir)
        sf.report.notes.append(f"training arrays memory-mapped from {mmap_dir}")
    return arrays, sf.report


def year_channels(arrays: SeriesArrays) -> bool:
    """The ``auto`` choice of ``calendar_year``: whether the data (all series together) span
    :data:`YEAR_SPAN_DAYS` or more. Logged, since the version's config records only the result."""
    days = float(np.ptp(arrays.ts)) / 86400.0 if len(arrays) else 0.0
    on = days >= YEAR_SPAN_DAYS
    log.info("calendar_year %s: the data span %.1f days (auto: on from %g)", on, days,
             YEAR_SPAN_DAYS)  # fmt: skip
    return on


def _same_windows(a: ModelConfig, b: ModelConfig) -> bool:
    """Configs whose held-out windows (and so scores) are identical."""
    return (a.sequence_length, a.horizon, a.features, a.calendar, a.calendar_year) == (
        b.sequence_length, b.horizon, b.features, b.calendar, b.calendar_year,
    )  # fmt: skip


def _inputs(c: ModelConfig) -> tuple[Any, ...]:
    """What, beside the windows, decides a network's inputs: the seasons taken out of them and
    whether the state's level is a channel."""
    return c.seasonal(), c.level_channel


def gate(
    registry: ModelRegistry,
    new_report: dict[str, Any],
    config: ModelConfig,
    arrays: SeriesArrays,
    ho: HeldOut,
    *,
    force: bool,
    season: int | None,
) -> tuple[bool, str, dict[str, Any] | None]:
    """Decide promotion: ``(promote, reason, serving_report)``.

    The serving version is scored on the same held-out windows; the new one is promoted when
    its MAE is strictly lower. The first version is always promoted; a serving version that no
    longer loads does not block a new one; a serving version of another shape (horizon, window,
    features) cannot be compared and is kept unless ``force``. A serving version with other
    seasons (or none) is scored on the same windows with its own inputs: a hybrid replaces a
    plain network, or the reverse, only when it forecasts better.
    """
    cur = registry.current()
    if cur is None:
        return True, "first version in the model directory", None
    try:
        serving = registry.load(cur, backend="torch", device="cpu")
    except (ModelLoadError, EventcastError) as exc:
        return True, f"serving version {cur} does not load ({exc})", None
    if not _same_windows(serving.config, config):
        reason = (
            f"serving version {cur} has another shape (horizon {serving.config.horizon}, window "
            f"{serving.config.sequence_length}, features {list(serving.config.features)}): "
            "not comparable"
        )
        return force, reason + ("; promoted by --force" if force else "; use --force"), None
    net = serving.predictor.net  # type: ignore[attr-defined]
    if _inputs(serving.config) != _inputs(config):  # the same windows, other network inputs
        ho = held_out(arrays, serving.config, season)
    old, _, _ = evaluate(net, arrays, serving.config, season=season, version=cur, holdout=ho,
                         linear_ar=False)  # fmt: skip
    new_mae = new_report["metrics"]["model"]["mae"]
    old_mae = old["metrics"]["model"]["mae"]
    better = new_mae < old_mae
    reason = (
        f"held-out MAE {new_mae:.6g} vs serving {cur} {old_mae:.6g} "
        f"({'better' if better else 'not better'})"
    )
    if not better and force:
        reason += "; promoted by --force"
    return better or force, reason, old


def _run_name(version: str) -> str:
    return version


def retrain_once(settings: RetrainSettings) -> RetrainResult:
    """One complete retrain (see module docstring). Raises ConfigError for unusable data or
    settings; the model directory is only ever changed by the atomic registry operations."""
    from train.distributed import barrier, env_rank, reap_children

    t0 = time.monotonic()
    # Provisional on ranks other than 0: rank 0's name and folder are broadcast once the process
    # group is up (train.distributed.SharedRun); only rank 0 creates its run directory.
    rank = env_rank()
    version = new_version_name()
    run_dir = settings.logging.run_dir / _run_name(version)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    mmap = None
    if settings.mmap_dir:
        mmap = settings.mmap_dir / (version if rank == 0 else f"{version}.rank{rank}")
    arrays, data_report = prepare_arrays(settings.data_source, settings.split, mmap)
    config = settings.model.replace(features=list(data_report.features))
    if settings.calendar_year_auto:
        config = config.replace(calendar_year=year_channels(arrays))
    config, seasons_info = seasonal_config(arrays, config, seasons_request(settings))
    dm = EventDataModule(
        arrays,
        config,
        num_workers=settings.training.num_workers,
        train_windows_per_epoch=settings.training.train_windows_per_epoch,
        seed=settings.training.seed,
    )
    log.info("data: %s", json.dumps(describe(arrays, dm.window_counts())))

    from train.fit import build_loggers, fit_model

    loggers = build_loggers(settings, run_dir, _run_name(version))
    if settings.sweep:
        from train.sweep import run_sweep

        fit, trainer, sweep_info = run_sweep(settings, config, dm, run_dir, loggers)
    else:
        fit, trainer = fit_model(settings, config, dm, run_dir, loggers, version=version)
        sweep_info = None
        version, run_dir = fit.version or version, fit.run_dir or run_dir
    if not trainer.is_global_zero:
        log.info(
            "rank %d/%d: training done; waiting at the barrier while rank 0 calibrates, "
            "evaluates, exports and writes version %s",
            trainer.global_rank, trainer.world_size, version,
        )  # fmt: skip
        barrier(trainer, "eventcast-retrain-done")
        log.info("rank %d/%d: rank 0 is done with version %s; exiting 0",
                 trainer.global_rank, trainer.world_size, version)  # fmt: skip
        return RetrainResult(None, False, "not the global-zero process", run_dir=run_dir)
    try:
        result = _finish(settings, fit, trainer, loggers, dm, arrays, data_report, version,
                         run_dir, sweep_info, t0, seasons_info)  # fmt: skip
    finally:
        # The other ranks wait here whatever happened to rank 0 (its exit status is the command's).
        barrier(trainer, "eventcast-retrain-done")
    if trainer.world_size > 1:
        reap_children(trainer)
    return result


def _finish(
    settings: RetrainSettings,
    fit: Any,
    trainer: Any,
    loggers: list[Any],
    dm: EventDataModule,
    arrays: SeriesArrays,
    data_report: DataReport,
    version: str,
    run_dir: Path,
    sweep_info: dict[str, Any] | None,
    t0: float,
    seasons_info: dict[str, Any],
) -> RetrainResult:
    """Rank 0's part after training: calibration, evaluation, the gate, the registry, MLflow."""
    config = fit.config

    # Interval calibration on the validation split, before the held-out evaluation and the
    # registry write: the factors live in the config (interval_scale, tail_scale) and the graph.
    from train.calibrate import calibrate_intervals

    config, calibration = calibrate_intervals(
        fit.module, dm, config, seed=settings.training.seed, mode=settings.training.calibration
    )
    fit.config = config

    report, ho, fc = evaluate(fit.module, arrays, config, season=settings.season, version=version)
    report["data"] = {**data_report.to_dict(), **describe(arrays, dm.window_counts())}
    report["training"] = {
        "epochs": fit.epochs,
        "seconds": round(fit.seconds, 1),
        "stopped_by": fit.stopped_by,
        "best_val_loss": fit.best_val_loss,
        "batch_size": fit.batch_size,
        "config": config.to_dict(),
        "precision": settings.hardware.precision,
        "precision_used": fit.precision,
        "seed": settings.training.seed,
        "world_size": fit.world_size,
        "num_nodes": settings.hardware.num_nodes,
        "strategy": settings.hardware.strategy,
        "train_batches": fit.train_batches,  # of rank 0 (every rank runs as many)
        "optimizer_steps": fit.optimizer_steps,
        "gradients": fit.gradients,
    }
    report["calibration"] = calibration
    report["seasons"] = seasons_info
    if sweep_info is not None:
        report["sweep"] = sweep_info

    from train.plots import save_forecast_png

    png = save_forecast_png(
        run_dir / "forecast.png", arrays.ids, ho.series, ho.ts, ho.y, fc,
        title=f"held-out, horizon {config.horizon}",
    )  # fmt: skip
    _log_figure(loggers, run_dir / "forecast.png", ho, fc, arrays.ids, config.horizon)

    registry = ModelRegistry(settings.model_dir)
    promote, reason, serving = gate(
        registry, report, config, arrays, ho, force=settings.force, season=settings.season
    )
    report["gate"] = {
        "serving_version": registry.current(),
        "serving_metrics": serving["metrics"]["model"] if serving else None,
        "promote": promote,
        "reason": reason,
    }
    (run_dir / "evaluation.json").write_text(json.dumps(report, indent=2, default=str) + "\n")

    n = min(INT8_HOLDOUT_WINDOWS, ho.windows)
    # The int8 check scores the network on its own targets: with seasons, what they leave.
    targets = ho.y[:n] if ho.offsets is None else ho.y[:n] - ho.offsets[:n]
    registry.write_version(
        fit.module,
        config,
        report,
        ho.x[:CANARY_WINDOWS],
        version=version,
        holdout=(ho.x[:n], targets),
        extra_files={"forecast.png": png},
    )
    if promote:
        registry.promote(version)
        log.info("version %s promoted: %s", version, reason)
    else:
        log.warning("version %s written but not promoted: %s", version, reason)
    result = RetrainResult(version, promote, reason, report, run_dir)
    if settings.logging.mlflow_tracking_uri:
        from train.tracking import log_to_mlflow

        log_to_mlflow(settings, loggers, result, registry.path(version))
    _finish_wandb(loggers)
    report["total_seconds"] = round(time.monotonic() - t0, 1)
    (run_dir / "result.json").write_text(json.dumps(result.to_dict(), indent=2, default=str))
    return result


def _finish_wandb(loggers: list[Any]) -> None:
    """Close the W&B run of this retrain (offline: its files are complete on disk), so a next
    round or retrain in the same process starts its own run."""
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger" and getattr(lg, "_experiment", None) is not None:
            lg.experiment.finish()


def _log_figure(
    loggers: list[Any], png: Path, ho: HeldOut, fc: dict[str, Any], ids: list[str], h: int
) -> None:
    """The held-out forecast plot, also to TensorBoard (``test/forecast``)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    tbs = [lg for lg in loggers if isinstance(lg, TensorBoardLogger)]
    if not tbs:
        return
    from train.plots import _pyplot, forecast_figure

    fig = forecast_figure(ids, ho.series, ho.ts, ho.y, fc, title=f"held-out, horizon {h}")
    for tb in tbs:
        tb.experiment.add_figure("test/forecast", fig)
        tb.experiment.flush()
    _pyplot().close(fig)


def evaluate_version(
    model_dir: Path,
    data: DataSettings,
    split: SplitSettings,
    *,
    version: str | None = None,
    season: int | None = None,
    peers: PeerSettings | None = None,
    versus: list[str] | None = None,
) -> dict[str, Any]:
    """``worker evaluate``: score a version (default the serving one) on ``data``'s held-out
    split beside the baselines (and, with ``peers``, the statsforecast models of
    :mod:`train.peers`; with ``versus``, other versions as methods ``model@VERSION``) and return
    the report. NoModelError without a serving version; ModelLoadError when a version fails its
    checks; ConfigError when the data lack one of the model's features or a ``versus`` version
    forecasts other windows."""
    from train.evaluate import add_offsets, net_forecast

    registry = ModelRegistry(model_dir)
    loaded = registry.load(version, backend="torch", device="cpu")
    data = replace(data, features=loaded.config.features)
    arrays, data_report = prepare_arrays(data, split)
    ho = held_out(arrays, loaded.config, season)
    others: dict[str, dict[str, np.ndarray]] = {}
    for name in versus or ():
        other = registry.load(name.strip(), backend="torch", device="cpu")
        o, c = other.config, loaded.config
        if (o.sequence_length, o.horizon, o.features) != (c.sequence_length, c.horizon, c.features):
            raise ConfigError(f"--versus: version {other.version} forecasts other windows "
                              "(window, horizon or features differ)")  # fmt: skip
        ho_o = held_out(arrays, o, season)
        net_o = other.predictor.net  # type: ignore[attr-defined]
        others[f"model@{other.version}"] = add_offsets(net_forecast(net_o, ho_o.x), ho_o.offsets)
    report, _, _ = evaluate(
        loaded.predictor.net,  # type: ignore[attr-defined]
        arrays,
        loaded.config,
        season=season,
        version=loaded.version,
        holdout=ho,
        peers=peers,
        versus=others,
    )
    report["data"] = data_report.to_dict()
    return report
