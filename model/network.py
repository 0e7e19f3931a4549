"""The forecasting network, readable in one file.

``ForecastNet`` is a plain ``torch.nn.Module`` (no Lightning), so serving needs only torch:

    x (B, T, C) raw window from model.features.build_inputs
      -> per-window instance normalisation of the value (and exogenous) channels; a seasonal
         model's level channel with the value channel's mean and std (then clipped to
         ±LEVEL_CLIP), and taken out: it feeds the linear AR skip only, not the LSTM
      -> LSTM (num_layers, dropout between layers)                      (B, T, Hd)
      -> multi-head attention, query = last LSTM output, keys = all     (B, Hd)
      -> MLP on [last, context]                                         (B, Hd)
      -> head: location, scale (softplus + eps) [, degrees of freedom] for H steps
      -> location += linear AR skip: Linear(T -> H) on the normalised value channel  (ar_skip)
         (else += the last normalised value, i.e. persistence)
      -> scale *= interval_scale (calibrated on the validation split after training)
      -> undo the normalisation; 80 % and 95 % bounds computed in the graph
         (the 95 % half-width *= tail_scale, calibrated likewise)

The AR skip (DLinear / N-BEATS-style residual) starts as persistence (weight 1 on the last value),
so an untrained net forecasts like the naive baseline and a linear autoregression is in its reach
from the first step; the LSTM/attention path then learns the non-linear correction.

Because the window's own mean and standard deviation are divided out on the way in and multiplied
back on the way out, one model serves series of any scale: multiplying a window by ``k > 0``
multiplies ``mean``, ``std`` and the bounds by ``k``.

``EventForecaster`` (the LightningModule used for training) lives in ``model/module.py``; it is
re-exported here lazily so that ``import model.network`` does not import Lightning.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import ModelConfig

if TYPE_CHECKING:
    pass

Z80 = 1.2815515655446004  # standard normal quantile at 0.90 (two-sided 80 %)
Z95 = 1.959963984540054  # standard normal quantile at 0.975 (two-sided 95 %)
STD_EPS = 1e-4  # floor of the normalised scale: keeps std > 0 and the NLL bounded
DF_MIN = 2.01  # Student-t degrees of freedom stay above 2 so the variance exists
# Window std floor, relative to the window mean and absolute. Relative keeps scale equivariance
# (a constant window of 1000 gets the same relative floor as one of 1); the absolute term only
# matters for all-zero windows.
NORM_EPS_REL = 1e-8
NORM_EPS_ABS = 1e-10
# A seasonal model's level, in the window's standard deviations from its mean, is clipped to
# this: on a near-flat window the ratio is unbounded and would swamp the linear path.
LEVEL_CLIP = 10.0

OUTPUT_NAMES: tuple[str, ...] = ("mean", "std", "lower_80", "upper_80", "lower_95", "upper_95")


class DistParams(NamedTuple):
    """The predictive distribution in normalised units, plus the window statistics."""

    loc: Tensor  # (B, H) location in normalised units
    scale: Tensor  # (B, H) > 0, scale in normalised units (the std for a Gaussian)
    df: Tensor | None  # (B, H) > 2 for student_t, None for gaussian
    shift: Tensor  # (B, 1) window mean of the value channel
    unit: Tensor  # (B, 1) window std of the value channel (> 0)
    tail: float = 1.0  # the config's tail_scale: multiplies the 95 % half-width


class ForecastNet(nn.Module):
    """LSTM + attention forecaster with a Gaussian or Student-t head (see module docstring)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        c, hd, h = config.input_size, config.hidden_size, config.horizon
        self.n_params = 3 if config.distribution == "student_t" else 2
        self.lstm = nn.LSTM(
            input_size=c - config.level_channel,  # the level goes to the linear path only
            hidden_size=hd,
            num_layers=config.num_layers,
            batch_first=True,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
        )
        # The LSTM's compute dtype. bfloat16 only in the CPU serving copy of backend torch-bf16
        # (model.export.bf16_lstm: oneDNN runs it on AMX / AVX-512 BF16); float32 otherwise.
        self.lstm_dtype = torch.float32
        self.attn = nn.MultiheadAttention(hd, config.attention_heads, batch_first=True)
        self.mlp = nn.Sequential(
            nn.LayerNorm(2 * hd),
            nn.Linear(2 * hd, hd),
            nn.GELU(),
            nn.Dropout(config.dropout),
        )
        self.head = nn.Linear(hd, self.n_params * h)
        # Linear autoregressive skip over the normalised value channel: (B, T) -> (B, H).
        self.ar: nn.Linear | None = None
        # A seasonal model's level is one more input of it, after the window (weight 0 at first).
        if config.ar_skip:
            t = config.sequence_length
            self.ar = nn.Linear(t + config.level_channel, h)
            with torch.no_grad():  # start as persistence: every step = the last value
                self.ar.weight.zero_()
                self.ar.weight[:, t - 1] = 1.0
                self.ar.bias.zero_()
        # Which channels get per-window normalisation: the value and the exogenous features, not
        # the calendar sin/cos (already in [-1, 1], and constant within short windows).
        mask = torch.ones(c)
        mask[1 : 1 + config.calendar_channels] = 0.0
        self.register_buffer("norm_mask", mask, persistent=False)  # (C,)

    def params(self, x: Tensor) -> DistParams:
        """Distribution parameters in normalised units for a raw window ``x`` of shape (B, T, C)."""
        b = x.shape[0]
        mask: Tensor = self.norm_mask  # type: ignore[assignment]  # (C,) 1 = normalise it
        # Statistics are taken on the window divided by its largest magnitude, so squaring cannot
        # overflow float32 for values up to its range (a window holding 1e19 would otherwise
        # give an infinite variance and NaN forecasts), then scaled back.
        peak = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)  # (B, 1, C) > 0
        xs = x / peak  # (B, T, C) in [-1, 1]
        mu_s = xs.mean(dim=1, keepdim=True)  # (B, 1, C)
        var_s = (xs - mu_s).pow(2).mean(dim=1, keepdim=True)  # (B, 1, C), two-pass for precision
        mu = mu_s * peak  # (B, 1, C)
        sd = torch.sqrt(var_s + NORM_EPS_REL * mu_s.pow(2)) * peak  # (B, 1, C)
        sd = torch.clamp_min(sd, NORM_EPS_ABS**0.5)  # all-zero windows: > 0 all the same
        xn = (x - mu * mask) / (sd * mask + (1.0 - mask))  # (B, T, C)
        level: Tensor | None = None
        if self.config.level_channel:  # in the value's units: the window's own mean and std
            level = (x[:, -1, -1:] - mu[:, 0, :1]) / sd[:, 0, :1]  # (B, 1)
            level = level.clamp(-LEVEL_CLIP, LEVEL_CLIP)  # a near-flat window: sd ~ 0
            xn = xn[:, :, :-1]  # (B, T, C - 1): the LSTM sees the window only

        if self.lstm_dtype is torch.float32:
            out, _ = self.lstm(xn)  # (B, T, Hd)
        else:  # bf16 LSTM, float32 before and after it
            out = self.lstm(xn.to(self.lstm_dtype))[0].float()  # (B, T, Hd)
        last = out[:, -1:, :]  # (B, 1, Hd)
        if self.training:
            ctx, _ = self.attn(last, out, out, need_weights=False)  # (B, 1, Hd)
        else:
            ctx = self._attend_one_query(last, out)  # (B, 1, Hd), same maths, fewer FLOPs
        z = self.mlp(torch.cat([last, ctx], dim=-1)[:, 0, :])  # (B, Hd)
        # .float(): under bf16 autocast the distribution arithmetic below still runs in fp32.
        p = self.head(z).float().reshape(b, self.n_params, self.config.horizon)  # (B, P, H)

        # The location is a correction to a linear forecast: persistence (the last observed
        # value) or the learnt AR skip, which starts as persistence. Either way an untrained net
        # is already a sane forecaster and training is fast.
        if self.ar is not None:
            v = xn[:, :, 0]  # (B, T) normalised values
            if level is not None:
                v = torch.cat([v, level], dim=1)  # (B, T + 1)
            # Broadcast multiply + sum instead of a matmul: stays float32 under bf16/fp16
            # autocast (the linear path carries most of the signal; bf16 would cost accuracy).
            # Cost B·H·T, negligible beside the LSTM.
            w: Tensor = self.ar.weight  # (H, T)
            base = (v.unsqueeze(1) * w.float()).sum(dim=-1) + self.ar.bias.float()  # (B, H)
        else:
            base = xn[:, -1, 0:1]  # (B, 1), broadcast over H
        loc = base + p[:, 0, :]  # (B, H)
        scale = F.softplus(p[:, 1, :]) + STD_EPS  # (B, H)
        if self.config.interval_scale != 1.0:  # a constant in the traced / exported graph
            scale = scale * self.config.interval_scale  # (B, H)
        df = DF_MIN + F.softplus(p[:, 2, :]) if self.n_params == 3 else None  # (B, H)
        return DistParams(loc, scale, df, mu[:, :, 0], sd[:, :, 0], self.config.tail_scale)

    def _attend_one_query(self, last: Tensor, out: Tensor) -> Tensor:
        """``self.attn(last, out, out)`` for a single query, with the key and value projections
        folded into the query side: ``q·(W_k h_t + b_k) = (W_kᵀq)·h_t + const`` (the constant
        cancels in the softmax) and ``Σ_t a_t (W_v h_t + b_v) = W_v (Σ_t a_t h_t) + b_v``. That
        skips projecting all T keys and values: O(Hd²) instead of O(T·Hd²) per window. Used at
        inference; training runs nn.MultiheadAttention itself (tests check they agree)."""
        a = self.attn
        b, _, hd = out.shape
        nh = a.num_heads
        dh = hd // nh
        w_q, w_k, w_v = a.in_proj_weight.chunk(3)  # (Hd, Hd) each
        b_q, _, b_v = a.in_proj_bias.chunk(3)  # (Hd,) each
        # Batched matmuls with a large M (heads or windows as the batch), not M = 1 products.
        q = (last[:, 0] @ w_q.T + b_q) * dh**-0.5  # (B, Hd)
        q = q.reshape(b, nh, dh).transpose(0, 1)  # (nh, B, dh)
        qk = (q @ w_k.reshape(nh, dh, hd)).transpose(0, 1)  # (B, nh, Hd): W_kᵀq per head
        att = (qk @ out.transpose(1, 2)).softmax(dim=-1)  # (B, nh, T)
        pooled = (att @ out).transpose(0, 1)  # (nh, B, Hd): Σ_t a_t h_t per head
        ctx = pooled @ w_v.reshape(nh, dh, hd).transpose(1, 2)  # (nh, B, dh)
        ctx = ctx.transpose(0, 1).reshape(b, 1, hd) + b_v  # (B, 1, Hd)
        return a.out_proj(ctx)  # (B, 1, Hd)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Forecast for windows ``x`` (B, T, C) float32.

        Returns ``(mean, std, lower_80, upper_80, lower_95, upper_95)``, each (B, H) in the
        value's own units, ``std > 0`` and ``lower_95 <= lower_80 <= mean <= upper_80 <= upper_95``.
        """
        return outputs_from_params(self.params(x))


def outputs_from_params(p: DistParams) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Undo the normalisation and compute std and interval bounds (all (B, H))."""
    mean = p.loc * p.unit + p.shift  # (B, H)
    width = p.scale * p.unit  # (B, H)
    if p.df is None:
        std = width
        q80, q95 = Z80, Z95
        h80, h95 = width * q80, width * q95
    else:
        std = width * torch.sqrt(p.df / (p.df - 2.0))
        h80 = width * student_t_quantile(p.df, 0.2, Z80)
        h95 = width * student_t_quantile(p.df, 0.05, Z95)
    if p.tail != 1.0:  # a constant in the traced / exported graph
        h95 = h95 * p.tail
    return mean, std, mean - h80, mean + h80, mean - h95, mean + h95


