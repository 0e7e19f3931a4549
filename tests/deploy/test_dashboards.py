"""Monitoring files and the image: every metric the Grafana dashboard and the Prometheus alert
rules query is one the code really exports, the provisioning matches docker-compose.yml, and the
Dockerfile builds a slim non-root image in CPU and CUDA variants.

Exported names are read from the live registries of the worker (``stream.metrics.Metrics``), the
HTTP service (``deploy.http.metrics``) and the worker's online-accuracy scorer
(``stream.accuracy``), not from a hand-kept list.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

REPO = Path(__file__).resolve().parents[2]
PROM = REPO / "deploy" / "prometheus"
GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "eventcast.json"
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gauge": ("",),
    "info": ("_info",),
}
NAME = re.compile(r"\beventcast_[a-z0-9_]+\b")


def exported(registry: CollectorRegistry) -> set[str]:
    """Sample names a registry exposes (whether or not a labelled child exists yet)."""
    names: set[str] = set()
    for family in registry.collect():
        for suffix in SUFFIXES.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names


def worker_names() -> set[str]:
    from stream.metrics import Metrics

    return exported(Metrics().registry)


def serve_names() -> set[str]:
    from deploy.http.metrics import ServeMetrics

    return exported(ServeMetrics().registry)


def accuracy_names() -> set[str]:
    from prometheus_client import CollectorRegistry

    from stream.accuracy import AccuracyMetrics

    registry = CollectorRegistry()
    AccuracyMetrics(registry)
    return exported(registry)


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p["targets"]]


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((PROM / "alerts.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def test_every_queried_metric_is_exported() -> None:
    known = worker_names() | serve_names() | accuracy_names()
    queried = {n for e in dashboard_exprs() + [r["expr"] for r in alert_rules()]
               for n in NAME.findall(e)}  # fmt: skip
    assert queried, "no metric found in the dashboard and alert rules"
    assert sorted(queried - known) == []
    # the worker's own metrics carry most of it
    assert len(queried & worker_names()) >= 15


def test_worker_panels_and_alerts_use_only_worker_metrics() -> None:
    """Everything outside the accuracy and HTTP sections comes from the worker itself."""
    worker = worker_names()
    for p in dashboard()["panels"]:
        if "accuracy" in p["title"].lower() or "MAE" in p["title"] or "coverage" in p["title"]:
            continue
        if p["title"].startswith("HTTP"):
            continue
        for t in p["targets"]:
            assert set(NAME.findall(t["expr"])) <= worker, (p["title"], t["expr"])
    doc = yaml.safe_load((PROM / "alerts.yml").read_text())
    for group in doc["groups"]:
        if group["name"] == "eventcast-worker":
            for r in group["rules"]:
                assert set(NAME.findall(r["expr"])) <= worker, r["alert"]


def test_online_accuracy_metrics_are_exported_by_the_worker() -> None:
    """The worker's registry carries the online-accuracy metrics (stream/accuracy.py) that the
    drift alerts and accuracy panels query, and the shadow-version metrics."""
    assert accuracy_names() <= worker_names()
    queried = {n for e in dashboard_exprs() + [r["expr"] for r in alert_rules()]
               for n in NAME.findall(e) if n.startswith("eventcast_online_")}  # fmt: skip
    assert queried and queried <= worker_names()
    shadow = {"eventcast_shadow_forecasts_published_total", "eventcast_shadow_failures_total",
              "eventcast_shadow_dropped_total", "eventcast_shadow_info"}  # fmt: skip
    assert shadow <= worker_names()


def test_dashboard_has_the_required_panels_and_one_datasource() -> None:
    d = dashboard()
    titles = " | ".join(p["title"].lower() for p in d["panels"])
    for needle in ("throughput", "latency", "lag", "dead-letter", "model version"):
        assert needle in titles, needle
    latency = next(p for p in d["panels"] if p["title"] == "Event-to-forecast latency")
    assert [t["legendFormat"] for t in latency["targets"]] == ["p50", "p95", "p99"]
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = ds["datasources"][0]["uid"]
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"
    for p in d["panels"]:
        assert p["datasource"]["uid"] == uid
        for t in p["targets"]:
            assert t["datasource"]["uid"] == uid and t["expr"].count("(") == t["expr"].count(")")
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)) and d["uid"]


def test_alert_rules_are_well_formed_and_include_drift() -> None:
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    for r in rules:
        assert r["labels"]["severity"] in ("warning", "critical"), r["alert"]
        assert r["annotations"]["summary"], r["alert"]
        assert r["expr"].count("(") == r["expr"].count(")"), r["alert"]
    drift = next(r for r in rules if r["alert"] == "EventcastOnlineMaeDrift")
    assert "eventcast_online_abs_error_total" in drift["expr"]
    assert "eventcast_online_scored_total" in drift["expr"]


def test_provisioning_matches_docker_compose() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    mounts = {v.split(":")[1]: v.split(":")[0] for s in ("prometheus", "grafana")
              for v in compose[s]["volumes"]}  # fmt: skip
    for target, source in mounts.items():
        assert (REPO / source).exists(), f"{source} (mounted at {target}) is missing"
    prom = yaml.safe_load((PROM / "prometheus.yml").read_text())
    for rule_file in prom["rule_files"]:
        assert rule_file in mounts, rule_file
    worker_job = next(j for j in prom["scrape_configs"] if j["job_name"] == "worker")
    sd = worker_job["dns_sd_configs"][0]
    assert sd["names"] == ["worker"] and sd["port"] == 9400
    assert "9400" in [str(p) for p in compose["worker"].get("expose", [])]
    provider = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "eventcast.yml").read_text()
    )
    path = provider["providers"][0]["options"]["path"]
    assert mounts[path] == "./deploy/grafana/dashboards"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_rules(tmp_path: Path) -> None:
    r = subprocess.run(["promtool", "check", "rules", str(PROM / "alerts.yml")],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_is_slim_non_root_with_cpu_and_cuda_variants() -> None:
    text = (REPO / "deploy" / "Dockerfile").read_text()
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert froms and all("slim" in f for f in froms), froms
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert "ARG VARIANT=cpu" in text and "cuda)" in text and "cpu)" in text
    assert "download.pytorch.org/whl/cpu" in text  # the CPU variant gets the CPU wheel
    assert "requirements.lock" in text  # pinned versions in both variants
    assert "EVENTCAST_METRICS_HOST=0.0.0.0" in text  # Prometheus reaches worker:9400
    assert re.search(r"^HEALTHCHECK ", text, re.M) and "EXPOSE 9400 8000" in text
    # the CPU filter drops exactly the CUDA runtime wheels of the lock, never torch itself
    pattern = re.search(r"grep -vE '([^']+)'", text)
    assert pattern is not None
    lock = (REPO / "requirements.lock").read_text().splitlines()
    dropped = [line for line in lock if re.match(pattern.group(1), line)]
    assert dropped and all(re.match(r"(nvidia-|cuda-|triton==)", d) for d in dropped)
    assert not any(line.startswith("torch==") for line in dropped)
