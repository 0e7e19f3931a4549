"""Writing a model version: weights, config, ONNX export (checked against torch), optional int8,
canary windows with their outputs, metrics, and a sha256 manifest, built in a hidden folder and
renamed into place so that a reader sees a version completely or not at all.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from model.checks import MAX_CANARY, forecast_arrays, run_canary_torch
from model.config import ModelConfig
from model.errors import ConfigError, RegistryError
from model.layout import (
    CANARY,
    CONFIG,
    MANIFEST,
    MANIFEST_FORMAT,
    METRICS,
    ONNX,
    ONNX_INT8,
    OWN_FILES,
    WEIGHTS,
    arch,
    directory_lock,
    fsync_dir,
    fsync_file,
    new_version_name,
    plain_file_name,
    sha256_file,
    valid_version_name,
)
from model.network import OUTPUT_NAMES
from model.weights import build_net, forecast_net, save_weights, state_dict_cpu

log = logging.getLogger(__name__)


def write_version(
    root: Path,
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
    if arch(inner.config) != arch(config):
        raise ConfigError(
            f"config: does not describe the network (network {arch(inner.config)}, "
            f"config {arch(config)})"
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
        if not plain_file_name(fname) or fname in OWN_FILES:
            raise ConfigError(f"extra_files: {fname!r} is not an allowed file name")
    if (root / name).exists():
        raise RegistryError(f"version {name} already exists in {root}")

    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{name}-{secrets.token_hex(4)}"
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

        outputs = run_canary_torch(cpu_net, canary)
        canary_doc: dict[str, Any] = {
            "inputs": canary.tolist(),
            "outputs": {k: v.tolist() for k, v in zip(OUTPUT_NAMES, outputs, strict=True)},
        }
        if offer:
            from model.predictor import OnnxPredictor

            q = OnnxPredictor(tmp / ONNX_INT8, threads=1, providers=["CPUExecutionProvider"])
            fc = q.predict(canary)
            canary_doc["outputs_int8"] = {
                k: v.tolist() for k, v in zip(OUTPUT_NAMES, forecast_arrays(fc), strict=True)
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
            p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
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
            fsync_file(p)
        fsync_dir(tmp)
        with directory_lock(root):
            if (root / name).exists():
                raise RegistryError(f"version {name} already exists in {root}")
            os.rename(tmp, root / name)
            fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("model version %s written to %s", name, root)
    return name
