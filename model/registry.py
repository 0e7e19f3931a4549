"""The model directory (docs/contract.md): its versions, the ``CURRENT`` pointer and history.

Layout::

    root/CURRENT                 one line: the serving version (replaced atomically)
    root/HISTORY                 promoted versions, oldest first (for rollback)
    root/<version>/              model.safetensors, config.json, model.onnx, canary.json,
                                 metrics.json, manifest.json [, model.int8.onnx, extra files]
    root/.tmp-<version>-<hex>/   a version being written (hidden; never listed or loaded)

Writers build a version in a hidden temp folder and rename it into place, so a reader sees a
version completely or not at all. :meth:`ModelRegistry.load` trusts nothing in a version folder:
it checks the manifest and checksums, the config, the tensor shapes, the ONNX file's external
data references and a canary batch before it returns a predictor, and it never unpickles.

The pieces: :mod:`model.layout` (names, atomic file steps, the directory lock),
:mod:`model.writer` (writing a version), :mod:`model.loader` and :mod:`model.checks` (loading
one). Only torch, numpy and safetensors are needed (onnxruntime for the ONNX backends, and onnx +
onnxruntime for :meth:`ModelRegistry.write_version`, which exports).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import secrets
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from model.config import ModelConfig
from model.errors import ConfigError, RegistryError
from model.layout import (
    CURRENT,
    HISTORY,
    MANIFEST,
    METRICS,
    directory_lock,
    new_version_name,
    valid_version_name,
    write_atomic,
)
from model.loader import LoadedModel, load_version
from model.writer import write_version

__all__ = ["MANIFEST", "LoadedModel", "ModelRegistry", "VersionInfo", "new_version_name"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VersionInfo:
    """One version folder as listed by :meth:`ModelRegistry.versions`."""

    name: str
    path: Path
    created: dt.datetime  # UTC, from the manifest (else the folder's mtime)
    is_current: bool
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "created": self.created.isoformat(),
            "is_current": self.is_current,
            "metrics": self.metrics,
        }


class ModelRegistry:
    """Versions of a model in one directory (see module docstring).

    Methods that change the directory (``write_version``'s final rename, ``promote``,
    ``rollback``, ``prune``) hold an exclusive ``flock`` on ``root/.lock``, so two processes
    (a trainer and an operator) do not interleave them.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    # ---- reading -------------------------------------------------------------------------------

    def current(self) -> str | None:
        """The serving version's name, or None when there is no (or an empty) ``CURRENT``."""
        try:
            text = (self.root / CURRENT).read_text(encoding="utf-8").strip()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (OSError, UnicodeDecodeError) as e:
            raise RegistryError(f"{self.root / CURRENT}: cannot read ({e})") from e
        return text.splitlines()[0].strip() if text else None

    def path(self, version: str) -> Path:
        """The folder of ``version``; RegistryError for a name that is not a plain folder name."""
        if not valid_version_name(version):
            raise RegistryError(f"{version!r}: not a valid version name")
        return self.root / version

    def versions(self) -> list[VersionInfo]:
        """Every version folder, oldest first (by creation time). Hidden folders (versions being
        written, or left behind by a crashed writer) and stray files are not listed."""
        if not self.root.is_dir():
            return []
        cur = self.current()
        out: list[VersionInfo] = []
        for p in sorted(self.root.iterdir()):
            if not p.is_dir() or not valid_version_name(p.name):
                continue
            created: dt.datetime | None = None
            with contextlib.suppress(Exception):
                created = dt.datetime.fromisoformat(
                    json.loads((p / MANIFEST).read_text())["created"]
                )
            if created is None:
                created = dt.datetime.fromtimestamp(p.stat().st_mtime, dt.UTC)
            metrics: dict[str, Any] = {}
            with contextlib.suppress(Exception):
                m = json.loads((p / METRICS).read_text())
                metrics = m if isinstance(m, dict) else {}
            if created.tzinfo is None:
                created = created.replace(tzinfo=dt.UTC)
            out.append(VersionInfo(p.name, p, created, p.name == cur, metrics))
        # Names sort by time only to the second; two versions written within one second (a
        # retrain loop, a test) are ordered by their recorded creation time instead.
        out.sort(key=lambda v: (v.created, v.name))
        return out

    def history(self) -> list[str]:
        """Promoted versions, oldest first (the last one is normally ``CURRENT``)."""
        try:
            lines = (self.root / HISTORY).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        return [x.strip() for x in lines if x.strip()]

    def rollback_target(self) -> str | None:
        """The version :meth:`rollback` would switch to: the latest promoted version before the
        current one that still exists, or None."""
        cur = self.current()
        for name in reversed(self.history()):
            if name != cur and valid_version_name(name) and (self.root / name).is_dir():
                return name
        return None

    # ---- writing -------------------------------------------------------------------------------

    def write_version(
        self,
        net: nn.Module,
        config: ModelConfig,
        metrics: Mapping[str, Any],
        canary_inputs: np.ndarray,
        *,
        version: str | None = None,
        int8: bool | None = None,
        extra_files: Mapping[str, Path] | None = None,
        holdout: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> str:
        """Write a complete version (not promoted) and return its name
        (:func:`model.writer.write_version`, which documents the arguments and errors)."""
        return write_version(
            self.root, net, config, metrics, canary_inputs, version=version, int8=int8,
            extra_files=extra_files, holdout=holdout,
        )  # fmt: skip

    def promote(self, version: str) -> None:
        """Make ``version`` the serving one: atomically replace ``CURRENT`` (temp file, fsync,
        rename, fsync of the folder) and append it to the history. RegistryError when the
        version folder does not exist. Promotion does not check the model: workers do, on load."""
        p = self.path(version)
        with directory_lock(self.root):
            if not p.is_dir():
                raise RegistryError(f"version {version} does not exist in {self.root}")
            hist = self.history()
            cur = self.current()
            if cur and (not hist or hist[-1] != cur):
                hist.append(cur)  # CURRENT set by hand: keep it as a rollback target
            if not hist or hist[-1] != version:
                hist.append(version)
            write_atomic(self.root, HISTORY, "".join(f"{h}\n" for h in hist))
            write_atomic(self.root, CURRENT, f"{version}\n")
        log.info("model version %s promoted in %s", version, self.root)

    def rollback(self) -> str:
        """Point ``CURRENT`` back at the previously promoted version and return its name.

        RegistryError when there is nothing to roll back to."""
        with directory_lock(self.root):
            target = self.rollback_target()
            if target is None:
                raise RegistryError(f"no earlier promoted version to roll back to in {self.root}")
            hist = self.history()
            # Drop everything after the target: a second rollback goes one step further back.
            idx = len(hist) - 1 - hist[::-1].index(target)
            write_atomic(self.root, HISTORY, "".join(f"{h}\n" for h in hist[: idx + 1]))
            write_atomic(self.root, CURRENT, f"{target}\n")
        log.info("model directory %s rolled back to %s", self.root, target)
        return target

    def prune(self, keep: int) -> list[str]:
        """Delete all but the ``keep`` newest versions, never ``CURRENT`` nor the rollback target;
        also removes temp folders of crashed writers older than an hour. Returns the deleted
        version names (oldest first). ConfigError when ``keep < 0``."""
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
            raise ConfigError(f"keep: must be an integer >= 0, got {keep!r}")
        removed: list[str] = []
        with directory_lock(self.root):
            names = [v.name for v in self.versions()]
            protected = {self.current(), self.rollback_target()}
            newest = set(names[len(names) - keep :]) if keep else set()
            for name in names:
                if name in newest or name in protected:
                    continue
                # Rename first so that a half-deleted folder is never visible as a version.
                trash = self.root / f".del-{name}-{secrets.token_hex(4)}"
                os.rename(self.root / name, trash)
                shutil.rmtree(trash, ignore_errors=True)
                removed.append(name)
            cutoff = dt.datetime.now().timestamp() - 3600
            for p in self.root.iterdir():
                if (
                    p.is_dir()
                    and p.name.startswith((".tmp-", ".del-"))
                    and p.stat().st_mtime < cutoff
                ):
                    shutil.rmtree(p, ignore_errors=True)
            if removed:
                alive = [h for h in self.history() if h not in removed]
                write_atomic(self.root, HISTORY, "".join(f"{h}\n" for h in alive))
        return removed

    # ---- loading -------------------------------------------------------------------------------

    def load(
        self,
        version: str | None = None,
        *,
        backend: str = "auto",
        device: str = "auto",
        threads: int | None = None,
        expect: ModelConfig | None = None,
        bf16: bool = False,
        cuda_graphs: bool | None = None,
    ) -> LoadedModel:
        """Check a version (default: ``CURRENT``) and return it with a ready predictor
        (:func:`model.loader.load_version` lists every check and its ``reason``)."""
        return load_version(
            self.root, version, None if version is not None else self.current(),
            backend=backend, device=device, threads=threads, expect=expect, bf16=bf16,
            cuda_graphs=cuda_graphs,
        )  # fmt: skip
