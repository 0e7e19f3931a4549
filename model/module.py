"""``EventForecaster``: the LightningModule that trains a :class:`~model.network.ForecastNet`.

Batches are ``(x, y)`` (or a mapping with keys ``x`` and ``y``): ``x`` the (B, T, C) windows from
:func:`model.features.build_inputs`, ``y`` the (B, H) raw targets (``(B,)`` accepted when H = 1).
Hyperparameters are saved as a plain dict (``{"config": {...}}``), so a Lightning checkpoint holds
only tensors and builtins and can be read back with ``torch.load(weights_only=True)``.

Under distributed data parallel every epoch metric is logged with ``sync_dist=True``: its epoch
value is the mean over all ranks' windows (weighted by batch size), so early stopping, the
checkpoint monitor, the LR scheduler and the loggers see one global number. The training loss
is also logged per step (``train_loss_step``, synchronised too); the other training metrics are
epoch values only (``train_mae``, ...), which costs one all-reduce per metric per epoch instead
of per step.

Gradient clipping goes through :meth:`EventForecaster.configure_gradient_clipping`, which keeps
the largest total norm and largest absolute gradient seen before and after clipping
(:attr:`EventForecaster.grad_stats`), the trainer's evidence that clipping acted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor

from model.config import ModelConfig, as_config
from model.losses import forecast_metrics, nll
from model.network import ForecastNet, outputs_from_params


class EventForecaster(L.LightningModule):
    """LSTM + attention forecaster with calibrated intervals (see ``model.network``).

    ``EventForecaster(config, **overrides)``: ``config`` is a ModelConfig, a dict or None for the
    defaults; keyword overrides (``hidden_size=64``) are applied on top and validated.
    """

    def __init__(
        self, config: ModelConfig | dict[str, Any] | None = None, **overrides: Any
    ) -> None:
        super().__init__()
        self.config: ModelConfig = as_config(config, **overrides)
        # A plain dict (not the dataclass): checkpoints stay loadable with weights_only=True and
        # `load_from_checkpoint` rebuilds the module through this same constructor.
        self.save_hyperparameters({"config": self.config.to_dict()})
        self.net = ForecastNet(self.config)
        self.train_batches = 0  # training batches this process ran (optimizer steps: trainer)
        self._grad: dict[str, Tensor] = {}  # running maxima, on the training device
        self._grad_steps = 0

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(mean, std, lower_80, upper_80, lower_95, upper_95)``, each (B, H)."""
        return self.net(x)

    # ---- training --------------------------------------------------------------------------------

    def _unpack(self, batch: Any) -> tuple[Tensor, Tensor]:
        if isinstance(batch, Mapping):
            x, y = batch["x"], batch["y"]
        else:
            x, y = batch[0], batch[1]
        if y.ndim == 1:
            y = y.unsqueeze(-1)  # (B,) -> (B, 1) for H = 1
        return x, y.to(x.dtype)

    def _shared_step(self, batch: Any, stage: str) -> Tensor:
        x, y = self._unpack(batch)  # (B, T, C), (B, H)
        p = self.net.params(x)
        loss = nll(p, y)
        with torch.no_grad():
            metrics = forecast_metrics(outputs_from_params(p), y)
        kw: dict[str, Any] = {"batch_size": x.shape[0], "on_epoch": True, "sync_dist": True}
        self.log(f"{stage}_loss", loss, prog_bar=True, on_step=stage == "train", **kw)
        self.log(f"{stage}_nll", loss.detach(), on_step=False, **kw)
        for name, value in metrics.items():
            self.log(f"{stage}_{name}", value, on_step=False, **kw)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.train_batches += 1
        return self._shared_step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> tuple[Tensor, ...]:
        x = batch["x"] if isinstance(batch, Mapping) else batch[0]
        return self.net(x)

    # ---- gradient clipping ----------------------------------------------------------------------

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: int | float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Lightning's clipping (``self.clip_gradients``), with the gradients' largest total norm
        and largest absolute value recorded before and after it (finite steps only: a skipped
        16-mixed step with inf gradients is left out). Called on every optimizer step."""
        if not gradient_clip_val:
            return
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads:
            return
        before = self._grad_norms(grads)
        self.clip_gradients(
            optimizer,
            gradient_clip_val=gradient_clip_val,
            gradient_clip_algorithm=gradient_clip_algorithm,
        )
        after = self._grad_norms(grads)
        finite = torch.isfinite(before).all()
        for key, value in (("before", before), ("after", after)):
            value = torch.where(finite, value, torch.zeros_like(value))
            prev = self._grad.get(key)
            self._grad[key] = value if prev is None else torch.maximum(prev, value)
        self._grad_steps += 1

    @staticmethod
    def _grad_norms(grads: list[Tensor]) -> Tensor:
        """(total L2 norm, largest |g|) of ``grads`` as one float32 tensor, no host sync."""
        with torch.no_grad():
            norms = torch.stack([g.detach().float().norm() for g in grads])
            peaks = torch.stack([g.detach().float().abs().max() for g in grads])
            return torch.stack([norms.norm(), peaks.max()])

    @property
    def grad_stats(self) -> dict[str, float | int]:
        """Clipping evidence of this process: ``steps`` clipped, and the largest ``norm_*`` (total
        L2) and ``abs_*`` (largest element) of the gradients ``before`` / ``after`` clipping."""
        if not self._grad_steps:
            return {"steps": 0}
        b, a = self._grad["before"].tolist(), self._grad["after"].tolist()
        return {
            "steps": self._grad_steps,
            "norm_before_max": float(b[0]),
            "norm_after_max": float(a[0]),
            "abs_before_max": float(b[1]),
            "abs_after_max": float(a[1]),
        }

    def configure_optimizers(self) -> Any:  # Lightning's OptimizerLRSchedulerConfig dict
        opt = torch.optim.AdamW(
            self.parameters(), lr=self.config.learning_rate, weight_decay=self.config.weight_decay
        )
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", patience=5)
        return {
            "optimizer": opt,
            # strict=False: a run without a validation loop warns instead of failing.
            "lr_scheduler": {"scheduler": sched, "monitor": "val_loss", "strict": False},
        }
