"""The network: shapes, gradients, scale equivariance, Student-t quantiles, learning, Lightning."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from model.config import ModelConfig
from model.export import random_windows
from model.features import build_inputs
from model.losses import forecast_metrics, gaussian_crps, nll
from model.network import Z80, Z95, ForecastNet, outputs_from_params, student_t_quantile
from tests.helpers.tiny_model import tiny_config


@pytest.mark.parametrize("horizon", [1, 12])
@pytest.mark.parametrize("distribution", ["gaussian", "student_t"])
def test_output_shapes_and_ordering(horizon: int, distribution: str) -> None:
    cfg = tiny_config(horizon=horizon, distribution=distribution, num_layers=2)
    net = ForecastNet(cfg).eval()
    x = torch.from_numpy(random_windows(np.random.default_rng(0), 5, 48, cfg.input_size))
    with torch.no_grad():
        outs = net(x)
    assert len(outs) == 6
    for o in outs:
        assert o.shape == (5, horizon) and o.dtype == torch.float32
        assert torch.isfinite(o).all()
    mean, std, l80, u80, l95, u95 = outs
    assert (std > 0).all()
    assert (l95 <= l80).all() and (l80 <= mean).all() and (mean <= u80).all() and (u80 <= u95).all()
    if distribution == "gaussian":
        torch.testing.assert_close(u80 - mean, Z80 * std)
        torch.testing.assert_close(u95 - mean, Z95 * std)


@pytest.mark.parametrize("distribution", ["gaussian", "student_t"])
def test_gradients_reach_every_parameter(distribution: str) -> None:
    cfg = tiny_config(horizon=3, num_layers=2, distribution=distribution)
    net = ForecastNet(cfg).train()
    x = torch.from_numpy(random_windows(np.random.default_rng(1), 8, 48, cfg.input_size))
    y = x[:, -1, :1] + torch.randn(8, 3)
    nll(net.params(x), y).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("distribution", ["gaussian", "student_t"])
@pytest.mark.parametrize("k", [1e-3, 0.5, 7.0, 1e4])
def test_scale_equivariance(distribution: str, k: float) -> None:
    cfg = tiny_config(horizon=4, distribution=distribution, features=("f",))
    net = ForecastNet(cfg).eval()
    x = random_windows(np.random.default_rng(2), 16, 48, cfg.input_size)
    xk = x.copy()
    xk[:, :, 0] *= k
    with torch.no_grad():
        base = net(torch.from_numpy(x))
        scaled = net(torch.from_numpy(xk))
    for b, s in zip(base, scaled, strict=True):
        torch.testing.assert_close(s, b * k, rtol=1e-4, atol=1e-5 * k * float(b.abs().max()))


def test_the_level_channel_is_read_in_the_value_channels_units() -> None:
    """A hybrid's level channel is normalised with the window's value statistics, not its own (a
    constant channel has none), and feeds the linear AR path, with weight 0 at first (an
    untrained hybrid forecasts as without it): scaling or shifting value and level together
    moves the forecast the same way, the learnt weight makes the level count, and a level far
    from a flat window is clipped (finite forecasts)."""
    cfg = tiny_config(
        horizon=3,
        seasons=(24,),
        season_gammas=(0.1,),
        season_spacing_s=3600.0,
        season_level=True,
        ar_skip=True,
    )
    assert cfg.level_channel
    net = ForecastNet(cfg).eval()
    rng = np.random.default_rng(4)
    x = random_windows(rng, 8, 48, cfg.input_size)
    x[:, :, -1] = x[:, -1:, 0] + rng.normal(0, 1, (8, 1))  # a level near the newest value
    moved = x.copy()
    moved[:, :, 0] = 3.0 * x[:, :, 0] + 50.0
    moved[:, :, -1] = 3.0 * x[:, :, -1] + 50.0
    other = x.copy()
    other[:, :, -1] += 5.0
    assert net.lstm.input_size == cfg.input_size - 1 and net.ar is not None
    with torch.no_grad():
        untrained = net(torch.from_numpy(x))[0], net(torch.from_numpy(other))[0]
        net.ar.weight[:, -1] = 0.5  # as if learnt
        base, m, o = (net(torch.from_numpy(a)) for a in (x, moved, other))
        flat = x[:1].copy()
        flat[:, :, 0] = 7.0
        flat[:, :, -1] = 1e6
        far = net(torch.from_numpy(flat))
    torch.testing.assert_close(*untrained)
    torch.testing.assert_close(m[0], 3.0 * base[0] + 50.0, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(m[1], 3.0 * base[1], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(o[0], base[0])
    assert all(torch.isfinite(t).all() for t in far)


def test_shift_equivariance_and_constant_window() -> None:
    cfg = tiny_config(calendar=False)
    net = ForecastNet(cfg).eval()
    x = torch.from_numpy(random_windows(np.random.default_rng(3), 4, 48, 1))
    with torch.no_grad():
        a = net(x)
        b = net(x + 100.0)
        flat = net(torch.full((2, 48, 1), 5.0))
    torch.testing.assert_close(b[0], a[0] + 100.0, rtol=0, atol=2e-3)
    torch.testing.assert_close(b[1], a[1], rtol=1e-3, atol=1e-4)
    assert torch.isfinite(torch.stack(flat)).all() and (flat[1] > 0).all()


def test_student_t_quantiles_match_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    df = np.concatenate([np.linspace(2.01, 5, 40), np.geomspace(5, 1e5, 40)])
    for p, z in [(0.2, Z80), (0.05, Z95)]:
        got = student_t_quantile(torch.tensor(df, dtype=torch.float32), p, z).numpy()
        want = stats.t.ppf(1 - p / 2, df)
        np.testing.assert_allclose(got, want, rtol=6e-4)
    for p in (0.8, 0.6, 0.4, 0.1, 0.01):  # other levels (quantile loss of the evaluator)
        z = float(stats.norm.ppf(1 - p / 2))
        got = student_t_quantile(torch.tensor(df, dtype=torch.float32), p, z).numpy()
        np.testing.assert_allclose(got, stats.t.ppf(1 - p / 2, df), rtol=1e-3)


def test_crps_closed_form_matches_sampling() -> None:
    g = torch.Generator().manual_seed(0)
    mean, std, y = torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([2.5])
    s = mean + std * torch.randn(200_000, generator=g)
    s2 = mean + std * torch.randn(200_000, generator=g)
    mc = (s - y).abs().mean() - 0.5 * (s - s2).abs().mean()
    torch.testing.assert_close(gaussian_crps(y, mean, std), mc.reshape(1), rtol=2e-2, atol=0)


def _synthetic(cfg: ModelConfig, n: int, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
    """Hourly series: random level, daily sine of random amplitude, Gaussian noise of 10 % of the
    amplitude. The next value is learnable from the window and the calendar channels."""
    t = cfg.sequence_length
    start = rng.integers(0, 10_000, (n, 1)) * 3600.0
    ts = 1.7e9 + start + 3600.0 * np.arange(t + 1)[None, :]
    level = rng.uniform(-100, 100, (n, 1))
    amp = rng.uniform(1, 20, (n, 1))
    v = level + amp * np.sin(2 * np.pi * ts / 86_400) + 0.1 * amp * rng.standard_normal(ts.shape)
    x = build_inputs(ts[:, :-1], v[:, :-1], None, cfg)
    return torch.from_numpy(x), torch.from_numpy(v[:, -1:].astype(np.float32))


def test_learns_a_synthetic_series_with_calibrated_intervals() -> None:
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    cfg = tiny_config(learning_rate=1e-2)
    xtr, ytr = _synthetic(cfg, 4096, rng)
    xva, yva = _synthetic(cfg, 1000, rng)
    net = ForecastNet(cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    steps = 300
    # Annealing the learning rate to ~0 makes the end point stable (no last-step noise).
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(0)

    def validate() -> tuple[float, dict[str, float]]:
        net.eval()
        with torch.no_grad():
            p = net.params(xva)
            m = forecast_metrics(outputs_from_params(p), yva)
        net.train()
        return float(nll(p, yva)), {k: float(v) for k, v in m.items()}

    start_nll, start = validate()
    for _ in range(steps):
        i = torch.randint(0, len(xtr), (64,), generator=g)
        loss = nll(net.params(xtr[i]), ytr[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    end_nll, end = validate()
    # Normalised NLL: starting near +0.8, a learned model reaches well below zero.
    assert end_nll < start_nll - 0.8, (start_nll, end_nll)
    assert end["mae"] < 0.6 * start["mae"]
    assert 0.70 <= end["coverage_80"] <= 0.90, end
    assert 0.85 <= end["coverage_95"] <= 0.99, end
    assert time.perf_counter() - t0 < 60


def test_lightning_module_trains_logs_and_checkpoints_weights_only(tmp_path: Path) -> None:
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from model.module import EventForecaster
    from model.network import EventForecaster as Lazy
    from model.weights import build_net, load_checkpoint_weights

    assert Lazy is EventForecaster
    cfg = tiny_config(horizon=2)
    x = torch.from_numpy(random_windows(np.random.default_rng(4), 64, 48, cfg.input_size))
    y = x[:, -1, :1].repeat(1, 2) + 0.1 * torch.randn(64, 2)
    dl = DataLoader(TensorDataset(x, y), batch_size=32)
    model = EventForecaster(cfg.to_dict(), learning_rate=5e-3)
    assert model.config.learning_rate == 5e-3 and model.hparams["config"]["horizon"] == 2
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        enable_checkpointing=False,
    )
    trainer.fit(model, dl, dl)
    logged = trainer.callback_metrics
    for k in ("loss", "mae", "rmse", "r2", "nll", "crps", "coverage_80", "coverage_95"):
        assert f"val_{k}" in logged and torch.isfinite(logged[f"val_{k}"]), k
    assert "train_loss_epoch" in logged
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    # Resuming/reading needs no unpickling of arbitrary objects.
    raw = torch.load(ckpt, weights_only=True)
    assert raw["hyper_parameters"]["config"]["horizon"] == 2
    net = build_net(model.config, load_checkpoint_weights(ckpt))
    with torch.no_grad():
        torch.testing.assert_close(net(x[:4]), model.eval()(x[:4]), rtol=0, atol=0)
    again = EventForecaster.load_from_checkpoint(ckpt, weights_only=True)
    assert again.config == model.config


@pytest.mark.parametrize(("hidden", "heads"), [(16, 2), (64, 4), (64, 1)])
def test_folded_inference_attention_equals_multihead_attention(hidden: int, heads: int) -> None:
    cfg = tiny_config(hidden_size=hidden, attention_heads=heads, horizon=2)
    net = ForecastNet(cfg)
    out = torch.randn(6, 48, hidden)
    last = out[:, -1:, :]
    with torch.no_grad():
        ref, _ = net.attn(last, out, out, need_weights=False)
        torch.testing.assert_close(net._attend_one_query(last, out), ref, rtol=1e-5, atol=1e-6)
        x = torch.from_numpy(random_windows(np.random.default_rng(0), 6, 48, cfg.input_size))
        train_out = net.train()(x)  # dropout is 0: train and eval paths must agree
        eval_out = net.eval()(x)
    for a, b in zip(train_out, eval_out, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_extreme_magnitudes_give_finite_forecasts():
    """A window holding 1.86e19 once squared its way to an infinite variance (NaN forecasts);
    statistics are now taken on the window scaled by its peak, so outputs stay finite."""
    torch.manual_seed(0)
    net = ForecastNet(ModelConfig(hidden_size=16, num_layers=1, attention_heads=2)).eval()
    x = torch.zeros(3, 48, net.config.input_size)
    x[0, -1, 0] = 1.86e19  # 47 zeros then one huge value
    x[1, :, 0] = torch.linspace(-1e30, 1e30, 48)
    # x[2] stays all zeros: the std floor keeps it finite too
    with torch.no_grad():
        outputs = net(x)
    for out in outputs:
        assert torch.isfinite(out).all()
    mean, std = outputs[0], outputs[1]
    assert (std > 0).all()
    assert mean[0, 0].abs() < 1e21  # on the window's own scale, not inf
