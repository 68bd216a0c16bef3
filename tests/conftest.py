"""Shared pytest fixtures. Each group is owned by one part of the code base; add new groups below."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------------------
# STAC reading (dsat_core.data.stac / reader / security, dsat_core.captions): real scenes and a real STAC API
# ------------------------------------------------------------------------------------------------------------
REAL_DATA = REPO.parent / "shared" / "data" / "real"
SAMPLES = REPO / "catalogs" / "samples"
REAL_COLLECTION = "real-samples"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_rustac(args: list[str], cwd: Path, port: int, timeout: float = 20.0) -> subprocess.Popen:
    """Start `rustac serve ARGS --addr 127.0.0.1:PORT` in `cwd` and wait until it answers."""
    exe = shutil.which("rustac")
    if exe is None:
        pytest.skip("the rustac CLI is not installed")
    log = open(cwd / f"rustac-{port}.log", "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [exe, "serve", *args, "--addr", f"127.0.0.1:{port}"], cwd=cwd, stdout=log, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"rustac exited with {proc.returncode}: {(cwd / log.name).read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1):
                return proc
        except OSError:
            time.sleep(0.1)
    proc.terminate()
    raise RuntimeError(f"rustac did not answer on port {port} within {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not (REAL_DATA / "catalog" / "catalog.json").is_file():
        pytest.skip(f"real sample data not found at {REAL_DATA}")
    return REAL_DATA


@pytest.fixture(scope="session")
def real_items(real_data: Path) -> dict[str, dict]:
    """The six real items (static catalog) as dicts with absolute asset hrefs, keyed by id."""
    from dsat_core.data.stac import load_static_catalog

    return {item["id"]: item for item in load_static_catalog(real_data / "catalog" / "catalog.json")}


@pytest.fixture(scope="session")
def stac_api(real_items: dict[str, dict], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a rustac STAC API on a free 127.0.0.1 port serving the six real items (absolute hrefs)."""
    folder = tmp_path_factory.mktemp("stac-api")
    lines = []
    for item in real_items.values():
        item = {**item, "collection": REAL_COLLECTION, "links": []}
        lines.append(json.dumps(item))
    (folder / "items.ndjson").write_text("\n".join(lines) + "\n")
    port = free_port()
    proc = start_rustac(["items.ndjson", "--create-collections"], folder, port)
    yield f"http://127.0.0.1:{port}"
    stop(proc)


@pytest.fixture(scope="session")
def samples_api() -> Iterator[str]:
    """rustac started from catalogs/samples the way the demo does (relative hrefs)."""
    port = free_port()
    proc = start_rustac(["collection.json", "items.ndjson"], SAMPLES, port)
    yield f"http://127.0.0.1:{port}"
    stop(proc)
    for log in SAMPLES.glob(f"rustac-{port}.log"):
        log.unlink()


# ------------------------------------------------------------------------------------------------------------
# Dataset store (dsat_core.data.store / ingest / dataset): a real S3 API (moto server) on 127.0.0.1
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A `moto_server` on a free port; yields s3fs ``storage_options`` (endpoint + dummy credentials)."""
    exe = shutil.which("moto_server")
    if exe is None:
        pytest.skip("moto_server is not installed (pip install 'moto[server]')")
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1):
                break
        except OSError as err:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop(proc)
                raise RuntimeError(f"moto_server did not start on {endpoint}") from err
            time.sleep(0.1)
    yield {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
    stop(proc)
    log.close()


@pytest.fixture
def s3_bucket(s3_server: dict, request: pytest.FixtureRequest) -> str:
    """A fresh, empty bucket name on the moto server."""
    import re

    import s3fs

    fs = s3fs.S3FileSystem(**s3_server)
    name = (
        re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-")
        + f"-{time.monotonic_ns() % 10**6}"
    )
    fs.mkdir(name)
    return name


# ------------------------------------------------------------------------------------------------------------
# Orchestration (flows/): a Prefect test API for the whole session
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def prefect_api() -> Iterator[None]:
    """A temporary Prefect API (Prefect's own test harness) for flow tests."""
    import os

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
