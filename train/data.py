"""Series as flat arrays, time-based splits, strided windows, and the LightningDataModule.

All series are stored end to end in flat arrays (``ts``, ``value``, one per feature) with the
start and length of each series. Two int arrays describe every point:

- ``segment``: the id of the contiguous run the point belongs to. A run ends at the end of its
  series and wherever the spacing jumps above ``max_gap_factor`` times the series' median
  spacing (a gap), so no window ever spans two series or a gap; series of unequal length need no
  padding.
- ``split``: 0 train, 1 validation, 2 test. Per series, the last ``test_fraction`` of its points
  (by count, i.e. by time) are test, the ``val_fraction`` before them validation.

A window of ``T`` inputs and ``H`` targets starting at flat index ``s`` belongs to split ``k`` only
when *all* its targets lie in split ``k`` and it does not cross a segment boundary; windows whose
targets straddle two splits are used by neither, so no target of a later split is ever seen while
training on an earlier one. Inputs may reach back into the previous split (they are the past).

Windows are strided views (``numpy.lib.stride_tricks.sliding_window_view``) of the flat arrays:
no copy is made per window; a batch gathers its rows once and goes through
:func:`model.features.build_inputs`, the same feature builder the worker uses. The arrays can
live in ``.npy`` files opened memory-mapped (:meth:`SeriesArrays.save` / :meth:`open`), so a data
set larger than memory trains with only the current batch resident.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from numpy.lib.stride_tricks import sliding_window_view
from torch.utils.data import DataLoader, Dataset, RandomSampler

from model.config import ModelConfig
from model.errors import ConfigError
from model.features import build_inputs
from model.seasonal import SeriesInputs, run_series
from train.settings import SplitSettings

log = logging.getLogger(__name__)

TRAIN, VAL, TEST = 0, 1, 2
SPLIT_NAMES = {TRAIN: "train", VAL: "val", TEST: "test"}
STORE_META = "arrays.json"


@dataclass
class SeriesArrays:
    """Every series end to end in flat arrays (see module docstring); may be memory-mapped."""

    ids: list[str]
    starts: np.ndarray  # (S,) int64, flat index of each series' first point
    lengths: np.ndarray  # (S,) int64
    spacing: np.ndarray  # (S,) float64, median spacing of each series in seconds
    ts: np.ndarray  # (N,) float64 epoch seconds
    values: np.ndarray  # (N,) float64
    segment: np.ndarray  # (N,) int64
    split: np.ndarray  # (N,) int8
    features: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (N,) float64
    settings: SplitSettings = field(default_factory=SplitSettings)

    def __len__(self) -> int:
        return int(self.values.shape[0])

    @property
    def n_series(self) -> int:
        return len(self.ids)

    @classmethod
    def from_frame(
        cls,
        frame: pd.DataFrame,
        features: Sequence[str] = (),
        settings: SplitSettings | None = None,
    ) -> SeriesArrays:
        """Build from a clean frame (``series_id, ts, value`` + features, sorted by series and
        time, no duplicates — what :mod:`train.sources` returns).

        Raises ConfigError when the frame is empty or a feature column is missing.
        """
        settings = settings or SplitSettings()
        if len(frame) == 0:
            raise ConfigError("--data: no rows to train on")
        for name in features:
            if name not in frame.columns:
                raise ConfigError(f"features: the data has no column {name!r}")
        frame = frame.sort_values(["series_id", "ts"], kind="stable")
        sid = frame["series_id"].to_numpy()
        ts = frame["ts"].to_numpy(dtype=np.float64)
        values = frame["value"].to_numpy(dtype=np.float64)
        n = len(frame)
        bounds = np.flatnonzero(sid[1:] != sid[:-1]) + 1
        starts = np.concatenate([[0], bounds]).astype(np.int64)
        lengths = np.diff(np.concatenate([starts, [n]])).astype(np.int64)
        ids = [str(sid[s]) for s in starts]

        spacing = np.empty(len(starts))
        new_segment = np.zeros(n, dtype=bool)
        new_segment[starts] = True
        split = np.empty(n, dtype=np.int8)
        for i, (s, ln) in enumerate(zip(starts, lengths, strict=True)):
            d = np.diff(ts[s : s + ln])
            spacing[i] = float(np.median(d)) if len(d) else 0.0
            if len(d):
                new_segment[s + 1 : s + ln] = d > settings.max_gap_factor * spacing[i]
            n_test = int(np.ceil(settings.test_fraction * ln))
            n_val = int(np.ceil(settings.val_fraction * ln))
            split[s : s + ln] = TRAIN
            split[s + ln - n_test - n_val : s + ln - n_test] = VAL
            split[s + ln - n_test : s + ln] = TEST
        segment = np.cumsum(new_segment).astype(np.int64) - 1
        feats = {name: frame[name].to_numpy(dtype=np.float64) for name in features}
        return cls(ids, starts, lengths, spacing, ts, values, segment, split, feats, settings)

    # ---- memory-mapped store --------------------------------------------------------------------

    def save(self, directory: Path | str) -> None:
        """Write the arrays as ``.npy`` files plus ``arrays.json`` into ``directory``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        for name in ("starts", "lengths", "spacing", "ts", "values", "segment", "split"):
            np.save(d / f"{name}.npy", np.ascontiguousarray(getattr(self, name)))
        for i, col in enumerate(self.features.values()):
            np.save(d / f"feature-{i}.npy", np.ascontiguousarray(col))
        meta = {
            "format": 1,
            "ids": self.ids,
            "features": list(self.features),
            "settings": self.settings.model_dump(),
        }
        (d / STORE_META).write_text(json.dumps(meta))

    @classmethod
    def open(cls, directory: Path | str, *, mmap: bool = True) -> SeriesArrays:
        """Open arrays written by :meth:`save`, memory-mapped (read-only) unless ``mmap=False``.

        Raises ConfigError when the folder is not such a store.
        """
        d = Path(directory)
        try:
            meta = json.loads((d / STORE_META).read_text())
            mode = "r" if mmap else None

            def load(name: str) -> np.ndarray:
                return np.load(d / f"{name}.npy", mmap_mode=mode, allow_pickle=False)

            feats = {n: load(f"feature-{i}") for i, n in enumerate(meta["features"])}
            return cls(
                ids=[str(x) for x in meta["ids"]],
                starts=np.asarray(load("starts")),
                lengths=np.asarray(load("lengths")),
                spacing=np.asarray(load("spacing")),
                ts=load("ts"),
                values=load("values"),
                segment=load("segment"),
                split=load("split"),
                features=feats,
                settings=SplitSettings(**meta["settings"]),
            )
        except (OSError, KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"--data: {d} is not a readable array store ({exc})") from exc

    def to_memmap(self, directory: Path | str) -> SeriesArrays:
        """Save to ``directory`` and return the same arrays opened memory-mapped."""
        self.save(directory)
        return SeriesArrays.open(directory, mmap=True)

    # ---- windows --------------------------------------------------------------------------------

    def window_starts(self, sequence_length: int, horizon: int, split: int) -> np.ndarray:
        """Flat start indices (int64, ascending) of every window of ``split`` (see module doc)."""
        w = sequence_length + horizon
        n = len(self)
        if n < w:
            return np.zeros(0, dtype=np.int64)
        seg = np.asarray(self.segment)
        spl = np.asarray(self.split)
        first_target = slice(sequence_length, n - horizon + 1)
        last = slice(w - 1, n)
        ok = (seg[: n - w + 1] == seg[last]) & (spl[first_target] == split) & (spl[last] == split)
        return np.flatnonzero(ok).astype(np.int64)

    def seasonal_inputs(self, config: ModelConfig) -> SeriesInputs | None:
        """For a model with seasons (``config.seasonal()``): every point as a window's newest
        input (:class:`model.seasonal.SeriesInputs`) from each series' seasonal state run over
        the whole series in time order (:func:`model.seasonal.run_series`, the worker's
        recursion; the state runs through gaps as the worker's does). None without seasons.
        Computed once per model shape and kept."""
        spec = config.seasonal()
        if spec is None:
            return None
        t, h = config.sequence_length, config.horizon
        key = (spec, t, h)
        cache = self.__dict__.setdefault("_seasonal_cache", {})
        if key not in cache:
            n = len(self)
            out = SeriesInputs(
                np.zeros(n, bool), np.zeros((n, t)), np.zeros((n, h)), np.full(n, np.nan)
            )
            for s, ln in zip(self.starts.tolist(), self.lengths.tolist(), strict=True):
                part = slice(s, s + ln)
                run = run_series(spec, self.ts[part], self.values[part], t, h)
                for whole, one in zip(out, run, strict=True):
                    whole[part] = one
            cache[key] = out
        return cache[key]

    def split_counts(self) -> dict[str, int]:
        spl = np.asarray(self.split)
        return {SPLIT_NAMES[k]: int((spl == k).sum()) for k in SPLIT_NAMES}


