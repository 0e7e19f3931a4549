"""Per-series seasonal memory: a level and one index ring per season, updated O(1) per accepted
point — additive exponential smoothing with several seasons
(Holt–Winters without a trend; Taylor 2003 for double seasonality; the ES half of Smyl's ES-RNN).

The network sees 48 points: one day of half-hourly data. A weekly pattern reaches it only through
calendar features. This state remembers each season's shape per series, so the network can be
fed the window with the seasons taken out and its forecast put back on them (the hybrid). The
trainer (:func:`run_series`) and the worker (:class:`stream.rings.SeriesRings`) run the *same*
recursion (:meth:`SeasonalState.update`), one point at a time in time order, and take a window's
inputs through the same call (:meth:`SeasonalState.window_inputs`).

- Phase: a point's place in season ``m`` is ``round(ts / spacing) mod m``: from its time, not its
  count, so a gap in the data does not shift the seasons.
- Warm-up: until the series has one full cycle of its longest season ``M`` (every phase seen),
  the state only buffers the values; then the level is their mean and each season's indices the
  mean residual at its phase (shortest season first, each centred), and the recursion starts.
  :attr:`SeasonalState.ready` says which path a forecast can take.
- Update, for a point ``y`` with phases ``p_k``: ``s = Σ_k I_k[p_k]``;
  ``ℓ ← α (y − s) + (1 − α) ℓ``; ``I_k[p_k] ← γ_k (y − ℓ − (s − I_k[p_k])) + (1 − γ_k) I_k[p_k]``.
- Coefficients: per model (:func:`fit_coefficients`), chosen on the training split to minimise
  the smoother's own mean absolute error over the model's horizon. Per model and not per series
  because the worker meets series the trainer never saw; and fitted *for the horizon*, because
  coefficients fitted for the next step (high α) make the long steps worse (measured on taylor,
  see the module's issue).

- Undo: the worker forecasts a redelivered record's window again, as it stood at that record, and
  the repeat must equal the first forecast. So the state keeps, for its last ``keep`` updates,
  what each one overwrote (level, the index of each season it touched, the step): :meth:`back`
  undoes them on a copy. ``keep`` is the worker's ``--window-history`` (how far back a window is
  retained); the trainer keeps none.

Memory per series: ``8 × (1 + Σ m)`` bytes once ready (half-hourly 48 + 336: 3.1 KB) plus
``8 × (2 + K) × keep`` for the undo entries (K seasons; 1.5 KB with the default 48), twice the
longest season while warming up; seasons over :data:`MAX_SEASON` steps are refused. The blob
Redis stores (:meth:`SeasonalState.encode`) is the same size.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

MAX_SEASON = 2016  # a week of 5-minute data: the longest season a series keeps
# version, seasons, ready, points seen, points seen when it became ready, level, undo entries,
# and the spec's fingerprint (a blob of another spec is refused: its recursion differs)
_HEADER = struct.Struct("<BBBqqdH8s")
_VERSION = 2


@dataclass(frozen=True)
class SeasonalSpec:
    """What a model's seasonal state is: its seasons in steps (ascending), the data's spacing
    and the smoothing coefficients (level ``alpha``, one ``gamma`` per season)."""

    seasons: tuple[int, ...]
    spacing_s: float
    alpha: float
    gammas: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.seasons or list(self.seasons) != sorted(set(self.seasons)):
            raise ValueError(f"seasons: ascending distinct steps, got {self.seasons}")
        if self.seasons[0] < 2 or self.seasons[-1] > MAX_SEASON:
            raise ValueError(f"seasons: each in [2, {MAX_SEASON}], got {self.seasons}")
        if len(self.gammas) != len(self.seasons):
            raise ValueError("gammas: one per season")
        if not self.spacing_s > 0:
            raise ValueError(f"spacing_s: must be > 0, got {self.spacing_s}")
        for name, v in (("alpha", self.alpha), *(("gamma", g) for g in self.gammas)):
            if not 0.0 < v <= 1.0:
                raise ValueError(f"{name}: must be in (0, 1], got {v}")

    @property
    def longest(self) -> int:
        return self.seasons[-1]

    @functools.cached_property  # (read by every blob's encode: hashed once per spec)
    def fingerprint(self) -> bytes:
        """8 bytes naming the recursion: a stored state of another spec is not this one's."""
        text = repr((self.seasons, self.spacing_s, self.alpha, self.gammas))
        return hashlib.sha256(text.encode()).digest()[:8]

    def steps(self, ts: np.ndarray | float) -> np.ndarray:
        """The step number of each time (its phase in every season follows by ``mod m``)."""
        return np.rint(np.asarray(ts, np.float64) / self.spacing_s).astype(np.int64)


