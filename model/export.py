"""ONNX export, parity checks and quantization (ONNX int8 and PyTorch dynamic int8).

``onnx``, ``onnxruntime`` and ``onnxruntime.quantization`` are imported inside the functions that
need them, so ``model/`` imports with only torch, numpy and safetensors installed.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from model.network import OUTPUT_NAMES, ForecastNet
from model.weights import forecast_net

ONNX_OPSET = 17
INPUT_NAME = "x"
# ONNX vs torch (fp32) tolerance at export: relative to the largest output magnitude.
ONNX_RTOL = 1e-4
# Largest relative rise of held-out MAE for which an int8 model is offered.
INT8_MAX_MAE_RISE = 0.02


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b| (with a tiny floor): the relative difference used by every parity
    check (ONNX vs torch, canary outputs). Non-finite values give ``inf``."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("inf")
    if a.size == 0:
        return 0.0
    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-12))


def export_onnx(net: nn.Module, path: Path | str, *, opset: int = ONNX_OPSET) -> Path:
    """Export ``net`` (EventForecaster or ForecastNet) to ``path`` as one self-contained ONNX file.

    The batch axis is dynamic; the window length and channels are fixed by the config. Uses the
    TorchScript exporter (``dynamo=False``): it maps ``nn.LSTM`` to the fused ONNX ``LSTM`` op,
    which onnxruntime runs (and quantizes) far faster than an unrolled loop. The network is
    deep-copied to the CPU in eval mode; ``net`` itself is not modified.
    """
    inner = copy.deepcopy(forecast_net(net)).to("cpu", torch.float32).eval()
    cfg = inner.config
    dummy = torch.zeros(2, cfg.sequence_length, cfg.input_size)
    dynamic = {name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)}
    path = Path(path)
    with warnings.catch_warnings():
        # The legacy exporter warns about LSTM + dynamic batch when h0/c0 are inputs; ours are
        # implicit zeros, which the ONNX LSTM op broadcasts over any batch (tested at 1 and 37).
        warnings.simplefilter("ignore")
        with torch.no_grad():
            torch.onnx.export(
                inner,
                (dummy,),
                str(path),
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_axes=dynamic,
                opset_version=opset,
                do_constant_folding=True,
            )
    return path


def onnx_session(path: Path | str | bytes, threads: int | None = 1) -> Any:
    """A CPU onnxruntime session with our standard options (for checks and benchmarks)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or 0
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def run_torch(net: nn.Module, x: np.ndarray) -> list[np.ndarray]:
    """The six outputs of ``net`` on ``x`` (B, T, C) as float32 numpy, CPU fp32, eval mode."""
    inner = forecast_net(net)
    was_training = inner.training
    inner.eval()
    try:
        with torch.inference_mode():
            outs = inner(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
    finally:
        inner.train(was_training)
    return [o.float().cpu().numpy() for o in outs]


def verify_onnx(
    net: nn.Module,
    path: Path | str,
    *,
    batches: tuple[int, ...] = (1, 37),
    rtol: float = ONNX_RTOL,
    seed: int = 0,
    x: np.ndarray | None = None,
) -> float:
    """Check the ONNX file against torch at each batch size; return the worst relative difference.

    Windows are random-walk series (or ``x``, cut into the batch sizes). Raises AssertionError
    naming the output and batch when the difference exceeds ``rtol``.
    """
    cfg: Any = forecast_net(net).config
    sess = onnx_session(path)
    worst = 0.0
    rng = np.random.default_rng(seed)
    for b in batches:
        xb = x[:b] if x is not None else random_windows(rng, b, cfg.sequence_length, cfg.input_size)
        got = sess.run(None, {INPUT_NAME: xb})
        ref = run_torch(net, xb)
        for name, g, r in zip(OUTPUT_NAMES, got, ref, strict=True):
            d = rel_diff(g, r)
            if not d <= rtol:
                raise AssertionError(
                    f"ONNX {name} at batch {b} differs from torch: {d:.2e} > {rtol}"
                )
            worst = max(worst, d)
    return worst


def random_windows(rng: np.random.Generator, b: int, t: int, c: int) -> np.ndarray:
    """(b, t, c) float32 test windows: a random walk with random level and scale in channel 0,
    smooth sin/cos-like values elsewhere."""
    x = rng.standard_normal((b, t, c)).astype(np.float32)
    level = rng.uniform(-50, 50, (b, 1)).astype(np.float32)
    scale = rng.uniform(0.1, 10, (b, 1)).astype(np.float32)
    x[:, :, 0] = level + scale * np.cumsum(x[:, :, 0], axis=1)
    x[:, :, 1:] = np.tanh(x[:, :, 1:])
    return x


def quantize_onnx_int8(src: Path | str, dst: Path | str) -> Path:
    """Dynamic int8 quantization (weights int8, activations quantized at run time) of an ONNX
    model with ``onnxruntime.quantization.quantize_dynamic``. LSTM, MatMul and Gemm are quantized;
    the normalisation and head arithmetic stay fp32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst = Path(dst)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(
            str(src),
            str(dst),
            weight_type=QuantType.QInt8,
            per_channel=False,
            op_types_to_quantize=["LSTM", "MatMul", "Gemm"],
        )
    return dst


@dataclass(frozen=True)
class Int8Report:
    """Held-out accuracy of an int8 model next to its fp32 original."""

    mae_fp32: float
    mae_int8: float
    rise: float  # (mae_int8 - mae_fp32) / mae_fp32
    max_rel_diff: float  # largest relative difference of any output vs fp32
    offered: bool  # rise <= max_rise
    max_rise: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def int8_report(
    fp32: Path | str | bytes,
    int8: Path | str | bytes,
    x: np.ndarray,
    y: np.ndarray,
    *,
    max_rise: float = INT8_MAX_MAE_RISE,
) -> Int8Report:
    """Compare the int8 ONNX model against the fp32 one on held-out windows ``x`` (N, T, C) with
    targets ``y`` (N, H) (or (N,) for H = 1); ``offered`` is True when the MAE rises by at most
    ``max_rise`` (relative). Non-finite int8 outputs are never offered."""
    y = np.asarray(y, dtype=np.float64)
    if y.ndim == 1:
        y = y[:, None]
    f = onnx_session(fp32).run(None, {INPUT_NAME: np.ascontiguousarray(x, np.float32)})
    q = onnx_session(int8).run(None, {INPUT_NAME: np.ascontiguousarray(x, np.float32)})
    mae_f = float(np.abs(f[0] - y).mean())
    mae_q = float(np.abs(q[0] - y).mean())
    rise = (mae_q - mae_f) / max(mae_f, 1e-12)
    diff = max(rel_diff(a, b) for a, b in zip(q, f, strict=True))
    ok = bool(np.isfinite(diff) and rise <= max_rise)
    return Int8Report(mae_f, mae_q, rise, diff, ok, max_rise)


def bf16_lstm(net: nn.Module) -> nn.Module:
    """A CPU copy of ``net``'s ForecastNet whose LSTM runs in bfloat16 (backend ``torch-bf16``).

    The LSTM is nearly all of the network's FLOPs; oneDNN runs a bf16 LSTM on AMX or AVX-512
    BF16 where the CPU has them (2–4× the float32 rate, docs/benchmarks.md) and emulates it, slower,
    where it does not. Normalisation, attention, head and the AR path stay float32. ``net`` itself
    is not modified.
    """
    inner: ForecastNet = copy.deepcopy(forecast_net(net)).to("cpu", torch.float32).eval()
    inner.lstm.to(torch.bfloat16)
    inner.lstm_dtype = torch.bfloat16
    return inner


def quantize_torch_dynamic(net: nn.Module) -> nn.Module:
    """PyTorch dynamic int8 quantization (``torch.ao.quantization.quantize_dynamic``) of the
    LSTM and Linear layers of a CPU copy of ``net``'s ForecastNet, for CPU inference.

    The attention's output projection stays fp32 (torch marks it non-quantizable). ``net`` itself
    is not modified. Returns a module with the same forward signature as ForecastNet.
    """
    from torch.ao.quantization import quantize_dynamic

    inner: ForecastNet = copy.deepcopy(forecast_net(net)).to("cpu", torch.float32).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization deprecation notice
        return quantize_dynamic(inner, {nn.LSTM, nn.Linear}, dtype=torch.qint8)
