"""The package layering (``[tool.importlinter]`` in pyproject.toml) holds: ``lint-imports`` exits 0
and reports every contract KEPT (deploy > train > stream > model; train never imports the worker
loop; nothing outside ``tests`` imports ``tests``)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_import_contract_is_kept() -> None:
    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    names = [c["name"] for c in contracts["contracts"]]
    assert len(names) >= 3
    script = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run(
        [str(script), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=240
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    for name in names:
        assert f"{name} KEPT" in out, out
    assert f"Contracts: {len(names)} kept, 0 broken." in out, out
