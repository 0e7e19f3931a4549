"""ONNX export, parity checks and quantization (ONNX int8 and PyTorch dynamic int8).

``onnx``, ``onnxruntime`` and ``onnxruntime.quantization`` are imported inside the functions that
need them, so ``model/`` imports with only torch, numpy and safetensors installed.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Sequence
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
# ONNX vs torch (both float32) tolerance at export, per output and per window, relative to the
# scale that output is computed at (see output_diffs and docs/training.md, "Export parity").
ONNX_RTOL = 1e-4
# Outputs computed as (window level) + (something): the mean (shift + loc * unit) and the four
# bounds (mean ± half-width). Their rounding error follows the terms' magnitudes, not the result's.
LOCATION_OUTPUTS: tuple[str, ...] = ("mean", "lower_80", "upper_80", "lower_95", "upper_95")
_TINY = 1e-12
# Level / spread of a window up to which std is compared with itself. Rounding the window's mean
# (6e-8 of its level in float32) shifts every normalised input by 6e-8 x level / spread; through
# a trained network's gain (up to ~10, measured) that moves std by 6e-6 of itself at ratio 10
# and 6e-5 at 100: beyond 100 the allowed difference grows with the ratio.
RESOLVED_RATIO = 1e2
# Largest relative rise of held-out MAE for which an int8 model is offered.
INT8_MAX_MAE_RISE = 0.02


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b| (with a tiny floor) over the whole array: a batch-wide relative
    difference (int8 reports, benchmarks). The export and canary checks use
    :func:`output_diffs` instead, which does not blow up where an output cancels to near zero.
    Non-finite values give ``inf``."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("inf")
    if a.size == 0:
        return 0.0
    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-12))


def output_scales(
    outputs: Sequence[np.ndarray], x: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """The magnitude each output of each window is computed at, (B,) per output name.

    - The mean is ``shift + loc · unit`` and the bounds ``mean ± half-width``: float32 rounds
      each term, so their error follows ``|shift|`` (the window's mean, at most its largest
      ``|value|``), ``|mean|`` and the half-width, not the result, which cancels to near zero
      wherever an interval crosses zero. Their scale is the window's largest of ``|x[..., 0]|``
      (when ``x`` is given), ``|lower_95|`` and ``|upper_95|`` (= ``|mean| + half-width95``,
      the largest term of any bound).
    - ``std`` is a product (predicted scale × window std × constants), compared with itself:
      its scale is the window's largest ``|std|``. Only a window whose float32 values cannot
      resolve its own spread widens it: the network sees ``(x - mean) / spread``, which float32
      knows to ``eps · level / spread`` of the spread (a uniform shift, through the network's
      gain); beyond ``level / spread`` = :data:`RESOLVED_RATIO` the scale grows with the ratio
      (``x`` given only).
    """
    by_name = {
        name: np.abs(np.asarray(o, dtype=np.float64))
        for name, o in zip(OUTPUT_NAMES, outputs, strict=True)
    }
    b = by_name["mean"].shape[0]
    loc = np.maximum(
        by_name["lower_95"].reshape(b, -1).max(axis=1),
        by_name["upper_95"].reshape(b, -1).max(axis=1),
    )
    std = by_name["std"].reshape(b, -1).max(axis=1)
    if x is not None:
        v = np.asarray(x, dtype=np.float64)[:, :, 0]
        level = np.abs(v).max(axis=1)
        loc = np.maximum(loc, level)
        # The network's own spread floor (model.network.NORM_EPS_REL): 1e-4 of the mean.
        spread = np.maximum(v.std(axis=1), 1e-4 * np.abs(v.mean(axis=1)))
        ratio = level / np.maximum(spread, _TINY)
        std = std * np.maximum(1.0, ratio / RESOLVED_RATIO)
    scales = {name: loc for name in LOCATION_OUTPUTS}
    scales["std"] = std
    return scales


def output_diffs(
    got: Sequence[np.ndarray], ref: Sequence[np.ndarray], x: np.ndarray | None = None
) -> dict[str, float]:
    """Per output name, the largest ``|got - ref|`` of any window divided by that window's scale
    of the output (:func:`output_scales` of ``ref``, with the input windows ``x`` when given).
    The parity measure of the export check and of the registry's canary; non-finite values or
    shapes that differ give ``inf``. Per window, so a batch's other windows never hide (or
    inflate) one window's difference."""
    out: dict[str, float] = {}
    scales = output_scales(ref, x)
    for name, g, r in zip(OUTPUT_NAMES, got, ref, strict=True):
        g64 = np.asarray(g, dtype=np.float64)
        r64 = np.asarray(r, dtype=np.float64)
        if g64.shape != r64.shape or not (np.isfinite(g64).all() and np.isfinite(r64).all()):
            out[name] = float("inf")
            continue
        if g64.size == 0:
            out[name] = 0.0
            continue
        b = r64.shape[0]
        err = np.abs(g64 - r64).reshape(b, -1).max(axis=1)
        out[name] = float((err / np.maximum(scales[name], _TINY)).max())
    return out


