"""Fixtures of the trainer's tests: small real-shaped data files and tiny-model CLI arguments.

Everything trains a tiny network (hidden 16, one layer) for one or two epochs on a few hundred
points, so a whole retrain (fit, evaluation, ONNX export, registry write) takes seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

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
