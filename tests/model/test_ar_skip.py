"""The linear AR skip on the location and the calibrated interval scale (both in the graph)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from model.config import ModelConfig
from model.export import export_onnx, random_windows, verify_onnx
from model.features import build_inputs
from model.losses import nll
from model.network import ForecastNet
from model.weights import build_net, state_dict_cpu
from tests.helpers.cpu import needs_bf16_autocast
from tests.helpers.tiny_model import tiny_config

# A stationary AR(2) that oscillates: persistence is poor, a linear AR on the window is optimal.
PHI = (1.6, -0.8)
NOISE = 1.0


def _ar2_windows(cfg: ModelConfig, n: int, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
    """``n`` windows of an AR(2) series (burn-in 200 steps) with their next ``H`` values and the
    oracle one-step forecast (the true conditional mean) of the first target."""
    t, h = cfg.sequence_length, cfg.horizon
    total = 200 + t + h
    e = NOISE * rng.standard_normal((n, total))
    v = np.zeros((n, total))
    for i in range(2, total):
        v[:, i] = PHI[0] * v[:, i - 1] + PHI[1] * v[:, i - 2] + e[:, i]
    v = v[:, 200:] + 50.0  # a level, so the normalisation has something to remove
    ts = 1.7e9 + 3600.0 * np.arange(t + h)[None, :].repeat(n, 0)
    x = build_inputs(ts[:, :t], v[:, :t], None, cfg)
    oracle = 50.0 + PHI[0] * (v[:, t - 1] - 50.0) + PHI[1] * (v[:, t - 2] - 50.0)
    return (torch.from_numpy(x), torch.from_numpy(v[:, t:].astype(np.float32)),
            torch.from_numpy(oracle.astype(np.float32)))  # fmt: skip


def _train(cfg: ModelConfig, x: torch.Tensor, y: torch.Tensor, steps: int) -> ForecastNet:
    torch.manual_seed(0)
    net = ForecastNet(cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.learning_rate, total_steps=steps,
                                                pct_start=0.1)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        i = torch.randint(0, len(x), (64,), generator=g)
        loss = nll(net.params(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


def test_ar_skip_starts_as_persistence() -> None:
    cfg = tiny_config(horizon=4, ar_skip=True)
    net = ForecastNet(cfg).eval()
    assert net.ar is not None and tuple(net.ar.weight.shape) == (4, 48)
    with torch.no_grad():  # without the head's correction, the location is the AR path alone
        net.head.weight.zero_()
        net.head.bias.zero_()
    x = torch.from_numpy(random_windows(np.random.default_rng(0), 7, 48, cfg.input_size))
    mean = net(x)[0]
    torch.testing.assert_close(mean, x[:, -1:, 0].expand(7, 4), rtol=1e-5, atol=1e-4)


def test_ar_skip_fits_a_pure_ar_series_quickly() -> None:
    """A tiny net with the AR path gets within 10 % of the oracle's MAE on an AR(2) series
    (where persistence is 1.5x worse) in 200 steps of batch 64."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    cfg = tiny_config(horizon=1, learning_rate=1e-2, ar_skip=True)
    xtr, ytr, _ = _ar2_windows(cfg, 4096, rng)
    xva, yva, oracle = _ar2_windows(cfg, 2000, rng)
    oracle_mae = float((yva[:, 0] - oracle).abs().mean())
    persistence_mae = float((yva[:, 0] - xva[:, -1, 0]).abs().mean())
    net = _train(cfg, xtr, ytr, steps=200)
    with torch.no_grad():
        mae = float((net(xva)[0][:, 0] - yva[:, 0]).abs().mean())
    assert persistence_mae > 1.5 * oracle_mae  # the series is not a persistence problem
    assert mae < 1.1 * oracle_mae, (mae, oracle_mae, persistence_mae)
    assert time.perf_counter() - t0 < 60


@pytest.mark.parametrize("tail", [1.0, 1.25, 0.7])
def test_interval_and_tail_scales_multiply_the_intervals_in_the_graph(
    tmp_path: Path, tail: float
) -> None:
    """``interval_scale`` scales std and both intervals; ``tail_scale`` the 95 % one on top."""
    torch.manual_seed(0)
    cfg = tiny_config(horizon=3, ar_skip=True, distribution="student_t")
    net = ForecastNet(cfg).eval()
    wide = build_net(cfg.replace(interval_scale=1.7, tail_scale=tail), state_dict_cpu(net))
    x = torch.from_numpy(random_windows(np.random.default_rng(1), 9, 48, cfg.input_size))
    with torch.no_grad():
        a, b = net(x), wide(x)
    torch.testing.assert_close(b[0], a[0])  # the mean does not move
    torch.testing.assert_close(b[1], 1.7 * a[1], rtol=1e-5, atol=1e-6)  # std
    for i, k in ((2, 1.7), (3, 1.7), (4, 1.7 * tail), (5, 1.7 * tail)):  # each bound - mean
        torch.testing.assert_close(b[i] - b[0], k * (a[i] - a[0]), rtol=1e-4, atol=1e-4)
    assert bool((b[4] <= b[2]).all() and (b[5] >= b[3]).all())  # 95 % contains 80 %
    # ... and the ONNX export carries the AR path and both scales.
    path = export_onnx(wide, tmp_path / "m.onnx")
    assert verify_onnx(wide, path, batches=(1, 37), rtol=1e-4) <= 1e-4


@needs_bf16_autocast
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_ar_path_stays_float32_under_autocast(dtype: torch.dtype) -> None:
    cfg = tiny_config(horizon=2, ar_skip=True)
    net = ForecastNet(cfg).eval()
    x = torch.from_numpy(random_windows(np.random.default_rng(2), 5, 48, cfg.input_size))
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        p = net.params(x)
    assert p.loc.dtype == torch.float32 and p.scale.dtype == torch.float32
