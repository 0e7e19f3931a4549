"""Online interval calibration: each series' 80 % and 95 % intervals widened or narrowed, per
horizon step, by what the stream has shown so far (``--interval-calibration online``).

The model's intervals were calibrated once, offline (train/calibrate.py). On a live stream that
drifts they stop meaning what they say. This keeps them honest with adaptive conformal inference
(Gibbs & Candès, "Adaptive conformal inference under distribution shift", NeurIPS 2021) in the
form of the quantile-tracking ("P") term of conformal PID control (Angelopoulos, Candès &
Tibshirani, "Conformal PID control for time series prediction", NeurIPS 2023), on a scale-free
score:

- State per series, interval level ``l`` and horizon step ``h``: a log-factor ``θ[l, h]``. A
  forecast's half-widths (below and above the mean, separately) are the model's times
  ``exp(θ)``.
- When the actual of step ``h`` of an earlier forecast arrives (the ``h``-th accepted point of the
  series after the forecast's point), ``θ[l, h] += γ_h · (miss − α_l)``, where ``miss`` is 1 when
  the actual fell outside that forecast's published ``l`` interval, ``α_l`` = 0.20 or 0.05, and
  ``γ_h = RATE / √h``: step ``h``'s scores come ``h`` points late, after ``h − 1`` more forecasts
  used the same factor, so a full-rate step would overshoot (measured: docs/training.md).
  This is online gradient descent on the pinball loss of the log score: over any sequence, the
  miss rate of each (series, level, step) converges to ``α_l`` (long-run coverage), at a speed and
  jitter set by ``RATE`` (docs/training.md, "Online interval calibration").
- ``θ`` is clamped to ``[log 1/4, log 4]``: an interval is at most 4× narrower or wider than the
  model's. Bounds stay finite and nested: the 95 % half-width is never below the 80 % one.
- A new series starts from its partition's prior, a ``θ`` of the same rule updated by every score
  of the partition (``PRIOR_RATE``).

State is a pure function of the records applied and the forecasts made, in offset order, so it
is persisted with the window in the same fenced Redis write (stream/store.py, the ``cal`` hash),
rebuilt by re-forecasting the log (stream/rebuild.py), and a forecast repeated after a crash (a
redelivered record) uses the factor recorded for its point: it equals the first one. Per series it
keeps the factors applied to its last ``capacity`` forecasts (for those repeats) and the last ``H``
published forecasts (for scoring).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from model.predictor import Forecast

LEVELS: tuple[str, ...] = ("80", "95")
_ALPHA = (0.20, 0.05)  # the miss rate each level promises (α)
RATE = 0.1  # θ step per unit of coverage error, per score of a series (at step 1)
PRIOR_RATE = 0.005  # the partition prior's step (it sees every series' scores)
DELAY_POWER = 0.5  # step h's rate is RATE / h ** DELAY_POWER
LOG_FACTOR_RANGE = (math.log(0.25), math.log(4.0))
MODES = ("online", "static")

_L = len(LEVELS)
_PEND_ROWS = 1 + 3 * _L
# version, levels, horizon, history entries k, points n, offset of the newest point
_SERIES_HEADER = struct.Struct("<BBHHqq")
_PRIOR_HEADER = struct.Struct("<BBH")  # version, levels, horizon
_BLOB_VERSION = 1
PRIOR_FIELD = ""  # the prior's field in the cal hash (no series id is empty: missing_key)


class _OtherHorizon(ValueError):
    """A stored blob written for a model of another horizon."""


class _Series:
    """One series' calibration state (see the module docstring)."""

    __slots__ = ("hist", "hist_off", "last_off", "n", "pend", "pend_at", "theta")

    def __init__(self, theta: np.ndarray, horizon: int, capacity: int) -> None:
        self.n = 0  # points observed: the index of the next one
        self.last_off = -1  # source offset of the newest point observed
        self.theta = theta.astype(np.float32, copy=True)  # (L, H) for the next forecast
        self.pend_at = np.full(horizon, -1, np.int64)  # point index of each pending forecast
        # (H slots, 1 + 3L, H): the mean, the model's lower and upper half-widths per level, and
        # the log-factors applied to them
        self.pend = np.zeros((horizon, _PEND_ROWS, horizon), np.float32)
        self.hist_off = np.full(capacity, -1, np.int64)  # source offset of each forecast kept
        self.hist = np.zeros((capacity, _L, horizon), np.float32)  # θ applied to it


