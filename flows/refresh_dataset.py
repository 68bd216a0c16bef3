"""Prefect flow `refresh-dataset`: STAC search → read + tile per item (on Dask if asked) → commit → report."""

from __future__ import annotations

import os
from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.futures import wait
from pydantic import BaseModel, Field

from dsat_core.data.catalog import CatalogConfig, load_catalog
from dsat_core.data.cluster import local_cluster_kwargs
from dsat_core.data.ingest import (
    IngestPlan,
    IngestReport,
    commit_staged,
    ingest_report_markdown,
    plan_ingest,
    read_and_stage,
)
from dsat_core.data.stac import search_items
from dsat_core.data.store import DatasetStore, StagedScene


class RefreshParams(BaseModel):
    """What to refresh. Unset values come from the catalog YAML or the environment."""

    catalog: str = Field("local-samples", description="catalogs/<name>.yaml or a path to a YAML file")
    store_uri: str | None = Field(None, description="local path or s3://...; default $DSAT_STORE_URI")
    stac_api: str | None = Field(None, description="override the catalog's STAC API URL")
    bbox: tuple[float, float, float, float] | None = None
    intersects: dict[str, Any] | None = Field(None, description="GeoJSON geometry of the AOI")
    datetime: str | None = None
    max_items: int | None = None
    use_dask: bool = Field(False, description="run the per-item tasks on a Dask cluster")
    dask_address: str | None = Field(None, description="existing scheduler; default $DASK_SCHEDULER_ADDRESS")
    n_workers: int = Field(2, ge=1, description="workers of the LocalCluster when no address is given")
    storage_options: dict[str, Any] | None = Field(
        None, description="fsspec options for s3:// stores, without secrets (credentials come from the env)"
    )
    read_options: dict[str, Any] | None = Field(
        None, description="fsspec options for s3:// assets, e.g. {anon: true} for public buckets"
    )

    def resolved_store_uri(self) -> str:
        return self.store_uri or os.environ.get("DSAT_STORE_URI") or f"data/{self.catalog}.zarr"


class RefreshResult(BaseModel):
    store_uri: str
    content_hash: str
    version: int
    items_added: list[str]
    tiles_added: dict[str, int]
    rejected: int


@task(name="load-catalog")
def load_config(catalog: str, stac_api: str | None) -> CatalogConfig:
    return load_catalog(catalog).with_overrides(stac_api=stac_api)


@task(name="search-stac", retries=3, retry_delay_seconds=[2, 10, 30])
def search(config: CatalogConfig, params: RefreshParams) -> list[dict]:
    return search_items(
        config,
        bbox=params.bbox or config.bbox,
        intersects=params.intersects,
        datetime=params.datetime or config.datetime,
        max_items=params.max_items or config.max_items,
    )


@task(name="plan")
def plan(
    items: list[dict], store_uri: str, config: CatalogConfig, storage_options: dict | None
) -> IngestPlan:
    store = DatasetStore.open(store_uri, storage_options=storage_options, create=True, catalog=config)
    return plan_ingest(items, store)


@task(name="read-and-stage", retries=2, retry_delay_seconds=5, task_run_name="read-and-stage-{item[id]}")
def stage(
    item: dict,
    config: CatalogConfig,
    store_uri: str,
    aoi_bbox: tuple | None,
    storage_options: dict | None,
    read_options: dict | None = None,
) -> StagedScene:
    return read_and_stage(
        item, config, store_uri, aoi_bbox=aoi_bbox, storage_options=storage_options, read_options=read_options
    )


@task(name="commit")
def commit(
    store_uri: str, staged: list[StagedScene], todo: IngestPlan, storage_options: dict | None
) -> IngestReport:
    return commit_staged(DatasetStore.open(store_uri, storage_options=storage_options), staged, todo)


@flow(name="stage-items")
def stage_items(
    items: list[dict],
    config: CatalogConfig,
    store_uri: str,
    aoi_bbox: tuple | None,
    storage_options: dict | None,
    read_options: dict | None = None,
) -> list[StagedScene]:
    """Read and stage every item, mapped; runs on the task runner given by `refresh_dataset`."""
    futures = stage.map(
        items,
        unmapped(config),
        unmapped(store_uri),
        unmapped(aoi_bbox),
        unmapped(storage_options),
        unmapped(read_options),
    )
    wait(futures)
    return [f.result() for f in futures]


def _task_runner(params: RefreshParams):
    from prefect_dask import DaskTaskRunner

    address = params.dask_address or os.environ.get("DASK_SCHEDULER_ADDRESS")
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster", cluster_kwargs=local_cluster_kwargs(params.n_workers)
    )


@flow(name="refresh-dataset", log_prints=True)
def refresh_dataset(params: RefreshParams = RefreshParams()) -> RefreshResult:
    """Search the catalog, ingest only items not yet in the store, and publish a markdown report."""
    logger = get_run_logger()
    store_uri = params.resolved_store_uri()
    config = load_config(params.catalog, params.stac_api)
    items = search(config, params)
    todo = plan(items, store_uri, config, params.storage_options)
    logger.info("%d items found, %d new for %s", len(items), len(todo.todo), store_uri)
    stager = stage_items.with_options(task_runner=_task_runner(params)) if params.use_dask else stage_items
    staged = (
        stager(todo.todo, config, store_uri, params.bbox, params.storage_options, params.read_options)
        if todo.todo
        else []
    )
    report = commit(store_uri, staged, todo, params.storage_options)
    create_markdown_artifact(
        key="refresh-dataset-report", markdown=ingest_report_markdown(report), description="refresh-dataset"
    )
    return RefreshResult(
        store_uri=store_uri,
        content_hash=report.content_hash,
        version=report.version,
        items_added=report.items_added,
        tiles_added=report.added_tiles,
        rejected=len(report.rejected),
    )


if __name__ == "__main__":
    refresh_dataset()
