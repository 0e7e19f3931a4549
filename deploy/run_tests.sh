#!/usr/bin/env bash
# Run the whole test suite against a stack of its own: Kafka and Redis on free ports in a temporary
# folder, started here and stopped on exit (whatever happens), so a stack the user runs on the
# default ports is never touched. Usage: deploy/run_tests.sh VENV [pytest args...]
set -euo pipefail
venv=$1; shift
here=$(cd "$(dirname "$0")/.." && pwd)
py="$venv/bin/python"
cd "$here"

stack_dir=$(mktemp -d "${TMPDIR:-/tmp}/eventcast-test-stack.XXXXXX")
export EVENTCAST_STACK_DIR="$stack_dir"
export EVENTCAST_KAFKA_PORT=$("$py" -c 'from deploy.stack import free_port; print(free_port())')
export EVENTCAST_REDIS_PORT=$("$py" -c 'from deploy.stack import free_port; print(free_port())')

cleanup() {
  "$py" -m deploy.stack down >/dev/null 2>&1 || true
  rm -rf "$stack_dir"
}
trap cleanup EXIT INT TERM

echo "[test] starting a stack of its own: Kafka 127.0.0.1:$EVENTCAST_KAFKA_PORT, Redis 127.0.0.1:$EVENTCAST_REDIS_PORT"
"$py" -m deploy.stack up --no-topics
export EVENTCAST_TEST_BOOTSTRAP="127.0.0.1:$EVENTCAST_KAFKA_PORT"
export EVENTCAST_TEST_REDIS_URL="redis://127.0.0.1:$EVENTCAST_REDIS_PORT/0"
# Keep test processes from fighting over the two cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# pytest exits non-zero on any failure, and with 5 when it collected no test: both fail the run.
"$py" -m pytest "$@"
