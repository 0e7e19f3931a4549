"""The model directory of CONTRACT.md: versions, the ``CURRENT`` pointer, and safe loading.

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

Only torch, numpy and safetensors are needed (onnxruntime for the ONNX backends, and onnx +
onnxruntime for :meth:`ModelRegistry.write_version`, which exports).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from model.config import ModelConfig
from model.errors import ConfigError, EventcastError, ModelLoadError, NoModelError, RegistryError
from model.network import OUTPUT_NAMES
from model.predictor import Predictor, build_predictor, resolve_backend
from model.weights import build_net, forecast_net, parse_weights, save_weights, state_dict_cpu

log = logging.getLogger(__name__)

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
MAX_CANARY = 64  # windows kept in canary.json: enough to catch bad weights, small to check

# Canary tolerances, per output and per window relative to the scale the output is computed at
# (model.export.output_diffs: the window's level for the mean and the bounds, its largest std for
# std). The fp32 torch check is the contract's 1e-4; the serving backend is also checked against
# its own expected precision.
CANARY_RTOL = 1e-4
SERVING_RTOL = {
    "onnx": 1e-4,
    "onnx-int8": 1e-2,  # vs the int8 outputs recorded at write time (same quantized graph)
    "torch-int8": 5e-2,  # vs fp32: dynamic quantization error
    "torch-bf16": 5e-2,  # vs fp32: the LSTM in bfloat16 (8-bit mantissa)
    "cuda": 5e-3,  # cuDNN LSTM may use TF32
    "cuda-bf16": 5e-2,
}

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


@dataclass
class LoadedModel:
    """A checked model version, ready to serve."""

    version: str
    config: ModelConfig
    predictor: Predictor
    path: Path


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
        """Write a complete version (not promoted) and return its name.

        ``net`` is an EventForecaster or ForecastNet (any device; it is not modified),
        ``canary_inputs`` (N, T, C) a few real input windows (the first 64 are kept), ``metrics``
        the evaluation report (JSON-able). ONNX is always exported and checked against torch.
        ``int8``: True writes ``model.int8.onnx``; None writes it only if ``holdout`` = (x, y) is
        given and the held-out MAE rises by at most 2 % (the report goes to metrics.json under
        ``int8``); False never. ``extra_files`` maps file names (e.g. ``model.ckpt``) to files
        copied in and covered by the manifest.

        Raises ConfigError when ``config`` does not describe ``net`` or the canary shape is wrong,
        RegistryError when the version exists or the ONNX export disagrees with torch. Nothing
        is left behind on failure.
        """
        from model.export import export_onnx, int8_report, quantize_onnx_int8, verify_onnx

        name = version or new_version_name()
        if not valid_version_name(name):
            raise RegistryError(f"{name!r}: not a valid version name")
        inner = forecast_net(net)
        if _arch(inner.config) != _arch(config):
            raise ConfigError(
                f"config: does not describe the network (network {_arch(inner.config)}, "
                f"config {_arch(config)})"
            )
        canary = np.ascontiguousarray(canary_inputs, dtype=np.float32)[:MAX_CANARY]
        want = (config.sequence_length, config.input_size)
        if canary.ndim != 3 or canary.shape[1:] != want or len(canary) == 0:
            raise ConfigError(
                f"canary_inputs: expected (N >= 1, {want[0]}, {want[1]}), got {canary.shape}"
            )
        if not np.isfinite(canary).all():
            raise ConfigError("canary_inputs: contains NaN or infinite numbers")
        extras = dict(extra_files or {})
        for fname in extras:
            if not _plain_file_name(fname) or fname in _OWN_FILES:
                raise ConfigError(f"extra_files: {fname!r} is not an allowed file name")
        if (self.root / name).exists():
            raise RegistryError(f"version {name} already exists in {self.root}")

        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{name}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            # A CPU fp32 copy with exactly the saved weights: canary outputs and the ONNX export
            # come from what a CPU loader will see, whatever device the trainer used.
            cpu_net = build_net(config, state_dict_cpu(inner))
            save_weights(cpu_net, tmp / WEIGHTS)
            (tmp / CONFIG).write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
            export_onnx(cpu_net, tmp / ONNX)
            try:
                verify_onnx(cpu_net, tmp / ONNX, batches=(1, len(canary)), x=canary)
                verify_onnx(cpu_net, tmp / ONNX, batches=(1, 37))
            except AssertionError as e:
                raise RegistryError(f"ONNX export of {name} disagrees with torch: {e}") from e

            report: dict[str, Any] | None = None
            offer = False
            # int8=None without held-out data cannot be judged: not offered, not even built.
            if int8 is True or (int8 is None and holdout is not None):
                quantize_onnx_int8(tmp / ONNX, tmp / ONNX_INT8)
                if holdout is not None:
                    rep = int8_report(tmp / ONNX, tmp / ONNX_INT8, holdout[0], holdout[1])
                    report = rep.to_dict()
                offer = bool(int8) or bool(report and report["offered"])
                if not offer:
                    (tmp / ONNX_INT8).unlink()

            outputs = _run_canary_torch(cpu_net, canary)
            canary_doc: dict[str, Any] = {
                "inputs": canary.tolist(),
                "outputs": {k: v.tolist() for k, v in zip(OUTPUT_NAMES, outputs, strict=True)},
            }
            if offer:
                from model.predictor import OnnxPredictor

                q = OnnxPredictor(tmp / ONNX_INT8, threads=1, providers=["CPUExecutionProvider"])
                fc = q.predict(canary)
                canary_doc["outputs_int8"] = {
                    k: v.tolist() for k, v in zip(OUTPUT_NAMES, _forecast_arrays(fc), strict=True)
                }
            (tmp / CANARY).write_text(json.dumps(canary_doc))

            metrics_doc = dict(metrics)
            if report is not None:
                metrics_doc["int8"] = report
            (tmp / METRICS).write_text(
                json.dumps(metrics_doc, indent=2, sort_keys=True, default=str) + "\n"
            )
            for fname, src in extras.items():
                shutil.copyfile(src, tmp / fname)

            files = {
                p.name: {"sha256": _sha256_file(p), "bytes": p.stat().st_size}
                for p in sorted(tmp.iterdir())
            }
            manifest = {
                "format": MANIFEST_FORMAT,
                "version": name,
                "created": dt.datetime.now(dt.UTC).isoformat(),
                "files": files,
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            for p in tmp.iterdir():
                _fsync_file(p)
            _fsync_dir(tmp)
            with self._lock():
                if (self.root / name).exists():
                    raise RegistryError(f"version {name} already exists in {self.root}")
                os.rename(tmp, self.root / name)
                _fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("model version %s written to %s", name, self.root)
        return name

    def promote(self, version: str) -> None:
        """Make ``version`` the serving one: atomically replace ``CURRENT`` (temp file, fsync,
        rename, fsync of the folder) and append it to the history. RegistryError when the
        version folder does not exist. Promotion does not check the model: workers do, on load."""
        p = self.path(version)
        with self._lock():
            if not p.is_dir():
                raise RegistryError(f"version {version} does not exist in {self.root}")
            hist = self.history()
            cur = self.current()
            if cur and (not hist or hist[-1] != cur):
                hist.append(cur)  # CURRENT set by hand: keep it as a rollback target
            if not hist or hist[-1] != version:
                hist.append(version)
            self._write_atomic(HISTORY, "".join(f"{h}\n" for h in hist))
            self._write_atomic(CURRENT, f"{version}\n")
        log.info("model version %s promoted in %s", version, self.root)

    def rollback(self) -> str:
        """Point ``CURRENT`` back at the previously promoted version and return its name.

        RegistryError when there is nothing to roll back to."""
        with self._lock():
            target = self.rollback_target()
            if target is None:
                raise RegistryError(f"no earlier promoted version to roll back to in {self.root}")
            hist = self.history()
            # Drop everything after the target: a second rollback goes one step further back.
            idx = len(hist) - 1 - hist[::-1].index(target)
            self._write_atomic(HISTORY, "".join(f"{h}\n" for h in hist[: idx + 1]))
            self._write_atomic(CURRENT, f"{target}\n")
        log.info("model directory %s rolled back to %s", self.root, target)
        return target

    def prune(self, keep: int) -> list[str]:
        """Delete all but the ``keep`` newest versions, never ``CURRENT`` nor the rollback target;
        also removes temp folders of crashed writers older than an hour. Returns the deleted
        version names (oldest first). ConfigError when ``keep < 0``."""
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
            raise ConfigError(f"keep: must be an integer >= 0, got {keep!r}")
        removed: list[str] = []
        with self._lock():
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
                self._write_atomic(HISTORY, "".join(f"{h}\n" for h in alive))
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
        """Check a version (default: ``CURRENT``) and return it with a ready predictor.

        Checks, in order, each failure raising ModelLoadError with the ``reason`` given:
        the version folder exists (``missing``); ``manifest.json`` parses, lists every file in
        the folder and nothing else, and lists the files this load opens (``manifest``); every
        listed file's size and sha256 match (``checksum``); ``config.json`` is a valid
        ModelConfig (``config``); with ``expect``, sequence length, input channels (calendar and
        feature names in order) and horizon equal (``shape``); the safetensors file parses
        (``format``) and its tensors have the shapes the config implies (``shape``); every
        listed ONNX file parses and has no external data outside the folder (``format``); the canary
        windows give finite outputs within 1e-4 (relative) of the recorded ones with fp32 torch,
        and within the backend's tolerance with the serving predictor (``canary``).
        No ``CURRENT`` (and no ``version``) raises NoModelError; bad backend/device names
        ConfigError. Files are read once and the checked bytes are what gets loaded.
        """
        name = version if version is not None else self.current()
        if name is None:
            raise NoModelError(
                f"no model in {self.root} (no {CURRENT} file): run `worker retrain` to train one, "
                "or start the worker with --wait-for-model"
            )
        if not valid_version_name(name):
            raise ModelLoadError(f"{name!r}: not a valid version name", "missing")
        vdir = self.root / name
        if not vdir.is_dir():
            raise ModelLoadError(f"version {name} not found in {self.root}", "missing")

        manifest = _read_manifest(vdir)
        # Backend choice needs to know whether an ONNX file is offered (as listed, not as on disk).
        want_onnx = ONNX_INT8 if backend == "onnx-int8" else ONNX
        backend, device = resolve_backend(backend, device, want_onnx in manifest)
        needed = [WEIGHTS, CONFIG, CANARY]
        if backend in ("onnx", "onnx-int8"):
            needed.append(want_onnx)
        for fname in needed:
            if fname not in manifest:
                reason = "manifest" if (vdir / fname).exists() else "missing"
                raise ModelLoadError(f"{vdir}: {fname} is not in the manifest", reason)
        blobs = _verify_files(vdir, manifest)

        try:
            config = ModelConfig.from_dict(json.loads(blobs[CONFIG]))
        except (EventcastError, ValueError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{vdir / CONFIG}: invalid model config ({e})", "config") from e
        if expect is not None:
            _check_expected(config, expect, vdir)
        net = build_net(
            config, parse_weights(blobs[WEIGHTS], str(vdir / WEIGHTS)), str(vdir / WEIGHTS)
        )

        canary_x, recorded, recorded_int8 = _read_canary(blobs[CANARY], config, vdir)
        _compare(
            vdir, "torch fp32", _run_canary_torch(net, canary_x), recorded, CANARY_RTOL, canary_x
        )

        # Every listed ONNX file is scanned, served or not: a version carrying a file that points
        # outside its folder is not trustworthy whichever backend this process picked.
        checked = {
            f: _checked_onnx(vdir, f, blobs[f], manifest) for f in manifest if f.endswith(".onnx")
        }
        onnx_src = checked.get(want_onnx) if backend in ("onnx", "onnx-int8") else None
        predictor = build_predictor(
            config,
            net,
            backend,
            device,
            onnx=onnx_src,
            threads=threads,
            bf16=bf16,
            cuda_graphs=cuda_graphs,
        )
        # The serving backend must reproduce the canary too (an int8 or GPU model within its own
        # precision); this also warms it up before it takes traffic.
        served = _forecast_arrays(predictor.predict(canary_x))
        if backend == "onnx-int8":
            ref, key = (recorded_int8, "onnx-int8") if recorded_int8 else (recorded, "torch-int8")
        elif backend in ("torch-int8", "torch-bf16"):
            ref, key = recorded, backend
        elif device.startswith("cuda") and backend == "torch":
            ref, key = recorded, ("cuda-bf16" if bf16 else "cuda")
        elif backend == "onnx":
            ref, key = recorded, "onnx"
        else:
            ref, key = recorded, ""
        if key:
            _compare(vdir, f"{backend} on {device}", served, ref, SERVING_RTOL[key], canary_x)
        log.info(
            "model version %s loaded (backend %s on %s)", name, predictor.backend, predictor.device
        )
        return LoadedModel(name, config, predictor, vdir)

    # ---- internals -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _write_atomic(self, fname: str, text: str) -> None:
        tmp = self.root / f".{fname}.{secrets.token_hex(4)}"
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.root / fname)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(self.root)


# ---- helpers ------------------------------------------------------------------------------------

_OWN_FILES = {WEIGHTS, CONFIG, ONNX, ONNX_INT8, CANARY, METRICS, MANIFEST}


def _arch(c: ModelConfig) -> tuple[Any, ...]:
    """The config fields the weights and graph depend on."""
    return (
        c.sequence_length, c.input_size, c.calendar, c.calendar_year, c.features, c.horizon,
        c.hidden_size,
        c.num_layers, c.attention_heads, c.distribution,
    )  # fmt: skip


def _plain_file_name(name: str) -> bool:
    return (
        isinstance(name, str)
        and bool(name)
        and not name.startswith(".")
        and "/" not in name
        and "\\" not in name
        and "\x00" not in name
        and name not in (".", "..")
    )


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_manifest(vdir: Path) -> dict[str, dict[str, Any]]:
    """The manifest's file table; ModelLoadError(reason="manifest") when it is absent, malformed,
    names a file that is not a plain name, or does not list a file present in the folder."""
    try:
        doc = json.loads((vdir / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ModelLoadError(f"{vdir}: {MANIFEST} missing", "manifest") from e
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelLoadError(f"{vdir / MANIFEST}: unreadable ({e})", "manifest") from e
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, dict):
        raise ModelLoadError(f"{vdir / MANIFEST}: no file table", "manifest")
    for fname, entry in files.items():
        ok = (
            _plain_file_name(fname)
            and fname != MANIFEST
            and isinstance(entry, dict)
            and isinstance(entry.get("sha256"), str)
            and isinstance(entry.get("bytes"), int)
        )
        if not ok:
            raise ModelLoadError(f"{vdir / MANIFEST}: bad entry {fname!r}", "manifest")
    for p in vdir.iterdir():
        if p.name != MANIFEST and p.name not in files:
            raise ModelLoadError(f"{vdir}: {p.name} is not listed in the manifest", "manifest")
    return files


def _verify_files(vdir: Path, manifest: Mapping[str, Mapping[str, Any]]) -> dict[str, bytes]:
    """Bytes of every listed file after checking size and sha256 (reason ``checksum``)."""
    blobs: dict[str, bytes] = {}
    for fname, entry in manifest.items():
        p = vdir / fname
        if p.is_symlink() or not p.is_file():
            raise ModelLoadError(f"{p}: listed in the manifest but not a regular file", "checksum")
        data = p.read_bytes()
        if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise ModelLoadError(f"{p}: checksum does not match the manifest", "checksum")
        blobs[fname] = data
    return blobs


def _check_expected(config: ModelConfig, expect: ModelConfig, vdir: Path) -> None:
    for fld in ("sequence_length", "calendar", "features", "horizon"):
        got, want = getattr(config, fld), getattr(expect, fld)
        if got != want:
            raise ModelLoadError(
                f"{vdir}: {fld} is {got!r}, the serving model has {want!r}", "shape"
            )


def _read_canary(
    data: bytes, config: ModelConfig, vdir: Path
) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray] | None]:
    try:
        doc = json.loads(data)
        x = np.asarray(doc["inputs"], dtype=np.float32)
        outs = [np.asarray(doc["outputs"][k], dtype=np.float32) for k in OUTPUT_NAMES]
        q = doc.get("outputs_int8")
        outs_q = [np.asarray(q[k], dtype=np.float32) for k in OUTPUT_NAMES] if q else None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{vdir / CANARY}: malformed ({e})", "canary") from e
    want = (config.sequence_length, config.input_size)
    shape_ok = x.ndim == 3 and x.shape[1:] == want and len(x) > 0
    out_shape = (len(x), config.horizon)
    if not shape_ok or any(o.shape != out_shape for o in outs + (outs_q or [])):
        raise ModelLoadError(f"{vdir / CANARY}: shapes do not match the config", "canary")
    return x, outs, outs_q


def _run_canary_torch(net: nn.Module, x: np.ndarray) -> list[np.ndarray]:
    from model.export import run_torch

    return run_torch(net, x)


def _forecast_arrays(fc: Any) -> list[np.ndarray]:
    return [fc.mean, fc.std, fc.lower["80"], fc.upper["80"], fc.lower["95"], fc.upper["95"]]


def _compare(
    vdir: Path,
    what: str,
    got: list[np.ndarray],
    ref: list[np.ndarray],
    rtol: float,
    x: np.ndarray,
) -> None:
    from model.export import output_diffs

    diffs = output_diffs(got, ref, x)
    for name, g in zip(OUTPUT_NAMES, got, strict=True):
        if not np.isfinite(g).all():
            raise ModelLoadError(f"{vdir}: canary {name} is not finite with {what}", "canary")
        d = diffs[name]
        if not d <= rtol:
            raise ModelLoadError(
                f"{vdir}: canary {name} with {what} differs from the recorded output by "
                f"{d:.2e} (relative, limit {rtol:g})",
                "canary",
            )


def _checked_onnx(vdir: Path, fname: str, data: bytes, manifest: Mapping[str, Any]) -> Path | bytes:
    """What to give onnxruntime: the checked bytes, or the path when the model has (in-folder,
    manifest-listed) external data. ModelLoadError(reason="format") for unparseable bytes or a
    location outside the folder; reason "manifest" for an in-folder data file not listed."""
    from model.onnx_check import OnnxFormatError, external_data_locations

    try:
        locations = external_data_locations(data)
    except OnnxFormatError as e:
        raise ModelLoadError(f"{vdir / fname}: not a valid ONNX file ({e})", "format") from e
    if not locations:
        return data
    root = vdir.resolve()
    for loc in locations:
        target = (vdir / loc).resolve() if loc else None
        if not loc or os.path.isabs(loc) or target is None or target.parent != root:
            raise ModelLoadError(
                f"{vdir / fname}: external data location {loc!r} is outside the version folder",
                "format",
            )
        if target.name not in manifest:
            raise ModelLoadError(
                f"{vdir / fname}: external data file {loc!r} is not in the manifest", "manifest"
            )
    return vdir / fname
