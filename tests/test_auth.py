"""Nobody gets in who does not belong: loopback-only defaults, authenticated Prefect and MLflow servers
(started here for real), no published Dask scheduler, no secrets committed under infra/."""

from __future__ import annotations

import ast
import inspect
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import httpx
import pytest
import yaml
from conftest import stop_group, wait_until_healthy

from dsat_core.data.stac_server import free_port

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
VENV_BIN = Path(sys.executable).parent


# ------------------------------------------------------------------------------------------------ helpers
def _start(cmd: list[str], env: dict[str, str], log: Path) -> tuple[subprocess.Popen, IO[str]]:
    """Start a server in its own session, its output to `log`."""
    sink = log.open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, sink


def _compose() -> dict:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


# ------------------------------------------------------------------------------------------------ servers
@pytest.fixture(scope="module")
def auth_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A Prefect server with API basic auth and an MLflow server with the basic-auth app, both on 127.0.0.1,
    both started at once (their start-ups overlap). Credentials are random per run."""
    pytest.importorskip("flask_wtf", reason="the MLflow basic-auth app needs mlflow[auth] (Flask-WTF)")
    root = tmp_path_factory.mktemp("auth-servers")
    creds = {
        "prefect_auth": f"dsat:{secrets.token_urlsafe(12)}",
        "mlflow_user": "admin",
        "mlflow_password": secrets.token_urlsafe(12),
    }
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}

    prefect_port, mlflow_port = free_port(), free_port()
    prefect_env = {
        **base,
        "PREFECT_HOME": str(root / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_API_AUTH_STRING": creds["prefect_auth"],
    }
    prefect = _start(
        [str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
        prefect_env,
        root / "prefect.log",
    )

    # the repository's auth config, with its user database moved into the temp folder
    ini = (INFRA / "mlflow-basic-auth.ini").read_text()
    ini = re.sub(r"(?m)^database_uri = .*$", f"database_uri = sqlite:///{root / 'auth.db'}", ini)
    (root / "basic_auth.ini").write_text(ini)
    mlflow_env = {
        **base,
        "MLFLOW_AUTH_CONFIG_PATH": str(root / "basic_auth.ini"),
        "MLFLOW_AUTH_ADMIN_USERNAME": creds["mlflow_user"],
        "MLFLOW_AUTH_ADMIN_PASSWORD": creds["mlflow_password"],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
    }
    mlflow = _start(
        [str(VENV_BIN / "mlflow"), "server", "--app-name", "basic-auth",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"),
         "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1"],
        mlflow_env,
        root / "mlflow.log",
    )  # fmt: skip
    try:
        for (proc, sink), health in (
            (prefect, f"http://127.0.0.1:{prefect_port}/api/health"),
            (mlflow, f"http://127.0.0.1:{mlflow_port}/health"),
        ):  # any status below 500 is an answer: the auth apps say 401 once they are up
            wait_until_healthy(proc, health, sink, timeout=120, healthy=lambda status: status < 500)
        yield {
            **creds,
            "prefect_api": f"http://127.0.0.1:{prefect_port}/api",
            "mlflow": f"http://127.0.0.1:{mlflow_port}",
        }
    finally:
        for started in (prefect, mlflow):
            stop_group(started[0])
            started[1].close()


def test_prefect_server_refuses_requests_without_the_auth_string(auth_servers: dict[str, str]) -> None:
    api = auth_servers["prefect_api"]
    user, password = auth_servers["prefect_auth"].split(":", 1)
    assert httpx.post(f"{api}/flows/filter", json={}, timeout=10).status_code == 401
    assert httpx.post(f"{api}/flows/filter", json={}, auth=(user, "wrong"), timeout=10).status_code == 401
    assert httpx.get(f"{api}/work_pools/dsat-gpu", timeout=10).status_code == 401
    ok = httpx.post(f"{api}/flows/filter", json={}, auth=(user, password), timeout=10)
    assert ok.status_code == 200 and ok.json() == []


def test_prefect_cli_authenticates_with_prefect_api_auth_string(auth_servers: dict[str, str]) -> None:
    """What workers and `prefect deploy` do: PREFECT_API_AUTH_STRING on the client side."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_API_URL=auth_servers["prefect_api"], PREFECT_SERVER_ANALYTICS_ENABLED="false")
    cmd = [str(VENV_BIN / "prefect"), "work-pool", "create", "dsat-auth-check", "--type", "process"]
    refused = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    env["PREFECT_API_AUTH_STRING"] = auth_servers["prefect_auth"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    user, password = auth_servers["prefect_auth"].split(":", 1)
    pool = httpx.get(f"{auth_servers['prefect_api']}/work_pools/dsat-auth-check", auth=(user, password))
    assert pool.status_code == 200 and pool.json()["type"] == "process"


def test_mlflow_basic_auth_refuses_strangers_and_users_without_permission(
    auth_servers: dict[str, str],
) -> None:
    url = f"{auth_servers['mlflow']}/api/2.0/mlflow"
    admin = (auth_servers["mlflow_user"], auth_servers["mlflow_password"])
    search = f"{url}/experiments/search?max_results=10"
    assert httpx.get(search, timeout=10).status_code == 401
    assert httpx.get(search, auth=("admin", "not-the-password"), timeout=10).status_code == 401
    assert httpx.get(search, auth=admin, timeout=10).status_code == 200

    created = httpx.post(f"{url}/experiments/create", json={"name": "private"}, auth=admin, timeout=10)
    assert created.status_code == 200, created.text
    experiment_id = created.json()["experiment_id"]
    # a user the admin adds gets nothing until granted (default_permission = NO_PERMISSIONS in the ini)
    alice = ("alice", secrets.token_urlsafe(12))
    made = httpx.post(
        f"{url}/users/create", json={"username": alice[0], "password": alice[1]}, auth=admin, timeout=10
    )
    assert made.status_code == 200, made.text
    get = f"{url}/experiments/get?experiment_id={experiment_id}"
    assert httpx.get(get, auth=alice, timeout=10).status_code == 403
    assert httpx.get(get, auth=admin, timeout=10).status_code == 200
    granted = httpx.post(
        f"{auth_servers['mlflow']}/api/3.0/mlflow/users/permissions/grant",
        json={"username": alice[0], "resource_type": "experiment", "resource_id": experiment_id,
              "permission": "READ"},
        auth=admin,
        timeout=10,
    )  # fmt: skip
    assert granted.status_code == 200, granted.text
    assert httpx.get(get, auth=alice, timeout=10).status_code == 200


def test_mlflow_client_reads_credentials_from_the_environment(
    auth_servers: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=auth_servers["mlflow"])
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    with pytest.raises(MlflowException, match="401|nauthorized|credentials"):
        client.search_experiments()
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", auth_servers["mlflow_user"])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", auth_servers["mlflow_password"])
    assert "Default" in {e.name for e in client.search_experiments()}


