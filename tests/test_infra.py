"""infra/: what cannot run here (no Docker, no cluster) is at least parsed and cross-checked.

Each YAML file must parse; the compose file must wire the services the team setup promises;
the Kubernetes objects must point at each other (probes at the serving paths, the Service and
the HPA at the Deployment). Each check returns the problems it finds, and a broken copy of
the manifests must be caught, so the checks themselves are tested.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO

INFRA = REPO / "infra"
K8S = INFRA / "k8s"
SERVE_PORT = 8000


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s_objects() -> dict[str, dict[str, Any]]:
    """kind -> object, from the files kustomization.yaml lists (one object of each kind here)."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    objects: dict[str, dict[str, Any]] = {}
    for name in kustomization["resources"]:
        for doc in load_all(K8S / name):
            assert doc["kind"] not in objects, f"{name}: a second {doc['kind']}"
            objects[doc["kind"]] = doc
    return objects


def container_port(container: dict[str, Any], port: int | str) -> int | None:
    if isinstance(port, int):
        return port
    return next((p["containerPort"] for p in container.get("ports", []) if p.get("name") == port), None)


def quantity(value: str | int) -> float:
    """A Kubernetes CPU or memory quantity as a number (cores or bytes)."""
    text = str(value)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 1e3, "M": 1e6, "G": 1e9}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", text)
    assert match, f"not a quantity: {text!r}"
    return float(match.group(1)) * units.get(match.group(2), 1)


def k8s_problems(objects: dict[str, dict[str, Any]]) -> list[str]:
    problems = []
    deployment, service, hpa = objects["Deployment"], objects["Service"], objects["HorizontalPodAutoscaler"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    if deployment["spec"]["selector"]["matchLabels"].items() - pod_labels.items():
        problems.append("Deployment selector does not match its pod labels")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    if container_port(container, "http") != SERVE_PORT:
        problems.append(f"container port 'http' is not {SERVE_PORT}")
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = container.get(probe, {}).get("httpGet", {})
        if get.get("path") != path:
            problems.append(f"{probe} checks {get.get('path')!r}, not {path}")
        if container_port(container, get.get("port", -1)) != SERVE_PORT:
            problems.append(f"{probe} port {get.get('port')!r} is not the serving port")
    resources = container.get("resources", {})
    for kind in ("cpu", "memory"):
        request, limit = resources.get("requests", {}).get(kind), resources.get("limits", {}).get(kind)
        if request is None or limit is None:
            problems.append(f"{kind}: request and limit are both required")
        elif quantity(request) > quantity(limit):
            problems.append(f"{kind}: request {request} exceeds limit {limit}")
    if service["spec"]["selector"].items() - pod_labels.items():
        problems.append("Service selector matches no pod of the Deployment")
    for port in service["spec"]["ports"]:
        if container_port(container, port["targetPort"]) != SERVE_PORT:
            problems.append(f"Service targetPort {port['targetPort']!r} is not the serving port")
    target = hpa["spec"]["scaleTargetRef"]
    if (target["kind"], target["name"], target["apiVersion"]) != ("Deployment", deployment["metadata"]["name"], "apps/v1"):
        problems.append(f"HPA targets {target}, not the Deployment {deployment['metadata']['name']!r}")
    if not 1 <= hpa["spec"].get("minReplicas", 1) <= hpa["spec"]["maxReplicas"]:
        problems.append("HPA replica bounds are inverted")
    if any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in hpa["spec"]["metrics"]) \
            and "cpu" not in resources.get("requests", {}):
        problems.append("HPA scales on CPU utilisation but the container requests no CPU")
    return problems


