"""Tiny, contract-valid model versions for tests (worker, HTTP service, registry).

``make_tiny_model_dir`` writes an untrained but seeded tiny EventForecaster through the real
``ModelRegistry.write_version`` (ONNX export, canary, manifest), so every test loads a model
exactly as production does. ``rewrite_manifest`` lets fault tests build versions that are
internally consistent but semantically bad (NaN weights, wrong shapes), which must then be
refused by the later checks rather than by the checksum.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.config import ModelConfig
from model.export import random_windows
from model.network import ForecastNet
from model.registry import MANIFEST, ModelRegistry


def tiny_config(
    *,
    hidden_size: int = 16,
    num_layers: int = 1,
    attention_heads: int = 2,
    horizon: int = 1,
    features: tuple[str, ...] = (),
    **overrides: Any,
) -> ModelConfig:
    """A tiny config (window 48, calendar on, Gaussian head, no dropout); ``overrides`` are any
    other ModelConfig fields."""
    return ModelConfig.from_dict(
        {
            "hidden_size": hidden_size,
            "num_layers": num_layers,
            "attention_heads": attention_heads,
            "horizon": horizon,
            "features": list(features),
            "dropout": 0.0,
            **overrides,
        }
    )


def make_tiny_model_dir(
    root: Path,
    *,
    hidden_size: int = 16,
    num_layers: int = 1,
    attention_heads: int = 2,
    horizon: int = 1,
    features: tuple[str, ...] = (),
    seed: int = 0,
    promote: bool = True,
    tweak: Callable[[ForecastNet], None] | None = None,
    int8: bool = False,
    **overrides: Any,
) -> str:
    """Write a tiny seeded model version into model directory ``root`` and return its name;
    ``overrides`` are any other ModelConfig fields (e.g. ``interval_scale``); ``tweak`` may edit
    the network's weights before it is written (a model with odd but finite behaviour).

    Untrained, but its forecasts are sane (the head starts from persistence: mean close to the
    last value, finite positive std). Promoted to CURRENT unless ``promote=False``.
    No int8 file is written unless ``int8``. Takes well under 5 s.
    """
    cfg = tiny_config(
        hidden_size=hidden_size, num_layers=num_layers, attention_heads=attention_heads,
        horizon=horizon, features=features, **overrides,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ForecastNet(cfg).eval()
    if tweak is not None:
        with torch.no_grad():
            tweak(net)
    canary = random_windows(np.random.default_rng(seed), 8, cfg.sequence_length, cfg.input_size)
    reg = ModelRegistry(root)
    version = reg.write_version(net, cfg, {"note": "tiny untrained test model"}, canary, int8=int8)
    if promote:
        reg.promote(version)
    return version


def rewrite_manifest(version_dir: Path) -> None:
    """Recompute manifest.json over the files now in ``version_dir`` (after a deliberate edit),
    so that the loader's later checks, not the checksum, must catch the fault."""
    version_dir = Path(version_dir)
    path = version_dir / MANIFEST
    doc = json.loads(path.read_text())
    doc["files"] = {
        p.name: {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "bytes": p.stat().st_size}
        for p in sorted(version_dir.iterdir())
        if p.name != MANIFEST and p.is_file()
    }
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
