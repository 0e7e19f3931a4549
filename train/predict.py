"""``worker predict``: batch forecasts of a data file, offline, as JSON lines.

One forecast object (docs/contract.md "Forecasts", without ``source``) per observation that ends a
full window, as the worker would emit it: the window is the series' last ``sequence_length``
accepted points (whatever their spacing), built by the shared feature builder and run through
the same checked predictor the worker loads. ``--latest`` keeps only each series' newest one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from numpy.lib.stride_tricks import sliding_window_view

from model.features import build_inputs
from model.registry import ModelRegistry
from stream.publisher import forecast_documents
from train.sources import DataSettings, load_data

CHUNK = 4096


def predict_file(
    model_dir: Path,
    data: DataSettings,
    out: Path,
    *,
    version: str | None = None,
    latest: bool = False,
    backend: str = "torch",
) -> dict[str, Any]:
    """Write forecasts for ``data`` to ``out`` (JSON lines); return a summary (counts, version,
    the data report). NoModelError / ModelLoadError from the registry; ConfigError for bad data
    (missing model features included). ``out`` is written to a temp file and renamed."""
    loaded = ModelRegistry(model_dir).load(version, backend=backend, device="cpu")
    cfg = loaded.config
    sf = load_data(dataclasses.replace(data, features=cfg.features))
    frame = sf.frame
    t = cfg.sequence_length
    sid = frame["series_id"].to_numpy()
    ts = frame["ts"].to_numpy(dtype=np.float64)
    vals = frame["value"].to_numpy(dtype=np.float64)
    feats = {f: frame[f].to_numpy(dtype=np.float64) for f in cfg.features}
    n = len(frame)
    if n >= t:
        same = sid[: n - t + 1] == sid[t - 1 :]  # window start and end in the same series
        starts = np.flatnonzero(same)
        if latest:
            ends = starts + t - 1
            is_last = np.append(sid[ends[:-1]] != sid[ends[1:]], True) if len(ends) else ends
            starts = starts[is_last.astype(bool)]
    else:
        starts = np.zeros(0, dtype=np.int64)
    tsv = sliding_window_view(ts, t) if n >= t else None
    vv = sliding_window_view(vals, t) if n >= t else None
    fv = {f: sliding_window_view(c, t) for f, c in feats.items()} if n >= t else {}

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    written = 0
    with open(tmp, "wb") as fh:
        for i in range(0, len(starts), CHUNK):
            rows = starts[i : i + CHUNK]
            assert tsv is not None and vv is not None
            wts, wv = np.asarray(tsv[rows]), np.asarray(vv[rows])
            wf = {f: np.asarray(v[rows]) for f, v in fv.items()}
            x = build_inputs(wts, wv, wf or None, cfg)
            fc = loaded.predictor.predict(x)
            ids = [str(sid[r]) for r in rows]
            for obj in forecast_documents(ids, wts, fc, version=loaded.version):
                fh.write(orjson.dumps(obj) + b"\n")
                written += 1
    tmp.replace(out)
    return {
        "out": str(out),
        "forecasts": written,
        "series": int(frame["series_id"].nunique()),
        "model_version": loaded.version,
        "data": sf.report.to_dict(),
    }
