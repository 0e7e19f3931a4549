"""GPU check and benchmark of the torch predictor: the one prepared script for a lent CUDA machine.

It installs nothing and imports only torch, numpy and the repository's ``model/`` and
``stream/rings.py`` (no Kafka, Redis, pydantic, orjson, PyYAML or onnx code), so it runs on a
machine whose Python has nothing but torch, onnxruntime, lightning, numpy and safetensors;
``tests/bench/test_gpu_dry_run.py`` proves that with an import guard. About 2-3 minutes on an
H100/H200 (``make bench-gpu``; the elapsed time of each part is printed).

1. ``check``: GPU outputs against the CPU fp32 outputs of the same weights, on random-walk windows
   of 1, 7, 333 and 1000 rows (odd sizes are padded to the worker's CUDA-graph buckets), for fp32
   (TF32 off), TF32 (on for matmuls and cuDNN) and bf16 autocast, each with and without CUDA
   graphs, and the worker's own CUDA configuration (torch's default TF32 flags, graphs). The
   measure and limits are the registry canary's (:func:`model.export.output_diffs`, per window;
   ``model.checks.SERVING_RTOL``: 5e-3 for fp32 with TF32, 5e-2 for bf16; 1e-3 for strict fp32).
2. ``throughput``: forecasts/s through ``TorchPredictor.predict`` (numpy in, numpy out: pinned
   host staging and copies included) at batch sizes 256 … 16384, for the default model (hidden
   256, 3 layers) and the small one (hidden 64, 2 layers), in all six precision × graphs modes;
   every batch size is its own graph bucket (no padding).
3. ``stage``: the worker's inference stage fed by an in-process window source at the batcher's
   batch sizes (64 … 2048, ``--max-batch`` default 2048, and 8192): per batch, one new point for
   each of B distinct series appended to a :class:`~stream.rings.SeriesRings` of 20,000 series
   (the store under ``PartitionWindows``), their windows gathered as ``PartitionWindows`` does,
   :func:`model.features.build_inputs`, the predictor with the worker's buckets, and the finite
   check of ``Forecast.finite_rows``; µs per forecast by step, so that the CPU side shows
   next to the model. Event decoding, admission and JSON encoding are not in it (they need orjson
   and pydantic; the CPU drains of ``make bench`` measure them).

Exit status 0 when every GPU output matches the CPU within its limit, and 0 with a message when
torch sees no GPU; 1 when a check fails (the other parts still run). ``--dry-run`` runs every
part on the CPU with tiny sizes (a few seconds): the code paths, not GPU figures.

    python -m bench.gpu_check [--dry-run] [--parts check,throughput,stage] [--min-time S]
                              [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file (python bench/gpu_check.py): the repository's code
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from model.checks import SERVING_RTOL
from model.config import ModelConfig
from model.export import output_diffs, random_windows, rel_diff
from model.features import build_inputs
from model.network import OUTPUT_NAMES, ForecastNet
from model.predictor import DEFAULT_BUCKETS, Forecast, TorchPredictor
from stream.rings import SeriesRings

MODELS: dict[str, dict[str, int]] = {
    "default (h256, 3 layers)": {"hidden_size": 256, "num_layers": 3, "attention_heads": 8},
    "small (h64, 2 layers)": {"hidden_size": 64, "num_layers": 2, "attention_heads": 4},
}
PARTS = ("check", "throughput", "stage")
T0 = 1_700_000_000.0  # first event time of the window source (epoch seconds)
STEP_S = 60.0  # its spacing


@dataclasses.dataclass(frozen=True)
class Precision:
    """How the network runs on the GPU. torch's TF32 switches are process-wide, so they are set
    before every call (:class:`Mode`); ``limit`` is the largest per-window relative difference
    from the CPU fp32 outputs that passes the check."""

    name: str
    tf32_matmul: bool
    tf32_cudnn: bool
    bf16: bool
    limit: float


FP32 = Precision("fp32", False, False, False, 1e-3)  # IEEE fp32 everywhere
TF32 = Precision("tf32", True, True, False, SERVING_RTOL["cuda"])
BF16 = Precision("bf16", False, True, True, SERVING_RTOL["cuda-bf16"])  # autocast; rest fp32
# What `worker --device cuda` runs: fp32 with torch's default flags (cuDNN, hence the LSTM, may
# use TF32; matmuls do not) and CUDA graphs over the default buckets.
WORKER = Precision("worker", False, True, False, SERVING_RTOL["cuda"])


@dataclasses.dataclass(frozen=True)
class Sizes:
    check_batches: tuple[int, ...]  # rows compared with the CPU (the largest is the reference)
    batches: tuple[int, ...]  # throughput table
    stage_batches: tuple[int, ...]  # events per batch through the inference stage
    series: int  # series held by the stage's window source
    min_time: float  # seconds per timed cell
    warmup: int  # calls before a throughput cell is timed
    hidden: int | None = None  # every model's hidden size (None: the real ones)


GPU_SIZES = Sizes((1, 7, 333, 1000), (256, 1024, 2048, 4096, 8192, 16384),
                  (64, 256, 1024, 2048, 8192), 20_000, 1.0, 3)  # fmt: skip
# The dry run's models keep their layers and heads but get hidden size 16: the code paths are the
# same, and at their real sizes the dry run took 16 s instead of 4 on the 2-core development box.
DRY_SIZES = Sizes((1, 3, 8), (4, 16), (4, 16), 40, 0.02, 1, hidden=16)


class Mode:
    """A predictor of its own (a copy of the weights) run under one precision, graphs on or off."""

    def __init__(
        self, net: ForecastNet, device: str, prec: Precision, graphs: bool, buckets: tuple[int, ...]
    ) -> None:
        self.prec, self.graphs = prec, graphs
        self.label = prec.name + ("+graphs" if graphs else "")
        self.predictor = TorchPredictor(
            copy.deepcopy(net), device, bf16=prec.bf16, cuda_graphs=graphs, buckets=buckets
        )

    def predict(self, x: np.ndarray) -> Forecast:
        set_tf32(self.prec)
        return self.predictor.predict(x)


def set_tf32(prec: Precision) -> None:
    with warnings.catch_warnings():  # (newer torch may deprecate these switches)
        warnings.simplefilter("ignore")
        torch.backends.cuda.matmul.allow_tf32 = prec.tf32_matmul
        torch.backends.cudnn.allow_tf32 = prec.tf32_cudnn


def arrays(fc: Forecast) -> list[np.ndarray]:
    """The six outputs in ``OUTPUT_NAMES`` order."""
    return [fc.mean, fc.std, fc.lower["80"], fc.upper["80"], fc.lower["95"], fc.upper["95"]]


def card_info(device: str) -> dict[str, str]:
    info = {"torch": torch.__version__, "numpy": np.__version__}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info["tf32 defaults (matmul, cudnn)"] = (
            f"{torch.backends.cuda.matmul.allow_tf32}, {torch.backends.cudnn.allow_tf32}"
        )
    if device == "cpu":
        info["device"] = "cpu (dry run: code paths only, no GPU figures)"
        return info
    props = torch.cuda.get_device_properties(0)
    info.update({
        "device": torch.cuda.get_device_name(0),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        "memory_gib": f"{props.total_memory / 2**30:.0f}",
        "cuda_runtime": str(torch.version.cuda),
        "cudnn": str(torch.backends.cudnn.version()),
    })  # fmt: skip
    if shutil.which("nvidia-smi"):
        q = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
             "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        if q.returncode == 0 and q.stdout.strip():
            info["driver, max SM clock, power limit"] = q.stdout.strip().splitlines()[0]
    return info


# ---- 1. GPU vs CPU ------------------------------------------------------------------------------


def check(net: ForecastNet, device: str, sizes: Sizes) -> list[dict[str, Any]]:
    """Each mode's outputs against the CPU fp32 ones, at every size of ``sizes.check_batches``."""
    cfg = net.config
    x = random_windows(
        np.random.default_rng(1), max(sizes.check_batches), cfg.sequence_length, cfg.input_size
    )
    want = arrays(TorchPredictor(copy.deepcopy(net), "cpu").predict(x))
    modes = [(p, g) for p in (FP32, TF32, BF16) for g in (False, True)] + [(WORKER, True)]
    rows = []
    print(f"| {'mode':<13} | per window | batch-wide |  limit | result |")
    print(f"|{'-' * 15}|-----------:|-----------:|-------:|--------|")
    for prec, graphs in modes:
        mode = Mode(net, device, prec, graphs, DEFAULT_BUCKETS)
        window, batch = 0.0, 0.0
        for b in sizes.check_batches:
            got = arrays(mode.predict(x[:b]))
            ref = [w[:b] for w in want]
            window = max(window, *output_diffs(got, ref, x[:b]).values())
            batch = max(batch, *(rel_diff(g, r) for g, r in zip(got, ref, strict=True)))
        ok = window <= prec.limit
        rows.append({"mode": mode.label, "per_window": window, "batch_wide": batch,
                     "limit": prec.limit, "ok": ok})  # fmt: skip
        verdict = "ok" if ok else "FAIL"
        print(f"| {mode.label:<13} | {window:10.2e} | {batch:10.2e} | {prec.limit:6.0e} "
              f"| {verdict:<6} |", flush=True)  # fmt: skip
        del mode
    return rows


