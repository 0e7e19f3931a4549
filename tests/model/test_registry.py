"""The model directory: writing, promotion, rollback, pruning, and refusal of every bad version
of docs/design.md's hot-reload fault list, each with its own reason."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from model.config import ModelConfig
from model.errors import ConfigError, ModelLoadError, NoModelError, RegistryError
from model.export import random_windows
from model.network import ForecastNet
from model.registry import MANIFEST, ModelRegistry, new_version_name
from tests.helpers.tiny_model import make_tiny_model_dir, rewrite_manifest, tiny_config

V = "20260101T000000-0001"


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real version written by write_version (copied by each test: fast)."""
    root = tmp_path_factory.mktemp("template")
    version = make_tiny_model_dir(root, promote=False, seed=1)
    return root / version


@pytest.fixture
def reg(tmp_path: Path, template: Path) -> ModelRegistry:
    """A model directory holding the template as version ``V``, promoted."""
    shutil.copytree(template, tmp_path / "models" / V)
    r = ModelRegistry(tmp_path / "models")
    r.promote(V)
    return r


def _refused(reg: ModelRegistry, reason: str, **kw: object) -> ModelLoadError:
    with pytest.raises(ModelLoadError) as e:
        reg.load(**kw)  # type: ignore[arg-type]
    assert e.value.reason == reason, str(e.value)
    return e.value


# ---- writing and the directory operations ------------------------------------------------------


def test_version_names_sort_by_time() -> None:
    import datetime as dt

    a = new_version_name(dt.datetime(2026, 11, 26, 15, 0, 0, tzinfo=dt.UTC))
    assert re.fullmatch(r"20261126T150000-[0-9a-f]{4}", a)
    b = new_version_name(dt.datetime(2026, 11, 26, 15, 0, 1, tzinfo=dt.UTC))
    assert a < b


def test_write_version_layout_and_manifest(tmp_path: Path) -> None:
    cfg = tiny_config(horizon=3, features=("temp",))
    net = ForecastNet(cfg).eval()
    canary = random_windows(np.random.default_rng(0), 100, 48, cfg.input_size)
    extra = tmp_path / "last.ckpt"
    extra.write_bytes(b"checkpoint bytes")
    reg = ModelRegistry(tmp_path / "models")
    name = reg.write_version(net, cfg, {"mae": 1.5}, canary, extra_files={"model.ckpt": extra})
    vdir = reg.path(name)
    files = sorted(p.name for p in vdir.iterdir())
    assert files == [
        "canary.json", "config.json", "manifest.json", "metrics.json", "model.ckpt",
        "model.onnx", "model.safetensors",
    ]  # fmt: skip
    manifest = json.loads((vdir / MANIFEST).read_text())
    assert set(manifest["files"]) == set(files) - {MANIFEST}
    assert all(len(e["sha256"]) == 64 for e in manifest["files"].values())
    assert ModelConfig.from_json(vdir / "config.json") == cfg
    assert len(json.loads((vdir / "canary.json").read_text())["inputs"]) == 64  # capped
    assert json.loads((vdir / "metrics.json").read_text()) == {"mae": 1.5}
    assert reg.current() is None  # writing does not promote
    assert [p.name for p in reg.root.iterdir() if p.name.startswith(".tmp")] == []
    loaded = reg.load(name, backend="onnx", expect=cfg)
    assert loaded.config == cfg and loaded.version == name and loaded.path == vdir
    with pytest.raises(RegistryError, match="exists"):
        reg.write_version(net, cfg, {}, canary, version=name)
    with pytest.raises(ConfigError, match="config"):
        reg.write_version(net, cfg.replace(hidden_size=32), {}, canary)
    with pytest.raises(ConfigError, match="canary"):
        reg.write_version(net, cfg, {}, canary[:, :10])


def test_write_version_offers_int8_only_when_accurate(tmp_path: Path) -> None:
    cfg = tiny_config()
    net = ForecastNet(cfg).eval()
    rng = np.random.default_rng(1)
    x = random_windows(rng, 256, 48, cfg.input_size)
    y = x[:, -1, :1] + 0.05 * np.abs(x[:, -1, :1]) * rng.standard_normal((256, 1))
    reg = ModelRegistry(tmp_path)
    auto = reg.write_version(net, cfg, {}, x[:8], holdout=(x, y))
    report = json.loads((reg.path(auto) / "metrics.json").read_text())["int8"]
    assert set(report) >= {"mae_fp32", "mae_int8", "rise", "offered"}
    assert (reg.path(auto) / "model.int8.onnx").exists() == report["offered"]
    forced = reg.write_version(net, cfg, {}, x[:8], int8=True)
    assert (reg.path(forced) / "model.int8.onnx").exists()
    m = reg.load(forced, backend="onnx-int8")
    assert m.predictor.backend == "onnx-int8"
    assert not (reg.path(reg.write_version(net, cfg, {}, x[:8])) / "model.int8.onnx").exists()


