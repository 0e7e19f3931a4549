"""Short data never fails a retrain for a baseline (issue 17): 10 hours of minute data (4 series ×
600 points) cannot have the one-day (1440-step) season of history the seasonal naive baseline
needs; it is reported unavailable, with the reason, and the retrain and `worker evaluate` finish.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from deploy.cli import main
from model.registry import ModelRegistry

SERIES, POINTS, MINUTE = 4, 600, 60.0


def _minute_csv(path: Path) -> Path:
    """4 × 600 synthetic minute points (a shape test: the values only need to be plausible)."""
    rng = np.random.default_rng(7)
    k = np.arange(POINTS)
    frames = [
        pd.DataFrame({
            "series_id": f"m{i}",
            "ts": 1_700_000_000.0 + MINUTE * k,
            "value": 20 + 3 * i + np.sin(2 * np.pi * k / 60) + 0.1 * rng.standard_normal(POINTS),
        })
        for i in range(SERIES)
    ]  # fmt: skip
    pd.concat(frames).to_csv(path, index=False)
    return path


def _check_report(report: dict) -> None:
    sn = report["metrics"]["seasonal_naive"]
    assert sn["available"] is False
    assert "1440 steps" in sn["reason"] and "season" in sn["reason"]
    assert all(sn[k] is None for k in ("mae", "mase", "smape", "wql", "coverage_80",
                                       "coverage_95"))  # fmt: skip
    assert report["unavailable"]["seasonal_naive"] == sn["reason"]
    assert report["per_step_mae"]["seasonal_naive"] is None
    # The model is compared with the best *available* naive baseline: persistence.
    q = report["quality"]
    assert q["best_naive"] == "persistence" and q["naive_unavailable"] == ["seasonal_naive"]
    assert q["mae_ratio"] == pytest.approx(
        report["metrics"]["model"]["mae"] / report["metrics"]["persistence"]["mae"]
    )
    assert report["season"] == 1440 and report["series"] == SERIES
    assert report["points"] > 0 and report["metrics"]["persistence"]["mae"] is not None
    json.dumps(report, allow_nan=False)


def test_minute_data_retrains_without_the_seasonal_baseline(
    tmp_path: Path, retrain_args: Callable[..., list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    data = _minute_csv(tmp_path / "minutes.csv")
    code = main(retrain_args(data=data))
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    assert result["promoted"] is True
    stored = json.loads((tmp_path / "models" / result["version"] / "metrics.json").read_text())
    _check_report(stored)
    assert ModelRegistry(tmp_path / "models").current() == result["version"]

    # A second retrain goes through the gate (serving version scored on the same windows).
    code = main(retrain_args(data=data))
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "held-out MAE" in json.loads(out)["reason"]

    # `worker evaluate` on the same data: the same report shape; the peers run too (AutoETS has
    # no seasonal state for a 1440-step season; MSTL needs two cycles of a day in training).
    out_file = tmp_path / "eval.json"
    code = main(["evaluate", "--data", str(data), "--model-dir", str(tmp_path / "models"),
                 "--peer-origins", "5", "--out", str(out_file)])  # fmt: skip
    _, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(out_file.read_text())
    _check_report(report)
    peers = report["peers"]
    assert peers["windows"] == 5 and peers["of_windows"] == report["windows"]
    assert peers["metrics"]["seasonal_naive"]["available"] is False
    ets = peers["models"]["autoets"]
    assert ets["season_length"] == 1 and "over 24" in ets["note"]
    assert peers["metrics"]["autoets"]["mae"] is not None
    assert peers["metrics"]["mstl"]["available"] is False
    assert "two full cycles" in peers["metrics"]["mstl"]["reason"]
