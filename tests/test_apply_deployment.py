"""The `apply-model/sr` deployment of infra/prefect.yaml runs on a real Prefect server and worker (the
deployment setup of tests/test_deployments.py: `prefect deploy --all` from the README), writing the COG and
STAC item of the shipped Rondônia scene."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import rasterio
from test_apply import AOI, SCENE, sr_model  # noqa: F401 - the module-scoped model fixture
from test_deployments import (  # noqa: F401 - the Prefect server fixtures
    _run_deployment,
    _run_worker_once,
    _state,
    deployed,
    prefect_server,
)

from dsat_core.evaluation.stac_output import validate_catalog

pytestmark = pytest.mark.slow


def test_apply_model_sr_deployment_writes_the_mosaic(
    deployed: dict[str, str],  # noqa: F811
    sr_model: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    params = {"kind": "sr", "catalog": "local-samples", "bbox": list(AOI), "model": str(sr_model),
              "out": str(tmp_path / "applied"), "steps": 2, "overlap": 4, "strength": 0.3}  # fmt: skip
    flow_run_id = _run_deployment(deployed, "apply-model/sr", params)
    _run_worker_once(deployed, "dsat-process", tmp_path / "worker.log", timeout=600)
    state = _state(deployed["PREFECT_API_URL"], flow_run_id)
    assert state["type"] == "COMPLETED", (tmp_path / "worker.log").read_text()[-4000:]
    item_path = tmp_path / "applied" / f"sr-{SCENE}" / f"sr-{SCENE}.json"
    item = json.loads(item_path.read_text())
    assert item["properties"]["dsat:apply"]["inputs"][0]["id"] == SCENE
    assert item["properties"]["dsat:apply"]["strength"] == pytest.approx(0.3)
    with rasterio.open(item_path.with_suffix(".tif")) as src:
        assert src.crs.to_epsg() == 32620 and src.transform.a == pytest.approx(15.0) and src.overviews(1)
    assert validate_catalog(tmp_path / "applied" / "catalog.json") == 2