def test_promote_rollback_prune(tmp_path: Path, template: Path) -> None:
    reg = ModelRegistry(tmp_path)
    names = [f"20260101T00000{i}-000{i}" for i in range(1, 5)]
    for n in names:
        shutil.copytree(template, tmp_path / n)
    assert reg.current() is None
    with pytest.raises(NoModelError, match="retrain"):
        reg.load()
    for n in names[:3]:
        reg.promote(n)
    assert reg.current() == names[2]
    assert (tmp_path / "CURRENT").read_text() == f"{names[2]}\n"
    assert [v.name for v in reg.versions()] == names
    assert [v.is_current for v in reg.versions()] == [False, False, True, False]
    assert reg.rollback_target() == names[1]

    # prune keeps the newest (names[3]), CURRENT (names[2]) and the rollback target (names[1]).
    assert reg.prune(keep=1) == [names[0]]
    assert [v.name for v in reg.versions()] == names[1:]
    assert reg.rollback() == names[1]
    assert reg.current() == names[1]
    with pytest.raises(RegistryError, match="roll back"):
        reg.rollback()
    with pytest.raises(RegistryError):
        reg.promote("20990101T000000-dead")
    with pytest.raises(RegistryError):
        reg.promote("../outside")
    with pytest.raises(ConfigError, match="keep"):
        reg.prune(-1)
    assert not any(p.name.startswith(".CURRENT") for p in tmp_path.iterdir())


def test_half_written_version_is_ignored(reg: ModelRegistry) -> None:
    tmp = reg.root / f".tmp-{V[:-1]}9-abcd1234"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"\x00" * 10)
    (reg.root / "stray-file.txt").write_text("x")
    assert [v.name for v in reg.versions()] == [V]
    assert reg.load().version == V
    # A version folder without a manifest (copied by hand, or cut short) is refused.
    bare = reg.root / "20260101T000000-0002"
    bare.mkdir()
    shutil.copy(reg.path(V) / "config.json", bare)
    _refused(reg, "manifest", version=bare.name)


# ---- refusal of bad versions ---------------------------------------------------------------


def test_loads_with_every_cpu_backend(reg: ModelRegistry) -> None:
    x = random_windows(np.random.default_rng(2), 5, 48, 5)
    ref = reg.load(backend="torch", device="cpu").predictor.predict(x)
    auto = reg.load(threads=1)
    assert (auto.predictor.backend, auto.predictor.device) == ("onnx", "cpu")  # no GPU here
    for backend in ("onnx", "torch-int8", "torch-bf16"):
        loaded = reg.load(backend=backend)  # each within its canary tolerance of fp32
        assert loaded.predictor.backend == backend
        fc = loaded.predictor.predict(x)
        np.testing.assert_allclose(fc.mean, ref.mean, rtol=0.05, atol=0.05 * np.abs(ref.mean).max())
    assert reg.load(expect=tiny_config()).version == V


def _edit(reg: ModelRegistry, fname: str, fn: Callable[[bytes], bytes], rehash: bool) -> None:
    p = reg.path(V) / fname
    p.write_bytes(fn(p.read_bytes()))
    if rehash:
        rewrite_manifest(reg.path(V))


def _flip_byte(b: bytes) -> bytes:
    i = len(b) // 2
    return b[:i] + bytes([b[i] ^ 0xFF]) + b[i + 1 :]


@pytest.mark.parametrize("fname", ["model.safetensors", "config.json", "model.onnx", "canary.json"])
def test_changed_byte_is_a_checksum_error(reg: ModelRegistry, fname: str) -> None:
    _edit(reg, fname, _flip_byte, rehash=False)
    _refused(reg, "checksum", backend="torch")


def test_extra_missing_or_absent_manifest(reg: ModelRegistry) -> None:
    (reg.path(V) / "surprise.bin").write_bytes(b"x")
    _refused(reg, "manifest")
    (reg.path(V) / "surprise.bin").unlink()
    (reg.path(V) / "model.onnx").unlink()
    _refused(reg, "checksum", backend="torch")
    (reg.path(V) / MANIFEST).unlink()
    _refused(reg, "manifest")


def test_manifest_that_omits_a_needed_file(reg: ModelRegistry) -> None:
    doc = json.loads((reg.path(V) / MANIFEST).read_text())
    del doc["files"]["model.safetensors"]
    (reg.path(V) / MANIFEST).write_text(json.dumps(doc))
    _refused(reg, "manifest")