@dataclass
class CalibrationSnapshot:
    """Changes to persist: blobs to set (the prior under ``PRIOR_FIELD``), series to delete."""

    set: dict[str, bytes] = field(default_factory=dict)
    delete: list[str] = field(default_factory=list)


class OnlineCalibrator:
    """The calibration state of one input partition. Feed it, in offset order, every accepted
    point (:meth:`observe`) and every forecast made (:meth:`calibrate`); or a whole batch at once
    (:meth:`calibrate_batch`). Not thread-safe (the worker's event loop only)."""

    def __init__(self, horizon: int, capacity: int) -> None:
        self.horizon = horizon
        self.capacity = capacity
        self.prior = np.zeros((_L, horizon), np.float32)
        self.series: dict[str, _Series] = {}
        self._dirty: set[str] = set()
        self._deleted: set[str] = set()
        self._prior_dirty = False
        self.history_misses = 0  # repeated forecasts whose factor was no longer kept
        self.dropped = 0  # stored blobs of another horizon, dropped by load()
        # The rate of step h: its scores arrive h points after the forecast, by which time h - 1
        # more forecasts used the same factor (delayed feedback); RATE / h ** DELAY_POWER.
        self.rates = [RATE / h**DELAY_POWER for h in range(1, horizon + 1)]

    # ---- the rule ------------------------------------------------------------------------------

    def observe(self, series_id: str, index: int, offset: int, value: float) -> None:
        """An accepted point of a series, ``index`` its place in the windows (0: a new or
        restarted series, which starts from the prior): score the pending forecasts it answers
        and update the series' and the prior's factors. (Only ``index == 0`` is used: the
        windows count from the points they hold after a load, this counts every point.)"""
        s = self.series.get(series_id)
        if s is None or index == 0:
            s = self.series[series_id] = _Series(self.prior, self.horizon, self.capacity)
            self._deleted.discard(series_id)
        index = s.n
        s.n = index + 1
        s.last_off = offset
        self._dirty.add(series_id)
        h_max = self.horizon
        pend_at = s.pend_at
        for h in range(1, min(index, h_max) + 1):
            at = index - h
            slot = at % h_max
            if pend_at[slot] != at:
                continue  # no forecast was made at that point (--emit latest, model_output)
            p = s.pend[slot, :, h - 1].tolist()
            err = value - p[0]
            side = p[1 + _L : 1 + 2 * _L] if err >= 0 else p[1 : 1 + _L]  # the model's halves
            # the series scores its published interval; the prior the one it would have given
            _track(s.theta, h - 1, side, p[1 + 2 * _L :], abs(err), self.rates[h - 1])
            _track(self.prior, h - 1, side, None, abs(err), PRIOR_RATE)
            self._prior_dirty = True

    def calibrate(
        self,
        series_id: str,
        offset: int,
        mean: np.ndarray,
        lower: np.ndarray,
        upper: np.ndarray,
    ) -> np.ndarray:
        """The factors (L, H) float32 for the forecast of the point at ``offset`` (the model's
        ``mean`` (H,) and its bounds ``lower``/``upper`` (L, H), levels in ``LEVELS`` order): the
        series' current ones when the point is its newest (recorded with the published forecast,
        now pending), the recorded ones when the forecast is repeated (a redelivered record)."""
        s = self.series.get(series_id)
        if s is None:  # a forecast without its point observed: only after lost state
            s = self.series[series_id] = _Series(self.prior, self.horizon, self.capacity)
            self._dirty.add(series_id)
        index = s.n - 1
        slot = index % self.capacity
        if offset != s.last_off or s.hist_off[slot] == offset:  # a repeated forecast
            hit = np.flatnonzero(s.hist_off == offset)
            if hit.size:
                return s.hist[hit[0]].copy()
            self.history_misses += 1  # its factors are no longer kept: the current ones
            return s.theta.copy()
        theta = s.theta.copy()
        s.hist_off[slot] = offset
        s.hist[slot] = theta
        pslot = index % self.horizon
        s.pend_at[pslot] = index
        p = s.pend[pslot]
        p[0] = mean
        p[1 : 1 + _L] = np.maximum(mean - lower, 0)
        p[1 + _L : 1 + 2 * _L] = np.maximum(upper - mean, 0)
        p[1 + 2 * _L :] = theta
        self._dirty.add(series_id)
        return theta

    def calibrate_batch(
        self,
        points: Sequence[tuple[int, str, int, float]],
        series: Sequence[str],
        offsets: np.ndarray,
        fc: Forecast,
    ) -> tuple[Forecast, np.ndarray]:
        """One partition's batch, in offset order: ``points`` (offset, series, index, value) of
        the accepted events, and the forecasts made (rows: ``series``, source ``offsets``,
        ``fc``). Returns the calibrated forecast and each row's step-1 factors (R, L)."""
        order = np.argsort(offsets, kind="stable")
        theta = np.zeros((len(series), _L, self.horizon), np.float32)
        lower = np.stack([fc.lower[lv] for lv in LEVELS], axis=1)  # (R, L, H)
        upper = np.stack([fc.upper[lv] for lv in LEVELS], axis=1)
        i = 0
        offs = offsets.tolist()
        for r in order.tolist():
            o = offs[r]
            while i < len(points) and points[i][0] <= o:
                off, sid, idx, val = points[i]
                self.observe(sid, idx, off, val)
                i += 1
            theta[r] = self.calibrate(series[r], o, fc.mean[r], lower[r], upper[r])
        for off, sid, idx, val in points[i:]:
            self.observe(sid, idx, off, val)
        return apply_factors(fc, np.exp(theta)), np.exp(theta[:, :, 0])

    def forget(self, names: Iterable[str]) -> None:
        """Drop series the windows forgot (idle TTL, series cap)."""
        for name in names:
            if self.series.pop(name, None) is not None:
                self._dirty.discard(name)
                self._deleted.add(name)

    # ---- persistence ---------------------------------------------------------------------------

    def snapshot(self, *, full: bool = False) -> CalibrationSnapshot:
        names = list(self.series) if full else sorted(self._dirty)
        snap = CalibrationSnapshot({n: self.encode(n) for n in names if n in self.series},
                                   sorted(self._deleted))  # fmt: skip
        if self._prior_dirty or full:
            snap.set[PRIOR_FIELD] = (
                _PRIOR_HEADER.pack(_BLOB_VERSION, _L, self.horizon) + self.prior.tobytes()
            )
        self._dirty.clear()
        self._deleted.clear()
        self._prior_dirty = False
        return snap

    def encode(self, series_id: str) -> bytes:
        s = self.series[series_id]
        keep = np.flatnonzero(s.hist_off >= 0)
        return b"".join((
            _SERIES_HEADER.pack(_BLOB_VERSION, _L, self.horizon, len(keep), s.n, s.last_off),
            s.theta.tobytes(), s.pend_at.tobytes(), s.pend.tobytes(),
            keep.astype(np.int64).tobytes(), s.hist_off[keep].tobytes(), s.hist[keep].tobytes(),
        ))  # fmt: skip

    def load(self, blobs: dict[str, bytes]) -> list[str]:
        """Restore from the stored blobs; returns the names whose blob is unreadable: the caller
        rebuilds the partition. A blob written for another horizon (the serving model changed
        shape) is dropped, not unreadable: that series starts afresh from the prior."""
        bad: list[str] = []
        for name, blob in blobs.items():
            try:
                if name == PRIOR_FIELD:
                    self.prior = self._decode_prior(blob)
                else:
                    self.series[name] = self._decode(blob)
            except _OtherHorizon:
                self.dropped += 1
                if name == PRIOR_FIELD:
                    self._prior_dirty = True  # the fresh prior replaces it
                else:
                    self._deleted.add(name)
            except (ValueError, struct.error):
                bad.append(name)
        return sorted(bad)

    def _decode_prior(self, blob: bytes) -> np.ndarray:
        ver, levels, h = _PRIOR_HEADER.unpack_from(blob)
        if (ver, levels) != (_BLOB_VERSION, _L):
            raise ValueError("calibration prior of another format")
        if h != self.horizon:
            raise _OtherHorizon
        arr = np.frombuffer(blob, np.float32, _L * h, _PRIOR_HEADER.size)
        if len(blob) != _PRIOR_HEADER.size + arr.nbytes:
            raise ValueError("calibration prior of a wrong size")
        return arr.reshape(_L, h).copy()

    def _decode(self, blob: bytes) -> _Series:
        ver, levels, h, k, n, last_off = _SERIES_HEADER.unpack_from(blob)
        if (ver, levels) != (_BLOB_VERSION, _L) or k > self.capacity or n < 0:
            raise ValueError("calibration blob of another format")
        if h != self.horizon:
            raise _OtherHorizon
        s = _Series(self.prior, h, self.capacity)
        s.n, s.last_off = n, last_off
        pos = _SERIES_HEADER.size
        parts: list[np.ndarray] = []
        layout = ((np.float32, _L * h), (np.int64, h), (np.float32, h * _PEND_ROWS * h),
                  (np.int64, k), (np.int64, k), (np.float32, k * _L * h))  # fmt: skip
        for dtype, count in layout:
            arr = np.frombuffer(blob, dtype, count, pos)
            parts.append(arr)
            pos += arr.nbytes
        if pos != len(blob):
            raise ValueError("calibration blob of a wrong size")
        theta, pend_at, pend, slots, offs, hist = parts
        if slots.size and (slots.min() < 0 or slots.max() >= self.capacity):
            raise ValueError("calibration blob with a history slot out of range")
        s.theta[:] = theta.reshape(_L, h)
        s.pend_at[:] = pend_at
        s.pend[:] = pend.reshape(h, _PEND_ROWS, h)
        s.hist_off[slots] = offs
        s.hist[slots] = hist.reshape(k, _L, h)
        return s