def compose_problems(compose: dict[str, Any]) -> list[str]:
    problems = []
    services = compose["services"]
    for name in ("postgres", "mlflow", "prefect-server", "prefect-worker", "serve"):
        if name not in services:
            problems.append(f"no service {name!r}")
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            if dependency not in services:
                problems.append(f"{name} depends on unknown service {dependency!r}")
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith(".") and source not in (compose.get("volumes") or {}):
                problems.append(f"{name} mounts undeclared volume {source!r}")
            elif source.startswith(".") and not (INFRA / source).exists():
                problems.append(f"{name} mounts missing file {source!r}")
        build = service.get("build")
        if build and not (INFRA / build["context"] / build["dockerfile"]).is_file():
            problems.append(f"{name} builds from a missing Dockerfile")
    mlflow = " ".join(map(str, services.get("mlflow", {}).get("command", [])))
    if "--backend-store-uri postgresql+psycopg://" not in mlflow or "@postgres:5432/" not in mlflow:
        problems.append("mlflow does not use the postgres service as its backend store")
    if "--artifacts-destination" not in mlflow:
        problems.append("mlflow has no artifact store")
    serve = services.get("serve", {})
    if f"{SERVE_PORT}:{SERVE_PORT}" not in serve.get("ports", []):
        problems.append(f"serve does not publish port {SERVE_PORT}")
    if f":{SERVE_PORT}/healthz" not in " ".join(serve.get("healthcheck", {}).get("test", [])):
        problems.append("serve's healthcheck does not call /healthz")
    if "serve" not in serve.get("command", []):
        problems.append("the serve service does not run `tlops serve`")
    for name in ("serve", "prefect-worker"):
        if services.get(name, {}).get("environment", {}).get("MLFLOW_TRACKING_URI") != "http://mlflow:5000":
            problems.append(f"{name} does not track to the mlflow service")
    worker = " ".join(services.get("prefect-worker", {}).get("command", []))
    if "worker start" not in worker or "--pool" not in worker:
        problems.append("prefect-worker does not start a worker on a pool")
    return problems


def test_every_yaml_file_under_infra_parses() -> None:
    files = sorted(INFRA.rglob("*.yml")) + sorted(INFRA.rglob("*.yaml"))
    assert {f.name for f in files} >= {"docker-compose.yml", "deployment.yaml", "service.yaml", "hpa.yaml"}
    for path in files:
        assert load_all(path), f"{path.name} is empty"
    with pytest.raises(yaml.YAMLError):
        yaml.safe_load("services:\n  serve:\n    ports: [8000:8000\n")


def test_compose_wires_the_team_setup() -> None:
    compose = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
    assert compose_problems(compose) == []
    broken = copy.deepcopy(compose)
    broken["services"]["serve"]["healthcheck"]["test"] = ["CMD", "true"]
    broken["services"]["mlflow"]["command"] = ["server", "--backend-store-uri", "sqlite:///mlflow.db"]
    broken["services"]["serve"]["depends_on"] = {"minio": {"condition": "service_healthy"}}
    assert len(compose_problems(broken)) == 4  # healthcheck, store, artifacts, unknown dependency


def test_kubernetes_objects_point_at_each_other() -> None:
    objects = k8s_objects()
    assert set(objects) >= {"Deployment", "Service", "HorizontalPodAutoscaler"}
    assert k8s_problems(objects) == []

    swapped = copy.deepcopy(objects)
    (container,) = swapped["Deployment"]["spec"]["template"]["spec"]["containers"]
    container["readinessProbe"]["httpGet"]["path"] = "/healthz"
    swapped["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] = "tlops-server"
    container["resources"]["requests"]["memory"] = "4Gi"
    assert k8s_problems(swapped) == [
        "readinessProbe checks '/healthz', not /readyz",
        "memory: request 4Gi exceeds limit 2Gi",
        "HPA targets {'apiVersion': 'apps/v1', 'kind': 'Deployment', 'name': 'tlops-server'}, not the Deployment 'tlops-serve'",
    ]


def test_dockerfile_serves_on_8000_with_a_healthcheck_and_copies_what_exists() -> None:
    text = (INFRA / "Dockerfile").read_text()
    assert f"EXPOSE {SERVE_PORT}" in text
    assert re.search(rf"HEALTHCHECK .*\n?.*127\.0\.0\.1:{SERVE_PORT}/healthz", text)
    assert 'ENTRYPOINT ["tlops"]' in text and 'CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]' in text
    for line in re.findall(r"^COPY (?!--from)(?:--\S+ )*(.+)$", text, flags=re.M):
        *sources, _ = line.split()
        for source in sources:
            assert source == "." or (REPO / source).exists(), f"COPY {source}: not in the repository"
    ignored = (INFRA / "Dockerfile.dockerignore").read_text().split()
    assert {"outputs", ".venv", ".cache", "mlruns"} <= set(ignored)
