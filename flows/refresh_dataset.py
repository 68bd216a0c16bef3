"""Prefect flow `refresh-dataset`: load the catalog → STAC search → `ingest_items` → a markdown report.

A thin layer over the one ingest driver, `dsat_core.data.ingest.ingest_items` (what `dsat ingest` runs):
the driver is called inside one Prefect task with a Prefect-aware ``progress`` hook (a progress artifact
and log lines), so reads, staging, the shard copies and the commits run on Dask exactly as they do from
the command line, and a failed item task is recorded as a rejection there as here. The Prefect tasks are
the steps around it: `load-catalog`, `search-stac` (retried, except when the API is unreachable:
`StacApiUnreachable` fails the flow at once) and `ingest`. The items go to `ingest` under Prefect's `quote`:
Prefect would otherwise walk every value of every item dict twice (looking for upstream futures), about
0.8 s per thousand items before the task starts. A catalog with a `static_catalog`
(`catalogs/local-samples.yaml`) is served by the search task itself on a free 127.0.0.1 port.
"""

from __future__ import annotations

import os
import time
from typing import Any, cast
from uuid import UUID

from prefect import Task, flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.states import State
from prefect.utilities.annotations import quote
from pydantic import BaseModel, Field

from dsat_core.data.catalog import CatalogConfig, load_catalog
from dsat_core.data.ingest import IngestReport, ingest_items, ingest_report_markdown
from dsat_core.data.stac import StacApiUnreachable, search_items
from dsat_core.data.stac_server import catalog_api


class RefreshParams(BaseModel):
    """What to refresh. Unset values come from the catalog YAML or the environment."""

    catalog: str = Field("local-samples", description="catalogs/<name>.yaml or a path to a YAML file")
    store_uri: str | None = Field(None, description="local path or s3://...; default $DSAT_STORE_URI")
    stac_api: str | None = Field(None, description="override the catalog's STAC API URL")
    bbox: tuple[float, float, float, float] | None = None
    intersects: dict[str, Any] | None = Field(None, description="GeoJSON geometry of the AOI")
    datetime: str | None = None
    max_items: int | None = None
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

    def resolved_dask_address(self) -> str | None:
        return self.dask_address or os.environ.get("DASK_SCHEDULER_ADDRESS")


class RefreshResult(BaseModel):
    store_uri: str
    content_hash: str
    version: int
    items_added: list[str]
    tiles_added: dict[str, int]
    rejected: int


class IngestProgress:
    """The driver's ``progress`` hook in a task run: a Prefect progress artifact and a log line, each at
    most every ``every_s`` seconds (and at the last item), so the driver loop is not slowed by API calls."""

    def __init__(self, key: str = "refresh-dataset-progress", every_s: float = 2.0) -> None:
        self.logger = get_run_logger()
        made = create_progress_artifact(0.0, key=key, description="items read and staged")
        self.artifact = cast(UUID, made)  # the sync form of a sync/async function
        self.every_s, self.last = every_s, time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        if done < total and time.monotonic() - self.last < self.every_s:
            return
        self.last = time.monotonic()
        update_progress_artifact(self.artifact, 100.0 * done / max(total, 1))
        self.logger.info("%d / %d items read and staged", done, total)


@task(name="load-catalog")
def load_config(catalog: str, stac_api: str | None) -> CatalogConfig:
    return load_catalog(catalog).with_overrides(stac_api=stac_api)


def retry_unless_unreachable(task: Task, task_run: TaskRun, state: State) -> bool:
    """`retry_condition_fn` of the search: an unreachable STAC API fails at once, other errors are retried."""
    return not isinstance(state.result(raise_on_failure=False), StacApiUnreachable)


@task(
    name="search-stac",
    retries=3,
    retry_delay_seconds=[2, 10, 30],
    retry_condition_fn=retry_unless_unreachable,
    cache_policy=NO_CACHE,
)
def search(config: CatalogConfig, params: RefreshParams) -> list[dict]:
    """The catalog's items (its `static_catalog` served for the duration of the search, if it has one)."""
    with catalog_api(config) as url:
        return search_items(
            config,
            api_url=url,
            bbox=params.bbox or config.bbox,
            intersects=params.intersects,
            datetime=params.datetime or config.datetime,
            max_items=params.max_items or config.max_items,
        )


@task(name="ingest", cache_policy=NO_CACHE)
def ingest(items: list[dict], config: CatalogConfig, params: RefreshParams) -> IngestReport:
    """`ingest_items` on Dask (the scheduler at `dask_address`, else a LocalCluster of `n_workers`)."""
    return ingest_items(
        items,
        config,
        params.resolved_store_uri(),
        aoi_bbox=params.bbox,
        scheduler_address=params.resolved_dask_address(),
        n_workers=params.n_workers,
        storage_options=params.storage_options,
        read_options=params.read_options,
        progress=IngestProgress(),
    )


@flow(name="refresh-dataset", log_prints=True)
def refresh_dataset(params: RefreshParams = RefreshParams()) -> RefreshResult:
    """Search the catalog, ingest only items not yet in the store, and publish a markdown report."""
    logger = get_run_logger()
    config = load_config(params.catalog, params.stac_api)
    items = search(config, params)
    logger.info("%d items found for %s", len(items), params.resolved_store_uri())
    report = ingest(quote(items), config, params)  # type: ignore[call-overload]  # the task gets the list
    create_markdown_artifact(
        key="refresh-dataset-report", markdown=ingest_report_markdown(report), description="refresh-dataset"
    )
    return RefreshResult(
        store_uri=report.store_uri,
        content_hash=report.content_hash,
        version=report.version,
        items_added=report.items_added,
        tiles_added=report.added_tiles,
        rejected=len(report.rejected),
    )


if __name__ == "__main__":
    refresh_dataset()
