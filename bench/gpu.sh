#!/usr/bin/env bash
# GPU check + benchmark of the torch predictor (bench/gpu_check.py). Installs nothing.
# Usage: bash bench/gpu.sh [VENV] [gpu_check.py args...]   (VENV defaults to ./.venv)
# Without a CUDA GPU it prints a message and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
[[ $# -gt 0 ]] && shift
py="$venv/bin/python"
[[ -x "$py" ]] || py="$(command -v python3)"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
fi
exec "$py" bench/gpu_check.py "$@"
