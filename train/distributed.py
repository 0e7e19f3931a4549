"""Distributed data parallel (DDP) training: ranks, one run for all of them, sharded windows.

``worker retrain --strategy ddp --devices N [--num-nodes M]`` trains in ``N x M`` processes
(ranks). Lightning starts the local ones itself (its subprocess launcher re-runs the same command
line with ``LOCAL_RANK`` set), or a cluster launcher starts every one of them (torchrun sets
``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``; SLURM's ``srun``
sets ``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_NODEID``, ``SLURM_NTASKS``); docs/training.md
has the commands. Every rank runs :func:`train.retrain.retrain_once` from the top, so:

- **One run, one version.** Each rank draws a provisional version name, but only the process
  the launcher calls rank 0 creates its run directory. When the process group is up (the
  Trainer's ``setup``), :class:`SharedRun` broadcasts rank 0's version name and run directory to
  every rank, and each logs them: the checkpoints (whose folder Lightning also broadcasts), the
  loggers and the version all live under rank 0's one run directory.
- **Rank 0 does the rest.** After training, only rank 0 loads the best checkpoint, calibrates,
  evaluates, exports and writes to the registry; the other ranks wait at a barrier
  (:func:`barrier`) and return without a version, exit 0. Rank 0 reaches the barrier even when
  it fails, so no rank hangs; its own exit status is the command's.
- **Global metrics.** The LightningModule logs every epoch metric with ``sync_dist=True``:
  validation loss, coverage, the early-stopping and checkpoint monitor and the LR scheduler's
  all see the mean over every rank's windows (weighted by windows). :class:`RankMetrics` logs
  each rank's local validation loss beside the merged one, so a log shows the merge.
- **Every window once.** Lightning's DistributedSampler pads the data to a multiple of the
  ranks (repeating windows); :class:`ShardedBatchSampler` instead shuffles all training windows
  with a seed shared by every rank (``seed + epoch``), deals them out round robin and cuts each
  rank's share into the same number of batches (DDP's gradient all-reduce needs equal step
  counts), so each training window is seen exactly once per epoch (``train_windows_per_epoch``:
  a fresh draw of that many, each once). Validation is cut into contiguous, unpadded shares.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import Callback

from model.errors import ConfigError

log = logging.getLogger(__name__)

DISTRIBUTED_STRATEGIES = ("ddp", "deepspeed", "fsdp")


def env_rank(environ: Mapping[str, str] | None = None) -> int:
    """The global rank a launcher gave this process, read before any process group exists:
    ``RANK`` (torchrun), ``SLURM_PROCID`` (srun, several tasks), or for Lightning's own launcher
    a non-zero ``NODE_RANK`` or ``LOCAL_RANK`` (reported as 1: not rank 0). 0 when none is set."""
    env = os.environ if environ is None else environ

    def num(name: str) -> int:
        try:
            return int(env.get(name, "0") or 0)
        except ValueError:
            return 0

    if "RANK" in env:
        return num("RANK")
    if num("SLURM_NTASKS") > 1 and "SLURM_PROCID" in env:
        return num("SLURM_PROCID")
    return 1 if (num("NODE_RANK") or num("LOCAL_RANK")) else 0


def is_distributed_strategy(strategy: str) -> bool:
    return str(strategy).startswith(DISTRIBUTED_STRATEGIES)


def _rank_world(trainer: L.Trainer | None) -> tuple[int, int]:
    if trainer is None:
        return 0, 1
    return int(trainer.global_rank), int(trainer.world_size)


class SharedRun(Callback):
    """Broadcast rank 0's version name and run directory to every rank once the process group
    is up (the Trainer's ``setup``); ``version`` and ``run_dir`` then hold rank 0's choice on
    every rank. Logs one line per rank when there are several."""

    def __init__(self, version: str, run_dir: Path) -> None:
        self.version = version
        self.run_dir = Path(run_dir)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        provisional = self.version
        version, run_dir = trainer.strategy.broadcast((self.version, str(self.run_dir)), src=0)
        self.version, self.run_dir = str(version), Path(run_dir)
        rank, world = _rank_world(trainer)
        if world > 1:
            log.info(
                "rank %d/%d: run directory %s, version %s (rank 0's; this rank drew %s)",
                rank, world, self.run_dir, self.version, provisional,
            )  # fmt: skip


class RankMetrics(Callback):
    """With several ranks: after each validation, log this rank's own validation loss (over its
    share of the windows, unsynchronised) beside the merged ``val_loss`` every rank sees."""

    def __init__(self) -> None:
        self._sum = 0.0
        self._n = 0

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sum, self._n = 0.0, 0

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.world_size <= 1 or outputs is None:
            return
        n = int(batch[0].shape[0])
        self._sum += float(outputs.detach()) * n
        self._n += n

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rank, world = _rank_world(trainer)
        if world <= 1 or trainer.sanity_checking or not self._n:
            return
        merged = trainer.callback_metrics.get("val_loss")
        log.info(
            "rank %d/%d: epoch %d val_loss local %.6f over %d windows; merged (all ranks) %.6f",
            rank, world, trainer.current_epoch, self._sum / self._n, self._n,
            float(merged) if merged is not None else float("nan"),
        )  # fmt: skip


def barrier(trainer: L.Trainer, name: str) -> None:
    """Wait for every rank (a no-op in a single process or once the group is gone)."""
    if trainer.world_size > 1:
        trainer.strategy.barrier(name)


def reap_children(trainer: L.Trainer, timeout: float = 120.0) -> list[int | None]:
    """On rank 0 under Lightning's own launcher: wait (at most ``timeout`` seconds in all) for
    the local ranks it started and log their exit codes, so the command ends after them."""
    launcher = getattr(trainer.strategy, "launcher", None)
    procs = list(getattr(launcher, "procs", None) or [])
    codes: list[int | None] = []
    deadline = time.monotonic() + timeout
    for i, p in enumerate(procs, start=1):
        try:
            code = p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except Exception:  # subprocess.TimeoutExpired: still running, leave it be
            code = None
        codes.append(code)
        log.info("rank 0: local rank %d (pid %d) exited with %s", i, p.pid, code)
    return codes


class ShardedBatchSampler:
    """Batches of window numbers for one rank of ``world``: every window in exactly one batch of
    exactly one rank per epoch, and every rank the same number of batches.

    ``shuffle``: a permutation drawn from ``seed + epoch`` (the same on every rank) dealt out
    round robin; otherwise contiguous shares in order. ``num_samples``: use only that many
    windows of each epoch's permutation (a fresh draw per epoch). Each share is cut into
    ``steps`` near-equal batches of at most ``batch_size`` windows, ``steps`` being the count the
    largest share needs. Lightning calls :meth:`set_epoch` through ``.sampler``.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        rank: int,
        world: int,
        shuffle: bool,
        seed: int = 0,
        num_samples: int | None = None,
    ) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world {world}")
        self.n, self.batch_size = int(n), max(1, int(batch_size))
        self.rank, self.world = int(rank), int(world)
        self.shuffle, self.seed = bool(shuffle), int(seed)
        self.used = min(self.n, int(num_samples)) if num_samples else self.n
        if self.used < self.world:
            raise ConfigError(
                f"{self.used} windows cannot be shared by {self.world} processes "
                "(each rank needs at least one): use fewer devices or more data"
            )
        self.epoch = 0
        largest = math.ceil(self.used / self.world)
        # Equal step counts on every rank; at least one window per batch on the smallest share.
        self.steps = min(math.ceil(largest / self.batch_size), self.used // self.world)

    @property
    def sampler(self) -> ShardedBatchSampler:
        return self  # Lightning's _set_sampler_epoch looks for .sampler.set_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def share(self) -> np.ndarray:
        """This rank's window numbers for the current epoch."""
        if self.shuffle:
            order = np.random.default_rng(self.seed + self.epoch).permutation(self.n)
            return order[: self.used][self.rank :: self.world]
        bounds = np.linspace(0, self.used, self.world + 1).round().astype(np.int64)
        return np.arange(bounds[self.rank], bounds[self.rank + 1])

    def __iter__(self) -> Iterator[list[int]]:
        for part in np.array_split(self.share(), self.steps):
            yield [int(i) for i in part]

    def __len__(self) -> int:
        return self.steps
