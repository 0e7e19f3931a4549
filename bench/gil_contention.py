"""Inference beside a busy Python thread: what the worker's event loop does to each predictor.

The worker runs inference in a thread while its event loop (decode, window updates, encoding,
Kafka) runs Python on another. A predictor that calls into Python once per operation has to take
the GIL back from that loop every time; one that makes a single call releases it once. This
script times one batch of the small model per predictor, alone and beside a thread that spins in
Python, and prints a table:

    python -m bench.gil_contention [--batch 200] [--reps 20]

Predictors: the eager bf16 network (what ``torch-bf16`` ran before it was traced), the
``torch-bf16`` predictor (one traced graph), ``torch`` (eager float32) and ``onnx``; and the
model inputs' building (``build_inputs``: a few dozen short numpy calls, each of which takes the
GIL back). The switch interval is the worker's (0.5 ms, stream/worker.py) unless
``--switch-interval-ms`` says.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from model.config import ModelConfig
from model.export import bf16_lstm, export_onnx, random_windows
from model.features import build_inputs
from model.network import ForecastNet
from model.predictor import OnnxPredictor, TorchPredictor


def timed(f: Callable[[], object], reps: int, busy: bool) -> float:
    """Mean seconds per call of ``f``, optionally with a Python-spinning thread beside it."""
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(200))

    th = threading.Thread(target=spin, daemon=True) if busy else None
    if th is not None:
        th.start()
    try:
        t0 = time.perf_counter()
        for _ in range(reps):
            f()
        return (time.perf_counter() - t0) / reps
    finally:
        stop.set()
        if th is not None:
            th.join()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--switch-interval-ms", type=float, default=0.5)
    a = ap.parse_args(argv)
    sys.setswitchinterval(a.switch_interval_ms / 1000)
    torch.set_num_threads(a.threads)
    cfg = ModelConfig(hidden_size=64, num_layers=2, attention_heads=8)  # the small model
    torch.manual_seed(0)
    net = ForecastNet(cfg).eval()
    x = random_windows(np.random.default_rng(0), a.batch, cfg.sequence_length, cfg.input_size)
    rng = np.random.default_rng(1)
    ts = 1.7e9 + 300.0 * np.arange(cfg.sequence_length)[None, :] + np.zeros((a.batch, 1))
    values = rng.normal(size=(a.batch, cfg.sequence_length))
    eager = bf16_lstm(net)
    traced = TorchPredictor(bf16_lstm(net), "cpu", backend="torch-bf16")
    fp32 = TorchPredictor(net, "cpu")
    onnx = OnnxPredictor(
        export_onnx(net, Path(tempfile.mkdtemp()) / "model.onnx"), threads=a.threads
    )

    def eager_bf16() -> object:
        with torch.inference_mode():
            return eager(torch.from_numpy(x))

    cases: dict[str, Callable[[], object]] = {
        "torch-bf16 eager (before tracing)": eager_bf16,
        "torch-bf16 (one traced graph)": lambda: traced.predict(x),
        "torch (eager float32)": lambda: fp32.predict(x),
        "onnx": lambda: onnx.predict(x),
        "build_inputs (the model inputs of the windows)": lambda: build_inputs(ts, values, {}, cfg),
    }
    print(
        f"| predictor (small model, batch {a.batch}, {a.threads} threads, switch interval "
        f"{a.switch_interval_ms:g} ms) | alone ms | beside a busy Python thread ms | ratio |"
    )
    print("|---|---:|---:|---:|")
    for name, f in cases.items():
        for _ in range(3):
            f()
        alone, busy = timed(f, a.reps, False), timed(f, a.reps, True)
        print(f"| {name} | {alone * 1e3:.2f} | {busy * 1e3:.2f} | {busy / alone:.1f}× |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
