"""The pieces of distributed training that need no second process: the rank a launcher
announces, and the sampler that gives every rank the same number of batches while each window
is used exactly once per epoch (the two-process runs are in test_features.py)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from model.errors import ConfigError
from train.distributed import ShardedBatchSampler, env_rank


@pytest.mark.parametrize(
    ("env", "rank"),
    [
        ({}, 0),
        ({"RANK": "3", "LOCAL_RANK": "1"}, 3),  # torchrun
        ({"RANK": "0", "LOCAL_RANK": "0"}, 0),
        ({"SLURM_NTASKS": "4", "SLURM_PROCID": "2"}, 2),  # srun
        ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, 0),  # a one-task job is not distributed
        ({"LOCAL_RANK": "1", "NODE_RANK": "0"}, 1),  # Lightning's launcher: a child
        ({"NODE_RANK": "1"}, 1),  # another node, its local rank 0
        ({"NODE_RANK": "0", "LOCAL_RANK": "0"}, 0),
    ],
)
def test_env_rank_reads_what_each_launcher_sets(env: dict[str, str], rank: int) -> None:
    assert env_rank(env) == rank


@pytest.mark.parametrize(
    ("n", "batch", "world", "num_samples"),
    [(906, 32, 2, None), (101, 10, 2, None), (100, 10, 3, None), (7, 1, 2, None),
     (1000, 64, 4, 333), (5, 512, 2, None), (64, 8, 8, None)],
)  # fmt: skip
def test_every_window_once_per_epoch_and_equal_steps(
    n: int, batch: int, world: int, num_samples: int | None
) -> None:
    used = num_samples or n
    seen_epochs = []
    for epoch in range(3):
        samplers = [
            ShardedBatchSampler(
                n, batch, rank=r, world=world, shuffle=True, seed=5, num_samples=num_samples
            )
            for r in range(world)
        ]
        for s in samplers:
            s.sampler.set_epoch(epoch)  # how Lightning reaches it
        batches = [list(s) for s in samplers]
        assert len({len(b) for b in batches}) == 1  # the same number of steps on every rank
        assert all(len(b) == len(s) for b, s in zip(batches, samplers, strict=True))
        assert all(0 < len(x) <= max(batch, 2) for b in batches for x in b)
        flat = [i for b in batches for x in b for i in x]
        assert len(flat) == used and len(set(flat)) == used  # each window exactly once
        assert all(0 <= i < n for i in flat)
        seen_epochs.append(sorted(flat))
    if num_samples:  # a fresh draw of windows each epoch
        assert seen_epochs[0] != seen_epochs[1]


def test_shuffle_differs_by_epoch_and_validation_is_contiguous() -> None:
    a = ShardedBatchSampler(100, 10, rank=0, world=2, shuffle=True, seed=0)
    first = list(itertools.chain(*a))
    a.set_epoch(1)
    assert list(itertools.chain(*a)) != first
    shares = [np.concatenate([np.asarray(x) for x in ShardedBatchSampler(
        101, 512, rank=r, world=2, shuffle=False)]) for r in range(2)]  # fmt: skip
    assert shares[0].tolist() == list(range(50)) or shares[0].tolist() == list(range(51))
    assert np.concatenate(shares).tolist() == list(range(101))


def test_fewer_windows_than_ranks_is_a_usage_error() -> None:
    with pytest.raises(ConfigError, match="cannot be shared by 4 processes"):
        ShardedBatchSampler(3, 8, rank=0, world=4, shuffle=False)
