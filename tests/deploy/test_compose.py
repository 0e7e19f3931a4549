"""docker-compose.yml cannot run here (no Docker engine), so it is checked by parsing it: every
service that runs `worker ...` must pass the real CLI's parser with its real environment, and
every file it mounts must exist."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deploy.cli import parse
from deploy.cli import settings as cli_settings
from stream.config import ENV_PREFIX

REPO = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
# Read by the image or the process, not flags: the reload token (a secret, never a flag), the log
# level (a global option) and the port the image's HEALTHCHECK probes.
NON_FLAG_ENV = {"EVENTCAST_RELOAD_TOKEN", "EVENTCAST_LOG_LEVEL", "EVENTCAST_HEALTH_PORT"}
WORKER_SERVICES = [
    name for name, svc in SERVICES.items() if svc.get("command", [None])[0] == "worker"
]


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    return {k: str(v) for k, v in env.items() if v is not None}


def _setting_names(argv: list[str]) -> set[str]:
    """The settings (field names) of the command ``argv`` selects."""
    return set(parse(argv).settings_cls.model_fields)


def test_core_services_are_defined():
    assert {"kafka", "redis", "worker", "trainer", "prometheus", "grafana"} <= set(SERVICES)
    assert SERVICES["trainer"]["profiles"] == ["trainer"]
    assert SERVICES["prometheus"]["profiles"] == ["monitoring"]
    assert SERVICES["grafana"]["profiles"] == ["monitoring"]
    assert "container_name" not in SERVICES["worker"]  # scalable with --scale


def test_kafka_is_kraft_and_single_node_safe():
    env = SERVICES["kafka"]["environment"]
    assert SERVICES["kafka"]["image"].startswith("apache/kafka:4.")
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert str(env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"]) == "false"
    for key in (
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
    ):
        assert int(env[key]) == 1


def test_redis_persists_with_aof_and_never_evicts():
    command = SERVICES["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"


@pytest.mark.parametrize("name", WORKER_SERVICES)
def test_worker_commands_parse_with_the_real_cli(name: str):
    service = SERVICES[name]
    argv = list(service["command"][1:])
    env = _environment(service)
    # Every EVENTCAST_* variable must name a real flag of that subcommand (or a known global).
    dests = _setting_names(argv)
    for key in env:
        if key.startswith(ENV_PREFIX) and key not in NON_FLAG_ENV:
            assert key[len(ENV_PREFIX) :].lower() in dests, (
                f"{name}: {key} is not a flag of {argv[0]}"
            )
    # The real CLI resolves the command line with the service's environment layered in.
    assert callable(parse(argv).func)
    cli_settings(argv, environ=env)


def test_mounted_files_exist():
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name} mounts missing {source}"


def test_images_build_from_the_projects_dockerfile():
    for name in WORKER_SERVICES:
        build = SERVICES[name].get("build")
        if build:
            assert (REPO / build["context"] / build["dockerfile"]).exists(), name