class SeasonalState:
    """One series' seasonal state (module docstring); ``keep``: how many updates :meth:`back`
    can undo."""

    __slots__ = ("idx", "keep", "level", "n", "ready", "ready_at", "spec", "undo_idx",
                 "undo_level", "undo_n", "undo_step", "warm", "warm_run", "warm_step")  # fmt: skip

    def __init__(self, spec: SeasonalSpec, keep: int = 0) -> None:
        self.spec = spec
        self.keep = keep
        self.n = 0  # points seen
        self.ready = False
        self.ready_at = -1  # points seen when the warm-up ended
        self.level = 0.0
        self.idx = [np.zeros(m) for m in spec.seasons]
        m = spec.longest
        self.warm = np.full(m, np.nan)  # the warm-up buffer, by phase of the longest season
        self.warm_step = np.full(m, -1, np.int64)
        self.warm_run = 0  # consecutive steps seen up to the newest (a repeated step counts once)
        # what update number c overwrote, at row (c - 1) % keep: level, each season's index, step
        self.undo_level = np.zeros(keep)
        self.undo_idx = np.zeros((keep, len(spec.seasons)))
        self.undo_step = np.zeros(keep, np.int64)
        self.undo_n = 0  # entries held (at most keep)

    def update(self, ts: float, value: float) -> None:
        """Feed one accepted point (in time order)."""
        self.n += 1
        step = round(ts / self.spec.spacing_s)  # as steps(): float64 division, half to even
        if not self.ready:
            m = self.spec.longest
            p = step % m
            last = int(self.warm_step[(step - 1) % m])  # (the phase before this one)
            if int(self.warm_step[p]) != step:  # a new step (not a second point in the same one)
                self.warm_run = self.warm_run + 1 if last == step - 1 else 1
            self.warm[p] = value
            self.warm_step[p] = step
            if self.warm_run >= m:  # the last m steps all seen: one whole cycle, every phase
                self._initialise()
            return
        spec = self.spec
        phases = [step % m for m in spec.seasons]
        parts = [float(ix[p]) for ix, p in zip(self.idx, phases, strict=True)]
        if self.keep:
            e = (self.n - 1) % self.keep
            self.undo_level[e] = self.level
            self.undo_idx[e] = parts
            self.undo_step[e] = step
            self.undo_n = min(self.undo_n + 1, self.keep)
        s = sum(parts)
        level = spec.alpha * (value - s) + (1.0 - spec.alpha) * self.level
        for ix, p, part, g in zip(self.idx, phases, parts, spec.gammas, strict=True):
            ix[p] = g * (value - level - (s - part)) + (1.0 - g) * part
        self.level = level

    def back(self, steps: int) -> SeasonalState | None:
        """The state as it was ``steps`` points ago (``self`` for 0; a copy otherwise, the last
        updates undone exactly), or None when it was still warming up then (the plain path).
        ValueError when that is further back than ``keep``."""
        if steps == 0:
            return self if self.ready else None
        count = self.n - steps
        if not self.ready or count < self.ready_at:
            return None
        if not 0 < steps <= self.undo_n:
            raise ValueError(f"cannot go {steps} points back (holds {self.undo_n} undo entries)")
        s = SeasonalState(self.spec)
        s.n, s.ready, s.ready_at, s.level = count, True, self.ready_at, self.level
        s.idx = [ix.copy() for ix in self.idx]
        for c in range(self.n, count, -1):
            e = (c - 1) % self.keep
            s.level = float(self.undo_level[e])
            step = int(self.undo_step[e])
            for k, m in enumerate(self.spec.seasons):
                s.idx[k][step % m] = self.undo_idx[e, k]
        return s

    def _initialise(self) -> None:
        self.level = float(self.warm.mean())
        resid = self.warm - self.level
        for k, m in enumerate(self.spec.seasons):
            phase = self.warm_step % m
            sums = np.bincount(phase, weights=resid, minlength=m)
            counts = np.bincount(phase, minlength=m)
            ix = np.divide(sums, counts, out=np.zeros(m), where=counts > 0)
            ix -= ix[counts > 0].mean()
            self.idx[k] = ix
            resid = resid - ix[phase]
        self.ready = True
        self.ready_at = self.n
        self.warm = np.empty(0)
        self.warm_step = np.empty(0, np.int64)

    def seasonal(self, ts: np.ndarray) -> np.ndarray:
        """The seasonal part at times ``ts`` (any shape) from the indices as they are now; 0 while
        warming up."""
        out = np.zeros(np.shape(ts))
        if self.ready:
            steps = self.spec.steps(ts)
            for ix, m in zip(self.idx, self.spec.seasons, strict=True):
                out += ix[steps % m]
        return out

    def forecast(self, ts: np.ndarray) -> np.ndarray:
        """The smoother's own forecast at times ``ts``: level plus seasonal part."""
        return self.level + self.seasonal(ts)

    def parts(self, ts: np.ndarray, horizon: int) -> tuple[np.ndarray, np.ndarray]:
        """The seasonal part of a window whose newest point the state has seen, as the indices
        are *now*: at the window's times ``ts`` (T,) and at the next ``horizon`` steps (H,).
        The same numbers as :meth:`seasonal` of each: :func:`parts_of_many` for one window (the
        trainer's call; the worker's for a redelivered window, the others batched)."""
        if not self.ready:
            return np.zeros(len(ts)), np.zeros(horizon)
        past, ahead = parts_of_many(
            self.spec, [self.idx], np.asarray(ts, np.float64)[None], horizon
        )
        return past[0], ahead[0]

    def window_inputs(
        self, ts: np.ndarray, values: np.ndarray, horizon: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """What the hybrid network gets for a window whose newest point the state has seen:
        ``(adjusted, offsets)`` — the window's values less their seasonal part (:meth:`parts`)
        (T,), and the seasonal part of the next ``horizon`` steps (H,), to add back onto the
        network's forecast — and, beside them, :attr:`level`: the smoother's own forecast of the
        adjusted values (its level; the network's ``level`` channel, model/features.py). The
        trainer calls this through :func:`run_series`; the worker takes the same :meth:`parts`
        and level (stream/windows.py) and subtracts them the same way."""
        past, ahead = self.parts(ts, horizon)
        return np.asarray(values, np.float64) - past, ahead

    # ---- persistence ---------------------------------------------------------------------------

    def encode(self) -> bytes:
        """The blob Redis stores: header, then the indices and the undo entries (oldest first) once
        ready, or the warm-up buffer before."""
        spec = self.spec
        undo = self.undo_n
        head = _HEADER.pack(
            _VERSION, len(self.idx), int(self.ready), self.n, self.ready_at, self.level, undo,
            spec.fingerprint,
        )  # fmt: skip
        if not self.ready:
            return head + self.warm.tobytes() + self.warm_step.tobytes()
        # update c's entry is row (c - 1) % keep: the oldest held, (n - undo) % keep, to the end
        # of the ring, then from its start (two slices of each array, no gather: encoded once
        # per dirty series per persist)
        first = (self.n - undo) % self.keep if undo else 0
        split = min(self.keep, first + undo)
        wrap = undo - (split - first)
        return b"".join(
            (
                head,
                *(ix.tobytes() for ix in self.idx),
                *(a[first:split].tobytes() + a[:wrap].tobytes()
                  for a in (self.undo_level, self.undo_idx, self.undo_step)),
            )
        )  # fmt: skip

    @classmethod
    def decode(cls, spec: SeasonalSpec, blob: bytes, keep: int = 0) -> SeasonalState:
        """The state from :meth:`encode` (the newest ``keep`` undo entries kept); ValueError when
        the blob is not one of ``spec``'s."""
        if len(blob) < _HEADER.size:
            raise ValueError("seasonal state too short")
        ver, k, ready, n, ready_at, level, undo, fp = _HEADER.unpack_from(blob)
        if ver != _VERSION or k != len(spec.seasons) or fp != spec.fingerprint:
            raise ValueError("seasonal state of another model (seasons or coefficients)")
        if n < 0 or (ready and not 0 < ready_at <= n) or undo > max(0, n - ready_at):
            raise ValueError("seasonal state with inconsistent counts")
        s = cls(spec, keep)
        s.n, s.level, s.ready, s.ready_at = n, level, bool(ready), ready_at
        pos = _HEADER.size
        if not s.ready:
            m = spec.longest
            if len(blob) != pos + 16 * m or undo:
                raise ValueError("seasonal state of a wrong size")
            s.warm = np.frombuffer(blob, np.float64, m, pos).copy()
            s.warm_step = np.frombuffer(blob, np.int64, m, pos + 8 * m).copy()
            s.warm_run = _run_length(s.warm_step)
            return s
        if len(blob) != pos + 8 * (sum(spec.seasons) + undo * (2 + k)):
            raise ValueError("seasonal state of a wrong size")
        for i, m in enumerate(spec.seasons):
            s.idx[i] = np.frombuffer(blob, np.float64, m, pos).copy()
            pos += 8 * m
        levels = np.frombuffer(blob, np.float64, undo, pos)
        idx = np.frombuffer(blob, np.float64, undo * k, pos + 8 * undo).reshape(undo, k)
        steps = np.frombuffer(blob, np.int64, undo, pos + 8 * undo * (1 + k))
        if keep:
            counts = np.arange(n - undo + 1, n + 1)[-keep:]
            rows = (counts - 1) % keep
            s.undo_level[rows] = levels[-keep:]
            s.undo_idx[rows] = idx[-keep:]
            s.undo_step[rows] = steps[-keep:]
            s.undo_n = len(counts)
        s.warm, s.warm_step = np.empty(0), np.empty(0, np.int64)
        return s


def _warmed(
    seasons: Sequence[int], spacing_s: float, ts: np.ndarray, values: np.ndarray
) -> tuple[SeasonalState, int] | None:
    """A state of ``seasons`` (any coefficients: the warm-up does not use them) fed a series up
    to the end of its warm-up, and how many points that took; None when it never warms up."""
    state = SeasonalState(SeasonalSpec(tuple(seasons), spacing_s, 0.5, (0.5,) * len(seasons)))
    for i, (t, v) in enumerate(zip(ts.tolist(), values.tolist(), strict=True)):
        state.update(t, v)
        if state.ready:
            return state, i + 1
    return None


def _run_length(warm_step: np.ndarray) -> int:
    """How many consecutive steps, up to the newest, a warm-up buffer holds."""
    newest = int(warm_step.max())
    if newest < 0:
        return 0
    m, run = len(warm_step), 0
    while run < m and warm_step[(newest - run) % m] == newest - run:
        run += 1
    return run


def parts_of_many(
    spec: SeasonalSpec,
    indices: Sequence[Sequence[np.ndarray]],
    ts: np.ndarray,
    horizon: int,
) -> tuple[np.ndarray, np.ndarray]:
    """:meth:`SeasonalState.parts` of many windows at once: row ``i`` of ``ts`` (R, T) is a
    window whose newest point a ready state of ``spec`` has seen, and ``indices[i]`` that state's
    :attr:`~SeasonalState.idx` then (the arrays, or a copy of them). Returns ``(past (R, T), ahead
    (R, H))``: the same numbers as one :meth:`~SeasonalState.parts` per window (the same
    operations, element by element), in a few array operations per season instead of a dozen per
    window (the worker's batches, stream/windows.py)."""
    r, t = ts.shape
    both = np.empty((r, t + horizon))
    both[:, :t] = ts
    both[:, t:] = ts[:, -1:] + spec.spacing_s * np.arange(1, horizon + 1)
    steps = spec.steps(both)
    out = np.zeros((r, t + horizon))
    for k, m in enumerate(spec.seasons):
        table = np.stack([ix[k] for ix in indices])  # (R, m): each window's indices
        out += np.take_along_axis(table, steps % m, axis=1)
    return out[:, :t], out[:, t:]


@dataclass
class SeasonalParts:
    """The seasonal side of R windows: whether each took the seasonal path (``ready`` (R,)), the
    seasonal part of its points (``past`` (R, T)) and of its next H steps (``ahead`` (R, H)),
    zeros on the plain path, and the state's level (``level`` (R,)), NaN on the plain path. The
    network gets ``values - past`` and the level, and its forecast moves by ``ahead``."""

    ready: np.ndarray
    past: np.ndarray
    ahead: np.ndarray
    level: np.ndarray

    @staticmethod
    def plain(rows: int, window: int, horizon: int) -> SeasonalParts:
        """R windows on the plain path (to be filled row by row)."""
        return SeasonalParts(
            np.zeros(rows, bool), np.zeros((rows, window)), np.zeros((rows, horizon)),
            np.full(rows, np.nan),
        )  # fmt: skip

    def take(self, rows: slice | np.ndarray) -> SeasonalParts:
        return SeasonalParts(self.ready[rows], self.past[rows], self.ahead[rows], self.level[rows])

    @staticmethod
    def concat(parts: Sequence[SeasonalParts]) -> SeasonalParts:
        return SeasonalParts(
            np.concatenate([p.ready for p in parts]),
            np.concatenate([p.past for p in parts]),
            np.concatenate([p.ahead for p in parts]),
            np.concatenate([p.level for p in parts]),
        )


class SeriesInputs(NamedTuple):
    """:func:`run_series`'s answer, one row per point of the series as a window's newest input:
    ``ready`` (N,) bool, ``adjusted`` (N, T) the window less its seasonal part, ``offsets`` (N, H)
    the seasonal part of the next steps, ``level`` (N,) the state's level (NaN where not ready);
    rows not ready (the warm-up, the first ``T - 1`` points) hold zeros."""

    ready: np.ndarray
    adjusted: np.ndarray
    offsets: np.ndarray
    level: np.ndarray


def run_series(
    spec: SeasonalSpec, ts: np.ndarray, values: np.ndarray, window: int, horizon: int
) -> SeriesInputs:
    """The trainer's side: one series in time order through a fresh state; for every point ``i``
    as the newest input of a window of ``window`` points (``i >= window - 1``), after the state
    has seen it, :meth:`SeasonalState.window_inputs` and the level (:class:`SeriesInputs`)."""
    n = len(values)
    out = SeriesInputs(
        np.zeros(n, bool), np.zeros((n, window)), np.zeros((n, horizon)), np.full(n, np.nan)
    )
    state = SeasonalState(spec)
    for i in range(n):
        state.update(float(ts[i]), float(values[i]))
        if i >= window - 1 and state.ready:
            lo = i - window + 1
            out.ready[i] = True
            out.adjusted[i], out.offsets[i] = state.window_inputs(
                ts[lo : i + 1], values[lo : i + 1], horizon
            )
            out.level[i] = state.level
    return out


class SeasonalFit(NamedTuple):
    """What :func:`fit_coefficients` found: the spec, its smoother's MAE over the horizon, and
    persistence's MAE on the same points."""

    spec: SeasonalSpec
    mae: float
    persistence_mae: float


ALPHAS = (0.01, 0.03, 0.1, 0.3, 0.6, 0.9)
GAMMAS = (0.01, 0.05, 0.1, 0.2, 0.4)


def fit_coefficients(
    series: Sequence[tuple[np.ndarray, np.ndarray]],
    seasons: Sequence[int],
    spacing_s: float,
    horizon: int,
    alphas: Sequence[float] = ALPHAS,
    gammas: Sequence[float] = GAMMAS,
    warm_seasons: Sequence[int] | None = None,
) -> SeasonalFit:
    """The grid point (α, γ per season) whose smoother, run over each ``(ts, values)`` series in
    time order, has the least mean absolute error over the next ``horizon`` points from every
    point after its warm-up (the points within ``horizon`` steps in time). Returns the spec, that
    error and persistence's on the same points (the last value carried forward: what the
    seasons must beat to be worth taking out of the network's inputs). Every grid point runs at
    once: one pass over the data, vectorised over the grid.

    ``warm_seasons`` (a superset of ``seasons``): score only the points after *their* warm-up,
    so that fits of several subsets of them are scored on the same points (``--seasons auto``
    compares them, train/seasons.py)."""
    grid = list(itertools.product(alphas, *([gammas] * len(seasons))))
    a = np.array([g[0] for g in grid])[:, None]  # (G, 1)
    gam = np.array([g[1:] for g in grid])  # (G, K)
    wide = sorted(warm_seasons or seasons)
    if not set(seasons) <= set(wide):
        raise ValueError(f"warm_seasons {wide} must include the seasons {list(seasons)}")
    total = np.zeros(len(grid))
    persistence = 0.0
    count = 0
    for ts, values in series:
        warmed = _warmed(seasons, spacing_s, ts, values)
        widest = warmed if wide == list(seasons) else _warmed(wide, spacing_s, ts, values)
        if warmed is None or widest is None:
            continue
        (warm, start), score_from = warmed, widest[1]
        steps = warm.spec.steps(ts)
        level = np.full((len(grid), 1), warm.level)
        idx = [np.tile(ix, (len(grid), 1)) for ix in warm.idx]  # (G, m) each
        rows = np.arange(len(grid))
        n = len(values)
        for i in range(start, n):
            # score the forecast made after point i - 1 against the points within the horizon
            j = np.searchsorted(steps, steps[i - 1] + horizon, side="right")
            ahead = slice(i, j)
            if j > i and i >= score_from:
                ahead_steps = steps[ahead]
                pred = level + sum(
                    ix[:, ahead_steps % m] for ix, m in zip(idx, seasons, strict=True)
                )
                total += np.abs(pred - values[ahead]).sum(axis=1)
                persistence += float(np.abs(values[ahead] - values[i - 1]).sum())
                count += j - i
            phases = [int(steps[i] % m) for m in seasons]
            parts = [ix[:, p] for ix, p in zip(idx, phases, strict=True)]
            s = sum(parts)
            new_level = a[:, 0] * (values[i] - s) + (1 - a[:, 0]) * level[:, 0]
            for k, (ix, p, part) in enumerate(zip(idx, phases, parts, strict=True)):
                ix[rows, p] = (
                    gam[:, k] * (values[i] - new_level - (s - part)) + (1 - gam[:, k]) * part
                )
            level[:, 0] = new_level
    if count == 0:
        raise ValueError("no series has a whole cycle of its longest season to fit on")
    mae = total / count
    best = int(np.argmin(mae))
    spec = SeasonalSpec(tuple(seasons), spacing_s, float(a[best, 0]), tuple(map(float, gam[best])))
    return SeasonalFit(spec, float(mae[best]), persistence / count)
