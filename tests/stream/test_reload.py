"""Hot reload through the running worker: a good version is swapped in mid-stream without losing a
forecast or going back in version; every corrupt version is refused while the old one serves."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from model.registry import ModelRegistry
from tests.helpers.kafka import consume_all, produce
from tests.helpers.tiny_model import make_tiny_model_dir, rewrite_manifest
from tests.stream.conftest import Truth, forecasts_by_source, make_events, wait_for, worker_argv

pytestmark = pytest.mark.integration


def point_current(root: Path, version: str) -> None:
    """Replace CURRENT atomically, as `worker models promote` does."""
    tmp = root / ".CURRENT.test"
    tmp.write_text(version + "\n")
    os.replace(tmp, root / "CURRENT")


def _weights(fn: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def edit(vdir: Path) -> None:
        p = vdir / "model.safetensors"
        p.write_bytes(fn(p.read_bytes()))
        rewrite_manifest(vdir)

    return edit


# The pickle cases: a payload that creates a marker file when anything unpickles it. It is written
# where a careless loader would read it: a torch checkpoint (`torch.save`, what `torch.load` and
# Lightning read) named as checkpoints are (model.ckpt, model.pt, model.pkl), and in place of the
# weights. The marker lives next to the model directory (the test's tmp_path), never in the
# version folder (the loader refuses unlisted files before it would read anything).
PAYLOAD_MARKER = "pickle-payload-ran"
CHECKPOINT_NAMES = ("model.ckpt", "model.pt", "model.pkl")


def payload_marker(vdir: Path) -> Path:
    return vdir.parent.parent / PAYLOAD_MARKER


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.marker, "w"))


def pickle_payload_bytes(marker: Path, name: str = "model.ckpt") -> bytes:
    """What a careless loader of ``name`` would unpickle, carrying the payload: for ``.pkl`` a
    plain pickle (``pickle.load``), otherwise a torch checkpoint in Lightning's layout (a
    ``state_dict`` of "tensors", ``torch.load(..., weights_only=False)``). Either creates
    ``marker`` when unpickled."""
    import io

    import torch

    obj = {"state_dict": {"net.head.weight": _Payload(marker)}, "epoch": 3}
    if name.endswith(".pkl"):
        return pickle.dumps(obj)
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _pickle_as_weights(vdir: Path) -> None:
    """The weights file and every checkpoint name hold the payload, all listed in the manifest."""
    for name in ("model.safetensors", *CHECKPOINT_NAMES):
        (vdir / name).write_bytes(pickle_payload_bytes(payload_marker(vdir), name))
    rewrite_manifest(vdir)


def _pickle_checkpoint_instead(vdir: Path) -> None:
    """No safetensors at all, only (listed) checkpoints holding the payload: a loader falling back
    to a checkpoint would unpickle it."""
    (vdir / "model.safetensors").unlink()
    for name in CHECKPOINT_NAMES:
        (vdir / name).write_bytes(pickle_payload_bytes(payload_marker(vdir), name))
    rewrite_manifest(vdir)


def _pickle_checkpoint_unlisted(vdir: Path) -> None:
    """A good version plus a payload checkpoint the manifest does not list."""
    (vdir / "model.ckpt").write_bytes(pickle_payload_bytes(payload_marker(vdir)))


def _nan_weights(b: bytes) -> bytes:
    import torch
    from safetensors.torch import load, save

    sd = load(b)
    name = max(sd, key=lambda k: sd[k].numel())
    sd[name] = torch.full_like(sd[name], float("nan"))
    return save(sd)


def _wrong_shape(vdir: Path) -> None:
    d = json.loads((vdir / "config.json").read_text())
    d["hidden_size"] = 32
    (vdir / "config.json").write_text(json.dumps(d))
    rewrite_manifest(vdir)


def _half_written(vdir: Path) -> None:
    (vdir / "manifest.json").unlink()
    (vdir / "model.onnx").unlink()


def _onnx_outside(vdir: Path) -> None:
    import onnx
    from onnx.external_data_helper import set_external_data

    m = onnx.load_from_string((vdir / "model.onnx").read_bytes())
    t = max(m.graph.initializer, key=lambda t: len(t.raw_data))
    set_external_data(t, location="../../etc/passwd", offset=0, length=len(t.raw_data))
    t.data_location = onnx.TensorProto.EXTERNAL
    t.ClearField("raw_data")
    (vdir / "model.onnx").write_bytes(m.SerializeToString())
    rewrite_manifest(vdir)


# Each corrupt-model class and the refusal reason it must be counted under (ModelLoadError.reason,
# the `reason` label of eventcast_model_reload_failures_total; model/loader.py lists them).
CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated": (_weights(lambda b: b[: len(b) // 3]), "format"),
    "random_bytes": (_weights(lambda b: os.urandom(len(b))), "format"),
    "pickle_as_weights": (_pickle_as_weights, "format"),
    "pickle_checkpoint_instead": (_pickle_checkpoint_instead, "missing"),
    "pickle_checkpoint_unlisted": (_pickle_checkpoint_unlisted, "manifest"),
    "wrong_shape": (_wrong_shape, "shape"),
    "nan_weights": (_weights(_nan_weights), "canary"),
    "half_written": (_half_written, "manifest"),
    "onnx_external_outside": (_onnx_outside, "format"),
}


def test_pickle_payload_runs_under_a_careless_loader(tmp_path: Path) -> None:
    """The payload is live: what a careless loader does with each of those files (``pickle.load``
    of the ``.pkl``, ``torch.load(weights_only=False)`` of the others) creates the marker, so the
    reload test's "marker never created" can fail. (Bytes read once and handed to ``torch.load``
    as a buffer: torch 2.15 sends a path ending in .safetensors to safetensors itself.)"""
    import io

    import torch

    for name in ("model.safetensors", *CHECKPOINT_NAMES):
        vdir = tmp_path / name / "models" / "v"
        vdir.mkdir(parents=True)
        f = vdir / name
        f.write_bytes(pickle_payload_bytes(payload_marker(vdir), name))
        assert not payload_marker(vdir).exists()
        if name.endswith(".pkl"):
            with open(f, "rb") as fh:
                obj = pickle.load(fh)  # the careless loader, on purpose
        else:
            obj = torch.load(io.BytesIO(f.read_bytes()), map_location="cpu", weights_only=False)
        obj["state_dict"]["net.head.weight"].close()  # the file the payload opened
        assert payload_marker(vdir).exists(), name


def _failures_by_reason(metrics: Any) -> dict[str, float]:
    return {
        s.labels["reason"]: s.value
        for metric in metrics.reload_failures.collect()
        for s in metric.samples
        if s.name.endswith("_total")
    }


def test_hot_reload_mid_stream_and_corrupt_versions_refused(
    stack: Any, topics: Any, redis_url: str, tmp_path: Path, thread_worker: Any
) -> None:
    root = tmp_path / "models"
    v1 = make_tiny_model_dir(root, seed=0)
    w = thread_worker(
        worker_argv(
            stack.bootstrap, redis_url, root, topics, "--metrics-port", "0", "--max-batch", "64"
        )
    )
    truth = Truth()
    first = make_events(10, 60)
    truth.add(first, produce(stack.bootstrap, topics.input, first))

    def all_out() -> list[Any]:
        return consume_all(stack.bootstrap, topics.output, idle=0.5, timeout=20)

    n1 = len(truth.expected_sources())
    wait_for(lambda: len(all_out()) >= n1, 60, "first forecasts", every=1.0)

    # A good new version while events keep flowing.
    v2 = make_tiny_model_dir(root, seed=1, promote=False)
    second = make_events(10, 40, start=60)
    placed = produce(stack.bootstrap, topics.input, second[:200])
    point_current(root, v2)
    # The rest once v2 serves: with the pipelined worker the first 200 may all be forecast
    # before the reload finishes, and then no forecast would show v2.
    wait_for(lambda: w.worker.runner.version == v2, 30, "v2 serving")
    placed += produce(stack.bootstrap, topics.input, second[200:])
    truth.add(second, placed)
    wait_for(
        lambda: set(forecasts_by_source(all_out())) >= truth.expected_sources(),
        60,
        "all forecasts",
        every=1.0,
    )

    m = w.worker.metrics
    assert m.reloads._value.get() == 1
    # Every offset has its forecast, and per partition the version never goes back.
    per_partition: dict[int, list[tuple[int, str]]] = {}
    for r in all_out():
        doc = orjson.loads(r.value)
        per_partition.setdefault(doc["source"]["partition"], []).append(
            (r.offset, doc["model_version"])
        )
    saw_v2 = False
    for rows in per_partition.values():
        versions = [v for _, v in sorted(rows)]
        first_v2 = versions.index(v2) if v2 in versions else len(versions)
        assert set(versions[:first_v2]) <= {v1} and set(versions[first_v2:]) <= {v2}
        saw_v2 |= first_v2 < len(versions)
    assert saw_v2

    # Each corrupt version is refused, counted under its own reason; v2 keeps serving; no
    # pickle payload ever runs.
    reg = ModelRegistry(root)
    marker = tmp_path / PAYLOAD_MARKER
    for i, (name, (corrupt, reason)) in enumerate(CORRUPTIONS.items()):
        bad = f"20300101T0000{i:02d}-bad{i}"
        shutil.copytree(reg.path(v2), root / bad)
        corrupt(root / bad)
        assert payload_marker(root / bad) == marker
        before = _failures_by_reason(m)
        point_current(root, bad)

        def delta(before: dict[str, float] = before) -> dict[str, float]:
            after = _failures_by_reason(m)
            return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}

        wait_for(lambda: bool(delta()), 30, f"{name} refused")
        time.sleep(0.5)  # a second count (a retry of the same version) would show here
        assert delta() == {reason: 1.0}, (name, delta())
        assert w.worker.runner.version == v2, name
        assert not marker.exists(), f"{name}: the pickle payload ran"
    assert m.reloads._value.get() == 1

    # Still serving v2 after all that.
    third = make_events(10, 5, start=100)
    truth.add(third, produce(stack.bootstrap, topics.input, third))
    wait_for(
        lambda: set(forecasts_by_source(all_out())) >= truth.expected_sources(),
        60,
        "forecasts after",
        every=1.0,
    )
    w.stop()
    late = [orjson.loads(r.value) for r in all_out()]
    tail = [d for d in late if d["ts"] >= orjson.loads(third[0][1])["ts"]]
    assert tail and {d["model_version"] for d in tail} == {v2}