# ---- 2. predictor throughput --------------------------------------------------------------------


def rate(mode: Mode, x: np.ndarray, min_time: float, warmup: int) -> float:
    """Forecasts/s of ``mode.predict(x)`` over at least ``min_time`` seconds, after ``warmup``
    calls (graph capture happens in the first). predict returns numpy, hence is synchronised."""
    for _ in range(warmup):
        mode.predict(x)
    reps = 0
    t0 = time.perf_counter()
    while reps == 0 or time.perf_counter() - t0 < min_time:
        mode.predict(x)
        reps += 1
    return reps * len(x) / (time.perf_counter() - t0)


def throughput(net: ForecastNet, device: str, sizes: Sizes) -> list[dict[str, Any]]:
    """One table row per mode (forecasts/s at each batch size), printed as it is measured."""
    cfg = net.config
    x = random_windows(
        np.random.default_rng(0), max(sizes.batches), cfg.sequence_length, cfg.input_size
    )
    print("| mode         | " + " | ".join(f"{b:>10}" for b in sizes.batches) + " |")
    print(f"|{'-' * 14}|" + "|".join("-" * 11 + ":" for _ in sizes.batches) + "|")
    rows = []
    for prec in (FP32, TF32, BF16):
        for graphs in (False, True):
            mode = Mode(net, device, prec, graphs, sizes.batches)
            rates = [rate(mode, x[:b], sizes.min_time, sizes.warmup) for b in sizes.batches]
            print(f"| {mode.label:<12} | " + " | ".join(f"{r:>10,.0f}" for r in rates) + " |",
                  flush=True)  # fmt: skip
            rows += [{"mode": mode.label, "batch": b, "forecasts_per_s": r}
                     for b, r in zip(sizes.batches, rates, strict=True)]  # fmt: skip
            del mode
            empty_cache(device)
    return rows


