"""The deployments in infra/prefect.yaml really run: a real Prefect server, `prefect deploy --all`, process
workers, a real MLflow server; a worker killed mid-run leaves a CRASHED flow run and a rerun resumes training.

Everything is started here on 127.0.0.1 (no mocks); the module takes ~3-4 minutes on 2 cores.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import stop_group, wait_until_healthy

from dsat_core.data.stac_server import free_port

REPO = Path(__file__).resolve().parents[1]
PREFECT_FILE = REPO / "infra" / "prefect.yaml"
ZOMBIE_AUTOMATION = REPO / "infra" / "automations" / "crash-zombie-flow-runs.yaml"
VENV_BIN = Path(sys.executable).parent
HEARTBEAT_S = 30  # Prefect's minimum flow-run heartbeat interval
ZOMBIE_WITHIN_S = 50  # the test's automation window (production: 90 s, see the YAML)

EXPECTED_DEPLOYMENTS = {
    "refresh-dataset/local-samples",
    "refresh-dataset/earth-search-sentinel-2-l2a",
    "refresh-dataset/planetary-computer-sentinel-2-l2a",
    "refresh-dataset/planetary-computer-landsat-c2-l2",
    "refresh-dataset/earth-search-naip",
    "import-dataset/fmow",
    "import-dataset/fmow-sentinel",
    "import-dataset/xbd",
    "import-dataset/spacenet",
    "train-diffusionsat/default",
    "train-controlnet/sr",
    "train-controlnet/temporal",
    "train-controlnet/inpaint",
    "evaluate/generation",
    "evaluate/sr",
}

pytestmark = pytest.mark.slow
_COMPLETED_RUNS: list[str] = []  # flow runs that finished; the zombie automation must leave them alone


# ------------------------------------------------------------------------------------------------ helpers
def _cli(env: dict[str, str], *args: str, timeout: float = 180) -> str:
    """Run the `prefect` CLI of this venv; return stdout+stderr, failing the test with them on error."""
    done = subprocess.run(
        [str(VENV_BIN / "prefect"), *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"prefect {' '.join(args)} failed ({done.returncode}):\n{out[-4000:]}"
    return out


def _run_deployment(env: dict[str, str], name: str, params: dict[str, Any]) -> str:
    """`prefect deployment run NAME --params JSON`; returns the flow run id."""
    out = _cli(env, "deployment", "run", name, "--params", json.dumps({"params": params}))
    match = re.search(r"UUID: ([0-9a-f-]{36})", out)
    assert match, out
    return match.group(1)


def _run_worker_once(env: dict[str, str], pool: str, log: Path, timeout: float = 300) -> None:
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [str(VENV_BIN / "prefect"), "worker", "start", "--pool", pool, "--run-once"],
            env=env,
            cwd=log.parent,  # not the repository: the deployment's pull step must chdir to $DSAT_REPO
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_group(proc)
            pytest.fail(f"worker --run-once still running after {timeout} s:\n{log.read_text()[-4000:]}")
    assert code == 0, log.read_text()[-4000:]


def _state(api: str, flow_run_id: str) -> dict[str, Any]:
    response = httpx.get(f"{api}/flow_runs/{flow_run_id}", timeout=10)
    response.raise_for_status()
    return response.json()["state"]


def _flow_run_logs(api: str, flow_run_id: str) -> list[str]:
    body = {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "TIMESTAMP_ASC", "limit": 200}
    messages: list[str] = []
    while True:
        response = httpx.post(f"{api}/logs/filter", json={**body, "offset": len(messages)}, timeout=10)
        response.raise_for_status()
        page = [row["message"] for row in response.json()]
        messages += page
        if len(page) < body["limit"]:
            return messages


def _complete_checkpoints(output_dir: Path) -> list[int]:
    return sorted(
        int(p.name.split("-")[1])
        for p in output_dir.glob("checkpoint-*")
        if p.name.split("-")[1].isdigit() and (p / "training_state.json").is_file()
    )


def _process_groups_under(pid: int) -> set[int]:
    """Process groups of `pid` and all its descendants (Prefect starts each flow run in a new session)."""
    import psutil

    root = psutil.Process(pid)
    groups = {os.getpgid(pid)}
    for child in root.children(recursive=True):
        with contextlib.suppress(ProcessLookupError):
            groups.add(os.getpgid(child.pid))
    return groups


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """`prefect server start` on a free 127.0.0.1 port; yields the environment its clients and workers use."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    server_env = {**base, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    log_path = home / "server.log"
    log = log_path.open("w")
    proc = subprocess.Popen(
        [str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=server_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    wait_until_healthy(proc, f"{api}/health", log, timeout=120)
    client_env = {
        **server_env,
        "PREFECT_API_URL": api,
        "PATH": f"{VENV_BIN}{os.pathsep}{base.get('PATH', '')}",  # the worker's python is the venv's
        "DSAT_REPO": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S),
        "PREFECT_WORKER_QUERY_SECONDS": "2",
    }
    client_env.pop("MLFLOW_TRACKING_URI", None)
    yield client_env
    stop_group(proc)
    log.close()


@pytest.fixture(scope="module")
def deployed(prefect_server: dict[str, str]) -> dict[str, str]:
    """Both pools, the zombie-run automation and every deployment of infra/prefect.yaml.

    `prefect deploy` runs WITHOUT DSAT_REPO: the workers' own DSAT_REPO decides where the code is.
    """
    env = prefect_server
    _cli(env, "work-pool", "create", "dsat-process", "--type", "process")
    _cli(env, "work-pool", "create", "dsat-gpu", "--type", "process")
    automation = yaml.safe_load(ZOMBIE_AUTOMATION.read_text())
    automation["automations"][0]["trigger"]["within"] = ZOMBIE_WITHIN_S  # shorter window, same definition
    _cli(env, "automation", "create", "--from-json", json.dumps(automation))
    deploy_env = {k: v for k, v in env.items() if k != "DSAT_REPO"}
    _cli(deploy_env, "--no-prompt", "deploy", "--all", "--prefect-file", str(PREFECT_FILE), timeout=300)
    return env


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A store with `rgb` + `multispectral` tiles (SR pairs) and a saved tiny DiffusionSatPipeline."""
    from dsat_core.data.synthetic import make_synthetic_store
    from dsat_core.pipelines.diffusionsat import make_tiny_pipeline

    root = tmp_path_factory.mktemp("deploy-inputs")
    store = make_synthetic_store(
        str(root / "store.zarr"), n_scenes=2, tiles_per_scene=4, size=16, products=("rgb", "multispectral")
    )
    make_tiny_pipeline(sample_size=8, vae_downsample=2, seed=3).save_pretrained(str(root / "base"))
    return {"store": store, "base": str(root / "base")}


# ------------------------------------------------------------------------------------------------ tests
def test_deploy_all_registers_every_deployment_with_pools_schedules_and_runtime_repo(
    deployed: dict[str, str],
) -> None:
    api = deployed["PREFECT_API_URL"]
    flows = {f["id"]: f["name"] for f in httpx.post(f"{api}/flows/filter", json={}, timeout=10).json()}
    rows = httpx.post(f"{api}/deployments/filter", json={}, timeout=10).json()
    by_name = {f"{flows[d['flow_id']]}/{d['name']}": d for d in rows}
    assert set(by_name) == EXPECTED_DEPLOYMENTS

    crons = {
        name: [(s["schedule"]["cron"], s["schedule"]["timezone"]) for s in d["schedules"]]
        for name, d in by_name.items()
    }
    assert crons["refresh-dataset/local-samples"] == [("0 3 * * *", "UTC")]
    assert crons["refresh-dataset/earth-search-naip"] == [("0 4 * * 0", "UTC")]
    assert all(crons[n] for n in EXPECTED_DEPLOYMENTS if n.startswith("refresh-dataset/"))
    assert not any(crons[n] for n in EXPECTED_DEPLOYMENTS if not n.startswith("refresh-dataset/"))

    pools = {name: d["work_pool_name"] for name, d in by_name.items()}
    assert {pools[n] for n in EXPECTED_DEPLOYMENTS if n.startswith("train-")} == {"dsat-gpu"}
    assert {pools[n] for n in EXPECTED_DEPLOYMENTS if not n.startswith("train-")} == {"dsat-process"}
    # the code location is resolved on the worker when the run starts, not frozen at deploy time
    pull = json.dumps(by_name["train-controlnet/sr"]["pull_steps"])
    assert "${DSAT_REPO}" in pull and str(REPO) not in pull
    assert by_name["train-controlnet/sr"]["parameters"]["params"]["train"]["task"] == "sr"


@pytest.mark.parametrize("kind", ["docker", "kubernetes"])
def test_work_pool_templates_are_accepted_by_the_server(prefect_server: dict[str, str], kind: str) -> None:
    """infra/work-pools/<kind>.json is a valid base job template (the server checks every placeholder)."""
    api = prefect_server["PREFECT_API_URL"]
    template = json.loads((REPO / "infra" / "work-pools" / f"{kind}.json").read_text())
    made = httpx.post(
        f"{api}/work_pools/",
        json={"name": f"dsat-{kind}-check", "type": kind, "base_job_template": template},
        timeout=10,
    )
    assert made.status_code == 201, made.text
    stored = httpx.get(f"{api}/work_pools/dsat-{kind}-check", timeout=10).json()
    assert stored["base_job_template"]["variables"]["properties"]["gpus"]["type"] == "integer"
    broken = json.loads(json.dumps(template))
    broken["job_configuration"]["image"] = "{{ not_a_variable }}"
    refused = httpx.post(
        f"{api}/work_pools/",
        json={"name": f"dsat-{kind}-broken", "type": kind, "base_job_template": broken},
        timeout=10,
    )
    assert refused.status_code == 422, refused.text


def test_train_controlnet_sr_deployment_runs_on_a_worker_and_logs_to_mlflow(
    deployed: dict[str, str], tiny_inputs: dict[str, str], mlflow_server: str, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    env = deployed
    api = env["PREFECT_API_URL"]
    output = tmp_path / "controlnet-sr"
    params = {
        "train": {
            "task": "sr",
            "store_uri": tiny_inputs["store"],
            "base_model": tiny_inputs["base"],
            "output_dir": str(output),
            "model_size": "tiny",
            "text_encoder": "hash",
            "resolution": 16,
            "train_batch_size": 2,
            "max_steps": 3,
            "checkpointing_steps": 100,
            "conditioning_embedding_channels": [8, 16],
            "degradation": {"factor": 2, "blur_sigma": 0.8},
            "use_mlflow": True,
            "mlflow_tracking_uri": mlflow_server,
            "mlflow_experiment": "deployments-test",
            "registered_model_name": "deploy-test-controlnet-sr",
            "validation_steps": 3,
            "num_validation_samples": 2,
            "validation_inference_steps": 2,
        },
        "launch": {"nproc_per_node": 1, "launcher": "torchrun"},
    }
    flow_run_id = _run_deployment(env, "train-controlnet/sr", params)
    _run_worker_once(env, "dsat-gpu", tmp_path / "worker.log")

    state = _state(api, flow_run_id)
    assert state["type"] == "COMPLETED", (state, (tmp_path / "worker.log").read_text()[-4000:])
    result = json.loads((output / "train_result.json").read_text())
    assert result["global_step"] == 3 and result["pipeline_dir"] == str(output / "pipeline")

    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["task"] == "sr"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3]
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert any(p.endswith(".png") for p in images), images
    versions = client.search_model_versions("name='deploy-test-controlnet-sr'")
    assert [(v.version, v.run_id) for v in versions] == [("1", run.info.run_id)]
    assert result["registered_model_version"] == "1"
    _COMPLETED_RUNS.append(flow_run_id)


def test_killed_worker_leaves_a_crashed_run_and_a_rerun_resumes_from_the_checkpoint(
    deployed: dict[str, str], tiny_inputs: dict[str, str], mlflow_server: str, tmp_path: Path
) -> None:
    env = deployed
    api = env["PREFECT_API_URL"]
    output = tmp_path / "diffusionsat"
    train = {
        "store_uri": tiny_inputs["store"],
        "output_dir": str(output),
        "model_size": "tiny",
        "text_encoder": "hash",
        "resolution": 16,
        "train_batch_size": 2,
        "max_steps": 100_000,  # far more than runs before the kill
        "checkpointing_steps": 3,
        "checkpoints_total_limit": 2,
        "use_mlflow": True,
        "mlflow_tracking_uri": mlflow_server,
        "mlflow_experiment": "deployments-crash-test",
        "save_pipeline": False,
    }
    launch = {"nproc_per_node": 1, "launcher": "torchrun"}
    first = _run_deployment(env, "train-diffusionsat/default", {"train": train, "launch": launch})

    # a long-running worker (its own session, like a container's PID 1) picks the run up ...
    log = (tmp_path / "worker-killed.log").open("w")
    worker = subprocess.Popen(
        [str(VENV_BIN / "prefect"), "worker", "start", "--pool", "dsat-gpu"],
        env=env,
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not _complete_checkpoints(output):
            assert worker.poll() is None, (tmp_path / "worker-killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint after 180 s"
            time.sleep(0.5)
        assert _state(api, first)["type"] == "RUNNING"
        # ... and dies with everything it started, the way a node or pod dies: SIGKILL, nothing reported.
        # Killing only the worker's group is not enough: Prefect runs each flow run in its own session.
        # All are stopped before any is killed: a worker that outlives its flow run by a moment reports it
        # CRASHED itself, which a dead node never does.
        groups = _process_groups_under(worker.pid)
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for group in groups:
                os.killpg(group, sig)
        killed_at = time.monotonic()
    finally:
        stop_group(worker, signal.SIGKILL)
        log.close()
    time.sleep(1)
    checkpoints = _complete_checkpoints(output)
    assert checkpoints, "the killed run left no checkpoint"
    resume_step = checkpoints[-1]
    saved_state = json.loads((output / f"checkpoint-{resume_step}" / "training_state.json").read_text())
    assert _state(api, first)["type"] == "RUNNING"  # nobody told the server yet

    # rerun: a new run of the same deployment; stop_at_step time-boxes it (the LR schedule keeps max_steps)
    rerun = {"train": {**train, "stop_at_step": resume_step + 2}, "launch": launch}
    second = _run_deployment(env, "train-diffusionsat/default", rerun)
    _run_worker_once(env, "dsat-gpu", tmp_path / "worker-rerun.log")
    assert _state(api, second)["type"] == "COMPLETED", (tmp_path / "worker-rerun.log").read_text()[-4000:]
    logs = "\n".join(_flow_run_logs(api, second))
    assert f"resumed from {output / f'checkpoint-{resume_step}'} at step {resume_step}" in logs, logs[-3000:]
    result = json.loads((output / "train_result.json").read_text())
    assert result["global_step"] == resume_step + 2
    assert result["mlflow_run_id"] == saved_state["mlflow_run_id"]  # the same MLflow run continues

    # the heartbeat automation marks the dead run CRASHED (at most ZOMBIE_WITHIN_S after its last heartbeat)
    deadline = killed_at + ZOMBIE_WITHIN_S + 40
    while (state := _state(api, first))["type"] == "RUNNING" and time.monotonic() < deadline:
        time.sleep(2)
    assert state["type"] == "CRASHED", state
    assert "Heartbeats stopped" in state["message"]
    # finished runs are not touched by the automation
    assert all(_state(api, run)["type"] == "COMPLETED" for run in [*_COMPLETED_RUNS, second])