def _track(
    theta: np.ndarray,
    step: int,
    side: list[float],
    applied: list[float] | None,
    err: float,
    rate: float,
) -> None:
    """One score of the rule on column ``step`` of ``theta`` (L, H), in place: per level, was
    ``err`` (the absolute error) outside the half-width ``side`` (the model's, on the side the
    actual fell) times ``exp`` of the factors ``applied`` (None: ``theta``'s own), nested as
    published? Then ``θ += rate · (miss − α)``, clamped."""
    th = theta[:, step].tolist()
    used = th if applied is None else applied
    lo, hi = LOG_FACTOR_RANGE
    half = 0.0
    for i in range(_L):
        half = max(half, side[i] * math.exp(used[i]))  # nested: never below the level before
        miss = 1.0 if err > half else 0.0
        th[i] = min(hi, max(lo, th[i] + rate * (miss - _ALPHA[i])))
    theta[:, step] = th


def scaled_halves(
    mean: np.ndarray, lower: Sequence[np.ndarray], upper: Sequence[np.ndarray], f: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Half-widths below and above ``mean`` per level (L, ...) after the factors ``f`` (L, ...),
    nested: no level's half-width is below the narrower level's."""
    lo = np.stack([np.maximum(mean - b, 0) for b in lower]) * f
    up = np.stack([np.maximum(b - mean, 0) for b in upper]) * f
    np.maximum.accumulate(lo, axis=0, out=lo)
    np.maximum.accumulate(up, axis=0, out=up)
    return lo.astype(np.float32), up.astype(np.float32)


def apply_factors(fc: Forecast, f: np.ndarray) -> Forecast:
    """``fc`` with each row's half-widths times ``f`` (R, L, H), nested (:func:`scaled_halves`).
    The std is scaled by the 80 % factor."""
    mean = fc.mean
    lo, up = scaled_halves(
        mean, [fc.lower[lv] for lv in LEVELS], [fc.upper[lv] for lv in LEVELS],
        np.moveaxis(f, 1, 0),
    )  # fmt: skip
    return Forecast(
        mean, (fc.std * f[:, 0]).astype(np.float32),
        {lv: (mean - lo[i]).astype(np.float32) for i, lv in enumerate(LEVELS)},
        {lv: (mean + up[i]).astype(np.float32) for i, lv in enumerate(LEVELS)},
    )  # fmt: skip
