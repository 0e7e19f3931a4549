"""``worker retrain --sweep N``: an Optuna search over the model's hyperparameters.

Each trial trains through the same :func:`train.fit.fit_model` as a single run, with Optuna's
Lightning pruning callback reporting ``val_loss`` after every validation epoch, so a trial that
falls behind the median of earlier trials at the same epoch is stopped early (median pruner).
The trial with the lowest validation loss is kept, and its module goes on to evaluation and the
registry exactly like a single run's. A time budget is shared evenly between the trials.

Search space around the configured model: hidden size (32 … 256), layers (1 … 3), dropout,
learning rate (log scale) and the output distribution (Gaussian or Student-t).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning as L

from model.config import ModelConfig
from model.errors import ConfigError
from train.data import EventDataModule
from train.fit import FitResult, fit_model
from train.settings import RetrainSettings

log = logging.getLogger(__name__)

HIDDEN_CHOICES = (32, 64, 128, 256)


def _heads(hidden: int, wanted: int) -> int:
    """The largest head count <= ``wanted`` dividing ``hidden`` (attention needs it)."""
    for h in range(min(wanted, hidden), 0, -1):
        if hidden % h == 0:
            return h
    return 1


def suggest_config(trial: Any, base: ModelConfig) -> ModelConfig:
    """A config for one trial: ``base`` with the searched fields replaced."""
    hidden = trial.suggest_categorical("hidden_size", list(HIDDEN_CHOICES))
    return base.replace(
        hidden_size=hidden,
        attention_heads=_heads(hidden, base.attention_heads),
        num_layers=trial.suggest_int("num_layers", 1, 3),
        dropout=trial.suggest_float("dropout", 0.0, 0.3),
        learning_rate=trial.suggest_float("learning_rate", 1e-4, 5e-3, log=True),
        distribution=trial.suggest_categorical("distribution", ["gaussian", "student_t"]),
    )


def run_sweep(
    settings: RetrainSettings,
    config: ModelConfig,
    dm: EventDataModule,
    run_dir: Path,
    loggers: list[Any],
) -> tuple[FitResult, L.Trainer, dict[str, Any]]:
    """Run ``settings.sweep`` trials; return the best trial's fit, its trainer and a summary
    (``best_params``, ``best_val_loss``, one entry per trial with its state).

    Raises ConfigError with a distributed strategy (pruning across processes needs an RDB
    storage) or when every trial was pruned or failed.
    """
    import optuna
    from optuna_integration import PyTorchLightningPruningCallback

    if str(settings.hardware.strategy).startswith(("ddp", "deepspeed", "fsdp")):
        raise ConfigError("--sweep: runs on one process; drop --strategy for a sweep")
    n = settings.sweep
    budget = settings.training.time_budget
    trial_settings = settings.model_copy(
        update={
            "time_budget": budget / n if budget else None,
            "lr_find": False,
            "scale_batch_size": False,
        }
    )
    best: dict[str, Any] = {"loss": math.inf, "fit": None, "trainer": None}

    def objective(trial: optuna.Trial) -> float:
        cfg = suggest_config(trial, config)
        pruning = PyTorchLightningPruningCallback(trial, monitor="val_loss")
        fit, trainer = fit_model(
            trial_settings, cfg, dm, run_dir / f"trial-{trial.number:02d}", [],
            extra_callbacks=[pruning],
        )  # fmt: skip
        loss = fit.best_val_loss if fit.best_val_loss is not None else math.inf
        if loss < best["loss"]:
            best.update(loss=loss, fit=fit, trainer=trainer)
        log.info("sweep trial %d: val_loss %.4g with %s", trial.number, loss, trial.params)
        return loss

    sampler = optuna.samplers.TPESampler(seed=settings.training.seed)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=2)
    study = optuna.create_study(direction="minimize", sampler=sampler, pruner=pruner)
    study.optimize(objective, n_trials=n, catch=(RuntimeError, ValueError))
    if best["fit"] is None:
        raise ConfigError(f"--sweep: none of the {n} trials completed")
    trials = [
        {"number": t.number, "state": t.state.name, "value": t.value, "params": t.params}
        for t in study.trials
    ]
    info = {
        "trials": trials,
        "best_trial": study.best_trial.number,
        "best_params": study.best_trial.params,
        "best_val_loss": best["loss"],
    }
    return best["fit"], best["trainer"], info
