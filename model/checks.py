"""What loading a model version checks, reason by reason (``ModelLoadError.reason``): the manifest
and checksums, the config against the serving one, the ONNX files' external data, and the canary
windows against the outputs recorded when the version was written.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from model.config import ModelConfig
from model.errors import ModelLoadError
from model.layout import CANARY, MANIFEST, plain_file_name
from model.network import OUTPUT_NAMES

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


def read_manifest(vdir: Path) -> dict[str, dict[str, Any]]:
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
            plain_file_name(fname)
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


def verify_files(vdir: Path, manifest: Mapping[str, Mapping[str, Any]]) -> dict[str, bytes]:
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


def check_expected(config: ModelConfig, expect: ModelConfig, vdir: Path) -> None:
    # The seasonal fields too: the worker's per-series seasonal state is the serving model's
    # recursion (a version with other seasons or coefficients needs a restart, which rebuilds it).
    for fld in ("sequence_length", "calendar", "features", "horizon", "seasons",
                "season_spacing_s", "season_alpha", "season_gammas"):  # fmt: skip
        got, want = getattr(config, fld), getattr(expect, fld)
        if got != want:
            raise ModelLoadError(
                f"{vdir}: {fld} is {got!r}, the serving model has {want!r}", "shape"
            )


def read_canary(
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


def run_canary_torch(net: nn.Module, x: np.ndarray) -> list[np.ndarray]:
    from model.export import run_torch

    return run_torch(net, x)


def forecast_arrays(fc: Any) -> list[np.ndarray]:
    return [fc.mean, fc.std, fc.lower["80"], fc.upper["80"], fc.lower["95"], fc.upper["95"]]


def compare(
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


def checked_onnx(vdir: Path, fname: str, data: bytes, manifest: Mapping[str, Any]) -> Path | bytes:
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
