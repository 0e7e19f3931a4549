"""GPU check and benchmark of the torch predictor (run on a CUDA machine; installs nothing).

1. Correctness: GPU outputs (fp32 — cuDNN may use TF32 —, bf16 autocast, each with and without
   CUDA graphs) against the CPU fp32 outputs of the same weights, on random-walk windows.
2. Throughput: forecasts/s through ``TorchPredictor.predict`` (numpy in, numpy out: pinned host
   staging and copies included) at batch sizes up to 8192, for the default model (hidden 256,
   3 layers) and the small one (hidden 64, 2 layers), CUDA graphs on and off.

3. The worker's in-process path without Kafka or Redis (``--pipeline``, on by default): encoded
   events decoded and applied to :class:`~stream.windows.PartitionWindows`, windows gathered,
   inputs built, the predictor on the GPU (bf16 + CUDA graphs), forecasts encoded to JSON — the
   forecasts/s one worker process could feed a GPU with, i.e. where the CPU side becomes the limit.

Exits 0 with a message when no GPU is visible, 1 when an output check fails. ``--device cpu``
runs only the pipeline part on the CPU (a dry run of the script on a machine without a GPU).

    python bench/gpu_check.py [--quick] [--no-pipeline] [--device cpu] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.config import ModelConfig
from model.export import random_windows, rel_diff
from model.network import ForecastNet
from model.predictor import TorchPredictor

MODELS: dict[str, dict[str, int]] = {
    "default (h256, 3 layers)": {"hidden_size": 256, "num_layers": 3, "attention_heads": 8},
    "small (h64, 2 layers)": {"hidden_size": 64, "num_layers": 2, "attention_heads": 4},
}
BATCHES = (1, 64, 512, 1024, 2048, 4096, 8192)
QUICK_BATCHES = (1, 512, 4096, 8192)
BUCKETS = (1, 8, 64, 512, 1024, 2048, 4096, 8192)
# Tolerances (max |gpu - cpu| / max |cpu| over each output).
RTOL = {"fp32": 5e-3, "bf16": 5e-2}
OUTPUTS = ("mean", "std", "lower_80", "upper_80", "lower_95", "upper_95")


def card_info() -> dict[str, str]:
    info = {
        "device": torch.cuda.get_device_name(0),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        "memory_gib": f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f}",
        "torch": torch.__version__,
        "cuda_runtime": str(torch.version.cuda),
        "cudnn": str(torch.backends.cudnn.version()),
        "tf32_cudnn": str(torch.backends.cudnn.allow_tf32),
        "tf32_matmul": str(torch.backends.cuda.matmul.allow_tf32),
    }
    if shutil.which("nvidia-smi"):
        q = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
             "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        if q.returncode == 0:
            info["driver/maxclock/power"] = q.stdout.strip().splitlines()[0]
    return info


def arrays(fc: Any) -> list[np.ndarray]:
    return [fc.mean, fc.std, fc.lower["80"], fc.upper["80"], fc.lower["95"], fc.upper["95"]]


def check(net: ForecastNet, x: np.ndarray) -> list[dict[str, Any]]:
    """GPU vs CPU on ``x`` for fp32/bf16 × graphs off/on (odd batch sizes exercise padding)."""
    want = arrays(TorchPredictor(copy.deepcopy(net), "cpu").predict(x))
    rows = []
    for precision in ("fp32", "bf16"):
        for graphs in (False, True):
            p = TorchPredictor(
                copy.deepcopy(net), "cuda", bf16=precision == "bf16", cuda_graphs=graphs,
                buckets=BUCKETS,
            )  # fmt: skip
            worst = 0.0
            for b in (1, 7, 333, len(x)):
                got = arrays(p.predict(x[:b]))
                worst = max(worst, *(rel_diff(g, w[:b]) for g, w in zip(got, want, strict=True)))
            ok = worst <= RTOL[precision]
            rows.append({"precision": precision, "graphs": graphs, "rel_diff": worst, "ok": ok})
    return rows


def throughput(p: TorchPredictor, x: np.ndarray, min_time: float) -> float:
    for _ in range(3):
        p.predict(x)
    torch.cuda.synchronize()
    reps = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < min_time:
        p.predict(x)  # returns numpy: synchronised
        reps += 1
    return reps * len(x) / (time.perf_counter() - t0)


class _Rec:
    """What the worker reads of a Kafka record."""

    __slots__ = ("key", "offset", "timestamp", "value")

    def __init__(self, offset: int, key: bytes, value: bytes) -> None:
        self.offset, self.key, self.value, self.timestamp = offset, key, value, 0


def pipeline(device: str, series: int, batch: int, min_time: float) -> list[dict[str, Any]]:
    """Forecasts/s of decode → windows → inputs → predictor → JSON, in one process, per model.

    Every series is warmed with 48 points first; then batches of ``batch`` events (a new point for
    ``batch`` distinct series each) go through the worker's own functions. Timings per stage are
    reported so that the CPU-side limit is visible next to the model's."""
    from model.features import build_inputs
    from stream.publisher import encode_forecasts
    from stream.settings import LimitSettings
    from stream.windows import PartitionWindows

    rows = []
    for label, arch in MODELS.items():
        cfg = ModelConfig(**arch)
        torch.manual_seed(0)
        cuda = device == "cuda"
        p = TorchPredictor(
            ForecastNet(cfg).eval(), device, bf16=cuda, cuda_graphs=cuda, buckets=BUCKETS
        )
        wins = PartitionWindows(
            "events", 0, sequence_length=cfg.sequence_length, features=(),
            limits=LimitSettings(max_series_per_partition=series + 1),
        )  # fmt: skip
        keys = [f"sensor-{i:06d}".encode() for i in range(series)]
        offset = 0
        step = 0

        def records(n: int, keys: list[bytes] = keys) -> list[_Rec]:
            nonlocal offset, step
            out = []
            for _ in range(n):
                k = keys[offset % series]
                if offset % series == 0:
                    step += 1
                v = b'{"ts":%d,"value":%.3f}' % (1_700_000_000 + 60 * step, 50 + (offset % 17))
                out.append(_Rec(offset, k, v))
                offset += 1
            return out

        wins.apply(records(48 * series), emit=False)
        t = {"apply": 0.0, "inputs": 0.0, "model": 0.0, "encode": 0.0}
        n = 0
        t_all = time.perf_counter()
        while time.perf_counter() - t_all < min_time:
            recs = records(batch)
            t0 = time.perf_counter()
            res = wins.apply(recs)
            t1 = time.perf_counter()
            x = build_inputs(res.windows.ts, res.windows.values, None, cfg)
            t2 = time.perf_counter()
            fc = p.predict(x)
            t3 = time.perf_counter()
            encode_forecasts(res.windows, fc, version="v", input_topic="e", output_topic="f")
            t4 = time.perf_counter()
            for k, a, b in (("apply", t0, t1), ("inputs", t1, t2), ("model", t2, t3),
                            ("encode", t3, t4)):  # fmt: skip
                t[k] += b - a
            n += len(res.windows)
        wall = time.perf_counter() - t_all
        row = {"model": label, "device": device, "batch": batch, "forecasts_per_s": n / wall}
        row.update({f"{k}_us_per_forecast": 1e6 * v / max(n, 1) for k, v in t.items()})
        rows.append(row)
        print(
            f"| {label} | {device} | {batch} | {n / wall:,.0f} | "
            + " | ".join(f"{1e6 * v / max(n, 1):.1f}" for v in t.values()) + " |",
            flush=True,
        )  # fmt: skip
    return rows


