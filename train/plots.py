"""Forecast plots: actuals, mean forecast, 80 % and 95 % bands, for a few series (matplotlib Agg).

For horizon 1 each series shows its rolling one-step forecasts over the end of the held-out part;
for longer horizons it shows whole forecast paths from origins ``H`` steps apart, so the bands
widen visibly along each path.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def forecast_figure(
    ids: list[str],
    series: np.ndarray,
    ts: np.ndarray,
    y: np.ndarray,
    fc: Mapping[str, np.ndarray],
    *,
    title: str = "",
    max_series: int = 3,
    max_points: int = 240,
) -> Any:
    """A matplotlib Figure. ``series`` (W,) series number of each window, ``ts`` (W, T+H) window
    times, ``y`` (W, H) targets, ``fc`` the forecasts (``mean, lower_80, upper_80, lower_95,
    upper_95`` each (W, H)). Windows must be in time order within each series."""
    plt = _pyplot()
    chosen = list(dict.fromkeys(series.tolist()))[:max_series]
    h = y.shape[1]
    fig, axes = plt.subplots(len(chosen) or 1, 1, figsize=(11, 3.2 * max(1, len(chosen))),
                             squeeze=False)  # fmt: skip
    for ax, s in zip(axes[:, 0], chosen, strict=False):
        rows = np.flatnonzero(series == s)
        if h == 1:
            rows = rows[-max_points:]
            tt = ts[rows, -1]
            sl = (rows, 0)
            x = (tt - tt[0]) / 3600.0
            ax.fill_between(x, fc["lower_95"][sl], fc["upper_95"][sl], alpha=0.15, color="C0",
                            label="95 %")  # fmt: skip
            ax.fill_between(x, fc["lower_80"][sl], fc["upper_80"][sl], alpha=0.3, color="C0",
                            label="80 %")  # fmt: skip
            ax.plot(x, fc["mean"][sl], color="C0", lw=1.2, label="forecast")
            ax.plot(x, y[sl], color="k", lw=1.0, label="actual")
        else:
            n_paths = max(1, max_points // h)
            picks = rows[::h][-n_paths:]
            t0 = ts[picks[0], -h]
            for j, r in enumerate(picks):
                x = (ts[r, -h:] - t0) / 3600.0
                lab = j == 0
                ax.fill_between(x, fc["lower_95"][r], fc["upper_95"][r], alpha=0.15, color="C0",
                                label="95 %" if lab else None)  # fmt: skip
                ax.fill_between(x, fc["lower_80"][r], fc["upper_80"][r], alpha=0.3, color="C0",
                                label="80 %" if lab else None)  # fmt: skip
                ax.plot(x, fc["mean"][r], color="C0", lw=1.2, label="forecast" if lab else None)
                ax.plot(x, y[r], color="k", lw=1.0, label="actual" if lab else None)
        ax.set_title(f"{ids[s]}" + (f" — {title}" if title else ""), fontsize=9)
        ax.set_xlabel("hours")
        ax.legend(loc="upper left", fontsize=7, ncol=4)
    fig.tight_layout()
    return fig


def save_forecast_png(path: Path | str, *args: Any, **kwargs: Any) -> Path:
    """Draw :func:`forecast_figure` and save it as a PNG at ``path``."""
    plt = _pyplot()
    fig = forecast_figure(*args, **kwargs)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p
