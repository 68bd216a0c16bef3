"""The README's main job (`dsat demo` → `main-job`), with tiny step counts, run twice."""

from __future__ import annotations

import mlflow
import pytest

from dsat_core.data.store import DatasetStore
from flows.demo import DemoParams, main_job

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
    parent = train_run.data.tags["mlflow.parentRunId"]
    assert client.get_run(first.evaluation["sr"].mlflow_run_id).data.tags["mlflow.parentRunId"] == parent
    champion = client.get_model_version_by_alias("diffusionsat-demo", "champion")  # evaluated, then promoted
    assert champion.version == client.get_model_version_by_alias("diffusionsat-demo", "candidate").version
    assert champion.tags["dsat.store_content_hash"] == first.store.content_hash

    assert _latest_artifact("diffusionsat-progress") == 100.0  # the progress bar in the Prefect UI

    second = main_job(params)  # a rerun does no damage: nothing new to ingest, training already done
    assert second.store.items_added == [] and second.store.content_hash == first.store.content_hash
    assert second.diffusionsat.global_step == 4 and second.diffusionsat.mlflow_run_id == train_run.info.run_id
    assert DatasetStore.open(first.store.store_uri).n_tiles("rgb") == store.n_tiles("rgb")


def _latest_artifact(key: str):
    import asyncio

    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            found = await client.read_latest_artifacts()
            return next(a.data for a in found if a.key == key)

    return asyncio.run(read())
