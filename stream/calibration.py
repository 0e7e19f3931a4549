"""Online interval calibration: each series' 80 % and 95 % intervals widened or narrowed, per
horizon step, by what the stream has shown so far (``--interval-calibration online``).

The model's intervals were calibrated once, offline (train/calibrate.py). On a live stream that
drifts they stop meaning what they say. This keeps them honest with adaptive conformal inference
(Gibbs & Candès, "Adaptive conformal inference under distribution shift", NeurIPS 2021) in the
form of the quantile-tracking ("P") term of conformal PID control (Angelopoulos, Candès &
Tibshirani, "Conformal PID control for time series prediction", NeurIPS 2023), on a scale-free
score:

- State per series, side ``s`` (below or above the mean), interval level ``l`` and horizon step
  ``h``: a log-term ``θ[s, l, h]``. A forecast's half-width on side ``s`` is the model's times a
  factor: ``exp(θ[s, 80])`` at 80 %, and ``exp(θ[s, 80] + θ[s, 95])`` at 95 % — the 80 % factor
  times a learnt ratio, so the 95 % bound follows the 80 % one's moves at once and learns only how
  far the tails differ (:func:`_applied`). Each bound is tracked alone, so a biased mean widens the
  side it misses on and narrows the other, where one factor for both would widen both.
- When the actual of step ``h`` of an earlier forecast arrives (the ``h``-th accepted point of the
  series after the forecast's point), for each side ``θ[s, l, h] += γ_h · r_l · (miss − α_l / 2)``,
  where ``miss`` is 1 when the actual fell beyond that forecast's published ``l`` bound on side
  ``s`` (always 0 on the side it did not fall), ``α_l`` = 0.20 or 0.05, ``r_l`` = ``LEVEL_RATE``
  and ``γ_h = RATE / √h``: step ``h``'s scores come ``h`` points late, after ``h − 1`` more
  forecasts used the same factor, so a full-rate step would overshoot. The 95 % level moves at
  half the rate: its misses are rare (2.5 % a side) and each is a jump of 0.975 · γ, whose jitter
  widens the interval on average (measured: docs/training.md). That slow rate alone could not
  follow a stream whose errors grew (a 24-step 95 % bound missed 9–10 % of the time for a whole
  held-out season); tied to the 80 % factor, it does (docs/training.md).
  This is online gradient descent on the pinball loss of each bound's log score: over any
  sequence, the miss rate of each (series, side, level, step) converges to ``α_l / 2`` (long-run
  coverage ``1 − α_l``), at a speed and jitter set by ``RATE`` (docs/training.md, "Online interval
  calibration").
- ``θ`` and each applied log-factor are clamped to ``[log 1/4, log 4]``: an interval is at most
  4× narrower or wider than the model's. Bounds stay finite and nested: the 95 % half-width is
  never below the 80 % one.
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
SIDES: tuple[str, ...] = ("lower", "upper")  # θ's first axis
_ALPHA = (0.20, 0.05)  # the miss rate each level promises (α), half of it on each side
RATE = 0.1  # θ step per unit of coverage error, per score of a series (at step 1)
LEVEL_RATE = (1.0, 0.5)  # each level's share of RATE (r_l)
PRIOR_RATE = 0.005  # the partition prior's step (it sees every series' scores)
DELAY_POWER = 0.5  # step h's rate is RATE / h ** DELAY_POWER
LOG_FACTOR_RANGE = (math.log(0.25), math.log(4.0))
MODES = ("online", "static")

_L = len(LEVELS)
# a pending forecast: its mean, the model's lower and upper half-widths per level, and the
# log-factors applied to them (lower, then upper)
_PEND_ROWS = 1 + 4 * _L
# version, levels, horizon, history entries k, points n, offset of the newest point
_SERIES_HEADER = struct.Struct("<BBHHqq")
_PRIOR_HEADER = struct.Struct("<BBH")  # version, levels, horizon
# 1: one factor for both sides; 2: the 95 % factor tracked alone (both dropped on load: the
# series starts afresh)
_BLOB_VERSION = 3
PRIOR_FIELD = ""  # the prior's field in the cal hash (no series id is empty: missing_key)


class _Stale(ValueError):
    """A stored blob written for a model of another horizon, or by an earlier form of the rule."""


class _Series:
    """One series' calibration state (see the module docstring)."""

    __slots__ = ("hist", "hist_off", "last_off", "n", "pend", "pend_at", "theta")

    def __init__(self, theta: np.ndarray, horizon: int, capacity: int) -> None:
        self.n = 0  # points observed: the index of the next one
        self.last_off = -1  # source offset of the newest point observed
        self.theta = theta.astype(np.float32, copy=True)  # (2, L, H) for the next forecast
        self.pend_at = np.full(horizon, -1, np.int64)  # point index of each pending forecast
        self.pend = np.zeros((horizon, _PEND_ROWS, horizon), np.float32)  # H slots of them
        self.hist_off = np.full(capacity, -1, np.int64)  # source offset of each forecast kept
        self.hist = np.zeros((capacity, 2, _L, horizon), np.float32)  # θ applied to it


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
        self.prior = np.zeros((2, _L, horizon), np.float32)
        self.series: dict[str, _Series] = {}
        self._dirty: set[str] = set()
        self._deleted: set[str] = set()
        self._prior_dirty = False
        self.history_misses = 0  # repeated forecasts whose factor was no longer kept
        self.dropped = 0  # stored blobs of another horizon or rule version, dropped by load()
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
            side = 1 if err >= 0 else 0  # the side the actual fell on
            half = p[1 + side * _L : 1 + (side + 1) * _L]  # the model's half-widths there
            applied = p[1 + (2 + side) * _L : 1 + (3 + side) * _L]
            # the series scores its published bounds; the prior the ones it would have given
            _track(s.theta, side, h - 1, half, applied, abs(err), self.rates[h - 1])
            _track(self.prior, side, h - 1, half, None, abs(err), PRIOR_RATE)
            self._prior_dirty = True

    def calibrate(
        self,
        series_id: str,
        offset: int,
        mean: np.ndarray,
        lower: np.ndarray,
        upper: np.ndarray,
    ) -> np.ndarray:
        """The log-factors (2, L, H) float32 for the forecast of the point at ``offset`` (the
        model's ``mean`` (H,) and its bounds ``lower``/``upper`` (L, H), levels in ``LEVELS``
        order): the series' current ones when the point is its newest (recorded with the
        published forecast, now pending), the recorded ones when the forecast is repeated (a
        redelivered record)."""
        head = np.concatenate(
            [mean[None], np.maximum(mean - lower, 0), np.maximum(upper - mean, 0)]
        )
        return self._calibrate(series_id, offset, head.astype(np.float32)).copy()

    def _calibrate(self, series_id: str, offset: int, head: np.ndarray) -> np.ndarray:
        """:meth:`calibrate` with the forecast as its pending row's head (1 + 2L, H): the mean,
        then the model's lower and upper half-widths per level. Returns a view of the state:
        read it, do not keep or change it."""
        s = self.series.get(series_id)
        if s is None:  # a forecast without its point observed: only after lost state
            s = self.series[series_id] = _Series(self.prior, self.horizon, self.capacity)
            self._dirty.add(series_id)
        index = s.n - 1
        slot = index % self.capacity
        if offset != s.last_off or s.hist_off[slot] == offset:  # a repeated forecast
            hit = np.flatnonzero(s.hist_off == offset)
            if hit.size:
                return s.hist[hit[0]]
            self.history_misses += 1  # its factors are no longer kept: the current ones
            return _applied(s.theta, np.empty_like(s.theta))
        s.hist_off[slot] = offset
        kept = s.hist[slot]
        _applied(s.theta, kept)
        pslot = index % self.horizon
        s.pend_at[pslot] = index
        p = s.pend[pslot]
        p[: 1 + 2 * _L] = head
        p[1 + 2 * _L :] = kept.reshape(2 * _L, -1)
        self._dirty.add(series_id)
        return kept

    def calibrate_batch(
        self,
        points: Sequence[tuple[int, str, int, float]],
        series: Sequence[str],
        offsets: np.ndarray,
        fc: Forecast,
    ) -> tuple[Forecast, np.ndarray]:
        """One partition's batch, in offset order: ``points`` (offset, series, index, value) of
        the accepted events, and the forecasts made (rows: ``series``, source ``offsets``,
        ``fc``). Returns the calibrated forecast and each row's step-1 factor per level (R, L),
        the mean of its two sides'."""
        order = np.argsort(offsets, kind="stable")
        theta = np.zeros((len(series), 2, _L, self.horizon), np.float32)
        mean = fc.mean[:, None]  # (R, 1, H)
        lower = np.stack([fc.lower[lv] for lv in LEVELS], axis=1)  # (R, L, H)
        upper = np.stack([fc.upper[lv] for lv in LEVELS], axis=1)
        heads = np.concatenate(
            [mean, np.maximum(mean - lower, 0), np.maximum(upper - mean, 0)], axis=1
        ).astype(np.float32)  # (R, 1 + 2L, H): each row's pending head
        i = 0
        offs = offsets.tolist()
        for r in order.tolist():
            o = offs[r]
            while i < len(points) and points[i][0] <= o:
                off, sid, idx, val = points[i]
                self.observe(sid, idx, off, val)
                i += 1
            theta[r] = self._calibrate(series[r], o, heads[r])
        for off, sid, idx, val in points[i:]:
            self.observe(sid, idx, off, val)
        f = np.exp(theta)
        return apply_factors(fc, f), f[..., 0].mean(axis=1)

    def factors(self, series_id: str | None = None) -> np.ndarray:
        """The log-factors (2, L, H) a series' next forecast gets (None: the partition prior's,
        what a new series starts from)."""
        theta = self.prior if series_id is None else self.series[series_id].theta
        return _applied(theta, np.empty_like(theta))

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
            except _Stale:
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
        _check_header(ver, levels, h, self.horizon)
        arr = np.frombuffer(blob, np.float32, 2 * _L * h, _PRIOR_HEADER.size)
        if len(blob) != _PRIOR_HEADER.size + arr.nbytes:
            raise ValueError("calibration prior of a wrong size")
        return arr.reshape(2, _L, h).copy()

    def _decode(self, blob: bytes) -> _Series:
        ver, levels, h, k, n, last_off = _SERIES_HEADER.unpack_from(blob)
        _check_header(ver, levels, h, self.horizon)
        if k > self.capacity or n < 0:
            raise ValueError("calibration blob of another format")
        s = _Series(self.prior, h, self.capacity)
        s.n, s.last_off = n, last_off
        pos = _SERIES_HEADER.size
        parts: list[np.ndarray] = []
        layout = ((np.float32, 2 * _L * h), (np.int64, h), (np.float32, h * _PEND_ROWS * h),
                  (np.int64, k), (np.int64, k), (np.float32, k * 2 * _L * h))  # fmt: skip
        for dtype, count in layout:
            arr = np.frombuffer(blob, dtype, count, pos)
            parts.append(arr)
            pos += arr.nbytes
        if pos != len(blob):
            raise ValueError("calibration blob of a wrong size")
        theta, pend_at, pend, slots, offs, hist = parts
        if slots.size and (slots.min() < 0 or slots.max() >= self.capacity):
            raise ValueError("calibration blob with a history slot out of range")
        s.theta[:] = theta.reshape(2, _L, h)
        s.pend_at[:] = pend_at
        s.pend[:] = pend.reshape(h, _PEND_ROWS, h)
        s.hist_off[slots] = offs
        s.hist[slots] = hist.reshape(k, 2, _L, h)
        return s


