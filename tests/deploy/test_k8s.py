"""deploy/k8s/ cannot be applied here (no cluster), so it is checked by parsing it against the code
it deploys: every pod runs a command the real CLI parses, and resolves to valid settings with the
pod's own environment and the mounted ConfigMap; the probes, ports, consumer group, topics, model
directory and partition count the manifests name are the ones those settings give; and what
KEDA, the PodDisruptionBudget and the CronJobs point at is what the workers use.

Values that Kubernetes fills in at run time are replaced by stand-ins: a Secret's value by a
placeholder, the downward API's pod name by a StatefulSet-style name, the CPU limit by its number.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.cli import parse
from deploy.cli import settings as cli_settings
from stream import shadow
from stream.commands import cmd_start
from stream.config import ENV_PREFIX, Settings
from stream.metrics import HealthServer
from tests.test_contract import flag_sections

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
KUSTOMIZATION = yaml.safe_load((K8S / "kustomization.yaml").read_text())
SECRET_EXAMPLE = "secret.example.yaml"
POD_SPEC_PATHS = {  # where each workload kind keeps its pod template
    "StatefulSet": ("spec", "template"),
    "Deployment": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}
# Settings whose values are credentials: they must come from a Secret, never from the manifests.
CREDENTIALS = {"sasl_username", "sasl_password", "redis_password", "reload_token"}
# KEDA's kafka scaler names for the workers' --sasl-mechanism (keda.sh, "Apache Kafka" scaler).
KEDA_SASL = {"PLAIN": "plaintext", "SCRAM-SHA-256": "scram_sha256", "SCRAM-SHA-512": "scram_sha512"}


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


RESOURCES = [doc for name in KUSTOMIZATION["resources"] for doc in _documents(K8S / name)]


def _find(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [r for r in RESOURCES if r["kind"] == kind and name in (None, r["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _pod_template(workload: dict[str, Any]) -> dict[str, Any]:
    node = workload
    for key in POD_SPEC_PATHS[workload["kind"]]:
        node = node[key]
    return node


@dataclass
class Pod:
    """One container of a workload, with what it runs and the settings that resolve to."""

    workload: dict[str, Any]
    container: dict[str, Any]
    argv: list[str]  # the container's args with the ConfigMap paths pointing at local copies
    env: dict[str, str]  # its environment, with stand-ins for what Kubernetes fills in

    @property
    def name(self) -> str:
        return f"{self.workload['kind']}/{self.workload['metadata']['name']}"

    @property
    def spec(self) -> dict[str, Any]:
        return _pod_template(self.workload)["spec"]

    def settings(self) -> Any:
        """The settings object the real CLI builds for this container (flags, then environment,
        then the ``--config`` file)."""
        return cli_settings(self.argv[1:], environ=self.env)

    def settings_class(self) -> type[Settings]:
        cls: type[Settings] = parse(self.argv[1:]).settings_cls
        return cls

    def env_source(self, name: str) -> dict[str, Any]:
        entries = [e for e in self.container.get("env", []) if e["name"] == name]
        assert len(entries) == 1, f"{self.name}: {name} set {len(entries)} times"
        return entries[0]

    def mount(self, path: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """The volume mount at ``path`` and the volume it mounts."""
        mounts = [m for m in self.container.get("volumeMounts", []) if m["mountPath"] == path]
        assert len(mounts) == 1, f"{self.name}: nothing (or several) mounted at {path}"
        volumes = [v for v in self.spec["volumes"] if v["name"] == mounts[0]["name"]]
        assert len(volumes) == 1, f"{self.name}: volume {mounts[0]['name']} not defined"
        return mounts[0], volumes[0]

    def port(self, name_or_number: str | int) -> int:
        """A probe's or service's port: a number, or the name of one of the container's ports."""
        if isinstance(name_or_number, int):
            return name_or_number
        ports = [p for p in self.container.get("ports", []) if p.get("name") == name_or_number]
        assert len(ports) == 1, f"{self.name}: no container port named {name_or_number}"
        return int(ports[0]["containerPort"])