def pipeline_header() -> None:
    print("\n## In-process pipeline without Kafka/Redis (forecasts/s; µs per forecast by stage)")
    print("| model | device | batch | forecasts/s | apply | inputs | model | encode |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--min-time", type=float, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--no-pipeline", action="store_true", help="skip the in-process pipeline")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--series", type=int, default=20_000, help="series in the pipeline part")
    args = ap.parse_args(argv)
    if args.device == "cpu":  # dry run of the pipeline part
        pipeline_header()
        rows = pipeline("cpu", min(args.series, 2000), 256, args.min_time or 2.0)
        if args.json:
            args.json.write_text(json.dumps({"pipeline": rows}, indent=2))
        return 0
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible to torch; nothing to check (this is not an error).")
        return 0
    min_time = args.min_time if args.min_time is not None else (0.5 if args.quick else 2.0)
    batches = QUICK_BATCHES if args.quick else BATCHES
    info = card_info()
    print("# eventcast GPU check")
    for k, v in info.items():
        print(f"# {k}: {v}")
    results: dict[str, Any] = {"card": info, "checks": {}, "throughput": []}
    failed = False
    for label, arch in MODELS.items():
        cfg = ModelConfig(**arch)
        torch.manual_seed(0)
        net = ForecastNet(cfg).eval()
        x = random_windows(np.random.default_rng(0), max(batches), 48, cfg.input_size)
        rows = check(net, x[:1000])
        results["checks"][label] = rows
        print(f"\n## {label}: GPU vs CPU (max relative difference over the six outputs)")
        for r in rows:
            flag = "ok" if r["ok"] else f"FAIL (limit {RTOL[r['precision']]:g})"
            print(f"   {r['precision']:<5} graphs={r['graphs']!s:<5} {r['rel_diff']:.2e}  {flag}")
            failed |= not r["ok"]
        modes = [(prec, g) for prec in ("fp32", "bf16") for g in (False, True)]
        head = " | ".join(f"{p}{'+graphs' if g else '':<7}" for p, g in modes)
        print(f"\n| {'batch':>5} | {head} |   forecasts/s, {label}")
        print(f"|{'-' * 7}|" + "|".join("-" * 14 for _ in modes) + "|")
        preds = {
            (prec, g): TorchPredictor(
                copy.deepcopy(net), "cuda", bf16=prec == "bf16", cuda_graphs=g, buckets=BUCKETS
            )
            for prec, g in modes
        }
        for b in batches:
            rates = {m: throughput(preds[m], x[:b], min_time) for m in modes}
            print(f"| {b:>5} | " + " | ".join(f"{rates[m]:>12,.0f}" for m in modes) + " |")
            for (prec, g), rate in rates.items():
                results["throughput"].append(
                    {"model": label, "batch": b, "precision": prec, "graphs": g, "rate": rate}
                )
        del preds
        torch.cuda.empty_cache()
    if not args.no_pipeline:
        pipeline_header()
        results["pipeline"] = [
            row
            for b in ((4096,) if args.quick else (1024, 4096, 8192))
            for row in pipeline("cuda", args.series, b, min_time)
        ]
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(
        "\nGPU outputs " + ("DIFFER from the CPU beyond tolerance" if failed else "match the CPU")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
