"""Export parity as a property: every randomly initialised, briefly trained model (sizes,
dropouts, heads, horizons, calibration factors, some trained under bf16 autocast) exports to an
ONNX graph that agrees with float32 torch within ``ONNX_RTOL``, on random-walk windows and on the
windows where a bound or the mean cancels to near zero.

The measure is :func:`model.export.output_diffs` (per output, per window, relative to the scale
the output is computed at). The old batch-wide ``rel_diff`` divided by the output's own largest
magnitude, which for a lone window whose interval crosses zero is tiny: float32 rounding of the
window's level alone then exceeded 1e-4 (the failures of issue 21).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.config import ModelConfig
from model.export import (
    ONNX_RTOL,
    cpu_bf16_autocast_lstm,
    export_onnx,
    fp32_copy,
    onnx_session,
    output_diffs,
    random_windows,
    rel_diff,
    run_torch,
    verify_onnx,
)
from model.losses import nll
from model.network import OUTPUT_NAMES, ForecastNet


def _hard_windows(rng: np.random.Generator, t: int, c: int, net: ForecastNet) -> np.ndarray:
    """Windows where float32 cancellation is worst: intervals that straddle zero (a negative
    level with a bound near 0), a large level with tiny moves, a window falling to zero."""
    x = random_windows(rng, 8, t, c)
    v = x[:, :, 0]
    v[0] = np.linspace(50.0, 0.0, t)  # falls to zero: the mean forecast near 0, level 50
    v[1] = 1e4 + 1e-2 * rng.standard_normal(t).cumsum()  # large level, tiny moves
    v[2] = -3.0 + rng.standard_normal(t)  # small negative level, interval crosses zero
    v[3] = rng.standard_normal(t) * 0.01  # all near zero
    v[4:] = v[4:] - v[4:, -1:]  # last value exactly 0: the forecast crosses zero
    # One window shifted so its upper 95 % bound lands on zero exactly (in torch).
    ref = run_torch(net, x[5:6])
    x[5, :, 0] -= float(ref[5][0, 0])
    return x.astype(np.float32)


def _briefly_trained(cfg: ModelConfig, seed: int, steps: int, bf16: bool) -> ForecastNet:
    """``steps`` Adam steps, under bf16 autocast when ``bf16`` and this CPU runs an LSTM so
    (:func:`model.export.cpu_bf16_autocast_lstm`; elsewhere those models train in float32)."""
    bf16 = bf16 and cpu_bf16_autocast_lstm() is None
    torch.manual_seed(seed)
    net = ForecastNet(cfg)
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(random_windows(rng, 64, cfg.sequence_length, cfg.input_size))
    y = x[:, -1:, 0] + torch.randn(64, cfg.horizon) * x[:, :, 0].std(dim=1, keepdim=True)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    net.train()
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = nll(net.params(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@st.composite
def configs(draw: st.DrawFn) -> tuple[ModelConfig, int, int, bool]:
    hidden = draw(st.sampled_from([8, 16, 32]))
    heads = draw(st.sampled_from([h for h in (1, 2, 4, 8) if hidden % h == 0]))
    cfg = ModelConfig(
        sequence_length=draw(st.sampled_from([12, 48])),
        hidden_size=hidden,
        attention_heads=heads,
        num_layers=draw(st.integers(1, 2)),
        dropout=draw(st.floats(0.0, 0.5)),
        horizon=draw(st.sampled_from([1, 3, 12])),
        distribution=draw(st.sampled_from(["gaussian", "student_t"])),
        ar_skip=draw(st.booleans()),
        calendar=draw(st.booleans()),
        interval_scale=draw(st.floats(0.1, 10.0)),
        tail_scale=draw(st.floats(0.66, 3.0)),
    )
    return cfg, draw(st.integers(0, 2**16)), draw(st.sampled_from([0, 5, 30])), draw(st.booleans())


WORST: list[float] = []


@pytest.mark.slow
@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=configs())
def test_export_agrees_with_float32_torch_on_every_model(tmp_path: Path, case: tuple) -> None:
    cfg, seed, steps, bf16 = case
    net = _briefly_trained(cfg, seed, steps, bf16)
    path = export_onnx(net, tmp_path / "m.onnx")
    worst = verify_onnx(net, path, batches=(1, 37), seed=seed)  # the registry's own check
    hard = _hard_windows(np.random.default_rng(seed), cfg.sequence_length, cfg.input_size, net)
    sess = onnx_session(path)
    for i in range(len(hard)):  # each window alone (batch 1: nothing else sets the scale) ...
        worst = max(worst, verify_onnx(net, path, batches=(1,), x=hard[i : i + 1]))
    got = sess.run(None, {"x": hard})  # ... and all together
    diffs = output_diffs(got, run_torch(net, hard), hard)
    worst = max(worst, *diffs.values())
    WORST.append(worst)
    assert worst <= ONNX_RTOL, (cfg, diffs)


def test_property_margin() -> None:
    """The property above holds with a margin (the tolerance is not tuned to pass): the worst
    difference seen over all its models stays 4x below ``ONNX_RTOL``. (Seen: 5.9e-6 in one run,
    1.9e-5 in a full `make test` run; oneDNN's kernel choice varies with the process's history.)"""
    if not WORST:
        pytest.skip("runs after test_export_agrees_with_float32_torch_on_every_model")
    print(f"export parity: worst {max(WORST):.2e} over {len(WORST)} models")  # pytest -rP
    assert max(WORST) <= ONNX_RTOL / 4, max(WORST)


def test_output_diffs_measure_each_output_at_the_scale_it_is_computed_at() -> None:
    """A window at level -50 whose upper 95 % bound is 1e-3: float32 holds -50 to ~4e-6, so a
    one-ulp difference is 4e-3 of the bound itself (what the old measure reported) but 8e-8 of
    the window's scale; std is compared with itself."""
    ulp = float(np.spacing(np.float32(50.0)))
    x = np.linspace(-55.0, -45.0, 4, dtype=np.float32).reshape(1, 4, 1)
    ref = [np.array([[v]], np.float32) for v in (-50.0, 25.0, -60.0, -40.0, -99.999, 1e-3)]
    got = [r.copy() for r in ref]
    got[5] = got[5] + ulp
    got[1] = got[1] * (1 + 1e-3)
    old = rel_diff(got[5], ref[5])
    new = output_diffs(got, ref, x)
    assert old > 1e-3  # the old measure fails this harmless rounding
    assert new["upper_95"] < 1e-7 and new["mean"] == 0.0
    assert new["std"] == pytest.approx(1e-3, rel=1e-3)  # a real std change is still seen
    # Shapes that differ or non-finite outputs never pass.
    got[0] = np.array([[np.nan]], np.float32)
    assert output_diffs(got, ref, x)["mean"] == np.inf


