"""``make bench-gpu`` (bench/gpu.sh → bench/gpu_check.py) runs on a lent GPU machine whose Python
has only torch, onnxruntime, lightning, numpy and safetensors, and installs nothing.

Without a GPU this is proved on the script's ``--dry-run`` (every part on the CPU, tiny sizes)
run in a subprocess behind an import guard: a ``sys.meta_path`` finder refuses the project's
other dependencies (Kafka, Redis, pydantic, orjson, PyYAML, onnx, ...), and every module the run
loaded must belong to the standard library, the repository, or one of those five distributions
and what they require. The exit statuses are checked too: 0 with a message when torch sees no
GPU, 1 when an output check fails.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
from importlib.metadata import PackageNotFoundError, distribution, packages_distributions
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
DEVICE_PACKAGES = ("torch", "onnxruntime", "lightning", "numpy", "safetensors")
# Installed here, absent there (or, like PyYAML, present there only because lightning needs it):
# any import of these fails loudly instead of passing because this venv happens to have it.
REFUSED = (
    "aiokafka",
    "kafka",
    "orjson",
    "redis",
    "pydantic",
    "pydantic_settings",
    "yaml",
    "faust",
    "fastapi",
    "uvicorn",
    "prometheus_client",
    "onnx",
    "onnxscript",
    "pandas",
    "statsforecast",
    "statsmodels",
    "scipy",
    "sklearn",
    "mlflow",
    "optuna",
    "httpx",
)
OWN = ("bench", "model", "stream")

GUARD = """
import importlib.abc, json, sys
REFUSED = set({refused!r})
assert not REFUSED & {{m.partition(".")[0] for m in sys.modules}}, "refused module preloaded"


class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in REFUSED:
            raise ModuleNotFoundError(f"import guard: no {{name}} on the GPU machine", name=name)
        return None


sys.meta_path.insert(0, Refuse())
before = set(sys.modules)
import bench.gpu_check as gpu_check
{prelude}
rc = gpu_check.main(sys.argv[1:])
tops = {{m.partition(".")[0] for m in set(sys.modules) - before}}
print("LOADED " + json.dumps({{m: getattr(sys.modules.get(m), "__file__", None) for m in tops}}))
sys.exit(rc)
"""


def run_guarded(
    *args: str, prelude: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    code = GUARD.format(refused=REFUSED, prelude=prelude)
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip


def loaded_modules(out: str) -> dict[str, str | None]:
    """Top-level module -> its file (None: built in, or made at run time such as Cython's
    ``_cython_3_x`` or multiprocessing's ``__mp_main__``) of each module the run loaded."""
    line = next(ln for ln in out.splitlines() if ln.startswith("LOADED "))
    return json.loads(line.removeprefix("LOADED "))  # type: ignore[no-any-return]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def device_modules() -> set[str]:
    """Top-level modules of the GPU machine's five distributions and everything they require
    (without extras), as installed in this environment."""
    seen: set[str] = set()
    todo = list(DEVICE_PACKAGES)
    while todo:
        name = _norm(todo.pop())
        if name in seen:
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError:  # a requirement for another platform
            continue
        seen.add(name)
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return {
        module
        for module, dists in packages_distributions().items()
        if any(_norm(d) in seen for d in dists)
    }


def test_dry_run_needs_only_the_gpu_machines_packages(tmp_path: Path) -> None:
    out_json = tmp_path / "gpu.json"
    proc = run_guarded("--dry-run", "--json", str(out_json))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "DRY RUN on the CPU" in out
    for model in ("default (h256, 3 layers)", "small (h64, 2 layers)"):
        for part in ("## 1.", "## 2.", "## 3."):
            assert f"{part} {model}" in out, out
    for mode in ("fp32", "fp32+graphs", "tf32", "tf32+graphs", "bf16", "bf16+graphs"):
        assert re.search(rf"^\| {re.escape(mode)} +\| +[\d.e+-]+ \|", out, re.M), (mode, out)
    assert re.search(r"^\| worker\+graphs +\| +4 \| +[\d,]+ \|", out, re.M), out
    assert "|  append |  gather |  inputs |   model |  finite |" in out, out
    assert "outputs match the CPU" in out, out
    figures = json.loads(out_json.read_text())
    assert set(figures) >= {"card", "check", "throughput", "stage"}
    assert all(len(rows) == 7 for rows in figures["check"].values())
    assert all(len(rows) == 6 * 2 for rows in figures["throughput"].values())
    assert all(len(rows) == 2 * 2 for rows in figures["stage"].values())

    allowed = device_modules() | set(sys.stdlib_module_names) | set(OWN)
    stdlib = {Path(sysconfig.get_paths()[k]).resolve() for k in ("stdlib", "platstdlib")}
    loaded = loaded_modules(proc.stdout)
    assert {"torch", "numpy", "model", "stream"} <= set(loaded)
    assert not set(loaded) & set(REFUSED)
    foreign = [
        f"{m} ({file})"
        for m, file in loaded.items()
        if m not in allowed and file is not None and not stdlib & set(Path(file).resolve().parents)
    ]
    assert not foreign, f"modules outside {DEVICE_PACKAGES} and their requirements: {foreign}"


def test_without_a_gpu_it_exits_0_with_a_message() -> None:
    env = os.environ | {"CUDA_VISIBLE_DEVICES": ""}
    proc = run_guarded(env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no CUDA GPU visible to torch" in proc.stdout
    assert "## 1." not in proc.stdout


def test_a_failed_check_exits_1() -> None:
    prelude = "gpu_check.TF32 = gpu_check.dataclasses.replace(gpu_check.TF32, limit=-1.0)"
    proc = run_guarded("--dry-run", "--parts", "check", prelude=prelude)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert re.search(r"^\| tf32 +\|.*\| FAIL", out, re.M), out
    assert re.search(r"^\| fp32 +\|.*\| ok", out, re.M), out
    assert "DIFFER from the CPU beyond their limits" in out


def test_make_bench_gpu_calls_no_setup() -> None:
    """The target runs bench/gpu.sh with $PYTHON, without deploy/setup_env.sh (Java, apt)."""
    plan = subprocess.run(
        ["make", "-n", "bench-gpu"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert plan.returncode == 0, plan.stderr
    assert "bench/gpu.sh" in plan.stdout and "setup_env" not in plan.stdout, plan.stdout
    env = os.environ | {"PYTHON": sys.executable}
    proc = subprocess.run(
        ["make", "-s", "bench-gpu", "GPU_ARGS=--dry-run --parts check"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "## 1. small (h64, 2 layers)" in proc.stdout
    assert "## 2." not in proc.stdout
