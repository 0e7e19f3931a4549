"""One training run through Lightning's ``Trainer``: loggers, callbacks, tuner, best weights.

``fit_model`` is the only place that builds a Trainer, so every knob of
:class:`~train.settings.RetrainSettings` reaches it the same way from the CLI, from YAML and from
a sweep trial. Callbacks: ModelCheckpoint (``val_loss``, top 3,
``event-forecaster-{epoch:02d}-{val_loss:.2f}``), EarlyStopping (``min_delta`` 0.001, patience
10), LearningRateMonitor (when a logger is on), RichProgressBar (only when stderr is a terminal),
and :class:`ForecastPlotCallback`. The time budget is Lightning's ``max_time``.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import (
    Callback,
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
)

from model.config import ModelConfig
from model.errors import ConfigError
from model.module import EventForecaster
from model.weights import load_checkpoint_weights
from train.data import VAL, EventDataModule
from train.settings import RetrainSettings

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "event-forecaster-{epoch:02d}-{val_loss:.2f}"


@dataclass
class FitResult:
    """What a training run produced: the module holding the best weights (CPU, eval mode; on a
    rank other than 0 of a distributed run, the last weights: only rank 0 reads checkpoints)."""

    module: EventForecaster
    config: ModelConfig
    best_checkpoint: Path | None
    best_val_loss: float | None
    epochs: int
    seconds: float
    stopped_by: str  # "max_epochs" | "early_stopping" | "time_budget"
    batch_size: int
    version: str | None = None  # rank 0's version name (SharedRun), when fit_model was given one
    run_dir: Path | None = None  # rank 0's run directory, likewise
    precision: str = "32-true"  # what the Trainer ran (Lightning runs 16-mixed as bf16 on a CPU)
    world_size: int = 1
    train_batches: int = 0  # training batches of this process (all epochs)
    optimizer_steps: int = 0  # trainer.global_step
    gradients: dict[str, Any] = dataclasses.field(default_factory=dict)  # clipping evidence


class ForecastPlotCallback(Callback):
    """Every ``every_n_epochs`` validation epochs, plot forecasts on a fixed sample of validation
    windows (a few series, the end of their validation part) and log the figure to every
    TensorBoard logger as ``val/forecast``."""

    def __init__(self, dm: EventDataModule, every_n_epochs: int = 5, max_series: int = 3) -> None:
        self.every = max(1, int(every_n_epochs))
        ds = dm.sets[VAL]
        n = len(ds)
        idx = np.arange(n)
        if n:
            series = np.searchsorted(dm.arrays.starts, ds.starts, side="right") - 1
            keep = np.isin(series, np.unique(series)[:max_series])
            idx = idx[keep]
            # At most 240 windows per series, the latest ones.
            parts = [idx[series[idx] == s][-240:] for s in np.unique(series[idx])]
            idx = np.concatenate(parts) if parts else idx[:0]
            self._series = series[idx]
        else:
            self._series = np.zeros(0, dtype=np.int64)
        self._x, self._y, self._ts = ds.arrays_for(idx) if len(idx) else (None, None, None)
        self._offsets = ds.offsets_for(idx)  # a model with seasons: their part, added back
        self._ids = dm.arrays.ids

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or self._x is None:
            return
        if (trainer.current_epoch + 1) % self.every:
            return
        from lightning.pytorch.loggers import TensorBoardLogger

        tbs = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not tbs:
            return
        from train.evaluate import add_offsets, net_forecast
        from train.plots import _pyplot, forecast_figure

        fc = add_offsets(net_forecast(pl_module, self._x), self._offsets)
        fig = forecast_figure(
            self._ids, self._series, self._ts, self._y, fc,
            title=f"validation, epoch {trainer.current_epoch}",
        )  # fmt: skip
        for tb in tbs:
            tb.experiment.add_figure("val/forecast", fig, global_step=trainer.global_step)
        _pyplot().close(fig)


class EpochLogCallback(Callback):
    """One log line per epoch (last training step's loss, validation loss and MAE, elapsed
    time) when no progress bar shows."""

    def __init__(self) -> None:
        self._start = time.monotonic()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        m = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        log.info(
            "epoch %d: train_loss %.4f val_loss %.4f val_mae %.4g (%.0f s)",
            trainer.current_epoch, m.get("train_loss_step", float("nan")),
            m.get("val_loss", float("nan")), m.get("val_mae", float("nan")),
            time.monotonic() - self._start,
        )  # fmt: skip


def build_loggers(settings: RetrainSettings, run_dir: Path, run_name: str) -> list[Any]:
    """The Lightning loggers that ``settings.logging.loggers`` names (TensorBoard by default)."""
    lg = settings.logging
    out: list[Any] = []
    for name in lg.loggers:
        if name == "tensorboard":
            from lightning.pytorch.loggers import TensorBoardLogger

            out.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version=""))
        elif name == "csv":
            from lightning.pytorch.loggers import CSVLogger

            out.append(CSVLogger(save_dir=str(run_dir), name="csv", version=""))
        elif name == "mlflow":
            from lightning.pytorch.loggers import MLFlowLogger

            out.append(
                MLFlowLogger(
                    experiment_name=lg.mlflow_experiment,
                    run_name=run_name,
                    tracking_uri=lg.mlflow_tracking_uri,
                    log_model=False,
                )
            )
        elif name == "wandb":
            from lightning.pytorch.loggers import WandbLogger

            out.append(
                WandbLogger(
                    project=lg.wandb_project,
                    name=run_name,
                    save_dir=str(run_dir),
                    offline=lg.wandb_offline,
                )
            )
    return out


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def make_trainer(
    settings: RetrainSettings,
    run_dir: Path,
    loggers: Sequence[Any],
    *,
    extra_callbacks: Sequence[Callback] = (),
    checkpoint: bool = True,
) -> tuple[L.Trainer, ModelCheckpoint | None, EarlyStopping]:
    """A Trainer wired with every knob of ``settings`` (see module docstring)."""
    tr, hw = settings.training, settings.hardware
    early = EarlyStopping(monitor="val_loss", min_delta=tr.min_delta, patience=tr.patience,
                          mode="min")  # fmt: skip
    from train.distributed import RankMetrics

    callbacks: list[Callback] = [early, *extra_callbacks, RankMetrics()]
    ckpt: ModelCheckpoint | None = None
    if checkpoint:
        ckpt = ModelCheckpoint(
            dirpath=str(run_dir / "checkpoints"),
            filename=CHECKPOINT_NAME,
            monitor="val_loss",
            mode="min",
            save_top_k=3,
        )
        callbacks.append(ckpt)
    if loggers:
        callbacks.append(LearningRateMonitor(logging_interval="epoch"))
    tty = _stderr_is_tty()
    if tty:
        from lightning.pytorch.callbacks import RichProgressBar

        callbacks.append(RichProgressBar())
    else:
        callbacks.append(EpochLogCallback())
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        trainer = _trainer(settings, run_dir, loggers, callbacks, checkpoint, tty)
    except (MisconfigurationException, ValueError, RuntimeError) as exc:
        # e.g. --accelerator gpu without a GPU, --devices 4 on a 2-device machine, a strategy
        # that this accelerator cannot run: a usage error, exit 2.
        raise ConfigError(
            f"--accelerator/--devices/--strategy/--precision: Lightning refused "
            f"accelerator={hw.accelerator} devices={hw.devices} strategy={hw.strategy} "
            f"precision={hw.precision}: {exc}"
        ) from exc
    return trainer, ckpt, early


def _trainer(
    settings: RetrainSettings,
    run_dir: Path,
    loggers: Sequence[Any],
    callbacks: list[Callback],
    checkpoint: bool,
    tty: bool,
) -> L.Trainer:
    tr, hw = settings.training, settings.hardware
    return L.Trainer(
        accelerator=hw.accelerator,
        devices=hw.lightning_devices,
        strategy=hw.strategy,
        num_nodes=hw.num_nodes,
        precision=_precision(hw.precision, hw.accelerator),  # type: ignore[arg-type]
        max_epochs=tr.max_epochs,
        max_time=tr.max_time,
        gradient_clip_val=tr.gradient_clip_val,
        gradient_clip_algorithm=tr.gradient_clip_algorithm if tr.gradient_clip_val else None,
        accumulate_grad_batches=tr.accumulate_grad_batches,
        deterministic=tr.deterministic,
        callbacks=callbacks,
        logger=list(loggers) if loggers else False,
        enable_checkpointing=checkpoint,
        # Under DDP the data module shards the windows itself (every window once per epoch,
        # train.distributed.ShardedBatchSampler); Lightning's sampler would pad with repeats.
        use_distributed_sampler=False,
        enable_progress_bar=tty,
        enable_model_summary=tty,
        default_root_dir=str(run_dir),
        log_every_n_steps=10,
        num_sanity_val_steps=0,
    )


def _precision(precision: str, accelerator: str) -> str:
    """``precision`` as the Trainer will run it, recorded as ``precision_used`` and said once as
    a log line by :func:`_log_precision`. On a CPU: ``16-mixed`` is ``bf16-mixed`` (Lightning 2.x
    has no float16 autocast there and would substitute it with a UserWarning), and
    ``bf16-mixed`` is ``32-true`` where the CPU runs no LSTM under bfloat16 autocast
    (:func:`model.export.cpu_bf16_autocast_lstm`: no AVX-512; training would stop at the first
    batch)."""
    on_cpu = accelerator == "cpu" or (
        accelerator == "auto"
        and not torch.cuda.is_available()
        and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available())
    )
    if not on_cpu:
        return precision
    if precision in ("16", "16-mixed"):
        precision = "bf16-mixed"
    if precision in ("bf16", "bf16-mixed"):
        from model.export import cpu_bf16_autocast_lstm

        why = cpu_bf16_autocast_lstm()
        if why is not None:
            log.warning("--precision %s: this CPU runs no LSTM under bf16 autocast (%s)",
                        precision, why)  # fmt: skip
            return "32-true"
    return precision


def _tune(
    settings: RetrainSettings, config: ModelConfig, dm: EventDataModule, run_dir: Path
) -> ModelConfig:
    """Lightning's Tuner: batch-size scaling, then the learning-rate finder (each if asked).
    Tuning runs on a throwaway trainer without loggers or checkpoints."""
    from lightning.pytorch.tuner import Tuner

    tr = settings.training
    if not (tr.scale_batch_size or tr.lr_find):
        return config
    # The finders run a fixed number of steps: they must not stop at the run's epoch limit.
    tune_settings = settings.model_copy(update={"max_epochs": 10_000, "time_budget": None})
    trainer, _, _ = make_trainer(tune_settings, run_dir / "tune", [], checkpoint=False)
    if trainer.world_size > 1:
        raise ConfigError(
            "--lr-find/--scale-batch-size: Lightning's tuner runs in one process; tune without "
            "--strategy/--devices/--num-nodes first, then pass the --learning-rate/--batch-size "
            "it found"
        )
    tuner = Tuner(trainer)
    if tr.scale_batch_size:
        module = EventForecaster(config)
        # On a CPU nothing runs out of memory: cap the search at 32x the configured batch.
        found = tuner.scale_batch_size(module, datamodule=dm, mode="power", max_trials=5,
                                       steps_per_trial=2, init_val=dm.batch_size)  # fmt: skip
        if found:
            dm.batch_size = int(found)
            config = config.replace(batch_size=int(found))
            log.info("batch size finder chose %d", found)
    if tr.lr_find:
        module = EventForecaster(config)
        finder = tuner.lr_find(module, datamodule=dm, update_attr=False, num_training=60)
        lr = finder.suggestion() if finder is not None else None
        if lr and np.isfinite(lr):
            config = config.replace(learning_rate=float(lr))
            log.info("learning-rate finder suggests %.3g", lr)
    return config


def fit_model(
    settings: RetrainSettings,
    config: ModelConfig,
    dm: EventDataModule,
    run_dir: Path,
    loggers: Sequence[Any] = (),
    *,
    extra_callbacks: Sequence[Callback] = (),
    version: str | None = None,
) -> tuple[FitResult, L.Trainer]:
    """Tune (if asked), train, and load the best checkpoint's weights into the returned module.

    The module comes back on the CPU in eval mode. The Trainer is returned too (callers check
    ``trainer.is_global_zero`` before writing anything shared). With ``version``, rank 0's
    version name and ``run_dir`` are broadcast to every rank (``FitResult.version`` /
    ``run_dir``; train.distributed.SharedRun).
    """
    from train.distributed import SharedRun

    L.seed_everything(settings.training.seed, workers=True, verbose=False)
    if settings.hardware.threads:
        torch.set_num_threads(settings.hardware.threads)
    config = _tune(settings, config, dm, run_dir)
    module = EventForecaster(config)
    plot_cb = ForecastPlotCallback(dm, settings.training.plot_every_n_epochs)
    shared = SharedRun(version, run_dir) if version is not None else None
    trainer, ckpt, early = make_trainer(
        settings,
        run_dir,
        loggers,
        extra_callbacks=[*([shared] if shared else []), plot_cb, *extra_callbacks],
    )
    _log_precision(settings, trainer)
    start = time.monotonic()
    trainer.fit(module, datamodule=dm)
    seconds = time.monotonic() - start

    best_path: Path | None = None
    best_loss: float | None = None
    if ckpt is not None and ckpt.best_model_path:
        best_path = Path(ckpt.best_model_path)
        best_loss = float(ckpt.best_model_score) if ckpt.best_model_score is not None else None
        if trainer.is_global_zero:  # the file is rank 0's (another node may not even see it)
            module.net.load_state_dict(load_checkpoint_weights(best_path))
    module = module.to("cpu").eval()
    if early.stopped_epoch > 0:
        stopped = "early_stopping"
    elif trainer.current_epoch < settings.training.max_epochs and settings.training.time_budget:
        stopped = "time_budget"
    else:
        stopped = "max_epochs"
    result = FitResult(
        module=module,
        config=config,
        best_checkpoint=best_path,
        best_val_loss=best_loss,
        epochs=int(trainer.current_epoch),
        seconds=seconds,
        stopped_by=stopped,
        batch_size=dm.batch_size,
        version=shared.version if shared else None,
        run_dir=shared.run_dir if shared else None,
        precision=str(trainer.precision),
        world_size=int(trainer.world_size),
        train_batches=module.train_batches,
        optimizer_steps=int(trainer.global_step),
        gradients={
            "clip_val": settings.training.gradient_clip_val,
            "clip_algorithm": settings.training.gradient_clip_algorithm
            if settings.training.gradient_clip_val
            else None,
            "accumulate_grad_batches": settings.training.accumulate_grad_batches,
            **module.grad_stats,
        },
    )
    return result, trainer


def _log_precision(settings: RetrainSettings, trainer: L.Trainer) -> None:
    """Say so when Lightning runs another precision than the one asked for (16-mixed on a CPU
    becomes bf16-mixed: Lightning 2.x has no float16 autocast on the CPU, and oneDNN has no
    float16 LSTM on most CPUs)."""
    asked, used = settings.hardware.precision, str(trainer.precision)
    if asked != used and (asked, used) not in (("32", "32-true"), ("16", "16-mixed")):
        log.warning("--precision %s: Lightning trains with %s on this accelerator", asked, used)
