"""Predictors: one interface over torch (CPU or CUDA) and onnxruntime (fp32 or int8).

A predictor holds a loaded model and turns a batch of input windows (from
:func:`model.features.build_inputs`) into a :class:`Forecast` of float32 numpy arrays. It never
reads files on its own after construction and is safe to call from one inference thread while
the event loop keeps running (torch and onnxruntime release the GIL).

Imports of onnxruntime happen inside the functions that need it.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from model.config import BACKENDS, CPU_ONLY_BACKENDS, DEVICES, ModelConfig
from model.errors import ConfigError, InputError, ModelLoadError
from model.weights import forecast_net, load_weights

log = logging.getLogger(__name__)

# Batch-size buckets for CUDA graphs: a batch is padded up to the next bucket so that a handful of
# captured graphs serve every size; larger batches are split into chunks of the largest bucket.
DEFAULT_BUCKETS: tuple[int, ...] = (1, 8, 32, 128, 512, 1024, 2048, 4096, 8192)


@dataclass
class Forecast:
    """Forecasts for B windows and H steps; every array is (B, H) float32.

    ``lower``/``upper`` are keyed by interval level: ``"80"`` and ``"95"``.
    """

    mean: np.ndarray
    std: np.ndarray
    lower: dict[str, np.ndarray]
    upper: dict[str, np.ndarray]

    @classmethod
    def from_outputs(cls, outs: Sequence[np.ndarray]) -> Forecast:
        """From the network's six outputs (mean, std, lower_80, upper_80, lower_95, upper_95)."""
        m, s, l80, u80, l95, u95 = (np.asarray(o, dtype=np.float32) for o in outs)
        return cls(m, s, {"80": l80, "95": l95}, {"80": u80, "95": u95})

    def __len__(self) -> int:
        return int(self.mean.shape[0])

    def shifted(self, offsets: np.ndarray) -> Forecast:
        """The forecast moved by ``offsets`` (B, H): mean and bounds (a model with seasons
        forecasts what they leave, and its forecast is that plus their part); std unchanged."""

        def move(a: np.ndarray) -> np.ndarray:
            return (a + offsets).astype(np.float32)

        return Forecast(
            move(self.mean), self.std, {k: move(v) for k, v in self.lower.items()},
            {k: move(v) for k, v in self.upper.items()},
        )  # fmt: skip

    def finite_rows(self) -> np.ndarray:
        """(B,) bool: the rows whose mean, std and bounds are all finite and whose std is > 0
        (the contract's forecast); the others must not be published."""
        ok = np.isfinite(self.mean).all(axis=1) & np.isfinite(self.std).all(axis=1)
        ok &= (self.std > 0).all(axis=1)
        for bound in (*self.lower.values(), *self.upper.values()):
            ok &= np.isfinite(bound).all(axis=1)
        return ok  # type: ignore[no-any-return]


@runtime_checkable
class Predictor(Protocol):
    """What the worker, the HTTP service and the evaluator call."""

    backend: str  # "torch" | "torch-bf16" | "torch-int8" | "onnx" | "onnx-int8"
    device: str  # "cpu" | "cuda" (or "cuda:N")

    def predict(self, x: np.ndarray) -> Forecast:
        """Forecasts for windows ``x`` (B, T, C) float32; B may be 0."""
        ...