def test_the_check_catches_a_wrong_graph(tmp_path: Path) -> None:
    """Parity can fail: an ONNX file of other weights (the location moved by 1 % of a window
    std, or the 95 % tail changed by 2 %) is refused, naming the output."""
    cfg = ModelConfig(hidden_size=16, num_layers=1, attention_heads=2, horizon=3)
    net = _briefly_trained(cfg, 0, 5, False)
    path = export_onnx(net, tmp_path / "m.onnx")
    assert verify_onnx(net, path) <= ONNX_RTOL
    moved = fp32_copy(net)
    with torch.no_grad():
        moved.head.bias[0] += 0.01
    with pytest.raises(AssertionError, match="ONNX mean at batch 1"):
        verify_onnx(moved, path)
    wider = fp32_copy(net)
    wider.config = cfg.replace(tail_scale=1.02)
    with pytest.raises(AssertionError, match=r"ONNX (lower|upper)_95"):
        verify_onnx(wider, path)


def test_reference_is_float32_whatever_the_trained_dtype(tmp_path: Path) -> None:
    """Like with like: a net left in bfloat16 (``bf16-true``) is exported and compared through
    its float32 copy (same weights on both sides), and a caller inside a bf16 autocast region
    still gets float32 arithmetic."""
    cfg = ModelConfig(hidden_size=16, num_layers=1, attention_heads=2)
    net = _briefly_trained(cfg, 1, 5, True)
    half = fp32_copy(net).to(torch.bfloat16)
    with pytest.raises((RuntimeError, ValueError)):  # what comparing it as it is would do
        half(torch.zeros(1, 48, cfg.input_size))
    assert verify_onnx(half, export_onnx(half, tmp_path / "h.onnx")) <= ONNX_RTOL
    path = export_onnx(net, tmp_path / "m.onnx")
    x = random_windows(np.random.default_rng(0), 5, 48, cfg.input_size)
    plain = run_torch(net, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = run_torch(net, x)
        assert verify_onnx(net, path) <= ONNX_RTOL
    for name, a, b in zip(OUTPUT_NAMES, inside, plain, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=name)