def _cpu_count(quantity: str) -> str:
    """A CPU quantity as the downward API hands it with divisor 1: whole cores, rounded up."""
    text = str(quantity)
    cores = int(text[:-1]) / 1000 if text.endswith("m") else float(text)
    return str(math.ceil(cores))


def _stand_in(pod_name: str, container: dict[str, Any], entry: dict[str, Any]) -> str:
    """What Kubernetes puts in an environment variable, for the test."""
    if "value" in entry:
        return str(entry["value"])
    source = entry["valueFrom"]
    if "secretKeyRef" in source:
        return f"placeholder-{source['secretKeyRef']['key']}"
    if "fieldRef" in source:
        assert source["fieldRef"]["fieldPath"] == "metadata.name", source
        return pod_name
    if "resourceFieldRef" in source:
        ref = source["resourceFieldRef"]
        assert ref["resource"] == "limits.cpu" and str(ref.get("divisor", "1")) == "1", ref
        return _cpu_count(container["resources"]["limits"]["cpu"])
    raise AssertionError(f"unexpected environment source {source}")


def _pods(tmp_root: Path) -> Iterator[Pod]:
    """Every container of every workload in the kustomization, its ConfigMap volumes written
    under ``tmp_root`` and its args rewritten to read them from there."""
    for workload in RESOURCES:
        if workload["kind"] not in POD_SPEC_PATHS:
            continue
        spec = _pod_template(workload)["spec"]
        pod_name = f"{workload['metadata']['name']}-0"  # a StatefulSet's first pod
        for container in spec["containers"]:
            argv = [str(a) for a in container.get("args", [])]
            for mount in container.get("volumeMounts", []):
                volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
                if "configMap" not in volume:
                    continue
                config_map = _find("ConfigMap", volume["configMap"]["name"])
                local = tmp_root / workload["metadata"]["name"] / mount["name"]
                local.mkdir(parents=True, exist_ok=True)
                for filename, text in config_map["data"].items():
                    (local / filename).write_text(text)
                prefix = mount["mountPath"].rstrip("/") + "/"
                argv = [
                    str(local) + "/" + a[len(prefix) :] if a.startswith(prefix) else a for a in argv
                ]
            env = {e["name"]: _stand_in(pod_name, container, e) for e in container.get("env", [])}
            yield Pod(workload, container, argv, env)


@pytest.fixture(scope="module")
def pods(tmp_path_factory: pytest.TempPathFactory) -> list[Pod]:
    return list(_pods(tmp_path_factory.mktemp("k8s")))


def _pods_running(pods: list[Pod], *command: str) -> list[Pod]:
    return [p for p in pods if p.argv[1 : 1 + len(command)] == list(command)]


def _the_pod_running(pods: list[Pod], *command: str) -> Pod:
    found = _pods_running(pods, *command)
    assert len(found) == 1, f"expected one container running `worker {' '.join(command)}`"
    return found[0]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# ---- the files ---------------------------------------------------------------------------------


