"""Inference-only throughput of every CPU predictor, in forecasts per second.

For the default model (hidden 256, 3 layers) and a small one (hidden 64, 2 layers), at batch sizes
1 … 1024, with torch (fp32), onnxruntime (fp32), onnxruntime int8 (dynamic quantization) and torch
dynamic int8 quantization. Models are untrained but seeded: throughput does not depend on the
weights. Each cell runs the predictor for at least ``--min-time`` seconds after a warm-up.

    python bench/bench_model.py [--threads 2] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.config import ModelConfig
from model.export import export_onnx, quantize_onnx_int8, random_windows, verify_onnx
from model.network import ForecastNet, count_parameters
from model.predictor import OnnxPredictor, Predictor, TorchPredictor

MODELS: dict[str, dict[str, int]] = {
    "default (h256, 3 layers)": {"hidden_size": 256, "num_layers": 3, "attention_heads": 8},
    "small (h64, 2 layers)": {"hidden_size": 64, "num_layers": 2, "attention_heads": 4},
}
BATCHES = (1, 8, 32, 128, 512, 1024)
QUICK_BATCHES = (1, 32, 256, 1024)
BACKENDS = ("torch", "torch-bf16", "onnx", "onnx-int8", "torch-int8")


def measure(p: Predictor, x: np.ndarray, min_time: float, max_reps: int = 10_000) -> float:
    """Forecasts per second of ``p`` on the batch ``x``: warm up, then repeat for ``min_time``."""
    for _ in range(2):
        p.predict(x)
    reps = 0
    t0 = time.perf_counter()
    while True:
        p.predict(x)
        reps += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_time or reps >= max_reps:
            return reps * len(x) / elapsed


def predictors(net: ForecastNet, tmp: Path, threads: int) -> dict[str, Predictor]:
    from model.export import bf16_lstm, quantize_torch_dynamic

    onnx = export_onnx(net, tmp / "model.onnx")
    verify_onnx(net, onnx)  # a benchmark of a wrong model is worthless
    int8 = quantize_onnx_int8(onnx, tmp / "model.int8.onnx")
    return {
        "torch": TorchPredictor(net, "cpu"),
        "torch-bf16": TorchPredictor(bf16_lstm(net), "cpu", backend="torch-bf16"),
        "onnx": OnnxPredictor(onnx, threads=threads, providers=["CPUExecutionProvider"]),
        "onnx-int8": OnnxPredictor(int8, threads=threads, providers=["CPUExecutionProvider"]),
        "torch-int8": TorchPredictor(quantize_torch_dynamic(net), "cpu", backend="torch-int8"),
    }


def run(threads: int, quick: bool, min_time: float) -> list[dict[str, Any]]:
    torch.set_num_threads(threads)
    rows: list[dict[str, Any]] = []
    batches = QUICK_BATCHES if quick else BATCHES
    for label, arch in MODELS.items():
        cfg = ModelConfig(**arch)
        torch.manual_seed(0)
        net = ForecastNet(cfg).eval()
        x_all = random_windows(np.random.default_rng(0), max(batches), 48, cfg.input_size)
        with tempfile.TemporaryDirectory() as d:
            preds = predictors(net, Path(d), threads)
            for b in batches:
                row: dict[str, Any] = {
                    "model": label,
                    "params": count_parameters(net),
                    "batch": b,
                }
                for name in BACKENDS:
                    row[name] = measure(preds[name], x_all[:b], min_time)
                rows.append(row)
                print(_row(row), flush=True)
    return rows


def _header(threads: int) -> str:
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    with_name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                with_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"# eventcast model inference (forecasts/s, higher is better)\n"
        f"# cpu: {with_name or cpu}, {os.cpu_count()} logical cores visible; threads={threads}\n"
        f"# torch {torch.__version__}, onnxruntime {ort.__version__}, numpy {np.__version__}, "
        f"python {sys.version.split()[0]}\n"
        f"| {'model':<26} | {'batch':>5} | " + " | ".join(f"{b:>10}" for b in BACKENDS) + " |\n"
        f"|{'-' * 28}|{'-' * 7}|" + "|".join("-" * 12 for _ in BACKENDS) + "|"
    )


def _row(r: dict[str, Any]) -> str:
    cells = " | ".join(f"{r[b]:>10,.0f}" for b in BACKENDS)
    return f"| {r['model']:<26} | {r['batch']:>5} | {cells} |"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    ap.add_argument("--quick", action="store_true", help="fewer batch sizes, shorter runs")
    ap.add_argument("--min-time", type=float, default=None, help="seconds per cell")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = ap.parse_args(argv)
    min_time = args.min_time if args.min_time is not None else (0.5 if args.quick else 1.5)
    print(_header(args.threads), flush=True)
    t0 = time.perf_counter()
    rows = run(args.threads, args.quick, min_time)
    print(f"# total {time.perf_counter() - t0:.0f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
