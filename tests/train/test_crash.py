"""A retrain killed with SIGKILL while it writes a version, or while it swaps ``CURRENT``,
leaves the serving version and the pointer intact and loadable."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from deploy.cli import main
from model.registry import ModelRegistry

REPO = Path(__file__).resolve().parents[2]

# Runs `worker retrain` in a child process with one hook patched in, chosen by HOOK:
#   export  - the version's weights are written, then the child announces itself (marker file)
#             and waits inside the ONNX export, where the test kills it from outside;
#   pointer - the new version is complete and renamed into place; the child SIGKILLs itself
#             right before CURRENT is replaced (the temp file of the new pointer exists).
CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    import model.export, model.registry
    hook, marker = sys.argv[1], Path(sys.argv[2])
    if hook == "export":
        real = model.export.export_onnx
        def export_onnx(net, path, **kw):
            marker.write_text(str(path))
            time.sleep(120)
            return real(net, path, **kw)
        model.export.export_onnx = export_onnx
    else:
        real_replace = os.replace
        def replace(src, dst, *a, **kw):
            if str(dst).endswith("CURRENT"):
                marker.write_text(str(src))
                os.kill(os.getpid(), signal.SIGKILL)
            return real_replace(src, dst, *a, **kw)
        model.registry.os.replace = replace
    from deploy.cli import main
    sys.exit(main(sys.argv[3:]))
    """
)


def _serving(tmp_path: Path, retrain_args: Callable[..., list[str]]) -> str:
    assert main(retrain_args()) == 0
    reg = ModelRegistry(tmp_path / "models")
    cur = reg.current()
    assert cur is not None
    return cur


def _check_intact(models: Path, old: str) -> ModelRegistry:
    reg = ModelRegistry(models)
    assert reg.current() == old
    assert (models / "CURRENT").read_text().strip() == old
    loaded = reg.load()  # manifest, checksums, config, canary: all as before
    assert loaded.version == old
    return reg


@pytest.mark.slow
def test_kill_9_mid_version_write_leaves_the_serving_version(
    tmp_path: Path, retrain_args: Callable[..., list[str]]
) -> None:
    old = _serving(tmp_path, retrain_args)
    models = tmp_path / "models"
    marker = tmp_path / "writing"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, "export", str(marker), *retrain_args("--force")],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert child.poll() is None, child.stderr.read().decode()[-3000:]  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the child never reached the version write"
            time.sleep(0.05)
        # Mid-write: the new version's folder holds some files but not all.
        (tmp,) = [p for p in models.iterdir() if p.name.startswith(".tmp-")]
        assert (tmp / "model.safetensors").is_file() and not (tmp / "manifest.json").exists()
        child.send_signal(signal.SIGKILL)
        assert child.wait(30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        if child.stderr is not None:
            child.stderr.close()
    reg = _check_intact(models, old)
    assert [v.name for v in reg.versions()] == [old]  # the half-written one is invisible
    # The next retrain works and is judged against the old serving version.
    assert main(retrain_args()) == 0
    assert len(reg.versions()) == 2


@pytest.mark.slow
def test_kill_9_during_pointer_swap_leaves_current_intact(
    tmp_path: Path, retrain_args: Callable[..., list[str]]
) -> None:
    old = _serving(tmp_path, retrain_args)
    models = tmp_path / "models"
    marker = tmp_path / "swapping"
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, "pointer", str(marker), *retrain_args("--force")],
        cwd=REPO, capture_output=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-3000:]
    assert marker.exists()
    reg = _check_intact(models, old)
    new = [v.name for v in reg.versions() if v.name != old]
    assert len(new) == 1  # complete, not promoted: promoting it is an operator's choice
    assert reg.load(new[0]).version == new[0]
    assert json.loads((models / new[0] / "metrics.json").read_text())["gate"]["promote"] is True
