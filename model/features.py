"""The one feature builder: raw ``(ts, value, features)`` windows -> the network's input tensor.

The trainer, the streaming worker and the HTTP service all call :func:`build_inputs`, so a model
sees exactly the same channels in training and in serving. Channel layout of the output
``(B, T, C)`` float32 array, ``C == config.input_size``:

====================  =====================================================================
channel               content
====================  =====================================================================
0                     the raw value (no scaling: the network normalises each window itself)
1, 2 (calendar)       sin, cos of the UTC time of day (period 86 400 s)
3, 4 (calendar)       sin, cos of the UTC week phase (period 7 days, Monday 00:00 = phase 0;
                      continuous, so it also moves within a day)
next 2 (calendar_year) sin, cos of the year phase (period 365.2425 days, 1 January 1970 = 0)
then                  exogenous features, in ``config.features`` order, raw
last (level)          a model with seasons (``config.level_channel``): the seasonal state's
                      level, the smoother's own forecast of the window less its seasons,
                      constant over the window; the newest value on the plain path (persistence,
                      the forecast of a window without a state). Raw: the network normalises it
                      with the value channel's statistics.
====================  =====================================================================

Everything is vectorised over the batch: one call on thousands of windows costs a few array
passes. Only numpy is needed here.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from model.config import ModelConfig
from model.errors import InputError

DAY_SECONDS = 86_400.0
WEEK_SECONDS = 7 * DAY_SECONDS
YEAR_SECONDS = 365.2425 * DAY_SECONDS  # the mean Gregorian year
# 1970-01-01 was a Thursday: shift by 3 days so that phase 0 is Monday 00:00 UTC.
_EPOCH_WEEKDAY_SHIFT = 3 * DAY_SECONDS


def build_inputs(
    ts: np.ndarray,
    values: np.ndarray,
    features: Mapping[str, np.ndarray] | None,
    config: ModelConfig,
    level: np.ndarray | None = None,
) -> np.ndarray:
    """Build the model input for ``B`` windows of ``T`` points each.

    Args:
        ts: ``(B, T)`` epoch seconds (UTC), float64 recommended (float32 loses seconds).
        values: ``(B, T)`` observed values.
        features: name -> ``(B, T)`` array for every name in ``config.features`` (others are
            ignored); may be ``None`` when the model has no exogenous features.
        config: the model's config (which channels, in which order).
        level: ``(B,)`` the seasonal state's level of each window on the seasonal path, NaN for
            those on the plain path; None: every window on the plain path. Read only when
            ``config.level_channel``.

    Returns:
        ``(B, T, config.input_size)`` float32, C-contiguous.

    Raises:
        InputError (a ConfigError and ValueError): an array is not 2-D or its shape differs from
        ``values``, a number is NaN or infinite, or a feature of ``config.features`` is missing
        (the message names it).
    """
    values = np.asarray(values)
    ts = np.asarray(ts, dtype=np.float64)
    if values.ndim != 2:
        raise InputError(f"values: expected a (batch, time) array, got shape {values.shape}")
    if ts.shape != values.shape:
        raise InputError(f"ts: shape {ts.shape} differs from values shape {values.shape}")
    if not np.isfinite(values).all():
        raise InputError("values: contains NaN or infinite numbers")
    if not np.isfinite(ts).all():
        raise InputError("ts: contains NaN or infinite numbers")

    b, t = values.shape
    out = np.empty((b, t, config.input_size), dtype=np.float32)
    out[:, :, 0] = values
    c = 1
    if config.calendar:
        day = (2.0 * np.pi / DAY_SECONDS) * np.mod(ts, DAY_SECONDS)  # (B, T) radians
        week = (2.0 * np.pi / WEEK_SECONDS) * np.mod(ts + _EPOCH_WEEKDAY_SHIFT, WEEK_SECONDS)
        out[:, :, 1] = np.sin(day)
        out[:, :, 2] = np.cos(day)
        out[:, :, 3] = np.sin(week)
        out[:, :, 4] = np.cos(week)
        c = 5
    if config.calendar_year:
        year = (2.0 * np.pi / YEAR_SECONDS) * np.mod(ts, YEAR_SECONDS)
        out[:, :, c] = np.sin(year)
        out[:, :, c + 1] = np.cos(year)
        c += 2
    for name in config.features:
        if features is None or name not in features:
            raise InputError(f"features: missing feature {name!r} the model was trained with")
        col = np.asarray(features[name])
        if col.shape != values.shape:
            raise InputError(
                f"features[{name!r}]: shape {col.shape} differs from values shape {values.shape}"
            )
        if not np.isfinite(col).all():
            raise InputError(f"features[{name!r}]: contains NaN or infinite numbers")
        out[:, :, c] = col
        c += 1
    if config.level_channel:
        newest = values[:, -1]
        if level is None:
            level = newest
        else:
            level = np.asarray(level, dtype=np.float64)
            if level.shape != (b,):
                raise InputError(f"level: expected shape ({b},), got {level.shape}")
            if np.isinf(level).any():
                raise InputError("level: contains infinite numbers")
            level = np.where(np.isnan(level), newest, level)
        out[:, :, c] = level[:, None]
    return out


def target_times(ts: np.ndarray, horizon: int) -> np.ndarray:
    """Estimated times of the ``horizon`` forecast steps of each window.

    Step ``k`` (1-based) is the newest ``ts`` plus ``k`` times the median spacing of that window,
    so irregular series get a robust estimate.

    Args:
        ts: ``(B, T)`` epoch seconds with ``T >= 2``.
        horizon: number of steps ``H >= 1``.

    Returns:
        ``(B, H)`` float64.

    Raises:
        InputError: ``ts`` is not 2-D with at least two points, or ``horizon < 1``.
    """
    ts = np.asarray(ts, dtype=np.float64)
    if ts.ndim != 2 or ts.shape[1] < 2:
        raise InputError(f"ts: expected a (batch, time >= 2) array, got shape {ts.shape}")
    if horizon < 1:
        raise InputError(f"horizon: must be >= 1, got {horizon}")
    spacing = np.median(np.diff(ts, axis=1), axis=1)  # (B,)
    steps = np.arange(1, horizon + 1, dtype=np.float64)  # (H,)
    return ts[:, -1:] + spacing[:, None] * steps[None, :]
