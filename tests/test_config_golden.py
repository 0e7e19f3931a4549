"""Golden compatibility test of the configuration layer: for every ``worker`` command, a YAML file,
a set of ``EVENTCAST_*`` variables and a command line, each setting a handful of values (some the
same setting from two sources, to pin the precedence flags > environment > file), must resolve to
the settings recorded in ``tests/golden/config.json``; and a few bad values must exit 2 with the
recorded message.

The golden file was written by this test *before* the configuration layer moved from hand-written
argparse plumbing to pydantic-settings, and is unchanged since: the switch changed no resolved
setting and no recorded error message. Regenerate it (only for a deliberate, documented change)
with ``EVENTCAST_WRITE_GOLDEN=1 pytest tests/test_config_golden.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden" / "config.json"

KAFKA_YAML = "bootstrap-servers: yaml-host:9092\nsasl-username: from-yaml\n"

# name -> (argv, environment, YAML text). Paths under "@" are made absolute in a temporary folder.
CASES: dict[str, tuple[list[str], dict[str, str], str]] = {
    "start": (
        [
            "start",
            "--model-dir",
            "@/models",
            "--max-batch",
            "512",
            "--guarantee",
            "exactly_once",
            "--max-future-skew",
            "90s",
            "--no-gc-freeze",
            "--shadow-version",
            "v2",
        ],
        {
            "EVENTCAST_MAX_BATCH": "64",
            "EVENTCAST_INPUT_TOPIC": "env-events",
            "EVENTCAST_ONLINE_ACCURACY": "false",
            "EVENTCAST_SERIES_TTL": "3600",
            "EVENTCAST_SECURITY_PROTOCOL": "sasl_plaintext",
            "EVENTCAST_SASL_MECHANISM": "plain",
            "EVENTCAST_SASL_PASSWORD": "secret",
        },
        "bootstrap-servers: yaml-host:9092\nsasl-username: from-yaml\ninput-topic: yaml-events\n"
        "max-delay-ms: 5\nliveness-timeout: 2m\nworker:\n  window_history: 12\n"
        "  redis-prefix: yamlpfx\n",
    ),
    "start-defaults": (["start"], {}, ""),
    "topics-create": (
        ["topics", "create", "--partitions", "3", "--shadow-topic", "fc.shadow"],
        {"EVENTCAST_REPLICATION_FACTOR": "2", "EVENTCAST_OUTPUT_TOPIC": "env-forecasts"},
        KAFKA_YAML + "output-topic: yaml-forecasts\ndlq-topic: yaml.dlq\n",
    ),
    "status": (
        ["status", "--interval", "0.5", "--json"],
        {"EVENTCAST_GROUP_ID": "env-group", "EVENTCAST_REDIS_URL": "redis://env-redis:6379/2"},
        KAFKA_YAML + "group-id: yaml-group\nredis-prefix: yamlpfx\n",
    ),
    "retrain": (
        [
            "retrain",
            "--data",
            "dataset://co2",
            "--model-dir",
            "@/models",
            "--hidden-size",
            "32",
            "--max-epochs",
            "7",
            "--time-budget",
            "90s",
            "--logger",
            "csv",
            "--no-calendar-year",
            "--devices",
            "1",
        ],
        {
            "EVENTCAST_SEED": "3",
            "EVENTCAST_PATIENCE": "4",
            "EVENTCAST_MAX_EPOCHS": "9",
            "EVENTCAST_FORCE": "yes",
        },
        "model:\n  num_layers: 3\n  horizon: 6\n  dropout: 0.2\ntraining:\n  seed: 1\n"
        "  gradient_clip_val: 0.5\nhardware:\n  precision: bf16-mixed\n  strategy: ddp\n"
        "data:\n  test_fraction: 0.25\n",
    ),
    "retrain-defaults": (["retrain", "--data", "synthetic://4", "--model-dir", "m"], {}, ""),
    "evaluate": (
        [
            "evaluate",
            "--data",
            "dataset://co2",
            "--model-dir",
            "@/models",
            "--version",
            "v1",
            "--season",
            "12",
        ],
        {"EVENTCAST_OUT": "@/report.json", "EVENTCAST_VAL_FRACTION": "0.15"},
        "test-fraction: 0.3\nmax-gap-factor: 4\n",
    ),
    "predict": (
        ["predict", "--data", "@/x.csv", "--out", "@/out.jsonl", "--latest"],
        {"EVENTCAST_MODEL_DIR": "@/models", "EVENTCAST_BACKEND": "onnx"},
        "since: '2020-01-01T00:00:00Z'\nmax-event-bytes: 4096\n",
    ),
    "models-list": (["models", "list", "--json"], {"EVENTCAST_MODEL_DIR": "@/env-models"}, ""),
    "models-promote": (["models", "promote", "v7"], {}, "model-dir: m\n"),
    "models-rollback": (["models", "rollback", "--model-dir", "@/m"], {}, "model-dir: other\n"),
    "models-prune": (["models", "prune", "--keep", "2"], {"EVENTCAST_MODEL_DIR": "@/m"}, ""),
    "serve": (
        ["serve", "--model-dir", "@/models", "--port", "8123", "--threads", "2"],
        {
            "EVENTCAST_RELOAD_TOKEN": "tok",
            "EVENTCAST_MAX_BODY_BYTES": "2048",
            "EVENTCAST_REDIS_URL": "redis://env-redis:6379/1",
            "EVENTCAST_REFRESH_SECONDS": "2.5",
        },
        "host: 0.0.0.0\nforecast-topic: yaml-forecasts\ninput-partitions: 4\nport: 9000\n",
    ),
    "plot": (
        ["plot", "--series", "s-1", "--out", "@/p.png", "--scan", "500"],
        {"EVENTCAST_FORECAST_TOPIC": "env-fc", "EVENTCAST_REDIS_PREFIX": "envpfx"},
        KAFKA_YAML + "input-topic: yaml-events\n",
    ),
    "dlq-replay": (
        ["dlq", "replay", "--reason", "schema", "--reason", "non_finite", "--dry-run"],
        {"EVENTCAST_FROM_OFFSET": "10", "EVENTCAST_DLQ_TOPIC": "env.dlq"},
        KAFKA_YAML + "input-topic: yaml-events\n",
    ),
    "series-delete": (
        ["series", "delete", "sensor-9", "--input-partitions", "6"],
        {"EVENTCAST_REDIS_URL": "redis://env-redis:6379/3"},
        "redis-prefix: yamlpfx\ninput-topic: yaml-events\n",
    ),
}

# name -> (argv, environment, YAML text): each must exit 2; the message is recorded.
BAD: dict[str, tuple[list[str], dict[str, str], str]] = {
    "flag-out-of-range": (["start", "--max-batch", "0"], {}, ""),
    "env-not-a-number": (["start"], {"EVENTCAST_MAX_BATCH": "many"}, ""),
    "yaml-bad-choice": (["start"], {}, "guarantee: twice\n"),
    "env-bad-boolean": (["start"], {"EVENTCAST_GC_FREEZE": "maybe"}, ""),
    "bad-servers": (["status", "--bootstrap-servers", "nohostport"], {}, ""),
    "bad-duration": (["start", "--max-future-skew", "soon"], {}, ""),
    "sasl-without-mechanism": (["start"], {"EVENTCAST_SECURITY_PROTOCOL": "SASL_SSL"}, ""),
    "same-topics": (["start", "--input-topic", "x", "--output-topic", "x"], {}, ""),
    "retrain-unknown-yaml-key": (
        ["retrain", "--data", "synthetic://2", "--model-dir", "m"],
        {},
        "training:\n  epochz: 3\n",
    ),
    "serve-without-model-dir": (["serve"], {}, ""),
}


def _abs(text: str, tmp: Path) -> str:
    return str(tmp) + text[1:] if text.startswith("@") else text


def _prepare(
    case: tuple[list[str], dict[str, str], str], tmp: Path
) -> tuple[list[str], dict[str, str]]:
    argv, env, yaml_text = case
    argv = [_abs(a, tmp) for a in argv]
    env = {k: _abs(v, tmp) for k, v in env.items()}
    if yaml_text:
        path = tmp / "settings.yaml"
        path.write_text(yaml_text)
        argv = [*argv, "--config", str(path)]
    return argv, env


def _jsonable(value: Any, tmp: Path) -> Any:
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        return value.replace(str(tmp), "@")
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, tuple | list | set | frozenset):
        items = [_jsonable(v, tmp) for v in value]
        return sorted(items) if isinstance(value, set | frozenset) else items
    return value


def _flatten(obj: Any, tmp: Path, prefix: str = "") -> dict[str, Any]:
    """Dotted attribute path -> JSON value of every leaf setting of ``obj``."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    elif isinstance(obj, argparse.Namespace):
        hidden = {"func", "config_data", "_dests", "config"}
        items = {k: v for k, v in vars(obj).items() if k not in hidden}
    else:
        return {prefix.rstrip("."): _jsonable(obj, tmp)}
    out: dict[str, Any] = {}
    for name, value in sorted(items.items()):
        out.update(_flatten(value, tmp, f"{prefix}{name}."))
    return out


