"""The `evaluate` Prefect flow end to end against a real MLflow server: a registered model fetched by alias,
metrics, tables, maps, sample grids, sensitivity and a STAC catalog logged as artifacts, lineage tags."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest
from conftest import EVAL_HOLDOUT
from PIL import Image
from pydantic import ValidationError

from dsat_core.data.store import DatasetStore
from dsat_core.evaluation import validate_catalog
from flows.evaluate import EvaluateParams, evaluate

pytestmark = pytest.mark.usefixtures("prefect_api")


def _artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for info in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, info.path) if info.is_dir else {info.path}
    return out


@pytest.fixture(scope="module")
def registered_model(mlflow_server: str, tiny_pipelines: dict[str, Path], eval_store: str) -> tuple[str, str]:
    """The tiny generation pipeline logged the way training logs it (pyfunc + registry), alias `candidate`.
    Returns (training run id, model URI)."""
    from mlflow import MlflowClient

    from dsat_core.training.mlflow_logging import MlflowTracker

    tracker = MlflowTracker(mlflow_server, "train-diffusionsat", run_name="tiny-train")
    lineage = {"store_uri": eval_store, "content_hash": "abc", "product": "rgb", "item_ids": [], "n_tiles": 0}
    version = tracker.log_pipeline(
        tiny_pipelines["generation"], "tiny-dsat", lineage=lineage, pip_requirements=["torch"]
    )
    tracker.end()
    MlflowClient(mlflow_server).set_registered_model_alias("tiny-dsat", "candidate", version)
    return tracker.run_id, "models:/tiny-dsat@candidate"


def test_generation_from_registered_model_logs_everything(
    mlflow_server: str,
    registered_model: tuple[str, str],
    eval_store: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mlflow import MlflowClient

    from dsat_core.pipelines import DiffusionSatPipeline

    loads: list[str] = []
    load = DiffusionSatPipeline.from_pretrained.__func__

    def counted(cls, path, *args, **kwargs):
        loads.append(str(path))
        return load(cls, path, *args, **kwargs)

    monkeypatch.setattr(DiffusionSatPipeline, "from_pretrained", classmethod(counted))
    train_run, model_uri = registered_model
    params = EvaluateParams(
        model_uri=model_uri,
        store_uri=eval_store,
        kind="generation",
        n_samples=4,
        steps=2,
        guidance_scale=1.0,
        holdout_fraction=EVAL_HOLDOUT,
        sensitivity_samples=3,
        mlflow_tracking_uri=mlflow_server,
        experiment=None,  # nest in the training run's experiment
        parent_run_id=train_run,
        output_dir=str(tmp_path / "out"),
        promote_to="champion",
    )
    result = evaluate(params)
    assert len(loads) == 1  # one load serves the evaluation and the sensitivity report

    client = MlflowClient(mlflow_server)
    assert client.get_model_version_by_alias("tiny-dsat", "champion").version == "1"
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == train_run
    assert run.info.experiment_id == client.get_run(train_run).info.experiment_id
    assert run.data.tags["dsat.store_content_hash"] == DatasetStore.open(eval_store).content_hash
    assert run.data.tags["dsat.store_uri"] == eval_store
    assert run.data.tags["dsat.model_uri"] == model_uri and run.data.tags["dsat.model_version"] == "1"
    assert run.data.tags["dsat.model_run_id"] == train_run
    assert "dsat.skipped.is" not in run.data.tags  # IS was not requested, so not reported as skipped
    metrics = run.data.metrics
    assert {"fid", "kid_mean", "sensitivity/lon", "robustness/mean_abs_change"} <= metrics.keys()
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics == pytest.approx(result.metrics)
    assert run.data.params["n_samples"] == "4" and run.data.params["eval.nearest_real_space"] == "inception"

    files = _artifacts(client, result.mlflow_run_id)
    expected = {
        "tables/per_tile.json",
        "samples/grid.png",
        "maps/quality_map.png",
        "sensitivity/sensitivity.json",
        "sensitivity/sensitivity.png",
        "stac/catalog.json",
        "summary.md",
    }
    assert expected <= files
    assert sum(f.startswith("stac/") and f.endswith(".tif") for f in files) == 4

    # what the server holds is complete: the table has a row per sample, the STAC copy validates
    local = Path(client.download_artifacts(result.mlflow_run_id, "", str(tmp_path / "dl")))
    table = json.loads((local / "tables" / "per_tile.json").read_text())
    rows = dict(zip(table["columns"], zip(*table["data"], strict=True), strict=True))
    assert len(rows["seed"]) == 4 and {"lon", "lat", "caption", "nearest_real_distance"} <= rows.keys()
    assert validate_catalog(local / "stac" / "catalog.json") == 1 + 1 + 4
    item = json.loads(next((local / "stac").rglob("*000001.json")).read_text())
    assert item["properties"]["dsat:model_uri"] == model_uri and item["properties"]["dsat:seed"] == 1
    assert Image.open(local / "maps" / "quality_map.png").format == "PNG"
    sensitivity = json.loads((local / "sensitivity" / "sensitivity.json").read_text())
    assert sensitivity["robustness"]["n"] == 3 and set(sensitivity["fields"]) >= {
        "lon",
        "lat",
        "gsd",
        "month",
    }
    assert result.stac_catalog and validate_catalog(result.stac_catalog) == 6
    assert "Evaluation: generation" in _markdown("evaluate-report")


def test_sr_from_folder_logs_model_and_bicubic_side_by_side(
    mlflow_server: str, tiny_pipelines: dict[str, Path], eval_store: str, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    params = EvaluateParams(
        pipeline_dir=str(tiny_pipelines["sr"]),
        store_uri=eval_store,
        kind="sr",
        n_samples=3,
        steps=2,
        holdout_fraction=EVAL_HOLDOUT,
        sensitivity=False,
        mlflow_tracking_uri=mlflow_server,
        output_dir=str(tmp_path / "out"),
    )
    result = evaluate(params)
    client = MlflowClient(mlflow_server)
    run = client.get_run(result.mlflow_run_id)
    assert client.get_experiment(run.info.experiment_id).name == "evaluate"
    for name in ("psnr", "ssim"):
        assert math.isfinite(run.data.metrics[f"{name}/model"]) and math.isfinite(
            run.data.metrics[f"{name}/bicubic"]
        )
    assert run.data.params["eval.recipe.degradation.factor"] == "4"
    assert run.data.tags["dsat.skipped.lpips"].startswith("no local LPIPS")
    files = _artifacts(client, result.mlflow_run_id)
    assert {"tables/per_tile.json", "maps/quality_map.png", "samples/grid.png", "stac/catalog.json"} <= files
    assert not any(f.startswith("sensitivity/") for f in files)
    grid = Image.open(client.download_artifacts(result.mlflow_run_id, "samples/grid.png", str(tmp_path)))
    assert grid.size == (2 + 4 * 18, 2 + 3 * 18)  # per tile: conditioning | bicubic | model | target
    markdown = _markdown("evaluate-report")
    assert "| psnr |" in markdown and "bicubic" in markdown


def test_params_need_exactly_one_model(eval_store: str) -> None:
    with pytest.raises(ValidationError, match="exactly one"):
        EvaluateParams(store_uri=eval_store)
    with pytest.raises(ValidationError, match="exactly one"):
        EvaluateParams(store_uri=eval_store, pipeline_dir="a", model_uri="models:/x@y")


def _markdown(key: str) -> str:
    from prefect.client.orchestration import get_client

    async def latest() -> str:
        async with get_client() as client:
            artifacts = await client.read_latest_artifacts()
            return next(a.data for a in artifacts if a.key == key)

    return asyncio.run(latest())
