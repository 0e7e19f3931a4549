"""Loss and metrics of probabilistic forecasts (torch only, no Lightning).

The training loss is the negative log-likelihood in *normalised* units (target divided by the
window's own std), so every series weighs the same whatever its scale. Reported metrics are in the
value's own units.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from model.network import DistParams

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
_INV_SQRT_PI = 1.0 / math.sqrt(math.pi)


def normalise_target(y: Tensor, p: DistParams) -> Tensor:
    """Target ``y`` (B, H) in the normalised units of ``p`` (B, H)."""
    return (y - p.shift) / p.unit


def nll(p: DistParams, y: Tensor) -> Tensor:
    """Mean negative log-likelihood of raw targets ``y`` (B, H) in normalised units (a scalar).

    Gaussian when ``p.df`` is None, Student-t otherwise. The log-determinant of the normalisation
    (log of the window std) is left out: it does not depend on the parameters.
    """
    yn = normalise_target(y, p)  # (B, H)
    z = (yn - p.loc) / p.scale  # (B, H)
    if p.df is None:
        out = torch.log(p.scale) + 0.5 * z * z + _HALF_LOG_2PI
    else:
        v = p.df
        out = (
            torch.lgamma(v / 2.0)
            - torch.lgamma((v + 1.0) / 2.0)
            + 0.5 * torch.log(v * math.pi)
            + torch.log(p.scale)
            + (v + 1.0) / 2.0 * torch.log1p(z * z / v)
        )
    return out.mean()


def gaussian_crps(y: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Closed-form CRPS of N(mean, std²) at ``y``, elementwise (Gneiting & Raftery 2007)."""
    z = (y - mean) / std
    cdf = 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return std * (z * (2.0 * cdf - 1.0) + 2.0 * pdf - _INV_SQRT_PI)


def forecast_metrics(
    outputs: tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor], y: Tensor
) -> dict[str, Tensor]:
    """MAE, RMSE, R², CRPS and 80/95 % coverage of ``outputs`` (the network's 6-tuple) vs ``y``.

    All in the value's own units, averaged over batch and horizon. CRPS is the Gaussian closed
    form with the predicted mean and std (for a Student-t head an approximation).
    R² is computed within the batch (1 - SSE / SST; 0 when the batch's targets are constant).
    """
    mean, std, lo80, hi80, lo95, hi95 = outputs
    err = y - mean
    sse = (err * err).sum()
    sst = ((y - y.mean()) ** 2).sum()
    r2 = torch.where(sst > 0, 1.0 - sse / sst.clamp_min(1e-12), torch.zeros_like(sst))
    return {
        "mae": err.abs().mean(),
        "rmse": torch.sqrt((err * err).mean()),
        "r2": r2,
        "crps": gaussian_crps(y, mean, std).mean(),
        "coverage_80": ((y >= lo80) & (y <= hi80)).float().mean(),
        "coverage_95": ((y >= lo95) & (y <= hi95)).float().mean(),
    }
