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


# --- the image: deploy/Dockerfile, parsed (no Docker engine here) ------------------------------


def _dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` in order: comments and blank lines dropped, ``\\``
    continuations joined (comment lines inside a continuation skipped, as Docker does)."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, f"{path}: a continuation runs past the end of the file"
    return out


def _exec_form(args: str) -> list[str]:
    """The JSON (exec) form of CMD/ENTRYPOINT/VOLUME; a shell form is refused here on purpose
    (PID 1 would be a shell that does not forward SIGTERM)."""
    import json

    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def _dockerignore_patterns() -> list[tuple[bool, str]]:
    path = REPO / ".dockerignore"
    rules = []
    for line in path.read_text().splitlines() if path.exists() else []:
        line = line.strip()
        if line and not line.startswith("#"):
            negate = line.startswith("!")
            rules.append((negate, line.lstrip("!").strip("/")))
    return rules


def _dockerignored(rel: str, rules: list[tuple[bool, str]]) -> bool:
    """Whether the build context leaves out ``rel`` (a path relative to the context): Docker's
    rules, last match wins, a pattern matching a parent folder leaves out what is under it,
    ``**`` matches any number of folders."""
    import fnmatch

    parts = Path(rel).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for negate, pattern in rules:
        pats = {pattern}
        if pattern.startswith("**/"):
            pats.add(pattern[3:])
        for pre in prefixes:
            cands = [pre] + (["*/" + pre] if pattern.startswith("**/") else [])
            hit = any(fnmatch.fnmatchcase(c, pt) for c in cands for pt in pats)
            if not hit and pattern.startswith("**/"):
                hit = fnmatch.fnmatchcase(Path(pre).name, pattern[3:])
            if hit:
                ignored = not negate
                break
    return ignored


def test_dockerignore_matcher_follows_dockers_rules():
    rules = [
        (False, ".venv"),
        (False, "**/__pycache__"),
        (False, "*.egg-info"),
        (True, "x.egg-info"),
    ]
    assert _dockerignored(".venv", rules)
    assert _dockerignored(".venv/bin/python", rules)
    assert _dockerignored("stream/__pycache__/a.pyc", rules)
    assert _dockerignored("eventcast.egg-info", rules)
    assert not _dockerignored("x.egg-info", rules)
    assert not _dockerignored("stream/store.py", rules)
    assert not _dockerignored("venv", rules)


def test_images_build_from_the_projects_dockerfile():
    """What `docker build -f deploy/Dockerfile .` needs and what the image then runs, checked
    without a Docker engine: every service that builds uses this Dockerfile from the repository
    root; every COPY source from the build context exists and is not left out by .dockerignore;
    the context holds every package and file `pip install .` needs (pyproject's packages and
    readme); the build's import smoke test names modules that are copied; the image runs the
    `worker` entry point of pyproject.toml (`worker start`, which the real CLI parses) under an
    init that forwards SIGTERM; its HEALTHCHECK probes /healthz on the worker's metrics port,
    which it EXPOSEs and binds on all interfaces, as docker-compose.yml's services expect."""
    import re
    import shlex
    import tomllib

    from deploy.cli import main as cli_main

    # 1. docker-compose.yml: every service that builds, builds this Dockerfile from the repo root,
    # and every service running `worker ...` uses the image those builds make.
    dockerfiles = set()
    built_images = set()
    for name, svc in SERVICES.items():
        build = svc.get("build")
        if build is None:
            continue
        build = {"context": build} if isinstance(build, str) else build
        assert (REPO / build["context"]).resolve() == REPO, f"{name}: context {build['context']}"
        dockerfiles.add((REPO / build["context"] / build.get("dockerfile", "Dockerfile")).resolve())
        built_images.add(svc.get("image"))
    assert dockerfiles == {REPO / "deploy" / "Dockerfile"}, dockerfiles
    assert len(built_images) == 1, built_images
    image = built_images.pop()
    for name in WORKER_SERVICES:
        assert SERVICES[name].get("image") == image, f"{name} does not run the built image"

    steps = _dockerfile_instructions(REPO / "deploy" / "Dockerfile")
    stages: list[list[tuple[str, str]]] = []
    for ins, args in steps:
        if ins == "FROM":
            stages.append([])
        if not stages:
            assert ins == "ARG", f"{ins} before the first FROM"  # only ARG may come first
            continue
        stages[-1].append((ins, args))
    assert len(stages) >= 1

    # 2. COPY/ADD from the build context: every source exists and is in the context.
    rules = _dockerignore_patterns()
    copied: set[str] = set()
    for stage in stages:
        for ins, args in stage:
            if ins not in ("COPY", "ADD"):
                continue
            words = shlex.split(args)
            flags = [w for w in words if w.startswith("--")]
            paths = [w for w in words if not w.startswith("--")]
            if any(f.startswith("--from=") for f in flags):
                continue  # from another stage, not the context
            assert len(paths) >= 2, f"{ins} {args}"
            for src in paths[:-1]:
                assert not src.startswith(("/", "..")), f"{ins} {src}: outside the context"
                assert (REPO / src).exists(), f"{ins} {src}: not in the repository"
                assert not _dockerignored(src, rules), f"{ins} {src}: left out by .dockerignore"
                copied.add(src.rstrip("/"))

    # 3. `pip install .` in the build stage: pyproject, every package it declares and its readme
    # are copied; the import smoke test after it names copied modules.
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert {"pyproject.toml", project["project"]["readme"]} <= copied, copied
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= copied, f"packages not copied: {packages - copied}"
    build_stage = next(st for st in stages if any(i == "RUN" and "pip install" in a for i, a in st))
    runs = " ".join(a for i, a in build_stage if i == "RUN")
    assert re.search(r"pip install (--no-deps )?\.", runs), "the project itself is not installed"
    for group in re.findall(r'python -c "import ([^"]+)"', runs):
        for module in (m.strip() for m in group.split(",")):
            top = module.split(".")[0]
            assert top in copied, f"smoke test imports {module}, not copied"
            rel = Path(*module.split("."))
            assert (REPO / rel).with_suffix(".py").exists() or (REPO / rel / "__init__.py").exists()

    # 4. What the image runs: ENTRYPOINT (an init) + CMD = the `worker` console script of
    # pyproject.toml, whose target is the real CLI's main, with a command the CLI parses.
    final = stages[-1]
    last = {ins: args for ins, args in final}
    entry = _exec_form(last["ENTRYPOINT"]) if "ENTRYPOINT" in last else []
    cmd = _exec_form(last["CMD"])
    assert entry in ([], ["/usr/bin/tini", "--"], ["tini", "--"]), entry
    if entry:
        assert "tini" in " ".join(a for i, a in final if i == "RUN"), "tini is not installed"
    argv = entry[2:] + cmd if entry else cmd
    if argv[:3] == ["python", "-m", "deploy.cli"]:
        argv = ["worker", *argv[3:]]
    assert argv[0] == "worker", argv
    assert project["project"]["scripts"]["worker"] == "deploy.cli:main"
    assert callable(cli_main)
    assert callable(parse(argv[1:]).func)
    # The console script lives in the venv the final stage copies from the build stage and puts
    # first on PATH.
    assert any(i == "COPY" and "--from=" in a and "/opt/venv" in a for i, a in final)
    env = " ".join(a for i, a in final if i == "ENV")
    assert re.search(r"PATH=/opt/venv/bin:", env), "the venv's bin is not on PATH"

    # 5. Health check and ports: HEALTHCHECK probes /healthz on EVENTCAST_HEALTH_PORT, default the
    # worker's metrics port; that port is EXPOSEd, the worker binds it on all interfaces, and the
    # compose services agree (the worker exposes that port, serve sets EVENTCAST_HEALTH_PORT to
    # the port it listens on and EXPOSEd too).
    health = last.get("HEALTHCHECK", "")
    m = re.search(r"EVENTCAST_HEALTH_PORT', '(\d+)'\)", health)
    assert m and "/healthz" in health, health
    default_port = int(m.group(1))
    exposed = {int(p.split("/")[0]) for i, a in final if i == "EXPOSE" for p in a.split()}
    assert default_port in exposed, (default_port, exposed)
    image_env = dict(re.findall(r"(\w+)=(\S+)", env))
    assert image_env.get("EVENTCAST_METRICS_HOST") == "0.0.0.0", image_env
    for key in image_env:
        if key.startswith(ENV_PREFIX):
            assert key[len(ENV_PREFIX) :].lower() in _setting_names(["start"]), key
    worker_cmd = SERVICES["worker"]["command"]
    worker_port = (
        int(worker_cmd[worker_cmd.index("--metrics-port") + 1])
        if "--metrics-port" in worker_cmd
        else cli_settings(worker_cmd[1:], environ=_environment(SERVICES["worker"])).metrics_port
    )
    assert worker_port == default_port
    assert str(default_port) in [str(p) for p in SERVICES["worker"].get("expose", [])]
    serve = SERVICES.get("serve")
    if serve is not None:
        serve_port = int(serve["command"][serve["command"].index("--port") + 1])
        assert int(serve["environment"]["EVENTCAST_HEALTH_PORT"]) == serve_port
        assert serve_port in exposed, (serve_port, exposed)


def test_redis_cluster_profile_is_three_primaries_and_three_replicas():
    nodes = [name for name in SERVICES if name.startswith("redis-node-")]
    assert len(nodes) == 6
    for name in nodes:
        node = SERVICES[name]
        assert node["profiles"] == ["cluster"]
        command = node["command"]
        assert command[command.index("--cluster-enabled") + 1] == "yes"
        assert int(command[command.index("--cluster-node-timeout") + 1]) <= 5000
        assert command[command.index("--appendonly") + 1] == "yes"
        assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
        assert f"{name}-data" in COMPOSE["volumes"]
    create = SERVICES["redis-cluster-create"]
    assert create["profiles"] == ["cluster"]
    assert "--cluster-replicas 1" in create["command"][-1]
    assert set(create["depends_on"]) == set(nodes)
