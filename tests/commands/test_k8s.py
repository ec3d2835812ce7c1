"""The Kubernetes manifests: every overlay renders, validates offline against the API schemas, and matches
what the server serves (probe routes, port, settings, metrics, the drain)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from rmserve.api.routes import router
from rmserve.config import Settings
from rmserve.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
KUBERNETES_VERSION = "1.30.0"  # the oldest release the manifests support (preStop exec, autoscaling/v2)
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}  # validated by hand below: not in the API schemas

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl renders the manifests")


def render(overlay: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, check=True
    )
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (c,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(request.param)


def test_every_resource_validates_against_the_kubernetes_schemas(rendered):
    _, docs = rendered
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "ConfigMap"} <= kinds
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRDS:
            continue
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_probes_and_ports_are_what_the_server_serves(rendered):
    _, docs = rendered
    c = container(docs)
    env = env_of(c)
    (port,) = c["ports"]
    assert port == {"name": "http", "containerPort": int(env["RMSERVE_PORT"])}
    assert env["RMSERVE_HOST"] == "0.0.0.0"
    routes = {getattr(route, "path", None) for route in router.routes}  # /health, /ready, /metrics live here
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert c["startupProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert {"/ready", "/health", "/metrics"} <= routes
    (service_port,) = one(docs, "Service")["spec"]["ports"]
    assert service_port["targetPort"] == "http"
    monitor = one(docs, "ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == service_port["name"] and endpoint["path"] == "/metrics"


def test_every_setting_in_the_environment_and_config_is_one_the_server_reads(rendered):
    _, docs = rendered
    env = env_of(container(docs))
    fields = set(Settings.model_fields)
    for name in env:
        if name.startswith("RMSERVE_"):
            assert name.removeprefix("RMSERVE_").lower() in fields, f"{name} is no rmserve setting"
    (config,) = [
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("rmserve-config")
    ]
    mount = next(m for m in container(docs)["volumeMounts"] if m["name"] == "config")
    assert env["RMSERVE_CONFIG"] == f"{mount['mountPath']}/config.yaml"
    settings = Settings.model_validate(yaml.safe_load(config["data"]["config.yaml"]))
    assert settings.served_models(), "the config must name the models to serve"


def test_the_api_key_comes_from_one_secret_for_the_server_and_the_scraper(rendered):
    _, docs = rendered
    secret = env_of(container(docs))["RMSERVE_API_KEY"]["secretKeyRef"]
    credentials = one(docs, "ServiceMonitor")["spec"]["endpoints"][0]["authorization"]["credentials"]
    assert credentials == secret == {"name": "rmserve-api-key", "key": "api-key"}


def test_a_pod_drains_before_it_is_killed(rendered):
    _, docs = rendered
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    c = container(docs)
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    shutdown = float(env_of(c)["RMSERVE_SHUTDOWN_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + shutdown + 10
    strategy = one(docs, "Deployment")["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0
    assert one(docs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


def test_pods_run_unprivileged_on_a_read_only_root_with_read_only_models(rendered):
    _, docs = rendered
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    c = container(docs)
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["readOnlyRootFilesystem"]
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["models"]["readOnly"] and mounts["config"]["readOnly"]
    writable = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
    cache = env_of(c)["RMSERVE_CACHE_DIR"]
    assert any(cache.startswith(path) for path in writable), "the cache must be on a writable volume"


def test_the_autoscaler_scales_on_a_metric_each_pod_exports(rendered):
    overlay, docs = rendered
    hpa = one(docs, "HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    exported = {m.name for m in Metrics().registry.collect()}
    assert name in exported
    assert hpa["spec"]["scaleTargetRef"]["name"] == one(docs, "Deployment")["metadata"]["name"]
    rules = yaml.safe_load((K8S / "components" / "prometheus" / "prometheus-adapter-rules.yaml").read_text())
    assert [r["name"]["as"] for r in rules["rules"]["custom"]] == [name]
    target = int(metric["pods"]["target"]["averageValue"])
    assert target == {"cpu": 4096, "gpu": 65536}[overlay]


def test_the_gpu_overlay_asks_for_one_gpu_per_pod():
    docs = render("gpu")
    assert container(docs)["resources"]["limits"]["nvidia.com/gpu"] == 1
    claim = {v["name"]: v for v in one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]}["models"]
    assert claim["persistentVolumeClaim"] == {"claimName": "rmserve-models", "readOnly": True}
    assert "nvidia.com/gpu" not in container(render("cpu"))["resources"].get("limits", {})