def empty_cache(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()


# ---- 3. the worker's inference stage ------------------------------------------------------------


class WindowSource:
    """``series`` series of ``sequence_length`` points in a :class:`SeriesRings` (the worker's
    window store); :meth:`batch` appends one new point to each of the next ``b`` series (round
    robin: ``b`` distinct series when ``b <= series``) and returns their rows and point counts,
    what ``PartitionWindows`` hands to ``SeriesRings.gather``. Values are random walks."""

    def __init__(self, series: int, sequence_length: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.rings = SeriesRings(sequence_length + 16, ())
        self.noise = rng.standard_normal(1 << 16).tolist()
        self.last = rng.uniform(-50, 50, series).tolist()
        self.series = series
        self.offset = 0
        self.next = 0
        for i in range(series):
            row = self.rings.allocate(f"sensor-{i:06d}")
            for _ in range(sequence_length):
                self._append(row)

    def _append(self, row: int) -> int:
        self.last[row] += self.noise[self.offset & 0xFFFF]
        n = self.rings.append(row, self.offset, T0 + STEP_S * self.rings.n[row], self.last[row], {})
        self.offset += 1
        return n + 1

    def batch(self, b: int) -> tuple[list[int], list[int]]:
        rows = [(self.next + i) % self.series for i in range(b)]
        self.next = (self.next + b) % self.series
        return rows, [self._append(r) for r in rows]


STAGE_STEPS = ("append", "gather", "inputs", "model", "finite")


def stage(
    net: ForecastNet, device: str, source: WindowSource, sizes: Sizes
) -> list[dict[str, Any]]:
    """Forecasts/s of append → gather → build_inputs → predict → finite check, one batch after
    another in one thread (the worker overlaps the next batch's preparation with inference on
    its event loop; here the steps add up), for the worker's configuration and bf16."""
    cfg = net.config
    rows = []
    for prec in (WORKER, BF16):
        mode = Mode(net, device, prec, True, DEFAULT_BUCKETS)
        for b in sizes.stage_batches:
            t = dict.fromkeys(STAGE_STEPS, 0.0)
            n = bad = 0
            for warm in (True, False):
                t_all = time.perf_counter()
                while True:
                    t0 = time.perf_counter()
                    ids, ends = source.batch(b)
                    t1 = time.perf_counter()
                    _, ts, values, feats = source.rings.gather(ids, ends, cfg.sequence_length)
                    t2 = time.perf_counter()
                    x = build_inputs(ts, values, feats, cfg)
                    t3 = time.perf_counter()
                    fc = mode.predict(x)
                    t4 = time.perf_counter()
                    ok = fc.finite_rows()
                    t5 = time.perf_counter()
                    if warm:  # one batch: graph capture, first pinned buffer
                        break
                    stamps = (t0, t1, t2, t3, t4, t5)
                    for k, step in enumerate(STAGE_STEPS):
                        t[step] += stamps[k + 1] - stamps[k]
                    n += b
                    bad += b - int(ok.sum())
                    if time.perf_counter() - t_all >= sizes.min_time:
                        break
            wall = time.perf_counter() - t_all
            us = {k: 1e6 * v / n for k, v in t.items()}
            row = {"mode": mode.label, "batch": b, "forecasts_per_s": n / wall, "not_finite": bad}
            rows.append(row | {f"{k}_us": v for k, v in us.items()})
            print(f"| {mode.label:<14} | {b:>5} | {n / wall:>11,.0f} | "
                  + " | ".join(f"{us[k]:>7.2f}" for k in STAGE_STEPS) + f" | {bad:>10} |",
                  flush=True)  # fmt: skip
        del mode
        empty_cache(device)
    return rows


# ---- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--dry-run", action="store_true",
                    help="every part on the CPU, tiny sizes (seconds; no GPU figures)")  # fmt: skip
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    ap.add_argument("--min-time", type=float, default=None, help="seconds per timed cell")
    ap.add_argument("--json", type=Path, default=None, help="also write every figure here")
    args = ap.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    if unknown := sorted(set(parts) - set(PARTS)):
        ap.error(f"--parts: unknown {', '.join(unknown)} (known: {', '.join(PARTS)})")
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible to torch; nothing to check (this is not an error). "
              "--dry-run runs the code paths on the CPU.")  # fmt: skip
        return 0
    device = "cpu" if args.dry_run else "cuda"
    sizes = DRY_SIZES if args.dry_run else GPU_SIZES
    if args.min_time is not None:
        sizes = dataclasses.replace(sizes, min_time=args.min_time)
    start = time.perf_counter()
    info = card_info(device)
    print("# eventcast GPU check" + (" -- DRY RUN on the CPU" if args.dry_run else ""))
    for k, v in info.items():
        print(f"# {k}: {v}")
    results: dict[str, Any] = {"card": info, "dry_run": args.dry_run}
    failed = False
    nets = {}
    for label, arch in MODELS.items():
        torch.manual_seed(0)
        if sizes.hidden is not None:
            arch = arch | {"hidden_size": sizes.hidden}
            label += f" [dry run: hidden {sizes.hidden}]"
        nets[label] = ForecastNet(ModelConfig(**arch)).eval()

    if "check" in parts:
        t = time.perf_counter()
        results["check"] = {}
        for label, net in nets.items():
            print(f"\n## 1. {label}: GPU vs CPU fp32, largest relative difference over the six "
                  f"outputs ({', '.join(OUTPUT_NAMES)}), batches "
                  f"{', '.join(map(str, sizes.check_batches))}")  # fmt: skip
            rows = check(net, device, sizes)
            results["check"][label] = rows
            failed |= not all(r["ok"] for r in rows)
        print(f"# check: {time.perf_counter() - t:.0f} s")

    if "throughput" in parts:
        t = time.perf_counter()
        results["throughput"] = {}
        for label, net in nets.items():
            print(f"\n## 2. {label}: predictor forecasts/s by batch size (numpy in and out; "
                  f"{sizes.min_time:g} s per cell)")  # fmt: skip
            results["throughput"][label] = throughput(net, device, sizes)
        print(f"# throughput: {time.perf_counter() - t:.0f} s")

    if "stage" in parts:
        t = time.perf_counter()
        source = WindowSource(sizes.series, max(n.config.sequence_length for n in nets.values()))
        print(f"# window source: {sizes.series:,} series filled in {time.perf_counter() - t:.1f} s")
        results["stage"] = {}
        for label, net in nets.items():
            print(
                f"\n## 3. {label}: the worker's inference stage from an in-process window "
                f"source ({sizes.series:,} series): forecasts/s, µs/forecast by step"
            )
            print(f"| {'mode':<14} | batch | forecasts/s | " + " | ".join(
                f"{k:>7}" for k in STAGE_STEPS) + " | not finite |")  # fmt: skip
            print(f"|{'-' * 16}|------:|------------:|" + "|".join(
                "-" * 8 + ":" for _ in STAGE_STEPS) + "|-----------:|")  # fmt: skip
            results["stage"][label] = stage(net, device, source, sizes)
        print(f"# stage: {time.perf_counter() - t:.0f} s")

    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(f"\n# done in {time.perf_counter() - start:.0f} s")
    if "check" in parts:
        verdict = "DIFFER from the CPU beyond their limits" if failed else "match the CPU"
        print(("CPU (dry run) outputs " if args.dry_run else "GPU outputs ") + verdict)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
