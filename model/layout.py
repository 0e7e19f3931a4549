"""The model directory's layout (docs/contract.md, "Model directory"): file names, version names,
and the file-system steps that keep it consistent (atomic replace, fsync, one lock per directory).

::

    root/CURRENT                 one line: the serving version (replaced atomically)
    root/HISTORY                 promoted versions, oldest first (for rollback)
    root/<version>/              model.safetensors, config.json, model.onnx, canary.json,
                                 metrics.json, manifest.json [, model.int8.onnx, extra files]
    root/.tmp-<version>-<hex>/   a version being written (hidden; never listed or loaded)
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from model.config import ModelConfig

CURRENT = "CURRENT"
HISTORY = "HISTORY"
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
ONNX = "model.onnx"
ONNX_INT8 = "model.int8.onnx"
CANARY = "canary.json"
METRICS = "metrics.json"
MANIFEST_FORMAT = 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_RESERVED = {CURRENT, HISTORY}


def new_version_name(now: dt.datetime | None = None) -> str:
    """A new, sortable version name: UTC time and 4 random hex digits, e.g.
    ``20261126T150000-3f2a``."""
    now = now or dt.datetime.now(dt.UTC)
    return f"{now.astimezone(dt.UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(2)}"


def valid_version_name(name: str) -> bool:
    """True for a plain folder name (no path separators, not hidden, not a reserved file)."""
    return bool(_NAME.match(name)) and name not in _RESERVED and ".." not in name


OWN_FILES = {WEIGHTS, CONFIG, ONNX, ONNX_INT8, CANARY, METRICS, MANIFEST}


def arch(c: ModelConfig) -> tuple[Any, ...]:
    """The config fields the weights and graph depend on."""
    return (
        c.sequence_length, c.input_size, c.calendar, c.calendar_year, c.features, c.horizon,
        c.hidden_size,
        c.num_layers, c.attention_heads, c.distribution,
    )  # fmt: skip


def plain_file_name(name: str) -> bool:
    return (
        isinstance(name, str)
        and bool(name)
        and not name.startswith(".")
        and "/" not in name
        and "\\" not in name
        and "\x00" not in name
        and name not in (".", "..")
    )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def directory_lock(root: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``root/.lock``: changes to one model directory (a version's
    final rename, promote, rollback, prune) by two processes do not interleave."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def write_atomic(root: Path, fname: str, text: str) -> None:
    """Replace ``root/fname`` with ``text`` atomically (temp file, fsync, rename, fsync dir)."""
    tmp = root / f".{fname}.{secrets.token_hex(4)}"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, root / fname)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(root)
