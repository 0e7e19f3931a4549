"""ONNX parity, int8 quantization (ONNX and torch), safetensors round trip, pickle refusal."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from model.errors import ModelLoadError
from model.export import export_onnx as export
from model.export import (
    int8_report,
    quantize_onnx_int8,
    quantize_torch_dynamic,
    random_windows,
    rel_diff,
    run_torch,
    verify_onnx,
)
from model.network import OUTPUT_NAMES, ForecastNet
from model.predictor import OnnxPredictor, TorchPredictor
from model.weights import load_checkpoint_weights, load_weights, save_weights
from tests.helpers.tiny_model import tiny_config

# Stated tolerance of the quantized models on random-walk windows: every output within 5 % of
# the largest fp32 output magnitude (rel_diff), and held-out MAE within 2 % (the offer rule).
INT8_RTOL = 5e-2


@pytest.fixture(scope="module")
def nets() -> dict[str, ForecastNet]:
    torch.manual_seed(0)
    return {
        "gaussian": ForecastNet(tiny_config(num_layers=2, horizon=1)).eval(),
        "student_t": ForecastNet(tiny_config(horizon=12, distribution="student_t")).eval(),
    }


@pytest.mark.parametrize("kind", ["gaussian", "student_t"])
def test_onnx_parity_at_batch_1_and_37(
    kind: str, nets: dict[str, ForecastNet], tmp_path: Path
) -> None:
    net = nets[kind]
    path = export(net, tmp_path / "m.onnx")
    worst = verify_onnx(net, path, batches=(1, 37), rtol=1e-4)
    assert worst <= 1e-4
    # Same through the predictor interface, with real batch sizes 1 and 37.
    x = random_windows(np.random.default_rng(5), 37, 48, net.config.input_size)
    onnx_p = OnnxPredictor(path, threads=1)
    torch_p = TorchPredictor(net)
    for b in (1, 37):
        got, ref = onnx_p.predict(x[:b]), torch_p.predict(x[:b])
        assert got.mean.shape == (b, net.config.horizon) and got.mean.dtype == np.float32
        assert rel_diff(got.mean, ref.mean) <= 1e-4
        assert rel_diff(got.upper["95"], ref.upper["95"]) <= 1e-4


def test_onnx_int8_within_tolerance_and_report(
    nets: dict[str, ForecastNet], tmp_path: Path
) -> None:
    net = nets["gaussian"]
    fp32 = export(net, tmp_path / "m.onnx")
    int8 = quantize_onnx_int8(fp32, tmp_path / "m.int8.onnx")
    blob = int8.read_bytes()
    assert b"DynamicQuantizeLSTM" in blob and b"MatMulInteger" in blob  # really quantized
    x = random_windows(np.random.default_rng(6), 256, 48, net.config.input_size)
    ref = run_torch(net, x)
    got = OnnxPredictor(int8, threads=1)
    assert got.backend == "onnx-int8"
    fc = got.predict(x)
    for name, g, r in zip(OUTPUT_NAMES[:2], (fc.mean, fc.std), ref[:2], strict=True):
        assert rel_diff(g, r) <= INT8_RTOL, name
    y = x[:, -1, :1] + 0.05 * np.abs(x[:, -1, :1]) * np.random.default_rng(7).standard_normal(
        (256, 1)
    )
    rep = int8_report(fp32, int8, x, y)
    assert rep.max_rel_diff <= INT8_RTOL
    assert rep.offered == (rep.rise <= 0.02)
    strict = int8_report(fp32, int8, x, y, max_rise=-1.0)  # a rule nothing can pass
    assert not strict.offered


def test_torch_dynamic_quantization(nets: dict[str, ForecastNet]) -> None:
    net = nets["student_t"]
    q = quantize_torch_dynamic(net)
    assert any("quantized" in type(m).__module__ for m in q.modules())
    assert not any("quantized" in type(m).__module__ for m in net.modules())  # original untouched
    x = random_windows(np.random.default_rng(8), 64, 48, net.config.input_size)
    for g, r in zip(run_torch(q, x), run_torch(net, x), strict=True):
        assert np.isfinite(g).all()
        assert rel_diff(g, r) <= INT8_RTOL


def test_safetensors_round_trip_is_identical(nets: dict[str, ForecastNet], tmp_path: Path) -> None:
    net = nets["student_t"]
    save_weights(net, tmp_path / "w.safetensors")
    again = load_weights(tmp_path / "w.safetensors", net.config)
    x = random_windows(np.random.default_rng(9), 7, 48, net.config.input_size)
    for a, b in zip(run_torch(net, x), run_torch(again, x), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ModelLoadError) as e:
        load_weights(tmp_path / "w.safetensors", net.config.replace(hidden_size=32))
    assert e.value.reason == "shape"


class _Payload:
    """Unpickling this would run ``open(marker, "w")``: a stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_pickled_checkpoint_with_payload_is_refused(how: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.ckpt"
    obj = {"state_dict": {"net.head.bias": torch.zeros(2)}, "extra": _Payload(marker)}
    if how == "torch.save":
        torch.save(obj, ckpt)
    else:
        ckpt.write_bytes(pickle.dumps(obj))
    with pytest.raises(ModelLoadError) as e:
        load_checkpoint_weights(ckpt)
    assert e.value.reason == "format"
    assert "refused" in str(e.value) or "not a readable" in str(e.value)
    assert not marker.exists(), "the payload ran"


def test_checkpoint_reader_rejects_garbage_and_accepts_plain_state_dicts(
    nets: dict[str, ForecastNet], tmp_path: Path
) -> None:
    (tmp_path / "junk.ckpt").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ModelLoadError, match=r"junk\.ckpt"):
        load_checkpoint_weights(tmp_path / "junk.ckpt")
    with pytest.raises(ModelLoadError) as e:
        load_checkpoint_weights(tmp_path / "absent.ckpt")
    assert e.value.reason == "missing"
    torch.save(nets["gaussian"].state_dict(), tmp_path / "sd.pt")
    sd = load_checkpoint_weights(tmp_path / "sd.pt")
    assert set(sd) == set(nets["gaussian"].state_dict())
