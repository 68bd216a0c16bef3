"""Shared pytest fixtures. Each group is owned by one part of the code base; add new groups below."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from dsat_core.data.stac_server import StacServer, free_port
from dsat_core.data.stac_server import start_rustac as _start_rustac

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------------------
# STAC reading (dsat_core.data.stac / reader / security, dsat_core.captions): real scenes and a real STAC API
# ------------------------------------------------------------------------------------------------------------
REAL_DATA = REPO.parent / "shared" / "data" / "real"
SAMPLES = REPO / "catalogs" / "samples"
REAL_COLLECTION = "real-samples"


def start_rustac(args: list[str], cwd: Path) -> StacServer:
    """`rustac serve ARGS` in `cwd` on a free 127.0.0.1 port (skips when the rustac CLI is missing)."""
    if shutil.which("rustac") is None and not (Path(sys.executable).parent / "rustac").exists():
        pytest.skip("the rustac CLI is not installed")
    return _start_rustac(args, cwd)


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
    server = start_rustac(["items.ndjson", "--create-collections"], folder)
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def samples_api() -> Iterator[str]:
    """rustac started from catalogs/samples the way the demo does (relative hrefs)."""
    server = start_rustac(["collection.json", "items.ndjson"], SAMPLES)
    yield server.url
    server.stop()


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


@pytest.fixture
def local_catalog(tmp_path: Path) -> Callable[..., str]:
    """A shipped catalog YAML rewritten into `tmp_path`: local files allowed under it, 32 px tiles, and any
    other field changes given; returns the YAML path."""
    import yaml

    from dsat_core.data.catalog import load_catalog

    def make(name: str, **changes: Any) -> str:
        data = load_catalog(name).model_dump(mode="json")
        data.update(allowed_roots=[str(tmp_path)], tile_size=32, **changes)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        return str(path)

    return make


# ------------------------------------------------------------------------------------------------------------
# Orchestration (flows/): a Prefect test API for the whole session
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def prefect_api() -> Iterator[None]:
    """A temporary Prefect API (Prefect's own test harness) for flow tests."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


# ------------------------------------------------------------------------------------------------------------
# Evaluation (dsat_core.evaluation.runner / report, flows/evaluate.py): a real MLflow server, a small store
# with repeat acquisitions in two products, and tiny saved pipelines
# ------------------------------------------------------------------------------------------------------------
EVAL_PLACES = (("havelland", 12.73, 52.83), ("porto-velho", -63.93, -8.74), ("andros", -77.77, 24.56))
EVAL_DATES = ("2019-03-04", "2019-07-21", "2020-01-15")
EVAL_HOLDOUT = 0.25  # of 36 tiles: 9 held out (deterministic, see TileDataset split)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` (sqlite backend, served artifacts) on a free 127.0.0.1 port; yields its URL."""
    exe = shutil.which("mlflow")
    if exe is None:
        pytest.skip("the mlflow CLI is not installed")
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(folder / "server.log", "w")  # noqa: SIM115 - closed with the process
    cmd = [exe, "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
           "--artifacts-destination", str(folder / "artifacts"),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_until_healthy(proc, f"{url}/health", log, timeout=90)
    yield url
    stop_group(proc)
    log.close()


def wait_until_healthy(
    proc: subprocess.Popen,
    url: str,
    log: IO[str],
    *,
    timeout: float,
    healthy: Callable[[int], bool] = lambda status: status == 200,
) -> None:
    """Poll `url` until its HTTP status is `healthy`. If the server exits or `timeout` passes first, stop its
    process group (it was started in its own session), close its `log` and raise with the log's tail."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if healthy(response.status):
                    return
        except urllib.error.HTTPError as err:  # an error status is still an answer (e.g. 401 behind auth)
            if healthy(err.code):
                return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_group(proc)
            log.close()
            command = " ".join(map(str, proc.args[:3]))
            raise RuntimeError(f"{command} did not start on {url}: {Path(log.name).read_text()[-3000:]}")
        time.sleep(0.25)


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
    """Stop a server started in its own session, with the workers it forked (gunicorn / uvicorn)."""
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=timeout)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


@pytest.fixture(scope="session")
def eval_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """3 places × 3 dates × 4 tiles (16 px), each as `rgb` and `multispectral` (same field, same grid)."""
    from dsat_core.data.store import DatasetStore
    from dsat_core.data.synthetic import make_scene_tiles, synthetic_catalog
    from dsat_core.data.tiles import SceneTiles

    path = str(tmp_path_factory.mktemp("eval-store") / "store.zarr")
    store = DatasetStore.open(path, create=True, catalog=synthetic_catalog(("rgb", "multispectral"), 16))
    staged = []
    for name, lon, lat in EVAL_PLACES:
        for when in EVAL_DATES:
            item_id = f"{name}-{when}"
            scene = SceneTiles(item_id=item_id)
            for product, bands, dtype in (
                ("rgb", ("red", "green", "blue"), "uint8"),
                ("multispectral", ("blue", "green", "red", "nir08"), "uint16"),
            ):
                part = make_scene_tiles(
                    item_id, 4, 16, bands, product, lon=lon, lat=lat, date=when, dtype=dtype
                )
                scene.products[product] = part.products[product]
            staged.append(store.stage(scene))
    store.commit(staged)
    return path


@pytest.fixture(scope="session")
def tiny_pipelines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Saved tiny pipelines (16 px): `generation` (DiffusionSatPipeline with a non-zero metadata path) and
    one SatControlNetPipeline per task (`sr`: 4 channels, `temporal`: 3, `inpaint`: 3 + mask)."""
    import torch

    from dsat_core.models.controlnet3d import ControlNet3D
    from dsat_core.pipelines import SatControlNetPipeline, make_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny-pipelines")
    pipe = make_tiny_pipeline(sample_size=8, vae_downsample=2, seed=0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        with torch.no_grad():
            for p in pipe.unet.metadata_embedding.parameters():  # "trained": metadata changes the output
                p.normal_(0, 0.05)
        paths = {"generation": root / "generation"}
        pipe.save_pretrained(str(paths["generation"]), safe_serialization=True)
        for task, channels in (("sr", 4), ("temporal", 3), ("inpaint", 4)):
            controlnet = ControlNet3D.from_unet(pipe.unet, channels, (8, 16), vae_scale_factor=2)
            with torch.no_grad():
                for name, p in controlnet.named_parameters():
                    if "controlnet_" in name or "cond_embedding.conv_out" in name:
                        p.normal_(0, 0.02)
            paths[task] = root / task
            SatControlNetPipeline.from_diffusionsat(pipe, controlnet).save_pretrained(
                str(paths[task]), safe_serialization=True
            )
    return paths


# ------------------------------------------------------------------------------------------------------------
# Torch: tiny models run fastest single-threaded on the 2-core CI machines (no oversubscription).
# `DSAT_TORCH_THREADS=N make test` runs the suite on N threads: kernel choice must not decide a result.
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session", autouse=True)
def _torch_threads() -> Iterator[None]:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("DSAT_TORCH_THREADS", "1")))
    yield
    torch.set_num_threads(previous)