# Attribute paths of the settings objects before the switch -> the same setting's path after it
# (the worker's and the trainer's settings became flat: one field per flag, named as the flag).
RENAMED = {
    "json": "as_json",
    "hardware.devices": "hardware.lightning_devices",
    "data.uri": "data",  # the trainer's --data; its parsed source is data_source
    "data.features": "data_source.features",
    "data.since": "data_source.since",
    "data.until": "data_source.until",
    "data.max_event_bytes": "max_event_bytes",
    "data.kafka": "data_source.kafka",
    "accuracy.enabled": "online_accuracy",
    "accuracy.window": "accuracy_window",
    "batch.max_delay": "batch.max_delay",
    "limits.history": "limits.window_history",
    "limits.max_series": "limits.max_series_per_partition",
    "redis.url": "redis.redis_url",
    "redis.username": "redis.redis_username",
    "redis.password": "redis.redis_password",
    "redis.ssl_ca_certs": "redis.redis_ssl_ca_certs",
    "redis.ssl_certfile": "redis.redis_ssl_certfile",
    "redis.ssl_keyfile": "redis.redis_ssl_keyfile",
    "redis.prefix": "redis.redis_prefix",
    "shadow.version": "shadow_version",
    "shadow.model_dir": "shadow_model_dir",
    "shadow.topic": "shadow_topic_name",
    "shadow.queue_size": "shadow_queue_size",
    "shadow.enabled": "shadow_enabled",
}