@pytest.mark.parametrize("rehash", [False, True])
def test_truncated_weights(reg: ModelRegistry, rehash: bool) -> None:
    _edit(reg, "model.safetensors", lambda b: b[: len(b) // 3], rehash)
    _refused(reg, "format" if rehash else "checksum", backend="torch")


def test_random_bytes(reg: ModelRegistry) -> None:
    _edit(reg, "model.safetensors", lambda b: np.random.default_rng(0).bytes(len(b)), True)
    _refused(reg, "format")


def test_pickle_with_payload_in_place_of_weights(reg: ModelRegistry, tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str, str]]:
            return (open, (str(marker), "w"))

    def evil(_: bytes) -> bytes:
        return pickle.dumps({"state_dict": Payload()})

    _edit(reg, "model.safetensors", evil, rehash=True)
    _refused(reg, "format")
    assert not marker.exists()


def test_nan_weights_fail_the_canary(reg: ModelRegistry) -> None:
    from safetensors.torch import load, save

    def poison(b: bytes) -> bytes:
        sd = load(b)
        sd["head.weight"] = torch.full_like(sd["head.weight"], float("nan"))
        return save(sd)

    _edit(reg, "model.safetensors", poison, rehash=True)
    e = _refused(reg, "canary")
    assert "not finite" in str(e)


def test_slightly_different_weights_fail_the_canary(reg: ModelRegistry) -> None:
    from safetensors.torch import load, save

    def nudge(b: bytes) -> bytes:
        sd = load(b)
        sd["head.bias"] = sd["head.bias"] + 0.01
        return save(sd)

    _edit(reg, "model.safetensors", nudge, rehash=True)
    _refused(reg, "canary")


def test_wrong_shape_config(reg: ModelRegistry) -> None:
    def bigger(b: bytes) -> bytes:
        d = json.loads(b)
        d["hidden_size"] = 32
        return json.dumps(d).encode()

    _edit(reg, "config.json", bigger, rehash=True)
    _refused(reg, "shape")


def test_expectation_mismatch(reg: ModelRegistry) -> None:
    _refused(reg, "shape", expect=tiny_config(horizon=2))
    _refused(reg, "shape", expect=tiny_config(features=("temp",)))
    _refused(reg, "shape", expect=tiny_config(sequence_length=24))


def test_invalid_config(reg: ModelRegistry) -> None:
    _edit(reg, "config.json", lambda b: b'{"hidden_size": "big"}', rehash=True)
    _refused(reg, "config")


def test_missing_version_and_bad_current(reg: ModelRegistry) -> None:
    _refused(reg, "missing", version="20990101T000000-0000")
    (reg.root / "CURRENT").write_text("../../etc\n")
    _refused(reg, "missing")


def _externalise(location: str) -> Callable[[bytes], bytes]:
    onnx = pytest.importorskip("onnx")
    from onnx.external_data_helper import set_external_data

    def edit(b: bytes) -> bytes:
        m = onnx.load_from_string(b)
        t = max(m.graph.initializer, key=lambda t: len(t.raw_data))
        set_external_data(t, location=location, offset=0, length=len(t.raw_data))
        t.data_location = onnx.TensorProto.EXTERNAL
        t.ClearField("raw_data")
        return m.SerializeToString()

    return edit


@pytest.mark.parametrize("location", ["../../etc/passwd", "/etc/passwd", "sub/../../x.bin"])
@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_onnx_external_data_outside_the_folder(
    reg: ModelRegistry, location: str, backend: str
) -> None:
    _edit(reg, "model.onnx", _externalise(location), rehash=True)
    e = _refused(reg, "format", backend=backend)
    assert "outside" in str(e)


def test_onnx_external_data_inside_the_folder_is_accepted(reg: ModelRegistry) -> None:
    onnx = pytest.importorskip("onnx")
    vdir = reg.path(V)
    m = onnx.load(str(vdir / "model.onnx"))
    onnx.save_model(
        m, str(vdir / "model.onnx"), save_as_external_data=True, location="weights.bin",
        size_threshold=0,
    )  # fmt: skip
    unlisted = _refused(reg, "manifest", backend="onnx")
    assert "weights.bin" in str(unlisted)
    rewrite_manifest(vdir)
    assert reg.load(backend="onnx").predictor.backend == "onnx"


def test_onnx_scanner_finds_nothing_in_our_exports(template: Path) -> None:
    from model.onnx_check import OnnxFormatError, external_data_locations

    assert external_data_locations((template / "model.onnx").read_bytes()) == []
    with pytest.raises(OnnxFormatError):
        external_data_locations(b"\x0a\xff\xff\xff\xff\x0f")  # length beyond the end


def test_tampered_canary_outputs(reg: ModelRegistry) -> None:
    def shift(b: bytes) -> bytes:
        d = json.loads(b)
        d["outputs"]["mean"] = (np.asarray(d["outputs"]["mean"]) * 1.01).tolist()
        return json.dumps(d).encode()

    _edit(reg, "canary.json", shift, rehash=True)
    _refused(reg, "canary")


def test_versions_written_in_one_second_keep_their_creation_order(tmp_path: Path) -> None:
    """Version names sort by time only to the second; within one second the registry orders by
    the recorded creation time, so prune and rollback never take the newer one for the older."""
    cfg = tiny_config()
    net = ForecastNet(cfg).eval()
    canary = random_windows(np.random.default_rng(0), 8, 48, cfg.input_size)
    reg = ModelRegistry(tmp_path / "models")
    older = reg.write_version(net, cfg, {}, canary, version="20261126T150000-ffff")
    newer = reg.write_version(net, cfg, {}, canary, version="20261126T150000-0000")
    assert [v.name for v in reg.versions()] == [older, newer]
    assert reg.prune(1) == [older]
