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
SCHEDULER_PORT = 8786


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s_objects(folder: Path = K8S) -> dict[str, dict[str, Any]]:
    """kind -> object, from the files kustomization.yaml lists (one object of each kind here)."""
    objects: dict[str, dict[str, Any]] = {}
    for (kind, name), doc in named_k8s_objects(folder).items():
        assert kind not in objects, f"{name}: a second {kind}"
        objects[kind] = doc
    return objects


def named_k8s_objects(folder: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) -> object, from the files `folder/kustomization.yaml` lists."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    objects = {}
    for name in kustomization["resources"]:
        for doc in load_all(folder / name):
            objects[doc["kind"], doc["metadata"]["name"]] = doc
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
    assert {f.name for f in files} >= {"docker-compose.yml", "deployment.yaml", "service.yaml", "hpa.yaml",
                                       "scheduler.yaml", "workers.yaml", "storage.yaml"}
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


def dask_compose_problems(compose: dict[str, Any]) -> list[str]:
    """The `dask` profile: a scheduler and workers from the tlops image, on the flows' folders and volumes."""
    problems = []
    services = compose["services"]
    scheduler, worker = services.get("dask-scheduler", {}), services.get("dask-worker", {})
    flows = services.get("prefect-worker", {})
    for name, service in (("dask-scheduler", scheduler), ("dask-worker", worker)):
        if service.get("profiles") != ["dask"]:
            problems.append(f"{name} is not in the dask profile (a plain `up` would start it)")
        if (service.get("image"), service.get("build")) != (flows.get("image"), flows.get("build")):
            problems.append(f"{name} does not run the image the flows run")
    others = [name for name, service in services.items() if "dask" in service.get("profiles", []) and
              name not in ("dask-scheduler", "dask-worker")]
    if others:
        problems.append(f"other services in the dask profile: {others}")
    listens = " ".join(scheduler.get("command", []))
    if f"--port {SCHEDULER_PORT}" not in listens or f"{SCHEDULER_PORT}:{SCHEDULER_PORT}" not in scheduler.get("ports", []):
        problems.append(f"the scheduler does not listen on and publish {SCHEDULER_PORT}")
    if f"tcp://dask-scheduler:{SCHEDULER_PORT}" not in worker.get("command", []):
        problems.append("workers do not connect to the dask-scheduler service")
    if "dask-scheduler" not in worker.get("depends_on", {}):
        problems.append("workers do not wait for the scheduler")
    if sorted(worker.get("volumes", [])) != sorted(flows.get("volumes", [])) or \
            worker.get("working_dir") != flows.get("working_dir"):
        problems.append("workers do not see the folders and volumes the flows write (outputs/, .cache/)")
    return problems


def dask_k8s_problems(objects: dict[tuple[str, str], dict[str, Any]], serving_image: str) -> list[str]:
    """The Dask Deployments: the Service reaches the scheduler, workers reach the Service and share the pipeline volume."""
    problems = []
    scheduler, worker = objects[("Deployment", "dask-scheduler")], objects[("Deployment", "dask-worker")]
    service = objects[("Service", "dask-scheduler")]
    (scheduler_container,) = scheduler["spec"]["template"]["spec"]["containers"]
    (worker_container,) = worker["spec"]["template"]["spec"]["containers"]
    for deployment in (scheduler, worker):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        if deployment["spec"]["selector"]["matchLabels"].items() - labels.items():
            problems.append(f"{deployment['metadata']['name']}: selector does not match its pod labels")
    if service["spec"]["selector"].items() - scheduler["spec"]["template"]["metadata"]["labels"].items():
        problems.append("the scheduler Service selects no scheduler pod")
    (port,) = service["spec"]["ports"]
    if container_port(scheduler_container, port["targetPort"]) != SCHEDULER_PORT:
        problems.append(f"Service targetPort {port['targetPort']!r} is not the scheduler's port")
    if f"tcp://{service['metadata']['name']}:{port['port']}" not in worker_container.get("args", []):
        problems.append("workers do not connect to the scheduler Service")
    for container in (scheduler_container, worker_container):
        if container["image"] != serving_image:
            problems.append(f"{container['name']} runs {container['image']!r}, not the tlops image {serving_image!r}")
    claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName")
              for v in worker["spec"]["template"]["spec"].get("volumes", [])}
    mounts = {m["mountPath"]: claims.get(m["name"]) for m in worker_container.get("volumeMounts", [])}
    for path in ("/app/outputs", "/app/.cache"):
        claim = mounts.get(path)
        if claim is None or ("PersistentVolumeClaim", claim) not in objects:
            problems.append(f"workers do not mount {path} from a PersistentVolumeClaim of these manifests")
        elif "ReadWriteMany" not in objects[("PersistentVolumeClaim", claim)]["spec"]["accessModes"]:
            problems.append(f"{path}: claim {claim!r} is not ReadWriteMany (the run's client and every worker share it)")
    if worker_container.get("workingDir") != "/app":
        problems.append("workers do not run from /app, where params' relative paths resolve")
    resources = worker_container.get("resources", {})
    for kind in ("cpu", "memory"):
        request, limit = resources.get("requests", {}).get(kind), resources.get("limits", {}).get(kind)
        if request is None or limit is None or quantity(request) > quantity(limit):
            problems.append(f"worker {kind}: needs a request no larger than its limit")
    return problems


def test_compose_has_a_dask_profile_on_the_flows_image_and_volumes() -> None:
    compose = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
    assert dask_compose_problems(compose) == [] and compose_problems(compose) == []
    broken = copy.deepcopy(compose)
    broken["services"]["dask-worker"]["volumes"] = ["pipeline-outputs:/app/outputs"]
    broken["services"]["dask-worker"]["command"] = ["worker", "tcp://scheduler:8786"]
    del broken["services"]["dask-scheduler"]["profiles"]
    assert dask_compose_problems(broken) == [
        "dask-scheduler is not in the dask profile (a plain `up` would start it)",
        "workers do not connect to the dask-scheduler service",
        "workers do not see the folders and volumes the flows write (outputs/, .cache/)",
    ]


def test_kubernetes_dask_workers_reach_the_scheduler_and_share_the_pipeline_volume() -> None:
    objects = named_k8s_objects(K8S / "dask")
    serving_image = k8s_objects()["Deployment"]["spec"]["template"]["spec"]["containers"][0]["image"]
    assert dask_k8s_problems(objects, serving_image) == []
    broken = copy.deepcopy(objects)
    broken[("Service", "dask-scheduler")]["spec"]["ports"][0]["targetPort"] = 8787
    broken[("PersistentVolumeClaim", "tlops-pipeline")]["spec"]["accessModes"] = ["ReadWriteOnce"]
    (worker,) = broken[("Deployment", "dask-worker")]["spec"]["template"]["spec"]["containers"]
    worker["image"] = "daskdev/dask:latest"
    assert dask_k8s_problems(broken, serving_image) == [
        "Service targetPort 8787 is not the scheduler's port",
        "worker runs 'daskdev/dask:latest', not the tlops image 'tlops'",
        "/app/outputs: claim 'tlops-pipeline' is not ReadWriteMany (the run's client and every worker share it)",
        "/app/.cache: claim 'tlops-pipeline' is not ReadWriteMany (the run's client and every worker share it)",
    ]