def fp32_copy(net: nn.Module) -> ForecastNet:
    """A CPU float32 copy of ``net``'s ForecastNet in eval mode, its LSTM in float32 too: the
    reference every parity check compares against (weights trained in bf16/fp16 mixed precision
    are float32 already; a ``bf16-true`` or GPU net is converted; ``net`` is not modified)."""
    inner: ForecastNet = copy.deepcopy(forecast_net(net)).to("cpu", torch.float32).eval()
    inner.lstm_dtype = torch.float32
    return inner


def export_onnx(net: nn.Module, path: Path | str, *, opset: int = ONNX_OPSET) -> Path:
    """Export ``net`` (EventForecaster or ForecastNet) to ``path`` as one self-contained ONNX file.

    The batch axis is dynamic; the window length and channels are fixed by the config. Uses the
    TorchScript exporter (``dynamo=False``): it maps ``nn.LSTM`` to the fused ONNX ``LSTM`` op,
    which onnxruntime runs (and quantizes) far faster than an unrolled loop. The network is
    deep-copied to the CPU in eval mode; ``net`` itself is not modified.
    """
    inner = fp32_copy(net)
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
    """The six outputs of ``net`` on ``x`` (B, T, C) as float32 numpy, in eval mode, outside any
    autocast region (a caller inside a mixed-precision context still gets float32 arithmetic)."""
    inner = forecast_net(net)
    was_training = inner.training
    inner.eval()
    try:
        with torch.inference_mode(), torch.autocast("cpu", enabled=False):
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
    """Check the ONNX file against torch at each batch size; return the worst difference.

    Like with like: the reference is a CPU float32 copy of ``net`` (:func:`fp32_copy`), run
    outside autocast, as the ONNX graph is float32. Windows are random-walk series (or ``x``, cut
    into the batch sizes). The measure is :func:`output_diffs` (per output, per window, relative
    to the scale the output is computed at). Raises AssertionError naming the output and batch
    when the difference exceeds ``rtol``.
    """
    ref_net = fp32_copy(net)
    cfg: Any = ref_net.config
    sess = onnx_session(path)
    worst = 0.0
    rng = np.random.default_rng(seed)
    for b in batches:
        xb = x[:b] if x is not None else random_windows(rng, b, cfg.sequence_length, cfg.input_size)
        xb = np.ascontiguousarray(xb, dtype=np.float32)
        got = sess.run(None, {INPUT_NAME: xb})
        ref = run_torch(ref_net, xb)
        for name, d in output_diffs(got, ref, xb).items():
            if not d <= rtol:
                raise AssertionError(
                    f"ONNX {name} at batch {b} differs from torch: {d:.2e} > {rtol} "
                    "(relative to the window's scale of that output)"
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


@functools.cache
def cpu_bf16_autocast_lstm() -> str | None:
    """None when this CPU runs an LSTM under bfloat16 autocast (float32 weights, bfloat16
    compute: what ``--precision bf16-mixed`` trains with), else why not: oneDNN's first error
    line. oneDNN's kernel for it needs AVX-512; on an AVX2-only CPU (an AMD EPYC of this project's
    CI, say) it raises "could not create a primitive descriptor". An LSTM whose weights *are*
    bfloat16 (backend ``torch-bf16``, :func:`bf16_lstm`) runs there all the same, on another
    kernel. Probed once per process on a 1 × 3 × 4 input, forward and backward."""
    lstm = nn.LSTM(4, 8, batch_first=True)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lstm(torch.zeros(1, 3, 4))[0].float().sum().backward()
    except RuntimeError as exc:
        return str(exc).splitlines()[0].split(". Run workload")[0]
    return None


def bf16_lstm(net: nn.Module) -> nn.Module:
    """A CPU copy of ``net``'s ForecastNet whose LSTM runs in bfloat16 (backend ``torch-bf16``).

    The LSTM is nearly all of the network's FLOPs; oneDNN runs a bf16 LSTM on AMX or AVX-512
    BF16 where the CPU has them (2–4× the float32 rate, docs/benchmarks.md) and emulates it,
    slower, where it does not. Normalisation, attention, head and the AR path stay float32.
    ``net`` itself is not modified.
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
        q = quantize_dynamic(inner, {nn.LSTM, nn.Linear}, dtype=torch.qint8)
    # The AR skip stays float32: it carries most of the signal (int8 would cost accuracy for a
    # T x H matrix that is negligible work), and the forward reads its weight as a tensor, which
    # a dynamically quantized Linear no longer has.
    if inner.ar is not None:
        q.ar = inner.ar
    return q  # type: ignore[no-any-return]
