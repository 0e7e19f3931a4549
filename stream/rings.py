"""Ring buffers of many series in dense arrays, and their blob codec: the storage under
:class:`stream.windows.PartitionWindows`.

Each series has a row of ``capacity`` slots for its newest points: source offset, ts, value and
one value per feature. Point ``i`` (0-based, counted since the row was created) sits in column
``i % capacity``; a row holds ``min(n, capacity)`` points. Rows of forgotten series are reused.

The blob of a series (what Redis stores, see ``stream/store.py``) is a little-endian header
``<B version=1><H k points><H F features>`` then ``int64[k]`` offsets, ``float64[k]`` ts,
``float64[k]`` values and ``float64[k*F]`` features (point-major), oldest first. A model with
seasons (``ModelConfig.seasons``) appends the series' seasonal state
(:meth:`model.seasonal.SeasonalState.encode`): it is updated with each appended point and stored
with the points, so it is persisted by the same fenced write, restored with them and rebuilt by
the same replay.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

import numpy as np

from model.seasonal import SeasonalSpec, SeasonalState

_BLOB_HEADER = struct.Struct("<BHH")  # format version, points retained, feature count
_BLOB_VERSION = 1


class SeriesRings:
    """Rows of ring buffers, one per series id. ``index``, ``n`` (points appended per row) and
    ``last_ts`` (newest ts per row) are read on the hot path; they are never rebound.

    ``seasonal``: the serving model's seasonal spec (None: no seasonal state); each row's state
    (``states``) can be taken back ``keep`` points (a retained window's state)."""

    def __init__(
        self,
        capacity: int,
        feature_names: Sequence[str],
        seasonal: SeasonalSpec | None = None,
        keep: int = 0,
    ) -> None:
        self.capacity = capacity
        self.feature_names = tuple(feature_names)
        self.seasonal = seasonal
        self.keep = keep
        self.states: list[SeasonalState | None] = []  # row -> seasonal state
        self.index: dict[str, int] = {}  # series id -> row
        self.names: list[str | None] = []  # row -> series id (None: free)
        self.n: list[int] = []
        self.last_ts: list[float] = []
        self.rows = 0  # rows ever used (free ones included)
        self._free: list[int] = []
        w, f = capacity, len(self.feature_names)
        self.off = np.zeros((0, w), np.int64)
        self.ts = np.zeros((0, w), np.float64)
        self.val = np.zeros((0, w), np.float64)
        self.feat = np.zeros((0, w, f), np.float64)

    def __len__(self) -> int:
        return len(self.index)

    def retained(self, row: int) -> np.ndarray:
        """Columns of the row's retained points, oldest first."""
        n = self.n[row]
        return np.arange(max(0, n - self.capacity), n) % self.capacity

    def window(
        self, series_id: str
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """``(offsets, ts, values, features)`` of every retained point, oldest first. KeyError
        for an unknown series."""
        row = self.index[series_id]
        idx = self.retained(row)
        feats = {n: self.feat[row, idx, j].copy() for j, n in enumerate(self.feature_names)}
        return self.off[row, idx].copy(), self.ts[row, idx].copy(), self.val[row, idx].copy(), feats

    def allocate(self, series_id: str) -> int:
        """A fresh row for ``series_id`` (a free one, or a new one)."""
        if self._free:
            row = self._free.pop()
            self.names[row] = series_id
            self.n[row] = 0
            self.last_ts[row] = -math.inf
            self.states[row] = self._fresh_state()
        else:
            row = self.rows
            self.rows += 1
            if row >= len(self.off):
                self._grow(max(64, 2 * len(self.off)))
            self.names.append(series_id)
            self.n.append(0)
            self.last_ts.append(-math.inf)
            self.states.append(self._fresh_state())
        self.index[series_id] = row
        return row

    def _fresh_state(self) -> SeasonalState | None:
        return None if self.seasonal is None else SeasonalState(self.seasonal, self.keep)

    def _grow(self, rows: int) -> None:
        def grown(a: np.ndarray) -> np.ndarray:
            out = np.zeros((rows, *a.shape[1:]), a.dtype)
            out[: len(a)] = a
            return out

        self.off, self.ts, self.val, self.feat = map(
            grown, (self.off, self.ts, self.val, self.feat)
        )

    def forget(self, row: int) -> str:
        """Free a row; returns the series id it held."""
        name = self.names[row]
        assert name is not None
        del self.index[name]
        self.names[row] = None
        self.states[row] = None
        self._free.append(row)
        return name

    def append(
        self, row: int, offset: int, ts: float, value: float, features: dict[str, float]
    ) -> int:
        """Add a point to a row; returns the row's point count before it."""
        n = self.n[row]
        col = n % self.capacity
        self.off[row, col] = offset
        self.ts[row, col] = ts
        self.val[row, col] = value
        for j, name in enumerate(self.feature_names):
            self.feat[row, col, j] = features[name]
        self.n[row] = n + 1
        self.last_ts[row] = ts
        state = self.states[row]
        if state is not None:
            state.update(ts, value)
        return n

    def end_of(self, row: int, offset: int) -> int | None:
        """The point count of the row right after the point of source ``offset`` was appended
        (so that ``gather(.., end)`` gives the window as it stood then); None when the point is
        not retained (or never was)."""
        n = self.n[row]
        base = max(0, n - self.capacity)
        hits = np.flatnonzero(self.off[row, : min(n, self.capacity)] == offset)
        if len(hits) == 0:
            return None
        col = int(hits[0])
        return base + ((col - base) % self.capacity) + 1

    def gather(
        self, rows: list[int], ends: list[int], length: int
    ) -> tuple[list[str], np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """The ``length`` points before each ``end`` of each row, in one fancy-indexing pass:
        ``(series ids, ts (R, T), values (R, T), features name -> (R, T))``."""
        r = np.asarray(rows, dtype=np.int64)[:, None]  # (R, 1)
        cols = (
            np.asarray(ends, dtype=np.int64)[:, None] - length + np.arange(length)
        ) % self.capacity  # (R, T)
        feats = {n: self.feat[r, cols, j] for j, n in enumerate(self.feature_names)}
        names = [self.names[i] for i in rows]
        return names, self.ts[r, cols], self.val[r, cols], feats  # type: ignore[return-value]

    # ---- blobs ---------------------------------------------------------------------------------

    def encode(self, row: int) -> bytes:
        """The blob of a row's retained points."""
        idx = self.retained(row)
        header = _BLOB_HEADER.pack(_BLOB_VERSION, len(idx), len(self.feature_names))
        return b"".join(
            (
                header,
                self.off[row, idx].tobytes(),
                self.ts[row, idx].tobytes(),
                self.val[row, idx].tobytes(),
                np.ascontiguousarray(self.feat[row, idx, :]).tobytes(),
                b"" if (state := self.states[row]) is None else state.encode(),
            )
        )

    def load(self, series_id: str, blob: bytes) -> int:
        """A row restored from a blob (its newest ``capacity`` points, and its seasonal state);
        returns the row. Raises ValueError when the blob is malformed, has another feature count,
        or lacks (holds) the seasonal state of the model (of another model, or without one)."""
        off, ts, val, feat = decode_series(blob, len(self.feature_names))
        trailer = blob[series_size(blob) :]
        if self.seasonal is None and trailer:
            raise ValueError("window blob holds a seasonal state; the model has no seasons")
        state = None
        if self.seasonal is not None:
            if not trailer:
                raise ValueError("window blob holds no seasonal state; the model has seasons")
            state = SeasonalState.decode(self.seasonal, trailer, self.keep)
        k = min(len(off), self.capacity)
        row = self.allocate(series_id)
        self.states[row] = state
        sl = slice(len(off) - k, len(off))
        self.off[row, :k] = off[sl]
        self.ts[row, :k] = ts[sl]
        self.val[row, :k] = val[sl]
        self.feat[row, :k] = feat[sl]
        self.n[row] = k
        self.last_ts[row] = float(ts[-1]) if k else -math.inf
        return row


def series_size(blob: bytes) -> int:
    """Bytes of a series blob's points (what follows is its seasonal state, if any). Raises
    ValueError on a malformed header."""
    if len(blob) < _BLOB_HEADER.size:
        raise ValueError("window blob too short")
    version, k, f = _BLOB_HEADER.unpack_from(blob)
    if version != _BLOB_VERSION:
        raise ValueError(f"window blob format {version} is not {_BLOB_VERSION}")
    return int(_BLOB_HEADER.size + 8 * k * (3 + f))


def decode_series(
    blob: bytes, features: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Parse a series blob's points into ``(offsets (k,), ts (k,), values (k,), features (k,
    F))``, oldest first (a seasonal state after them is left to :meth:`SeriesRings.load`). Raises
    ValueError on a malformed blob or (when given) another feature count."""
    size = series_size(blob)
    _, k, f = _BLOB_HEADER.unpack_from(blob)
    if features is not None and f != features:
        raise ValueError(f"window blob has {f} features, expected {features}")
    if len(blob) < size:
        raise ValueError("window blob has the wrong length")
    pos = _BLOB_HEADER.size
    off = np.frombuffer(blob, np.int64, k, pos)
    ts = np.frombuffer(blob, np.float64, k, pos + 8 * k)
    val = np.frombuffer(blob, np.float64, k, pos + 16 * k)
    feat = np.frombuffer(blob, np.float64, k * f, pos + 24 * k).reshape(k, f)
    return off, ts, val, feat
