"""The reference for online interval calibration in the fault tests and the chaos run: every
forecast's 80/95 % bounds as an independent replay gives them (the model run offline on each true
window, then one :class:`stream.calibration.OnlineCalibrator` per partition fed the true accepted
points and those forecasts in offset order). A calibration update lost or applied twice under a
fault shifts every later bound of its series, so comparing with this checks the whole history of
the state, not only the final one."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

Events = dict[str, list[tuple[int, int, float, float]]]  # series -> accepted (p, offset, ts, value)
Bounds = dict[str, dict[str, np.ndarray]]  # "lower"/"upper" -> level -> (H,)


def offline_forecast(
    model: Any, events: Events, picks: Sequence[tuple[str, int]], *, window: int = 48
) -> Any:
    """The forecast (:class:`model.predictor.Forecast`) of the window ending at each ``(series,
    index of its accepted point)`` pick, computed as the *trainer* computes it: for a model with
    seasons, each series run through :func:`model.seasonal.run_series` (train/data.py's path), its
    window less the seasonal part and the state's level on the seasonal path, the offsets added
    back."""
    from model.features import build_inputs
    from model.seasonal import run_series

    cfg = model.config
    ts = np.array([[e[2] for e in events[s][i - window + 1 : i + 1]] for s, i in picks])
    vals = np.array([[e[3] for e in events[s][i - window + 1 : i + 1]] for s, i in picks])
    spec = cfg.seasonal()
    if spec is None:
        return model.predictor.predict(build_inputs(ts, vals, None, cfg))
    runs = {}
    for s in {s for s, _ in picks}:
        history = np.array([e[2:] for e in events[s]], np.float64)  # (n, 2): ts, value
        runs[s] = run_series(spec, history[:, 0], history[:, 1], window, cfg.horizon)
    offsets = np.zeros((len(picks), cfg.horizon))
    level = np.full(len(picks), np.nan)  # NaN: the plain path
    for r, (s, i) in enumerate(picks):
        run = runs[s]
        if run.ready[i]:
            vals[r], offsets[r], level[r] = run.adjusted[i], run.offsets[i], run.level[i]
    return model.predictor.predict(build_inputs(ts, vals, None, cfg, level)).shifted(offsets)


def replayed_intervals(
    model_dir: Path, events: Events, *, window: int = 48, kept: int = 96
) -> dict[tuple[int, int], Bounds]:
    """(partition, offset) -> the bounds of the forecast of every accepted event whose window is
    full (its ``window``-th point on); ``kept`` points of factor history per series."""
    from model.registry import ModelRegistry
    from stream.calibration import OnlineCalibrator

    model = ModelRegistry(model_dir).load(backend="torch", device="cpu")
    parts: dict[int, list[tuple[int, str, int, float]]] = {}
    for sid, evs in events.items():
        for i, (p, o, _, v) in enumerate(evs):
            parts.setdefault(p, []).append((o, sid, i, v))
    out: dict[tuple[int, int], Bounds] = {}
    for p, points in parts.items():
        points.sort()
        rows = [(o, sid, i) for o, sid, i, _ in points if i >= window - 1]
        if not rows:
            continue
        fc = offline_forecast(model, events, [(s, i) for _, s, i in rows], window=window)
        cal = OnlineCalibrator(model.config.horizon, kept)
        offsets = np.array([o for o, _, _ in rows], np.int64)
        want, _ = cal.calibrate_batch(points, [s for _, s, _ in rows], offsets, fc)
        for r, (o, _, _) in enumerate(rows):
            out[(p, o)] = {
                side: {lv: arr[lv][r] for lv in ("80", "95")}
                for side, arr in (("lower", want.lower), ("upper", want.upper))
            }
    return out