def _check_header(version: int, levels: int, horizon: int, want_horizon: int) -> None:
    """A blob of this rule's form and horizon passes; one of an earlier form (versions 1 and 2)
    or of another horizon is stale (dropped); anything else is unreadable."""
    if version not in (1, 2, _BLOB_VERSION) or levels != _L:
        raise ValueError("calibration blob of another format")
    if version != _BLOB_VERSION or horizon != want_horizon:
        raise _Stale


def _track(
    theta: np.ndarray,
    side: int,
    step: int,
    half: list[float],
    applied: list[float] | None,
    err: float,
    rate: float,
) -> None:
    """One score of the rule on column ``step`` of ``theta`` (2, L, H), in place: the actual fell
    ``err`` (absolute) from the mean on ``side`` (0 below, 1 above), where the model's half-widths
    per level are ``half``. Per level, was it beyond the bound the log-factors ``applied`` there
    gave (None: the ones ``theta`` gives, :func:`_applied`), nested as published? Then
    ``θ[side] += rate · r · (miss − α / 2)``; the other side, which it cannot have missed,
    ``θ[other] −= rate · r · α / 2``; clamped. (At 95 % the term is the ratio to the 80 % factor:
    a miss there raises the ratio, and one at 80 % the factor both levels share.)"""
    lo, hi = LOG_FACTOR_RANGE
    col = theta[:, :, step].tolist()  # one read and one write of the state per score
    here, there = col[side], col[1 - side]
    if applied is None:  # what this state gives (_applied, on one column): 80 %, 80 % × ratio
        applied = [here[0], min(hi, max(lo, here[0] + here[1]))]
    bound = 0.0
    for i in range(_L):
        bound = max(bound, half[i] * math.exp(applied[i]))  # nested: not inside the level before
        r = rate * LEVEL_RATE[i]
        miss = 1.0 if err > bound else 0.0
        here[i] = min(hi, max(lo, here[i] + r * (miss - _ALPHA[i] / 2)))
        there[i] = max(lo, there[i] - r * _ALPHA[i] / 2)
    theta[:, :, step] = col


