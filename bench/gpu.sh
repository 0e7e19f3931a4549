#!/usr/bin/env bash
# `make bench-gpu`: GPU check + benchmark of the torch predictor (bench/gpu_check.py). Installs
# nothing and needs no setup: any Python with torch and numpy runs it (a lent GPU machine has only
# torch, onnxruntime, lightning, numpy and safetensors). About 2-3 minutes on an H100/H200; without
# a CUDA GPU it prints a message and exits 0; 1 when a GPU output differs from the CPU.
# Usage: bash bench/gpu.sh [VENV] [gpu_check.py args...], e.g. --dry-run (every part on the CPU).
# Python: $PYTHON if set, else VENV/bin/python when a VENV folder is given, else ./.venv/bin/python
# when it exists, else python3.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-}"
if [[ $# -gt 0 && -d "$1" ]]; then
  [[ -z "$py" ]] && py="$1/bin/python"
  shift
fi
[[ -z "$py" && -x .venv/bin/python ]] && py=.venv/bin/python
[[ -z "$py" ]] && py="$(command -v python3)"
echo "# python: $py"
exec "$py" -m bench.gpu_check "$@"
