"""Fixtures of the trainer's tests: small real-shaped data files and tiny-model CLI arguments.

Everything trains a tiny network (hidden 16, one layer) for one or two epochs on a few hundred
points, so a whole retrain (fit, evaluation, ONNX export, registry write) takes seconds.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from model.export import ONNX_RTOL, onnx_session, output_diffs, random_windows, run_torch
from model.registry import ModelRegistry
from train.sources import synthetic_frame

TINY = ["--hidden-size", "16", "--num-layers", "1", "--dropout", "0", "--threads", "1"]


@pytest.fixture
def synthetic_csv(tmp_path: Path) -> Path:
    """Two hourly synthetic series of 400 points each (different scales), as a CSV file."""
    frame = synthetic_frame(n_series=2, length=400, spacing=3600.0, seed=1)
    path = tmp_path / "synthetic.csv"
    frame.to_csv(path, index=False)
    return path


@pytest.fixture
def retrain_args(tmp_path: Path, synthetic_csv: Path) -> Callable[..., list[str]]:
    """``retrain_args(*extra, data=..., model_dir=...)`` -> argv of a tiny one-epoch retrain."""

    def make(
        *extra: str, data: Path | str | None = None, model_dir: Path | None = None
    ) -> list[str]:
        return [
            "retrain",
            "--data", str(data or synthetic_csv),
            "--model-dir", str(model_dir or tmp_path / "models"),
            "--run-dir", str(tmp_path / "runs"),
            "--max-epochs", "1",
            "--logger", "none",
            *TINY,
            *extra,
        ]  # fmt: skip

    return make


def write_csv(path: Path, rows: list[dict[str, object]]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def serves(model_dir: Path, version: str) -> dict:
    """Load ``version`` as the worker does (backend onnx: every check, the canary with torch
    fp32 and with onnx), predict its canary windows, and compare the export with float32 torch
    on them and on 200 random windows one at a time. Returns metrics.json plus ``parity``."""
    reg = ModelRegistry(model_dir)
    loaded = reg.load(version, backend="onnx")
    vdir = reg.path(version)
    x = np.asarray(json.loads((vdir / "canary.json").read_text())["inputs"], np.float32)
    fc = loaded.predictor.predict(x)
    assert np.isfinite(fc.mean).all() and (fc.std > 0).all()
    net = reg.load(version, backend="torch").predictor.net  # type: ignore[attr-defined]
    sess = onnx_session(vdir / "model.onnx")
    cfg = loaded.config
    rng = np.random.default_rng(0)
    batches = [
        x,
        *(random_windows(rng, 1, cfg.sequence_length, cfg.input_size) for _ in range(200)),
    ]
    worst = 0.0
    for xb in batches:
        worst = max(
            worst, *output_diffs(sess.run(None, {"x": xb}), run_torch(net, xb), xb).values()
        )
    assert worst <= ONNX_RTOL
    metrics = json.loads((vdir / "metrics.json").read_text())
    metrics["parity"] = worst
    return metrics
