"""infra/ files are well-formed: compose (via `docker-compose config` when installed), Kubernetes manifests,
work-pool templates, the zombie-run automation and the deployment list of prefect.yaml."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
K8S = INFRA / "k8s"
COMPOSE = shutil.which("docker-compose")


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _k8s() -> dict[tuple[str, str], dict]:
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in _docs(path):
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), f"{path.name}: {doc.get('kind')}"
            assert doc["metadata"].get("name"), f"{path.name}: {doc['kind']} without a name"
            if doc["kind"] != "Namespace":
                assert doc["metadata"].get("namespace") == "dsat", f"{path.name}: {doc['kind']}"
            out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def _containers(pod_spec: dict) -> list[dict]:
    return pod_spec.get("initContainers", []) + pod_spec["containers"]


def _secret_refs(container: dict) -> set[str]:
    refs = {e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e}
    for var in container.get("env", []):
        ref = var.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            refs.add(ref["name"])
    return refs


# ------------------------------------------------------------------------------------------------ compose
def test_compose_services_and_networks() -> None:
    compose = yaml.safe_load((INFRA / "compose.yaml").read_text())
    services = compose["services"]
    expected = {"postgres", "minio", "minio-init", "prefect-server", "prefect-init", "mlflow",
                "dask-scheduler", "dask-worker", "prefect-worker", "prefect-gpu-worker"}  # fmt: skip
    assert expected <= services.keys()
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        assert svc.get("networks") == ["dsat"], name
        for dep in svc.get("depends_on", []):
            assert dep in services, f"{name} depends on unknown {dep}"
    gpu = services["prefect-gpu-worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert "--app-name basic-auth" in services["mlflow"]["command"]
    assert "PREFECT_SERVER_API_AUTH_STRING" in services["prefect-server"]["environment"]


def test_image_dask_config_keeps_the_project_worker_settings() -> None:
    """The `cpu` image's Dask config gives `dask worker` processes the nanny environment of the project's
    LocalCluster: no MALLOC_TRIM_THRESHOLD_ (`GLIBC_DEFAULTS`), and its quieter servers (`QUIET_BACKGROUND`),
    Dask's other settings kept."""
    import dask
    import distributed  # noqa: F401 - loads Dask's distributed defaults

    from dsat_core.data.cluster import GLIBC_DEFAULTS, QUIET_BACKGROUND

    assert "COPY infra/dask.yaml /etc/dask/dask.yaml" in (INFRA / "Dockerfile").read_text()
    merged = dask.config.update(
        copy.deepcopy(dask.config.config), yaml.safe_load((INFRA / "dask.yaml").read_text())
    )
    for key, value in {**GLIBC_DEFAULTS, **QUIET_BACKGROUND}.items():
        assert dask.config.get(key, config=merged) == value and dask.config.get(key) != value, key
    assert merged["distributed"]["nanny"]["pre-spawn-environ"]["OMP_NUM_THREADS"] == 1