def test_kustomization_applies_every_manifest_but_the_secret_example():
    """`kubectl apply -k deploy/k8s` applies every manifest of the folder, and never the example
    Secret: applying placeholders would overwrite the real credentials."""
    listed = set(KUSTOMIZATION["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert SECRET_EXAMPLE in on_disk
    assert listed == on_disk - {SECRET_EXAMPLE}, (listed, on_disk)
    assert not [r for r in RESOURCES if r["kind"] == "Secret"]


# ---- every pod: the real CLI, real settings ----------------------------------------------------


def test_every_pod_runs_a_worker_command_the_cli_resolves(pods: list[Pod]):
    """Each container runs `worker ...` through the image's ENTRYPOINT (tini, which forwards
    SIGTERM; a `command:` would replace it), and its args, environment and ConfigMap give valid
    settings; every EVENTCAST_* variable it sets is a setting of that command (an unknown one
    would be ignored silently)."""
    assert len(pods) >= 5  # topics, worker, retrain, prune, serve
    for pod in pods:
        assert "command" not in pod.container, f"{pod.name}: command replaces tini"
        assert pod.argv[0] == "worker", f"{pod.name}: {pod.argv}"
        fields = set(pod.settings_class().model_fields)
        for key in pod.env:
            assert key.startswith(ENV_PREFIX), f"{pod.name}: {key} is not an EVENTCAST_ setting"
            assert key[len(ENV_PREFIX) :].lower() in fields, f"{pod.name}: {key} is no setting"
        pod.settings()  # raises ConfigError on a bad value, a missing credential, ...


def test_the_config_file_holds_only_real_settings(pods: list[Pod]):
    """Every key of the shared YAML file is a setting of a command that reads it: a misspelt key
    would be ignored without a word (stream/config.py keeps only the keys a command knows)."""
    config_map = _find("ConfigMap", "eventcast-config")
    readers = [p for p in pods if "--config" in p.argv]
    known = set().union(*(p.settings_class().model_fields for p in readers))
    for filename, text in config_map["data"].items():
        document = yaml.safe_load(text)
        keys = []
        for key, value in document.items():
            inner = value.keys() if isinstance(value, dict) else [key]
            keys += [str(k).replace("-", "_") for k in inner]
        unknown = sorted(set(keys) - known)
        assert not unknown, f"{filename}: no command reads {unknown}"
        assert not set(keys) & CREDENTIALS, f"{filename}: credentials belong in the Secret"


def test_credentials_come_from_the_secret(pods: list[Pod]):
    """Credentials are never written in a manifest: every credential variable is a secretKeyRef,
    every key referenced is one the example Secret documents, and the example holds only
    placeholders."""
    example = _documents(K8S / SECRET_EXAMPLE)[0]
    documented = set(example["stringData"])
    assert set(example["stringData"].values()) == {"CHANGE-ME"}
    referenced = set()
    for pod in pods:
        for entry in pod.container.get("env", []):
            setting = entry["name"][len(ENV_PREFIX) :].lower()
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            if setting in CREDENTIALS:
                assert ref is not None, f"{pod.name}: {entry['name']} not from a Secret"
            if ref is not None:
                assert ref["name"] == example["metadata"]["name"], ref
                referenced.add(ref["key"])
    keda_auth = _find("TriggerAuthentication")
    for ref in keda_auth["spec"]["secretTargetRef"]:
        assert ref["name"] == example["metadata"]["name"], ref
        referenced.add(ref["key"])
    assert referenced == documented, (referenced, documented)


def test_threads_follow_each_containers_own_cpu_limit(pods: list[Pod]):
    """Inference threads default to the machine's cores: in a pod that is the node's count, far
    above its CPU limit. Where EVENTCAST_THREADS is set, it is this container's CPU limit."""
    with_threads = [p for p in pods if "EVENTCAST_THREADS" in p.env]
    assert _the_pod_running(pods, "start") in with_threads
    for pod in with_threads:
        ref = pod.env_source("EVENTCAST_THREADS")["valueFrom"]["resourceFieldRef"]
        assert ref["containerName"] == pod.container["name"], f"{pod.name}: {ref}"
        limits = pod.container["resources"]["limits"]
        assert "cpu" in limits, f"{pod.name}: no CPU limit"
        assert pod.settings().threads == int(_cpu_count(limits["cpu"]))


# ---- the worker --------------------------------------------------------------------------------


def test_the_worker_runs_the_contracts_start_command(pods: list[Pod]):
    """`worker start` (docs/contract.md), each flag one the contract lists for it."""
    worker = _the_pod_running(pods, "start")
    assert parse(worker.argv[1:]).func is cmd_start
    contract_flags = flag_sections()["worker start"]
    for arg in worker.argv[2:]:
        if arg.startswith("--"):
            assert f"`{arg.split('=')[0]}`" in contract_flags, f"{arg} not in the contract"


def test_the_workers_group_instance_id_is_its_stable_pod_name(pods: list[Pod]):
    """Static membership: --group-instance-id is the pod name (downward API), and the pods are a
    StatefulSet's, whose names survive restarts (a Deployment's would not, and every restart
    would leave a stale static member holding partitions until the session timeout)."""
    worker = _the_pod_running(pods, "start")
    assert worker.workload["kind"] == "StatefulSet"
    source = worker.env_source("EVENTCAST_GROUP_INSTANCE_ID")["valueFrom"]
    assert source == {"fieldRef": {"fieldPath": "metadata.name"}}
    # Nothing of higher precedence (a flag) or in the file overrides it.
    assert worker.settings().group_instance_id == f"{worker.workload['metadata']['name']}-0"
    # KEDA owns the replica count; a fixed one here would reset it at every apply.
    assert "replicas" not in worker.workload["spec"]


def test_the_probes_reach_the_workers_health_endpoint(pods: list[Pod]):
    """Liveness on the path that fails when the worker is stuck, readiness (and start-up) on the
    path that fails when it is not ready, both on the worker's metrics port, which listens on
    the pod's address (the default 127.0.0.1 is unreachable for the kubelet)."""
    with warnings.catch_warnings():
        # starlette's TestClient warns at import that httpx will be replaced by httpx2
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient

    worker = _the_pod_running(pods, "start")
    settings = worker.settings()
    assert settings.metrics_port > 0
    assert settings.metrics_host in ("0.0.0.0", "::"), settings.metrics_host
    probes = {
        kind: worker.container[kind]["httpGet"]
        for kind in ("livenessProbe", "readinessProbe", "startupProbe")
    }
    for kind, probe in probes.items():
        assert worker.port(probe["port"]) == settings.metrics_port, kind

    def status(path: str, *, alive: bool, ready: bool) -> int:
        server = HealthServer(None, lambda: ready, "127.0.0.1", 0, alive=lambda: alive)  # type: ignore[arg-type]
        with TestClient(server.app()) as client:
            return client.get(path).status_code

    live = probes["livenessProbe"]["path"]
    assert status(live, alive=True, ready=False) == 200  # not ready is no reason to restart
    assert status(live, alive=False, ready=True) == 503
    for kind in ("readinessProbe", "startupProbe"):
        path = probes[kind]["path"]
        assert status(path, alive=True, ready=True) == 200, kind
        assert status(path, alive=True, ready=False) == 503, kind


def test_the_grace_period_outlasts_the_workers_drain(pods: list[Pod]):
    """On SIGTERM the worker finishes its batches in flight (a batch that does not move on for
    --liveness-timeout is stuck), then drains the shadow queue: the kubelet must wait longer
    than both before its SIGKILL."""
    worker = _the_pod_running(pods, "start")
    drain = worker.settings().liveness_timeout + shadow._DRAIN_TIMEOUT
    assert worker.spec["terminationGracePeriodSeconds"] > drain


def test_the_headless_service_governs_the_worker_pods(pods: list[Pod]):
    worker = _the_pod_running(pods, "start")
    service = _find("Service", worker.workload["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    labels = _pod_template(worker.workload)["metadata"]["labels"]
    assert _selects(service["spec"]["selector"], labels)
    ports = {worker.port(p["targetPort"]) for p in service["spec"]["ports"]}
    assert worker.settings().metrics_port in ports


def test_the_disruption_budget_covers_exactly_the_workers(pods: list[Pod]):
    budget = _find("PodDisruptionBudget")
    selector = budget["spec"]["selector"]["matchLabels"]
    worker = _the_pod_running(pods, "start")
    assert _selects(selector, _pod_template(worker.workload)["metadata"]["labels"])
    for other in pods:
        if other is not worker:
            labels = _pod_template(other.workload)["metadata"]["labels"]
            assert not _selects(selector, labels), f"the budget also selects {other.name}"
    assert budget["spec"].get("maxUnavailable") == 1


# ---- autoscaling -------------------------------------------------------------------------------


def test_keda_scales_the_workers_on_their_own_groups_lag(pods: list[Pod]):
    """The kafka trigger reads the lag of the workers' consumer group on their input topic, at
    their brokers, with their security settings and credentials."""
    worker = _the_pod_running(pods, "start")
    settings = worker.settings()
    scaled = _find("ScaledObject")
    target = scaled["spec"]["scaleTargetRef"]
    assert target.get("kind") == "StatefulSet"
    assert target["name"] == worker.workload["metadata"]["name"]
    assert scaled["spec"]["minReplicaCount"] == 1
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert meta["consumerGroup"] == settings.group_id
    assert meta["topic"] == settings.input_topic
    servers = {s.strip() for s in meta["bootstrapServers"].split(",")}
    assert servers == {s.strip() for s in settings.bootstrap_servers.split(",")}
    assert meta.get("offsetResetPolicy", "latest") == settings.auto_offset_reset
    if settings.security_protocol.startswith("SASL"):
        assert meta.get("sasl") == KEDA_SASL[settings.sasl_mechanism]
    else:
        assert meta.get("sasl", "none") == "none"
    assert meta.get("tls", "disable") == ("enable" if settings.uses_tls else "disable")

    auth = _find("TriggerAuthentication", trigger["authenticationRef"]["name"])
    refs = {r["parameter"]: (r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
    for parameter, variable in (("username", "SASL_USERNAME"), ("password", "SASL_PASSWORD")):
        ref = worker.env_source(ENV_PREFIX + variable)["valueFrom"]["secretKeyRef"]
        assert refs[parameter] == (ref["name"], ref["key"]), parameter


def test_max_replicas_equal_the_input_topics_partitions(pods: list[Pod]):
    """A worker beyond the partition count idles: maxReplicaCount is the partition count the
    topics Job creates the workers' input topic with."""
    topics = _the_pod_running(pods, "topics", "create").settings()
    worker = _the_pod_running(pods, "start").settings()
    for name in ("input_topic", "output_topic", "dlq_topic"):
        assert getattr(topics, name) == getattr(worker, name), name
    assert _find("ScaledObject")["spec"]["maxReplicaCount"] == topics.partitions


# ---- the model directory -----------------------------------------------------------------------


def test_the_trainer_writes_the_model_directory_the_workers_read(pods: list[Pod]):
    """The CronJob runs `worker retrain` once per schedule (not `--every`, which never returns)
    on the workers' input topic, into the volume the workers and `worker serve` mount read-only
    at their --model-dir."""
    retrain = _the_pod_running(pods, "retrain")
    assert retrain.workload["kind"] == "CronJob"
    assert retrain.workload["spec"]["concurrencyPolicy"] == "Forbid"
    trained = retrain.settings()
    assert trained.every is None
    worker = _the_pod_running(pods, "start")
    assert trained.data == f"kafka://{worker.settings().input_topic}"
    job = retrain.workload["spec"]["jobTemplate"]["spec"]
    assert job["activeDeadlineSeconds"] > trained.time_budget

    mount, volume = retrain.mount(str(trained.model_dir))
    assert not mount.get("readOnly") and not volume["persistentVolumeClaim"].get("readOnly")
    claim = volume["persistentVolumeClaim"]["claimName"]
    assert _find("PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteMany"]
    readers = [worker, _the_pod_running(pods, "serve")]
    for reader in readers:
        model_dir = reader.settings().model_dir
        assert model_dir == trained.model_dir, reader.name
        mount, volume = reader.mount(str(model_dir))
        assert volume["persistentVolumeClaim"]["claimName"] == claim, reader.name
        assert mount.get("readOnly") and volume["persistentVolumeClaim"].get("readOnly")
    pruner = _the_pod_running(pods, "models", "prune")
    mount, volume = pruner.mount(str(pruner.settings().model_dir))
    assert volume["persistentVolumeClaim"]["claimName"] == claim
