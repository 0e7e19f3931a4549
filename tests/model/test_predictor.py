"""Predictors behind one interface; backend choice; import isolation; GPU paths (marked gpu)."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from model.errors import ConfigError, InputError, ModelLoadError
from model.export import random_windows, rel_diff
from model.network import ForecastNet
from model.predictor import (
    Forecast,
    OnnxPredictor,
    Predictor,
    TorchPredictor,
    make_predictor,
    resolve_backend,
)
from model.registry import ModelRegistry
from tests.helpers.tiny_model import make_tiny_model_dir, tiny_config

ROOT = Path(__file__).resolve().parents[2]
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def version_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    return root / make_tiny_model_dir(root, horizon=12, num_layers=2)


@pytest.mark.parametrize("ar_skip", [False, True])
def test_every_backend_gives_the_same_forecast(
    version_dir: Path, tmp_path: Path, ar_skip: bool
) -> None:
    """Every CPU backend, with and without the AR skip (the trainer's default; torch-int8 once
    crashed on it: a quantized Linear has no weight tensor)."""
    cfg = tiny_config(horizon=12, num_layers=2, ar_skip=ar_skip)
    if ar_skip:
        version_dir = tmp_path / make_tiny_model_dir(
            tmp_path, horizon=12, num_layers=2, ar_skip=True
        )
    x = random_windows(np.random.default_rng(0), 33, 48, cfg.input_size)
    ref = make_predictor(version_dir, cfg, backend="torch", device="cpu").predict(x)
    assert isinstance(ref, Forecast) and len(ref) == 33
    for backend, tol in [("onnx", 1e-4), ("torch-int8", 5e-2), ("torch-bf16", 2e-2)]:
        p = make_predictor(version_dir, cfg, backend=backend, threads=1)
        assert isinstance(p, Predictor) and p.backend == backend and p.device == "cpu"
        fc = p.predict(x)
        for a, b in [(fc.mean, ref.mean), (fc.std, ref.std), (fc.lower["80"], ref.lower["80"])]:
            assert a.shape == (33, 12) and a.dtype == np.float32
            assert rel_diff(a, b) <= tol, backend
    assert (ref.std > 0).all() and (ref.lower["95"] <= ref.lower["80"]).all()


def test_auto_backend_choice(version_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_config(horizon=12, num_layers=2)
    if not torch.cuda.is_available():
        assert resolve_backend("auto", "auto", has_onnx=True) == ("onnx", "cpu")
        assert resolve_backend("auto", "auto", has_onnx=False) == ("torch", "cpu")
        assert make_predictor(version_dir, cfg).backend == "onnx"
        with pytest.raises(ConfigError, match="cuda"):
            resolve_backend("torch", "cuda", has_onnx=True)
    else:
        assert resolve_backend("auto", "auto", has_onnx=True) == ("torch", "cuda")
    for cpu_only in ("torch-bf16", "torch-int8"):
        with pytest.raises(ConfigError, match="CPU only"):
            resolve_backend(cpu_only, "cuda", has_onnx=True)
    with pytest.raises(ConfigError, match="backend"):
        resolve_backend("tensorrt", "cpu", has_onnx=True)
    with pytest.raises(ConfigError, match="device"):
        resolve_backend("auto", "tpu", has_onnx=True)
    with pytest.raises(ModelLoadError) as e:
        make_predictor(version_dir, cfg, backend="onnx-int8")
    assert e.value.reason == "missing"


def test_bad_shapes_and_empty_batches(version_dir: Path) -> None:
    cfg = tiny_config(horizon=12, num_layers=2)
    for p in (
        make_predictor(version_dir, cfg, backend="torch"),
        make_predictor(version_dir, cfg, backend="onnx"),
    ):
        with pytest.raises(InputError):
            p.predict(np.zeros((2, 47, cfg.input_size), np.float32))
        with pytest.raises(InputError):
            p.predict(np.zeros((48, cfg.input_size), np.float32))
        empty = p.predict(np.zeros((0, 48, cfg.input_size), np.float32))
        assert empty.mean.shape == (0, 12) and empty.upper["95"].shape == (0, 12)


def test_onnx_predictor_refuses_garbage(tmp_path: Path) -> None:
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelLoadError) as e:
        OnnxPredictor(tmp_path / "bad.onnx")
    assert e.value.reason == "format"


def test_model_package_imports_without_lightning_onnx_or_onnxruntime(version_dir: Path) -> None:
    """model.registry / model.predictor load and serve a torch model on a bare machine."""
    code = textwrap.dedent(
        f"""
        import sys
        for name in ("lightning", "pytorch_lightning", "onnx", "onnxruntime", "onnxscript",
                     "yaml", "scipy", "pandas"):
            sys.modules[name] = None  # makes `import name` raise ImportError
        import numpy as np
        import model, model.config, model.features, model.network, model.losses
        import model.weights, model.predictor, model.registry, model.onnx_check
        from model.registry import ModelRegistry
        m = ModelRegistry({str(version_dir.parent)!r}).load(backend="auto", device="cpu")
        assert m.predictor.backend == "torch", m.predictor.backend  # no onnxruntime: torch
        fc = m.predictor.predict(np.zeros((2, 48, m.config.input_size), np.float32))
        assert fc.mean.shape == (2, 12)
        loaded = [n for n in ("lightning", "onnx", "onnxruntime") if sys.modules.get(n)]
        assert not loaded, loaded
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