@pytest.mark.skipif(COMPOSE is None, reason="docker-compose not installed (apt-get install docker-compose)")
def test_docker_compose_config_resolves_and_requires_every_secret(tmp_path: Path) -> None:
    """`docker-compose config` needs no daemon: with the example env it resolves; without, it refuses."""
    cmd = [COMPOSE, "-f", str(INFRA / "compose.yaml"), "--env-file"]
    ok = subprocess.run([*cmd, str(INFRA / ".env.example"), "config"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    resolved = yaml.safe_load(ok.stdout)
    env = resolved["services"]["prefect-worker"]["environment"]
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api" and env["DSAT_REPO"] == "/opt/dsat"
    (tmp_path / "empty.env").write_text("")
    missing = subprocess.run([*cmd, str(tmp_path / "empty.env"), "config"], capture_output=True, text=True)
    assert missing.returncode != 0 and "set POSTGRES_PASSWORD" in missing.stderr + missing.stdout


# ------------------------------------------------------------------------------------------------ kubernetes
def test_kubernetes_manifests_request_gpus_and_take_credentials_from_secrets() -> None:
    objects = _k8s()
    assert ("ConfigMap", "dsat-config") in objects and ("PersistentVolumeClaim", "dsat-runs") in objects
    config = objects[("ConfigMap", "dsat-config")]["data"]
    assert config["DSAT_STORE_URI"].startswith("s3://")
    assert config["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"
    assert not any(o["kind"] == "Secret" for o in objects.values()), "secrets are created from infra/.env"
    assert "ReadWriteMany" in objects[("PersistentVolumeClaim", "dsat-runs")]["spec"]["accessModes"]

    # multi-node torchrun: PyTorchJob (operator) ...
    job = objects[("PyTorchJob", "dsat-train")]
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"} and replicas["Master"]["replicas"] == 1
    for spec in replicas.values():
        (container,) = spec["template"]["spec"]["containers"]
        assert container["name"] == "pytorch" and "torch.distributed.run" in container["command"]
        gpus = container["resources"]["limits"]["nvidia.com/gpu"]
        assert gpus == int(job["spec"]["nprocPerNode"])
        assert _secret_refs(container) == {"dsat-secrets"}
        assert "$(DSAT_STORE_URI)" in container["args"] and "latest" in container["args"]
    # ... or an Indexed Job, one pod per node, rendezvous on pod 0 through a headless Service
    indexed = objects[("Job", "dsat-train")]["spec"]
    service = objects[("Service", "dsat-train")]["spec"]
    assert indexed["completionMode"] == "Indexed" and indexed["completions"] == indexed["parallelism"] >= 2
    assert service["clusterIP"] == "None" and indexed["template"]["spec"]["subdomain"] == "dsat-train"
    (container,) = indexed["template"]["spec"]["containers"]
    script = container["args"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert int(env["NNODES"]) == indexed["completions"]
    assert env["RDZV_ENDPOINT"] == "dsat-train-0.dsat-train:29500"
    flags = ("--nnodes=", '--node_rank="$JOB_COMPLETION_INDEX"', "--rdzv_backend=c10d", "--rdzv_endpoint=")
    assert all(flag in script for flag in flags)
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert _secret_refs(container) == {"dsat-secrets"}

    # the Prefect worker for the kubernetes pool, with just enough RBAC to run Jobs
    worker = objects[("Deployment", "prefect-worker")]["spec"]["template"]["spec"]
    (container,) = worker["containers"]
    assert container["command"][:3] == ["prefect", "worker", "start"] and "kubernetes" in container["command"]
    assert _secret_refs(container) == {"dsat-secrets"}
    rules = objects[("Role", "prefect-worker")]["rules"]
    assert any("jobs" in r["resources"] and "create" in r["verbs"] for r in rules)
    assert not any(o["kind"] in ("ClusterRole", "ClusterRoleBinding") for o in objects.values())
    # nothing is exposed outside the cluster
    for obj in objects.values():
        if obj["kind"] == "Service":
            assert obj["spec"].get("type", "ClusterIP") == "ClusterIP"


def test_work_pool_templates_request_gpus_and_hold_no_secrets() -> None:
    k8s = json.loads((INFRA / "work-pools" / "kubernetes.json").read_text())
    pod = k8s["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert {"secretRef": {"name": "{{ secret_name }}"}} in container["envFrom"]
    docker = json.loads((INFRA / "work-pools" / "docker.json").read_text())
    request = docker["job_configuration"]["container_create_kwargs"]["device_requests"][0]
    assert request["driver"] == "nvidia" and request["capabilities"] == [["gpu"]]
    defaults = docker["variables"]["properties"]["env"]["default"]
    assert defaults["PREFECT_API_URL"].startswith("http://")
    assert defaults["MLFLOW_TRACKING_URI"].startswith("http://")
    for template in (k8s, docker):
        text = json.dumps(template).upper()
        assert "PASSWORD" not in text.replace("MLFLOW_TRACKING_PASSWORD", "")
        assert "SECRET_ACCESS_KEY" not in text


# ------------------------------------------------------------------------------------------------ prefect
def test_prefect_yaml_keeps_the_deployment_names_and_runtime_repo() -> None:
    config = yaml.safe_load((INFRA / "prefect.yaml").read_text())
    names = {(d["entrypoint"].split(":")[1], d["name"]) for d in config["deployments"]}
    assert {("train_diffusionsat", "default"), ("train_controlnet", "sr"), ("train_controlnet", "temporal"),
            ("train_controlnet", "inpaint"), ("evaluate", "generation"), ("evaluate", "sr"),
            ("refresh_dataset", "local-samples")} <= names  # fmt: skip
    for deployment in config["deployments"]:
        assert (REPO / deployment["entrypoint"].split(":")[0]).is_file(), deployment["entrypoint"]
    steps = [next(iter(step)) for step in config["pull"]]
    assert steps[-1] == "prefect.deployments.steps.set_working_directory"
    assert "{{ $DSAT_REPO }}" not in json.dumps(config["pull"])  # would be frozen at deploy time


def test_zombie_automation_marks_silent_flow_runs_crashed() -> None:
    (automation,) = yaml.safe_load((INFRA / "automations" / "crash-zombie-flow-runs.yaml").read_text())[
        "automations"
    ]
    trigger = automation["trigger"]
    assert trigger["posture"] == "Proactive" and trigger["after"] == ["prefect.flow-run.heartbeat"]
    assert {"prefect.flow-run.heartbeat", "prefect.flow-run.Completed"} <= set(trigger["expect"])
    assert trigger["within"] >= 2 * 30  # at least two missed 30 s heartbeats
    assert automation["actions"] == [{"type": "change-flow-run-state", "state": "CRASHED",
                                      "message": automation["actions"][0]["message"]}]  # fmt: skip


def test_every_deployment_s_parameters_validate_against_its_flow() -> None:
    """What `prefect deployment run NAME` sends with no `--params`: each flow's own parameter models accept
    it, and `train-diffusionsat/default` fine-tunes the shipped base model at its resolution."""
    from prefect.flows import load_flow_from_entrypoint

    from dsat_core.pipelines.diffusionsat import pipeline_path

    config = yaml.safe_load((INFRA / "prefect.yaml").read_text())
    validated = {}
    for deployment in config["deployments"]:
        flow = load_flow_from_entrypoint(str(REPO / deployment["entrypoint"]))
        validated[(flow.name, deployment["name"])] = flow.validate_parameters(
            deployment.get("parameters", {})
        )
    train = validated[("train-diffusionsat", "default")]["params"].train
    shipped = pipeline_path(train.init_from)
    latent = json.loads((shipped / "unet" / "config.json").read_text())["sample_size"]
    factor = 2 ** (len(json.loads((shipped / "vae" / "config.json").read_text())["block_out_channels"]) - 1)
    assert train.init_from == "default" and train.resolution == latent * factor == 64
    for name in ("sr", "temporal", "inpaint"):
        assert validated[("train-controlnet", name)]["params"].train.resolution == train.resolution
