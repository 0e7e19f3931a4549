# eventcast — the two commands that matter first: `make demo` and `make test`.
# Both set everything up on a fresh machine (cached virtual environment, redis-server, kcat,
# the Apache Kafka jars) and reuse what is already there on the next run.
SHELL := /bin/bash
.DEFAULT_GOAL := help

ENV = $$(bash deploy/setup_env.sh)

.PHONY: help setup demo test test-fast chaos stack-up stack-down stack-status lint format bench bench-gpu

help:
	@echo "make demo          set up, start the local stack, train if needed, stream live forecasts"
	@echo "make test          set up and run the whole test suite against its own real Kafka + Redis"
	@echo "make chaos         randomized fault run, ~10 min (CHAOS_ARGS='--seed N --minutes M ...')"
	@echo "make stack-up      start Kafka (127.0.0.1:9092) and Redis (127.0.0.1:6379) locally"
	@echo "make stack-down    stop them        make stack-status    show them"
	@echo "                   (REDIS_CLUSTER=1: Redis is a 3+3-node Redis Cluster on 127.0.0.1:7000-7005)"
	@echo "make lint          ruff + mypy + import contracts   make bench   benchmark tables (bench/)"
	@echo "make bench-gpu     GPU vs CPU check + GPU tables (~3 min, no setup; GPU_ARGS=--dry-run: CPU)"

setup:
	@bash deploy/setup_env.sh >/dev/null

demo:
	@venv=$(ENV) && "$$venv/bin/python" -m deploy.demo

test:
	@venv=$(ENV) && bash deploy/run_tests.sh "$$venv" $(PYTEST_ARGS)

# Everything except the slow fault tests (a quicker loop while developing; CI runs `make test`).
test-fast:
	@venv=$(ENV) && bash deploy/run_tests.sh "$$venv" -m "not slow" $(PYTEST_ARGS)

# Randomized fault run (tests/chaos.py, docs/chaos.md): its own Kafka + Redis on free ports, 2-3
# workers, seeded faults, one history checker; prints the seed, then faults and anomalies.
CHAOS_ARGS ?= --minutes 10 --guarantee exactly_once
chaos:
	@venv=$(ENV) && OMP_NUM_THREADS=1 "$$venv/bin/python" -m tests.chaos $(CHAOS_ARGS)

# REDIS_CLUSTER=1: the stack's Redis is a Redis Cluster of 3 primaries + 3 replicas on
# 127.0.0.1:7000-7005 (deploy/stack.py; EVENTCAST_REDIS_CLUSTER=1 in the environment does the same).
STACK_ARGS = $(if $(filter 1 yes true,$(REDIS_CLUSTER)),--redis-cluster)

stack-up:
	@venv=$(ENV) && "$$venv/bin/python" -m deploy.stack up $(STACK_ARGS)

stack-down:
	@venv=$(ENV) && "$$venv/bin/python" -m deploy.stack down

stack-status:
	@venv=$(ENV) && "$$venv/bin/python" -m deploy.stack status $(STACK_ARGS)

lint:
	@venv=$(ENV) && "$$venv/bin/ruff" check . && "$$venv/bin/ruff" format --check . && "$$venv/bin/mypy" \
	  && "$$venv/bin/lint-imports"

format:
	@venv=$(ENV) && "$$venv/bin/ruff" format . && "$$venv/bin/ruff" check --fix .

# BENCH_ARGS go to bench.run, e.g. BENCH_ARGS=--quick (about 25 minutes instead of 90).
bench:
	@venv=$(ENV) && bash bench/run_all.sh "$$venv" $(BENCH_ARGS)

# GPU check + benchmark (bench/gpu_check.py, docs/benchmarks.md "GPU"): no setup_env (no Java,
# no apt), installs nothing; $PYTHON, else .venv/bin/python, else python3. Exits 0 without a GPU.
bench-gpu:
	@bash bench/gpu.sh $(GPU_ARGS)