# ---- GPU (skipped without CUDA) ------------------------------------------------------------------


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("graphs", [False, True])
def test_cuda_fp32_matches_cpu(graphs: bool) -> None:
    cfg = tiny_config(horizon=3, num_layers=2)
    net = ForecastNet(cfg).eval()
    x = random_windows(np.random.default_rng(1), 1000, 48, cfg.input_size)
    want = TorchPredictor(copy.deepcopy(net), "cpu").predict(x)
    gpu = TorchPredictor(net, "cuda", cuda_graphs=graphs, buckets=(1, 8, 64, 512))
    for b in (1, 7, 64, 333, 1000):  # 1000 > largest bucket: split into chunks
        got = gpu.predict(x[:b])
        assert rel_diff(got.mean, want.mean[:b]) <= 5e-3
        assert rel_diff(got.upper["95"], want.upper["95"][:b]) <= 5e-3


@pytest.mark.gpu
@needs_gpu
def test_cuda_bf16_close_to_cpu() -> None:
    cfg = tiny_config(horizon=3)
    net = ForecastNet(cfg).eval()
    x = random_windows(np.random.default_rng(2), 256, 48, cfg.input_size)
    want = TorchPredictor(copy.deepcopy(net), "cpu").predict(x)
    got = TorchPredictor(net, "cuda", bf16=True, cuda_graphs=True).predict(x)
    assert rel_diff(got.mean, want.mean) <= 5e-2


@pytest.mark.gpu
@needs_gpu
def test_registry_loads_on_cuda(version_dir: Path) -> None:
    m = ModelRegistry(version_dir.parent).load(device="cuda")
    assert (m.predictor.backend, m.predictor.device) == ("torch", "cuda")


def test_torch_bf16_runs_only_the_lstm_in_bfloat16_on_a_copy() -> None:
    """Backend torch-bf16: a copy of the network whose LSTM weights are bfloat16 (oneDNN runs it
    on AMX / AVX-512 BF16); the rest and every output stay float32, the original is untouched,
    and the forecast stays within bf16 rounding of the float32 one."""
    from model.export import bf16_lstm

    cfg = tiny_config(horizon=3, num_layers=2)
    net = ForecastNet(cfg).eval()
    fast = bf16_lstm(net)
    assert fast.lstm.weight_ih_l0.dtype == torch.bfloat16 and fast.lstm_dtype is torch.bfloat16
    assert fast.head.weight.dtype == torch.float32
    assert net.lstm.weight_ih_l0.dtype == torch.float32 and net.lstm_dtype is torch.float32
    x = torch.from_numpy(random_windows(np.random.default_rng(3), 64, 48, cfg.input_size))
    with torch.no_grad():
        a, b = net(x), fast(x)
    assert all(o.dtype == torch.float32 for o in b)
    for got, want in zip(b, a, strict=True):
        assert 0 < rel_diff(got.numpy(), want.numpy()) <= 2e-2


def test_torch_bf16_predictor_runs_one_traced_graph_equal_to_the_eager_network() -> None:
    """The torch-bf16 predictor calls one TorchScript graph (the GIL is released once per batch,
    not once per op); it gives the eager bf16 network's outputs at any batch size."""
    from model.export import bf16_lstm

    cfg = tiny_config(horizon=4, num_layers=2)
    net = ForecastNet(cfg).eval()
    p = TorchPredictor(bf16_lstm(net), "cpu", backend="torch-bf16")
    assert isinstance(p._graph, torch.jit.ScriptModule)
    eager = bf16_lstm(net)
    for b in (1, 37, 300):
        x = random_windows(np.random.default_rng(b), b, 48, cfg.input_size)
        fc = p.predict(x)
        with torch.no_grad():
            ref = eager(torch.from_numpy(x))
        np.testing.assert_allclose(fc.mean, ref[0].numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(fc.upper["95"], ref[5].numpy(), rtol=1e-6, atol=1e-6)