def check_windows(x: Any, config: ModelConfig) -> np.ndarray:
    """``x`` as a C-contiguous float32 (B, T, C) array matching ``config``.

    Raises InputError when the shape does not match (T must equal ``sequence_length`` and C
    ``input_size``). Values are not checked for finiteness here (build_inputs does that).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    want = (config.sequence_length, config.input_size)
    if x.ndim != 3 or x.shape[1:] != want:
        raise InputError(f"windows: expected shape (batch, {want[0]}, {want[1]}), got {x.shape}")
    return x


def _empty(config: ModelConfig) -> Forecast:
    z = np.zeros((0, config.horizon), dtype=np.float32)
    return Forecast.from_outputs([z] * 6)


class TorchPredictor:
    """A torch model resident on one device, run under ``torch.inference_mode``.

    On CUDA, input batches go through a pinned host buffer (asynchronous copy), ``bf16`` runs the
    network under bf16 autocast (the distribution arithmetic stays fp32), and ``cuda_graphs``
    captures one CUDA graph per batch bucket, padding each batch up to the next bucket and
    replaying the graph (launch overhead vanishes; a bucket whose capture fails falls back to eager
    execution with a warning). On CPU, ``bf16`` and ``cuda_graphs`` are ignored; backend
    ``torch-bf16`` runs the network as one traced graph (:func:`_one_call`).

    The predictor takes ownership of ``net`` (moved to ``device``, put in eval mode).
    """

    def __init__(
        self,
        net: nn.Module,
        device: str = "cpu",
        bf16: bool = False,
        cuda_graphs: bool = False,
        buckets: Sequence[int] = DEFAULT_BUCKETS,
        *,
        backend: str = "torch",
    ) -> None:
        self.net = forecast_net(net)
        self.config: ModelConfig = self.net.config
        self.backend = backend
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device: CUDA requested but torch sees no GPU")
        self._dev = dev
        self.device = str(dev)
        self.net.to(dev).eval()
        self._cuda = dev.type == "cuda"
        self.bf16 = bool(bf16 and self._cuda)
        self.cuda_graphs = bool(cuda_graphs and self._cuda)
        self.buckets = tuple(sorted({int(b) for b in buckets if int(b) > 0})) or DEFAULT_BUCKETS
        self._lock = threading.Lock()
        self._graphs: dict[int, _GraphRunner | None] = {}
        self._pinned: Tensor | None = None
        # torch-bf16 on the CPU: the network as one traced graph (see _one_call).
        cpu_bf16 = backend == "torch-bf16" and not self._cuda
        self._graph = _one_call(self.net, self.config) if cpu_bf16 else None

    def predict(self, x: np.ndarray) -> Forecast:
        """Forecasts for ``x`` (B, T, C); raises InputError on a shape mismatch."""
        x = check_windows(x, self.config)
        if len(x) == 0:
            return _empty(self.config)
        with self._lock, torch.inference_mode():
            if not self._cuda:
                if self._graph is None:
                    outs = self.net(torch.from_numpy(x))
                else:  # the plain graph interpreter: the optimising one re-specialises on
                    # every new batch size and ran ~25 % slower here (docs/benchmarks.md)
                    with torch.jit.optimized_execution(False):
                        outs = self._graph(torch.from_numpy(x))
                return Forecast.from_outputs([o.numpy() for o in outs])
            step = self.buckets[-1]
            parts = [self._predict_cuda(x[i : i + step]) for i in range(0, len(x), step)]
        if len(parts) == 1:
            return Forecast.from_outputs(parts[0])
        return Forecast.from_outputs([np.concatenate(p) for p in zip(*parts, strict=True)])

    # ---- CUDA ----------------------------------------------------------------------------------

    def _stage(self, x: np.ndarray) -> Tensor:
        """Copy ``x`` into pinned host memory and start an asynchronous copy to the GPU."""
        n = len(x)
        if self._pinned is None or self._pinned.shape[0] < n:
            shape = (max(n, self.buckets[-1]), *x.shape[1:])
            self._pinned = torch.empty(shape, dtype=torch.float32).pin_memory()
        host = self._pinned[:n]
        host.numpy()[...] = x
        return host.to(self._dev, non_blocking=True)

    def _predict_cuda(self, x: np.ndarray) -> list[np.ndarray]:
        n = len(x)
        xd = self._stage(x)  # (n, T, C) on the GPU
        if self.cuda_graphs:
            bucket = next(b for b in self.buckets if b >= n)
            runner = self._graphs.get(bucket, ...)
            if runner is ...:
                runner = self._capture(bucket)
                self._graphs[bucket] = runner
            if runner is not None:
                outs = runner.run(xd)
                return [o[:n].float().cpu().numpy() for o in outs]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16):
            outs = self.net(xd)
        return [o.float().cpu().numpy() for o in outs]

    def _capture(self, bucket: int) -> _GraphRunner | None:
        try:
            return _GraphRunner(self.net, bucket, self.config, self._dev, self.bf16)
        except Exception as e:  # capture is an optimisation: never fail a prediction over it
            log.warning(
                "CUDA graph capture failed for batch bucket %d, running it eagerly: %s", bucket, e
            )
            return None


def _one_call(net: nn.Module, config: ModelConfig) -> torch.jit.ScriptModule:
    """``net`` as one TorchScript graph (``torch.jit.trace``; any batch size).

    Called from Python, the graph runs all its ops in C++ with the GIL released once. The eager
    network makes ~50 Python-level op calls per forward, and in the worker each of them has to
    take the GIL back from the event loop running on the other thread: measured 10 → 183 ms per
    200-window batch of the small bf16 model beside a busy Python thread, traced 8 → 33 ms
    (onnxruntime 10 → 24 ms; docs/benchmarks.md).
    """
    from model.export import random_windows

    x = random_windows(np.random.default_rng(0), 8, config.sequence_length, config.input_size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice (torch.compile needs a
        return torch.jit.trace(net, torch.from_numpy(x), check_trace=False)  # C compiler)


class _GraphRunner:
    """One captured CUDA graph for a fixed batch size (static input and output buffers)."""

    def __init__(
        self, net: nn.Module, batch: int, config: ModelConfig, dev: torch.device, bf16: bool
    ) -> None:
        self.static_in = torch.zeros(batch, config.sequence_length, config.input_size, device=dev)

        # cache_enabled=False: autocast's weight-cast cache must not leak across graph capture.
        def ac() -> torch.autocast:
            return torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16, cache_enabled=False)

        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side), ac():
            for _ in range(3):  # warm-up: cuDNN picks algorithms, allocator settles
                net(self.static_in)
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), ac():
            self.static_out: tuple[Tensor, ...] = tuple(net(self.static_in))

    def run(self, xd: Tensor) -> tuple[Tensor, ...]:
        n = xd.shape[0]
        self.static_in[:n].copy_(xd)
        if n < self.static_in.shape[0]:
            # Padding rows: zeros are a valid (constant) window; their outputs are discarded.
            self.static_in[n:].zero_()
        self.graph.replay()
        return self.static_out


class OnnxPredictor:
    """An onnxruntime session: CUDA provider when available (or as ``providers`` say), otherwise
    CPU with ``threads`` intra-op threads (None: onnxruntime's default), one inter-op thread and
    spinning off (idle threads sleep instead of burning the cores the worker needs).

    ``path`` is the ONNX file, or its bytes (then external data is not resolvable).
    Raises ModelLoadError(reason="format") when onnxruntime cannot load the model.
    """

    def __init__(
        self,
        path: Path | str | bytes,
        threads: int | None = None,
        providers: Sequence[str] | None = None,
        *,
        backend: str | None = None,
    ) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = int(threads) if threads else 0
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if providers is None:
            avail = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in avail]
        name = "<bytes>" if isinstance(path, bytes) else str(path)
        try:
            model = path if isinstance(path, bytes) else str(path)
            self.session = ort.InferenceSession(model, so, providers=list(providers))
        except Exception as e:
            raise ModelLoadError(
                f"{name}: onnxruntime cannot load the model ({e})", "format"
            ) from e
        inp = self.session.get_inputs()[0]
        self._input = inp.name
        self._shape = tuple(inp.shape)
        if backend is None:
            backend = "onnx-int8" if "int8" in Path(name).name else "onnx"
        self.backend = backend
        self.device = (
            "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        )

    def predict(self, x: np.ndarray) -> Forecast:
        """Forecasts for ``x`` (B, T, C); raises InputError on a shape mismatch."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 3 or tuple(x.shape[1:]) != tuple(self._shape[1:]):
            raise InputError(
                f"windows: expected shape (batch, {self._shape[1]}, {self._shape[2]}), "
                f"got {x.shape}"
            )
        if len(x) == 0:
            h = self.session.get_outputs()[0].shape[1]
            z = np.zeros((0, int(h)), dtype=np.float32)
            return Forecast.from_outputs([z] * 6)
        return Forecast.from_outputs(self.session.run(None, {self._input: x}))


# ---- construction ----------------------------------------------------------------------------


def cuda_available() -> bool:
    """True when torch sees a CUDA GPU."""
    return torch.cuda.is_available()


def _onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: str, has_onnx: bool) -> tuple[str, str]:
    """The concrete ``(backend, device)`` for the requested ones.

    ``device="auto"``: CUDA when torch sees a GPU, else CPU. ``backend="auto"``: torch on CUDA;
    on CPU onnxruntime when an ONNX file exists and onnxruntime is installed, else torch.
    Raises ConfigError for unknown names, CUDA requested without a GPU, or a CPU-only backend
    (torch-bf16, torch-int8) on CUDA.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    if device not in DEVICES:
        raise ConfigError(f"device: expected one of {', '.join(DEVICES)}, got {device!r}")
    if device == "auto":
        device = "cuda" if cuda_available() else "cpu"
    elif device == "cuda" and backend in ("auto", "torch") and not cuda_available():
        raise ConfigError("device: cuda requested but torch sees no GPU")
    if backend == "auto":
        if device == "cuda":
            backend = "torch"
        else:
            backend = "onnx" if has_onnx and _onnxruntime_available() else "torch"
    if backend in CPU_ONLY_BACKENDS and device == "cuda":
        raise ConfigError(f"backend: {backend} runs on the CPU only")
    return backend, device


def build_predictor(
    config: ModelConfig,
    net: nn.Module | None,
    backend: str,
    device: str,
    *,
    onnx: Path | bytes | None = None,
    threads: int | None = None,
    bf16: bool = False,
    cuda_graphs: bool | None = None,
) -> Predictor:
    """A predictor from already loaded parts (``backend``/``device`` concrete, see
    :func:`resolve_backend`). ``onnx`` is the model file (or bytes) for the ONNX backends.

    ``threads`` sets onnxruntime's intra-op threads; for torch on the CPU it calls
    ``torch.set_num_threads`` (process-wide: torch has no per-model setting).
    """
    if backend in ("onnx", "onnx-int8"):
        if onnx is None:
            raise ModelLoadError(f"backend {backend}: no ONNX file for it", "missing")
        providers = (
            ["CUDAExecutionProvider", "CPUExecutionProvider"]
            if device == "cuda"
            else ["CPUExecutionProvider"]
        )
        return OnnxPredictor(onnx, threads=threads, providers=providers, backend=backend)
    if device == "cpu" and threads:
        torch.set_num_threads(int(threads))
    if net is None:
        raise ValueError(f"backend {backend}: a torch network is needed")
    if backend == "torch-int8":
        from model.export import quantize_torch_dynamic

        return TorchPredictor(quantize_torch_dynamic(net), "cpu", backend="torch-int8")
    if backend == "torch-bf16":
        from model.export import bf16_lstm

        return TorchPredictor(bf16_lstm(net), "cpu", backend="torch-bf16")
    graphs = (device == "cuda") if cuda_graphs is None else cuda_graphs
    return TorchPredictor(net, device, bf16=bf16, cuda_graphs=graphs)


def make_predictor(
    version_dir: Path,
    config: ModelConfig,
    backend: str = "auto",
    device: str = "auto",
    threads: int | None = None,
    *,
    bf16: bool = False,
    cuda_graphs: bool | None = None,
) -> Predictor:
    """A predictor for the model files in ``version_dir`` (no manifest or canary checks: use
    :meth:`model.registry.ModelRegistry.load` for a version from a model directory).

    backend: ``auto`` | ``torch`` | ``torch-bf16`` | ``torch-int8`` | ``onnx`` | ``onnx-int8``;
    device: ``auto`` | ``cpu`` | ``cuda`` (see :func:`resolve_backend`). CUDA graphs default to on
    for torch on CUDA. Raises ConfigError for bad names, ModelLoadError when a file is missing
    (reason ``missing``) or malformed (``format``/``shape``).
    """
    version_dir = Path(version_dir)
    onnx_name = {"onnx-int8": "model.int8.onnx"}.get(backend, "model.onnx")
    onnx_path = version_dir / onnx_name
    backend, device = resolve_backend(backend, device, onnx_path.is_file())
    if backend in ("onnx", "onnx-int8"):
        if not onnx_path.is_file():
            raise ModelLoadError(f"{onnx_path}: file missing for backend {backend}", "missing")
        return build_predictor(config, None, backend, device, onnx=onnx_path, threads=threads)
    net = load_weights(version_dir / "model.safetensors", config)
    return build_predictor(
        config, net, backend, device, threads=threads, bf16=bf16, cuda_graphs=cuda_graphs
    )
