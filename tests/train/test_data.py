"""Flat series arrays, time-based splits without leakage, strided windows, the DataModule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from model.config import ModelConfig
from model.errors import ConfigError
from model.features import build_inputs
from train.data import TEST, TRAIN, VAL, EventDataModule, SeriesArrays, SplitSettings, WindowSet

CFG = ModelConfig(hidden_size=16, num_layers=1, attention_heads=2, sequence_length=8, horizon=3)


def frame(lengths: dict[str, int], gap_at: dict[str, int] | None = None) -> pd.DataFrame:
    """Series of unequal length, hourly, value = series number * 1000 + point number; an
    optional 5-hour gap before point ``gap_at[series]``."""
    rows = []
    for k, (sid, n) in enumerate(lengths.items()):
        ts = 1_000_000.0 + 3600.0 * np.arange(n)
        if gap_at and sid in gap_at:
            ts[gap_at[sid] :] += 5 * 3600.0
        rows.append(pd.DataFrame({"series_id": sid, "ts": ts, "value": k * 1000.0 + np.arange(n),
                                  "f": np.arange(n) * 0.5}))  # fmt: skip
    return pd.concat(rows, ignore_index=True)


def test_split_is_per_series_by_time() -> None:
    arr = SeriesArrays.from_frame(
        frame({"a": 100, "b": 40}), settings=SplitSettings(test_fraction=0.2, val_fraction=0.1)
    )
    spl = np.asarray(arr.split)
    a, b = spl[:100], spl[100:]
    # Last 20 % test, the 10 % before validation, the rest training, in time order.
    assert (a[:70] == TRAIN).all() and (a[70:80] == VAL).all() and (a[80:] == TEST).all()
    assert (b[:28] == TRAIN).all() and (b[28:32] == VAL).all() and (b[32:] == TEST).all()


def test_windows_never_leak_targets_across_splits_series_or_gaps() -> None:
    arr = SeriesArrays.from_frame(frame({"a": 120, "b": 60}, gap_at={"a": 30}))
    t, h = CFG.sequence_length, CFG.horizon
    seen: set[int] = set()
    for split in (TRAIN, VAL, TEST):
        starts = arr.window_starts(t, h, split)
        assert len(starts)
        for s in starts:
            targets = np.arange(s + t, s + t + h)
            # Every target is in this split; the window stays in one gap-free segment.
            assert (np.asarray(arr.split)[targets] == split).all()
            assert len(set(np.asarray(arr.segment)[s : s + t + h])) == 1
            seen.add(int(s))
    # The gap in series a breaks windows: none spans points 29 and 30.
    all_starts = np.array(sorted(seen))
    assert not ((all_starts <= 29) & (all_starts + t + h - 1 >= 30)).any()
    # No window spans the two series (a ends at flat index 119).
    assert not ((all_starts <= 119) & (all_starts + t + h - 1 >= 120)).any()
    # Windows whose targets straddle train/val are used by no split.
    n_all = sum(len(arr.window_starts(t, h, k)) for k in (TRAIN, VAL, TEST))
    assert n_all < 120 + 60 - 2 * (t + h - 1)


def test_windows_are_strided_views_and_batches_use_the_shared_feature_builder() -> None:
    cfg = CFG.replace(features=["f"])
    arr = SeriesArrays.from_frame(frame({"a": 80, "b": 50}), features=("f",))
    ws = WindowSet(arr, arr.window_starts(8, 3, TRAIN), cfg)
    assert np.shares_memory(ws._vals, arr.values)  # a view: no copy per window
    assert ws._vals.strides == (8, 8)
    idx = np.array([0, 5, len(ws) - 1])
    x, y = ws.collate(idx.tolist())
    s = ws.starts[idx]
    win = np.stack([np.asarray(arr.values)[i : i + 11] for i in s])
    tsw = np.stack([np.asarray(arr.ts)[i : i + 8] for i in s])
    fw = np.stack([np.asarray(arr.features["f"])[i : i + 8] for i in s])
    expected = build_inputs(tsw, win[:, :8], {"f": fw}, cfg)
    assert x.dtype == torch.float32 and x.shape == (3, 8, cfg.input_size)
    np.testing.assert_array_equal(x.numpy(), expected)
    np.testing.assert_array_equal(y.numpy(), win[:, 8:].astype(np.float32))


def test_memory_mapped_store_gives_identical_batches(tmp_path: Path) -> None:
    arr = SeriesArrays.from_frame(frame({"a": 90, "b": 70}), features=("f",))
    mm = arr.to_memmap(tmp_path / "store")
    assert isinstance(mm.values, np.memmap) and isinstance(mm.ts, np.memmap)
    cfg = CFG.replace(features=["f"])
    dm1 = EventDataModule(arr, cfg, batch_size=16)
    dm2 = EventDataModule(mm, cfg, batch_size=16)
    for a, b in zip(dm1.val_dataloader(), dm2.val_dataloader(), strict=True):
        torch.testing.assert_close(a, b)
    assert mm.ids == arr.ids and mm.settings == arr.settings
    with pytest.raises(ConfigError, match="array store"):
        SeriesArrays.open(tmp_path / "nothing")


def test_datamodule_shuffles_training_windows_and_draws_per_epoch() -> None:
    arr = SeriesArrays.from_frame(frame({"a": 200}))
    dm = EventDataModule(arr, CFG, batch_size=8, train_windows_per_epoch=24)
    batches = list(dm.train_dataloader())
    assert sum(len(b[0]) for b in batches) == 24
    assert dm.window_counts()["train"] > 24
    full = EventDataModule(arr, CFG, batch_size=1000)
    ((x, _),) = list(full.train_dataloader())
    firsts = x[:, -1, 0].numpy()
    assert not (np.diff(firsts) > 0).all()  # shuffled, not in time order


def test_too_short_series_fail_with_a_clear_message() -> None:
    arr = SeriesArrays.from_frame(frame({"a": 20}))
    with pytest.raises(ConfigError, match=r"no (train|val) window"):
        EventDataModule(arr, ModelConfig(horizon=1))
    with pytest.raises(ConfigError, match="--test-fraction"):
        SplitSettings(test_fraction=1.5)
