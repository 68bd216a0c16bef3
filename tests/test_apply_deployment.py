"""The `apply-model/sr`, `apply-model/cloud-fill` and `apply-model/generate` deployments of infra/prefect.yaml
run on a real Prefect server and process worker (the deployment setup of tests/test_deployments.py: `prefect
deploy --all` from the README) over the shipped Rondônia scene, logging to a real MLflow server: each writes
a COG on the input's grid (at the input GSD / the factor), a valid STAC item with provenance and an MLflow
run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import rasterio
from test_apply import AOI, SCENE, SOURCE, _aoi_shape, _mask_raster, sr_model  # noqa: F401 - model fixture
from test_deployments import (  # noqa: F401 - the Prefect server fixtures
    _run_deployment,
    _run_worker_once,
    _state,
    deployed,
    prefect_server,
)

from dsat_core.evaluation.stac_output import validate_catalog

pytestmark = pytest.mark.slow
EXPERIMENT = "apply-deployments"


def _params(kind: str, model: Path, out: Path, mlflow_server: str, **extra: Any) -> dict[str, Any]:
    """The deployment's parameters for the shipped samples (local catalog, tiny model, 2 steps)."""
    return {"kind": kind, "catalog": "local-samples", "bbox": list(AOI), "model": str(model), "out": str(out),
            "steps": 2, "overlap": 4, "mlflow_tracking_uri": mlflow_server, "experiment": EXPERIMENT,
            **extra}  # fmt: skip


def test_apply_model_deployments_write_mosaics_items_and_mlflow_runs(
    deployed: dict[str, str],  # noqa: F811
    sr_model: Path,  # noqa: F811
    tiny_pipelines: dict[str, Path],
    mlflow_server: str,
    tmp_path: Path,
) -> None:
    from mlflow import MlflowClient

    runs = {  # deployment: (task kind, parameters, output factor)
        "apply-model/sr": ("sr", _params("sr", sr_model, tmp_path / "sr", mlflow_server, strength=0.3), 2),
        "apply-model/cloud-fill": ("inpaint", _params(
            "inpaint", tiny_pipelines["inpaint"], tmp_path / "fill", mlflow_server,
            fill_mask=str(_mask_raster(tmp_path / "clouds.tif")),
        ), 1),
        "apply-model/generate": ("generate", _params(
            "generate", tiny_pipelines["generation"], tmp_path / "gen", mlflow_server
        ), 1),
    }  # fmt: skip
    flow_runs = {name: _run_deployment(deployed, name, params) for name, (_, params, _) in runs.items()}
    _run_worker_once(deployed, "dsat-process", tmp_path / "worker.log", timeout=900)
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    logged = {r.data.params["kind"]: r for r in client.search_runs([experiment.experiment_id])}
    for name, (kind, params, factor) in runs.items():
        state = _state(deployed["PREFECT_API_URL"], flow_runs[name])
        assert state["type"] == "COMPLETED", (name, (tmp_path / "worker.log").read_text()[-4000:])
        item_path = Path(params["out"]) / f"{kind}-{SCENE}" / f"{kind}-{SCENE}.json"
        item = json.loads(item_path.read_text())
        provenance = item["properties"]["dsat:apply"]
        assert provenance["inputs"][0]["id"] == SCENE
        assert provenance["strength"] == params.get("strength", 1.0)
        assert ("fill_mask" in item["assets"]) is (kind == "inpaint")
        assert item["properties"]["gsd"] == pytest.approx(30.0 / factor)
        with rasterio.open(SOURCE) as src, rasterio.open(item_path.with_suffix(".tif")) as out:
            assert out.crs == src.crs and out.transform.a == pytest.approx(src.transform.a / factor)
            assert (out.width // factor, out.height // factor) == _aoi_shape(src) and out.overviews(1)
        assert validate_catalog(Path(params["out"]) / "catalog.json") == 2
        assert logged[kind].info.status == "FINISHED", name