# ------------------------------------------------------------------------------------------------ static
def test_compose_publishes_only_on_loopback_and_never_the_dask_scheduler() -> None:
    services = _compose()["services"]
    published = {name: svc.get("ports", []) for name, svc in services.items()}
    assert any(published.values())
    for name, ports in published.items():
        for port in ports:
            spec = port if isinstance(port, str) else f"{port.get('host_ip', '')}:{port.get('published', '')}"
            assert spec.startswith("127.0.0.1:"), f"{name} publishes {port!r} beyond loopback"
    for name in ("dask-scheduler", "dask-worker", "postgres", "prefect-worker"):
        assert "ports" not in services[name] and "expose" not in services[name], name
    assert all(svc.get("network_mode") != "host" for svc in services.values())


def test_local_entry_points_default_to_loopback() -> None:
    from dsat_core.data import stac_server
    from flows.cli import build_parser

    assert build_parser().parse_args(["stac", "serve"]).host == "127.0.0.1"
    for fn in (stac_server.serve_static_catalog, stac_server.start_stac_server, stac_server.free_port):
        assert inspect.signature(fn).parameters["host"].default == "127.0.0.1", fn.__name__
    # Dask dashboards of LocalClusters: ":0" would listen on every interface
    found = []
    for path in [*(REPO / "dsat_core").rglob("*.py"), *(REPO / "flows").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            pairs = []
            if isinstance(node, ast.Call):
                pairs = [(k.arg, k.value) for k in node.keywords]
            elif isinstance(node, ast.Dict):
                pairs = [(getattr(k, "value", None), v) for k, v in zip(node.keys, node.values, strict=True)]
            for key, value in pairs:
                if key in ("dashboard_address", "host") and isinstance(value, ast.Constant):
                    found.append((f"{path.relative_to(REPO)}:{node.lineno}", key, value.value))
    bad = [f for f in found if f[2] is not None and not str(f[2]).startswith(("127.0.0.1", "localhost"))]
    assert not bad, bad
    assert any(key == "dashboard_address" for _, key, _ in found)


# placeholders documented in infra/.env.example (never real values)
PLACEHOLDER = re.compile(r"^(change-me[\w-]*|dsat(-admin)?|admin)$")
SECRET_KEY = re.compile(r"(PASSWORD|SECRET|TOKEN|AUTH_STRING|ACCESS_KEY|PRIVATE|API_KEY)", re.I)
REFERENCE = re.compile(r"^(\$\{[^}]+\}|\{\{[^}]+\}\}|\$\$?\w+|\"?\$\{[^}]+\}\"?)$")


def _assignments(text: str) -> list[tuple[int, str, str]]:
    """(line, key, value) of `KEY=value`, `key: value` and `key = value` lines."""
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("#"):
            continue
        match = re.match(r"^\s*-?\s*\"?([A-Za-z_][\w.-]*)\"?\s*[:=]\s*(.*?)\s*,?$", line)
        if match:
            out.append((number, match.group(1), match.group(2).strip().strip("\"'")))
    return out


def test_no_secrets_committed_under_infra() -> None:
    files = [p for p in INFRA.rglob("*") if p.is_file() and p.name != ".env"]
    assert (INFRA / ".env.example").is_file()
    problems = []
    for path in files:
        text = path.read_text()
        rel = path.relative_to(REPO)
        if re.search(r"AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY-----|ghp_[A-Za-z0-9]{30,}", text):
            problems.append(f"{rel}: key material")
        # credentials inside URLs (scheme://user:password@host) must be references
        for user_pass in re.findall(r"://[^/\s:@]+:([^@\s/]+)@", text):
            if not REFERENCE.match(user_pass):
                problems.append(f"{rel}: literal password in a URL")
        for number, key, value in _assignments(text):
            if not SECRET_KEY.search(key) or not value or value.lower() in ("null", "~", "true", "false"):
                continue
            if (
                value.startswith(("{", "[")) or value.isdigit()
            ):  # a nested object (e.g. a JSON schema) or a number
                continue
            if REFERENCE.match(value) or value.startswith(("${", "{{")) or key.lower().endswith("_file"):
                continue
            if path.name == ".env.example" and PLACEHOLDER.match(value.split(":")[-1]):
                continue
            if key.lower() in ("secretkeyref", "secretref", "secretname", "secretkey"):
                continue  # Kubernetes: a reference to a Secret, not a value
            problems.append(f"{rel}:{number}: {key} has a literal value")
    assert not problems, problems
    # the real env file is never tracked
    ignored = subprocess.run(["git", "check-ignore", "-q", "infra/.env"], cwd=REPO)
    assert ignored.returncode == 0, "infra/.env must be git-ignored"
    example = dict(line.split("=", 1) for line in (INFRA / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))  # fmt: skip
    secret_values = [v for k, v in example.items() if SECRET_KEY.search(k)]
    assert secret_values and all(v.split(":")[-1].startswith("change-me") for v in secret_values)
