"""``EventForecaster``: the LightningModule that trains a :class:`~model.network.ForecastNet`.

Batches are ``(x, y)`` (or a mapping with keys ``x`` and ``y``): ``x`` the (B, T, C) windows from
:func:`model.features.build_inputs`, ``y`` the (B, H) raw targets (``(B,)`` accepted when H = 1).
Hyperparameters are saved as a plain dict (``{"config": {...}}``), so a Lightning checkpoint holds
only tensors and builtins and can be read back with ``torch.load(weights_only=True)``.
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
        on_step = stage == "train"
        kw: dict[str, Any] = {"batch_size": x.shape[0], "on_step": on_step, "on_epoch": True}
        self.log(f"{stage}_loss", loss, prog_bar=True, **kw)
        self.log(f"{stage}_nll", loss.detach(), **kw)
        for name, value in metrics.items():
            self.log(f"{stage}_{name}", value, **kw)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> tuple[Tensor, ...]:
        x = batch["x"] if isinstance(batch, Mapping) else batch[0]
        return self.net(x)

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
