"""The deployments in infra/prefect.yaml really run: a real Prefect server, the README's "Deployments"
commands verbatim (pools, `prefect deploy --all`, a process worker per pool, `refresh-dataset/local-samples` →
`train-diffusionsat/default` → `train-controlnet/sr`, tiny step counts added as `--params`), a real MLflow
server; a worker killed mid-run leaves a CRASHED flow run and a rerun resumes training.

Everything is started here on 127.0.0.1 (no mocks); the module took 13 minutes on 2 cores shared with other
jobs (load average ~8), the README sequence 5.5 of them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
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
README = REPO / "README.md"
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
    "apply-model/sr",
    "apply-model/cloud-fill",
    "apply-model/generate",
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


def readme_deployment_commands() -> list[str]:
    """The command lines of the README's "Deployments" code block, as written there."""
    section = README.read_text().split("\n## Deployments\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "README.md: no bash block in the Deployments section"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def _split_setup(commands: list[str]) -> tuple[list[str], list[str]]:
    """(the lines before the first worker starts: pools and deployments, the rest: workers and runs)."""
    first = next(i for i, line in enumerate(commands) if " worker start " in line)
    return commands[:first], commands[first:]


def _bash(env: dict[str, str], lines: list[str], log: Path, timeout: float) -> subprocess.Popen:
    """Run `lines` as one `bash -e` script from the repository root, in its own session, logging to `log`;
    returns once the script ended (its background jobs may still run: stop them with `_stop_session`)."""
    with log.open("w") as sink:
        proc = subprocess.Popen(
            ["bash", "-euo", "pipefail", "-c", "\n".join(lines)],
            env=env,
            cwd=REPO,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop_session(proc.pid)
            pytest.fail(f"the README commands still ran after {timeout} s:\n{log.read_text()[-5000:]}")
    return proc


def _running_in_group(pgid: int) -> list[int]:
    """Pids of the group's processes that still run (zombies whose parent has not reaped them excluded)."""
    import psutil

    alive = []
    for proc in psutil.process_iter(["status"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(proc.pid)
    return alive


def _stop_session(pgid: int, timeout: float = 30) -> None:
    """SIGTERM every process of the group, wait until none runs, SIGKILL what is left after `timeout`."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _running_in_group(pgid) and time.monotonic() < deadline:
        time.sleep(0.5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


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
def deployed(prefect_server: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The README's commands up to the first worker (both pools, every deployment of infra/prefect.yaml),
    run verbatim, and the zombie-run automation.

    They run WITHOUT DSAT_REPO, as a deployer's shell would: the workers' own DSAT_REPO decides where the
    code is.
    """
    env = prefect_server
    automation = yaml.safe_load(ZOMBIE_AUTOMATION.read_text())
    automation["automations"][0]["trigger"]["within"] = ZOMBIE_WITHIN_S  # shorter window, same definition
    _cli(env, "automation", "create", "--from-json", json.dumps(automation))
    setup, _ = _split_setup(readme_deployment_commands())
    log = tmp_path_factory.mktemp("readme-setup") / "setup.log"
    done = _bash(_without_repo(env), setup, log, timeout=400)
    assert done.returncode == 0, log.read_text()[-5000:]
    return env


def _without_repo(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k != "DSAT_REPO"}


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A small synthetic store with `rgb` tiles for the crash test."""
    from dsat_core.data.synthetic import make_synthetic_store

    root = tmp_path_factory.mktemp("deploy-inputs")
    return {"store": make_synthetic_store(str(root / "store.zarr"), n_scenes=2, tiles_per_scene=4, size=16)}


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


def _tiny_params(tmp_path: Path, mlflow_server: str) -> dict[str, dict[str, Any]]:
    """`--params` for each deployment the README runs: tiny steps, outputs under `tmp_path`."""
    store, base = str(tmp_path / "local-samples.zarr"), tmp_path / "diffusionsat"
    tiny = {"model_size": "tiny", "text_encoder": "hash", "resolution": 16, "train_batch_size": 2}
    launch = {"nproc_per_node": 1, "launcher": "torchrun"}
    return {
        "refresh-dataset/local-samples": {"params": {"catalog": "local-samples", "store_uri": store}},
        "train-diffusionsat/default": {
            "params": {
                "train": {**tiny, "store_uri": store, "output_dir": str(base), "max_steps": 2,
                          "checkpointing_steps": 100, "use_mlflow": False},
                "launch": launch,
            }
        },
        "train-controlnet/sr": {
            "params": {
                "train": {**tiny, "task": "sr", "store_uri": store, "base_model": str(base / "pipeline"),
                          "output_dir": str(tmp_path / "controlnet-sr"), "max_steps": 2,
                          "checkpointing_steps": 100, "conditioning_embedding_channels": [8, 16],
                          "degradation": {"factor": 2, "blur_sigma": 0.8}, "use_mlflow": True,
                          "mlflow_tracking_uri": mlflow_server, "mlflow_experiment": "deployments-test",
                          "registered_model_name": "deploy-test-controlnet-sr", "validation_steps": 2,
                          "num_validation_samples": 2, "validation_inference_steps": 2},
                "launch": launch,
            }
        },
    }  # fmt: skip


def _with_params(lines: list[str], params: dict[str, dict[str, Any]]) -> list[str]:
    """The lines as written, each `prefect deployment run 'NAME' ...` with ` --params JSON` appended."""
    out = []
    for line in lines:
        match = re.match(r"prefect deployment run '([^']+)'", line)
        if match:
            assert match.group(1) in params, f"the README runs {match.group(1)}: give it tiny --params here"
            line = f"{line} --params {shlex.quote(json.dumps(params.pop(match.group(1))))}"
        out.append(line)
    assert not params, f"the README no longer runs {sorted(params)}"
    return out


def test_readme_deployment_commands_refresh_the_samples_then_train_then_the_sr_controlnet(
    deployed: dict[str, str], mlflow_server: str, tmp_path: Path
) -> None:
    """The README's worker and `deployment run --watch` lines, verbatim: nothing serves a STAC API but the
    refresh run itself; each run completes on its pool's worker before the next one starts."""
    from mlflow import MlflowClient

    from dsat_core.data.store import DatasetStore

    api = deployed["PREFECT_API_URL"]
    _, runs = _split_setup(readme_deployment_commands())
    log = tmp_path / "readme-runs.log"
    script = _bash(
        _without_repo(deployed), _with_params(runs, _tiny_params(tmp_path, mlflow_server)), log, 600
    )
    _stop_session(script.pid)  # the two workers the README started in the background
    out = log.read_text()
    assert script.returncode == 0, out[-6000:]
    flow_runs = re.findall(r"UUID: ([0-9a-f-]{36})", out)
    assert len(flow_runs) == 3 and all(_state(api, run)["type"] == "COMPLETED" for run in flow_runs), out
    _COMPLETED_RUNS.extend(flow_runs)

    store = DatasetStore.open(str(tmp_path / "local-samples.zarr"))
    shipped = {json.loads(line)["id"] for line in (REPO / "catalogs/samples/items.ndjson").open()}
    assert store.ingested_items() == shipped and store.n_tiles("rgb") > 50 and store.n_tiles("multispectral")
    base = json.loads((tmp_path / "diffusionsat" / "train_result.json").read_text())
    assert (
        base["global_step"] == 2 and (tmp_path / "diffusionsat" / "pipeline" / "model_index.json").is_file()
    )
    result = json.loads((tmp_path / "controlnet-sr" / "train_result.json").read_text())
    assert result["global_step"] == 2 and result["pipeline_dir"] == str(
        tmp_path / "controlnet-sr" / "pipeline"
    )

    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["task"] == "sr"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert any(p.endswith(".png") for p in images), images
    versions = client.search_model_versions("name='deploy-test-controlnet-sr'")
    assert [(v.version, v.run_id) for v in versions] == [("1", run.info.run_id)]
    assert result["registered_model_version"] == "1"


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