def resolve(argv: list[str], env: dict[str, str]) -> Any:
    """The settings object the command builds from ``argv`` and ``env``."""
    from deploy.cli import settings
    from train.settings import check_environment

    obj = settings(argv, environ=env)
    if argv[0] == "retrain":
        return check_environment(obj, env)
    return obj


def _path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def snapshot(
    argv: list[str], env: dict[str, str], tmp: Path, expected: dict[str, Any]
) -> dict[str, Any]:
    """The values of ``obj`` at the golden file's paths (``args.X`` / ``settings.X``: ``X``)."""
    from deploy.cli import parse

    obj = resolve(argv, env)
    if dataclasses.is_dataclass(obj):
        return _flatten(obj, tmp)
    out = {}
    for path in expected:
        new = path.split(".", 1)[1] if path.startswith(("args.", "settings.")) else path
        if new in ("command", "log_level") or new.endswith("_command"):
            # Which command ran, and the option before it: the command line, not settings.
            out[path] = getattr(parse(argv), new)
            continue
        out[path] = _jsonable(_path(obj, RENAMED.get(new, new)), tmp)
    return out


def bad_message(argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Exit code and last stderr line of ``worker ARGV`` in a fresh interpreter."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTCAST_")}
    res = subprocess.run(
        [sys.executable, "-m", "deploy.cli", *argv],
        cwd=REPO,
        env={**full_env, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    return res.returncode, lines[-1] if lines else ""


def _golden() -> dict[str, Any]:
    return json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {"settings": {}, "bad": {}}


WRITE = os.environ.get("EVENTCAST_WRITE_GOLDEN") == "1"


@pytest.mark.parametrize("name", sorted(CASES))
def test_settings_match_the_golden_file(name: str, tmp_path: Path) -> None:
    argv, env = _prepare(CASES[name], tmp_path)
    golden = _golden()
    got = snapshot(argv, env, tmp_path, golden["settings"].get(name, {}))
    if WRITE:
        golden["settings"][name] = got
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
        return
    assert got == golden["settings"][name]


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_values_exit_2_with_the_golden_message(name: str, tmp_path: Path) -> None:
    argv, env = _prepare(BAD[name], tmp_path)
    code, message = bad_message(argv, env)
    message = message.replace(str(tmp_path), "@")
    golden = _golden()
    if WRITE:
        golden["bad"][name] = [code, message]
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
        return
    assert [code, message] == golden["bad"][name]
