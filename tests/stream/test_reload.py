"""Hot reload through the running worker: a good version is swapped in mid-stream without losing a
forecast or going back in version; every corrupt version is refused while the old one serves."""

from __future__ import annotations

import json
import os
import pickle
import shutil
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


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, ("/tmp/eventcast-pickle-payload-ran", "w"))


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


CORRUPTIONS: dict[str, Callable[[Path], None]] = {
    "truncated": _weights(lambda b: b[: len(b) // 3]),
    "random_bytes": _weights(lambda b: os.urandom(len(b))),
    "pickle_payload": _weights(lambda b: pickle.dumps({"state_dict": _Payload()})),
    "wrong_shape": _wrong_shape,
    "nan_weights": _weights(_nan_weights),
    "half_written": _half_written,
    "onnx_external_outside": _onnx_outside,
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

    # Each corrupt version is refused; v2 keeps serving.
    reg = ModelRegistry(root)
    for i, (name, corrupt) in enumerate(CORRUPTIONS.items()):
        bad = f"20300101T0000{i:02d}-bad{i}"
        shutil.copytree(reg.path(v2), root / bad)
        corrupt(root / bad)
        before = sum(
            s.value
            for metric in m.reload_failures.collect()
            for s in metric.samples
            if s.name.endswith("_total")
        )
        point_current(root, bad)

        def failures() -> float:
            return sum(
                s.value
                for metric in m.reload_failures.collect()
                for s in metric.samples
                if s.name.endswith("_total")
            )

        wait_for(lambda: failures() > before, 30, f"{name} refused")  # noqa: B023
        assert w.worker.runner.version == v2, name
    assert not Path("/tmp/eventcast-pickle-payload-ran").exists()
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