def _applied(theta: np.ndarray, out: np.ndarray) -> np.ndarray:
    """The log-factors a state ``theta`` (2, L, H) gives, into ``out``: the 80 % one as it is,
    the 95 % one the 80 % one plus its own term (its factor is the 80 % factor times a learnt
    ratio), clamped."""
    out[:, 0] = theta[:, 0]
    np.clip(theta[:, 0] + theta[:, 1], *LOG_FACTOR_RANGE, out=out[:, 1])
    return out


def apply_factors(fc: Forecast, f: np.ndarray) -> Forecast:
    """``fc`` with each row's half-widths below and above the mean times ``f`` (R, 2, L, H): side
    (lower, upper), level, step; nested (no level's half-width below the narrower level's). The
    std is scaled by the mean of the two 80 % factors."""
    mean = fc.mean
    halves = []
    for side, sign, bounds in ((0, -1.0, fc.lower), (1, 1.0, fc.upper)):
        h = np.stack([np.maximum(sign * (bounds[lv] - mean), 0) for lv in LEVELS])
        h *= np.moveaxis(f[:, side], 1, 0)
        halves.append(np.maximum.accumulate(h, axis=0))
    lo, up = halves
    return Forecast(
        mean, (fc.std * f[:, :, 0].mean(axis=1)).astype(np.float32),
        {lv: (mean - lo[i]).astype(np.float32) for i, lv in enumerate(LEVELS)},
        {lv: (mean + up[i]).astype(np.float32) for i, lv in enumerate(LEVELS)},
    )  # fmt: skip
