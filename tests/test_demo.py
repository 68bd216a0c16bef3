"""The README's main job (`dsat demo` → `main-job`), with tiny step counts, run twice."""

from __future__ import annotations

import mlflow
import pytest

from dsat_core.data.store import DatasetStore
from flows.demo import APPLY_AOI, DemoParams, main_job

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]


def test_main_job_end_to_end_and_rerun(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = DemoParams(
        output_dir=str(tmp_path / "demo"),
        vae_steps=4,
        train_steps=4,
        controlnet_steps=2,
        eval_samples=2,
        eval_steps=2,
    )
    first = main_job(params)

    store = DatasetStore.open(first.store.store_uri)
    assert first.store.tiles_added["rgb"] > 50 and store.n_tiles("multispectral") > 0
    assert first.diffusionsat.global_step == 4 and first.controlnet_sr.global_step == 2
    assert {"fid", "kid_mean"} <= set(first.evaluation["generation"].metrics)
    assert {"psnr/model", "psnr/bicubic", "ssim/model"} <= set(first.evaluation["sr"].metrics)

    # Everything sits in one MLflow store, nested under the main-job run, with registered models.
    mlflow.set_tracking_uri(first.mlflow_tracking_uri)
    client = mlflow.MlflowClient()
    train_run = client.get_run(first.diffusionsat.mlflow_run_id)
    assert float(train_run.data.params["learning_rate"]) == params.finetune_learning_rate  # gentle fine-tune
    parent = train_run.data.tags["mlflow.parentRunId"]
    assert client.get_run(first.evaluation["sr"].mlflow_run_id).data.tags["mlflow.parentRunId"] == parent
    champion = client.get_model_version_by_alias("diffusionsat-demo", "champion")  # evaluated, then promoted
    assert champion.version == client.get_model_version_by_alias("diffusionsat-demo", "candidate").version
    assert champion.tags["dsat.store_content_hash"] == first.store.content_hash

    assert _latest_artifact("diffusionsat-progress") == 100.0  # the progress bar in the Prefect UI
    _check_applied_sr(first.applied_sr)

    second = main_job(params)  # a rerun does no damage: nothing new to ingest, training already done
    assert second.store.items_added == [] and second.store.content_hash == first.store.content_hash
    assert second.diffusionsat.global_step == 4 and second.diffusionsat.mlflow_run_id == train_run.info.run_id
    assert DatasetStore.open(first.store.store_uri).n_tiles("rgb") == store.n_tiles("rgb")


def _check_applied_sr(applied: dict) -> None:
    """The SR mosaic of a shipped scene: on the scene's CRS, 4 x the input pixels along each side."""
    import json
    from pathlib import Path

    import rasterio
    import rasterio.warp

    from dsat_core.data.catalog import CATALOG_DIR
    from dsat_core.evaluation.stac_output import validate_catalog

    item = json.loads(Path(applied["item"]).read_text())
    factor = item["properties"]["dsat:apply"]["task"]["degradation"]["factor"]
    scene = CATALOG_DIR / "samples" / "landsat8_oli_sr_rondonia_20190727_6band_30m.tif"
    with rasterio.open(scene) as src, rasterio.open(applied["cog"]) as out:
        assert out.crs == src.crs and out.transform.a == pytest.approx(src.transform.a / factor)
        left, bottom, right, top = rasterio.warp.transform_bounds("EPSG:4326", src.crs, *APPLY_AOI)
        cols, rows = (right - left) / src.transform.a, (top - bottom) / -src.transform.e
        assert cols <= out.width / factor <= cols + 2 and rows <= out.height / factor <= rows + 2
        assert out.count == 3 and out.overviews(1)
        assert out.read_masks(1).all() and out.read().std() > 0.0
    assert item["properties"]["gsd"] == pytest.approx(30.0 / factor)
    assert validate_catalog(applied["catalog"]) >= 2


def _latest_artifact(key: str):
    import asyncio

    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            found = await client.read_latest_artifacts()
            return next(a.data for a in found if a.key == key)

    return asyncio.run(read())