class WindowSet(Dataset[int]):
    """Windows of ``T`` inputs and ``H`` targets at the given flat ``starts``.

    Items are the window numbers; :meth:`collate` turns a list of them into one batch
    ``(x (B, T, C) float32, y (B, H) float32)``, so the DataLoader's sampler and batch size work
    as usual (Lightning's distributed sampler and batch-size finder included) while every batch is
    built in one vectorised pass.
    """

    def __init__(self, arrays: SeriesArrays, starts: np.ndarray, config: ModelConfig) -> None:
        self.arrays = arrays
        self.starts = np.asarray(starts, dtype=np.int64)
        self.config = config
        t, h = config.sequence_length, config.horizon
        w = t + h
        # Strided views: (N - W + 1, W), no data copied.
        self._ts = sliding_window_view(arrays.ts, w) if len(arrays) >= w else None
        self._vals = sliding_window_view(arrays.values, w) if len(arrays) >= w else None
        self._feats = {
            name: sliding_window_view(arrays.features[name], w) if len(arrays) >= w else None
            for name in config.features
        }
        missing = [f for f in config.features if f not in arrays.features]
        if missing:
            raise ConfigError(f"features: the data has no column(s) {', '.join(missing)}")
        self._seasonal = arrays.seasonal_inputs(config)

    def __len__(self) -> int:
        return int(self.starts.shape[0])

    def __getitem__(self, i: int) -> int:
        return int(i)

    def arrays_for(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(x (B, T, C) float32, y (B, H) float64, ts (B, T+H) float64)`` of windows ``idx``."""
        t = self.config.sequence_length
        rows = self.starts[np.asarray(idx, dtype=np.int64)]
        assert self._ts is not None and self._vals is not None
        ts = np.asarray(self._ts[rows])  # (B, W) gathered: the only copy
        vals = np.asarray(self._vals[rows])
        feats = {
            name: np.asarray(v[rows][:, :t]) for name, v in self._feats.items() if v is not None
        }
        inputs, level = vals[:, :t], None
        if self._seasonal is not None:  # the hybrid: the window less its seasonal part
            origin = rows + t - 1
            r = self._seasonal.ready[origin]
            inputs = inputs.copy()
            inputs[r] = self._seasonal.adjusted[origin[r]]
            level = self._seasonal.level[origin]  # NaN on the plain path
        x = build_inputs(ts[:, :t], inputs, feats or None, self.config, level)  # (B, T, C)
        return x, vals[:, t:], ts

    def offsets_for(self, idx: np.ndarray) -> np.ndarray:
        """(B, H): what to add back onto the network's forecast of windows ``idx`` (the seasonal
        part of its targets' times; zeros without seasons or while a series warms up)."""
        rows = self.starts[np.asarray(idx, dtype=np.int64)]
        if self._seasonal is None:
            return np.zeros((len(rows), self.config.horizon))
        return self._seasonal.offsets[rows + self.config.sequence_length - 1]

    def collate(self, items: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(items, dtype=np.int64)
        x, y, _ = self.arrays_for(idx)
        y = y - self.offsets_for(idx)  # the network learns what the seasons leave
        return torch.from_numpy(x), torch.from_numpy(y.astype(np.float32))


class EventDataModule(L.LightningDataModule):
    """Train / validation / test windows of :class:`SeriesArrays` for an EventForecaster.

    ``batch_size`` is an attribute (Lightning's batch-size finder changes it).
    ``train_windows_per_epoch`` draws that many random training windows per epoch (with a fresh
    draw each epoch) instead of all of them: long data sets then give short, frequent epochs.

    Raises ConfigError when the training or validation split has no window (series too short for
    ``sequence_length + horizon`` points per split).
    """

    def __init__(
        self,
        arrays: SeriesArrays,
        config: ModelConfig,
        *,
        batch_size: int | None = None,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        train_windows_per_epoch: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.arrays = arrays
        self.config = config
        self.batch_size = int(batch_size or config.batch_size)
        self.eval_batch_size = int(eval_batch_size)
        self.num_workers = int(num_workers)
        self.train_windows_per_epoch = train_windows_per_epoch
        self.seed = seed
        t, h = config.sequence_length, config.horizon
        self.sets = {
            k: WindowSet(arrays, arrays.window_starts(t, h, k), config) for k in (TRAIN, VAL, TEST)
        }
        need = t + h
        for k in (TRAIN, VAL):
            if len(self.sets[k]) == 0:
                raise ConfigError(
                    f"--data: no {SPLIT_NAMES[k]} window: each series needs at least {need} "
                    f"gap-free points in its {SPLIT_NAMES[k]} part (sequence_length {t} + "
                    f"horizon {h}); got {arrays.split_counts()} points in {arrays.n_series} series"
                )

    def window_counts(self) -> dict[str, int]:
        return {SPLIT_NAMES[k]: len(s) for k, s in self.sets.items()}

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def _loader(self, split: int, *, train: bool) -> DataLoader[Any]:
        ds = self.sets[split]
        kw: dict[str, Any] = {
            "collate_fn": ds.collate,
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
        }
        rank, world = self._rank_world()
        if world > 1:
            # Several processes (DDP): this rank's share, every window once per epoch, the same
            # number of training batches on every rank (train.distributed).
            from train.distributed import ShardedBatchSampler

            batches = ShardedBatchSampler(
                len(ds),
                self.batch_size if train else self.eval_batch_size,
                rank=rank,
                world=world,
                shuffle=train,
                seed=self.seed,
                num_samples=self.train_windows_per_epoch if train else None,
            )
            if train:
                log.info(
                    "rank %d/%d: %d of %d training windows per epoch in %d batches",
                    rank, world, len(batches.share()), len(ds), len(batches),
                )  # fmt: skip
            return DataLoader(ds, batch_sampler=batches, **kw)
        if not train:
            return DataLoader(ds, batch_size=self.eval_batch_size, shuffle=False, **kw)
        gen = torch.Generator().manual_seed(self.seed)
        if self.train_windows_per_epoch and self.train_windows_per_epoch < len(ds):
            sampler = RandomSampler(ds, num_samples=self.train_windows_per_epoch, generator=gen)
            return DataLoader(ds, batch_size=self.batch_size, sampler=sampler, **kw)
        return DataLoader(ds, batch_size=self.batch_size, shuffle=True, generator=gen, **kw)

    def train_dataloader(self) -> DataLoader[Any]:
        return self._loader(TRAIN, train=True)

    def val_dataloader(self) -> DataLoader[Any]:
        return self._loader(VAL, train=False)

    def test_dataloader(self) -> DataLoader[Any]:
        return self._loader(TEST, train=False)


def describe(arrays: SeriesArrays, windows: Mapping[str, int] | None = None) -> dict[str, Any]:
    """A JSON-able summary of the arrays (series, points per split, segments, windows)."""
    return {
        "series": arrays.n_series,
        "points": len(arrays),
        "segments": int(np.asarray(arrays.segment)[-1]) + 1 if len(arrays) else 0,
        "split_points": arrays.split_counts(),
        "median_spacing_s": float(np.median(arrays.spacing)) if arrays.n_series else None,
        **({"windows": dict(windows)} if windows is not None else {}),
    }
