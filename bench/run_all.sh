#!/usr/bin/env bash
# Every benchmark table of docs/benchmarks.md in one run (make bench). Starts and stops its own
# Kafka + Redis on free ports on 127.0.0.1; takes about 90 minutes, 55 of them the six latency
# curves (--quick: about 20, 15 of them curves; --only ceilings,drain,latency,soak: the earlier
# 35 and 6; the capacity drains of docs/operations.md "Capacity plan" add about 3 minutes with
# --quick and a Redis Cluster of 6 redis-server processes). The curves' paced producer
# (bench/pacer.c) is compiled on first use by bench/build_pacer.sh into ~/.cache/eventcast; it
# needs a C compiler and librdkafka-dev (installed with apt-get when run as root).
# Usage: bash bench/run_all.sh [VENV] [bench.run args...]   e.g. bash bench/run_all.sh .venv --quick
# BEFORE=<git ref> also drains the worker of that commit (before/after rows; its worker must accept
# the --backend of this run: onnx for commits before torch-bf16 existed).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
[[ $# -gt 0 ]] && shift
mkdir -p bench/results
stamp="$(date -u +%Y%m%dT%H%M%SZ)"
lscpu | grep -E "^(Model name|CPU\(s\)|Thread|Core|Socket|L2|L3|Flags)" | sed 's/^/# /' | cut -c1-160 \
  > "bench/results/$stamp.txt"
"$venv/bin/python" -m bench.run ${BEFORE:+--before "$BEFORE"} \
  --json "bench/results/$stamp.json" "$@" 2>&1 \
  | grep --line-buffered -v "pre-processing before quantization" | tee -a "bench/results/$stamp.txt"
echo "# tables: bench/results/$stamp.txt"
