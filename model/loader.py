"""Loading a model version for serving: every check of :mod:`model.checks` in order, on bytes read
once, then a predictor for the chosen backend and device; nothing is ever unpickled.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from model.checks import (
    CANARY_RTOL,
    SERVING_RTOL,
    check_expected,
    checked_onnx,
    compare,
    forecast_arrays,
    read_canary,
    read_manifest,
    run_canary_torch,
    verify_files,
)
from model.config import ModelConfig
from model.errors import EventcastError, ModelLoadError, NoModelError
from model.layout import CANARY, CONFIG, CURRENT, ONNX, ONNX_INT8, WEIGHTS, valid_version_name
from model.predictor import Predictor, build_predictor, resolve_backend
from model.weights import build_net, parse_weights

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A checked model version, ready to serve."""

    version: str
    config: ModelConfig
    predictor: Predictor
    path: Path


def load_version(
    root: Path,
    version: str | None,
    current: str | None,
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
    name = version if version is not None else current
    if name is None:
        raise NoModelError(
            f"no model in {root} (no {CURRENT} file): run `worker retrain` to train one, "
            "or start the worker with --wait-for-model"
        )
    if not valid_version_name(name):
        raise ModelLoadError(f"{name!r}: not a valid version name", "missing")
    vdir = root / name
    if not vdir.is_dir():
        raise ModelLoadError(f"version {name} not found in {root}", "missing")

    manifest = read_manifest(vdir)
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
    blobs = verify_files(vdir, manifest)

    try:
        config = ModelConfig.from_dict(json.loads(blobs[CONFIG]))
    except (EventcastError, ValueError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{vdir / CONFIG}: invalid model config ({e})", "config") from e
    if expect is not None:
        check_expected(config, expect, vdir)
    net = build_net(config, parse_weights(blobs[WEIGHTS], str(vdir / WEIGHTS)), str(vdir / WEIGHTS))

    canary_x, recorded, recorded_int8 = read_canary(blobs[CANARY], config, vdir)
    compare(vdir, "torch fp32", run_canary_torch(net, canary_x), recorded, CANARY_RTOL, canary_x)

    # Every listed ONNX file is scanned, served or not: a version carrying a file that points
    # outside its folder is not trustworthy whichever backend this process picked.
    checked = {
        f: checked_onnx(vdir, f, blobs[f], manifest) for f in manifest if f.endswith(".onnx")
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
    served = forecast_arrays(predictor.predict(canary_x))
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
        compare(vdir, f"{backend} on {device}", served, ref, SERVING_RTOL[key], canary_x)
    log.info(
        "model version %s loaded (backend %s on %s)", name, predictor.backend, predictor.device
    )
    return LoadedModel(name, config, predictor, vdir)