def student_t_quantile(df: Tensor, two_sided_p: float, z: float) -> Tensor:
    """Upper quantile ``t`` with ``P(|T| > t) = two_sided_p`` for Student-t with ``df`` > 2.

    G. W. Hill's approximation (CACM Algorithm 396, 1970), written branch-free with
    ``torch.where`` so it exports to ONNX. ``z`` is the normal quantile at ``1 - two_sided_p / 2``.
    Relative error < 1e-3 for df in [2.01, 1e5] and two-sided p in [0.01, 0.8] (< 6e-4 at the
    80 % and 95 % levels; checked against scipy in the tests), far below the sampling error of
    any interval coverage we measure.
    """
    n = df
    a = 1.0 / (n - 0.5)
    b = 48.0 / (a * a)
    c = ((20700.0 * a / b - 98.0) * a - 16.0) * a + 96.36
    d = ((94.5 / (b + c) - 3.0) / b + 1.0) * torch.sqrt(a * (math.pi / 2.0)) * n
    y = torch.pow(d * two_sided_p, 2.0 / n)
    # Branch 1: Cornish-Fisher-like expansion around the normal quantile.
    c1 = c + torch.where(n < 5.0, 0.3 * (n - 4.5) * (z + 0.6), torch.zeros_like(n))
    c1 = (((0.05 * d * z - 5.0) * z - 7.0) * z - 2.0) * z + b + c1
    zz = z * z
    y1 = (((((0.4 * zz + 6.3) * zz + 36.0) * zz + 94.5) / c1 - zz - 3.0) / b + 1.0) * z
    y1 = _expm1(a * y1 * y1)
    # Branch 2: small-tail series (used for very small df).
    y2 = (
        (1.0 / (((n + 6.0) / (n * y) - 0.089 * d - 0.822) * (n + 2.0) * 3.0) + 0.5 / (n + 4.0)) * y
        - 1.0
    ) * (n + 1.0) / (n + 2.0) + 1.0 / y
    return torch.sqrt(n * torch.where(y > 0.05 + a, y1, y2))


def _expm1(u: Tensor) -> Tensor:
    """exp(u) - 1 without cancellation for small u (ONNX has no Expm1 op)."""
    series = u * (1.0 + u * (0.5 + u * (1.0 / 6.0)))  # error ~ u⁴/24: < 1e-9 relative at 0.01
    return torch.where(u < 1e-2, series, torch.exp(u) - 1.0)


def count_parameters(net: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def __getattr__(name: str) -> Any:
    # Lazy re-export: `from model.network import EventForecaster` works without importing
    # Lightning for everyone who only needs ForecastNet (predictors, registry.load).
    if name == "EventForecaster":
        from model.module import EventForecaster

        return EventForecaster
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
