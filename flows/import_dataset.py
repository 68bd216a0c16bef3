"""Prefect flow `import-dataset`: a published dataset copy → STAC items (on Dask) → optionally the Zarr store.

The catalog YAML names the importer and the copy's public location (`importer:` block); the flow runs
`dsat_core.data.importers.run_import` into a static catalog folder, posts a markdown report, and, when
``store_uri`` is given, serves that folder with a local STAC API and runs `refresh-dataset` over it.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, Field

from dsat_core.data.catalog import CatalogConfig, ImporterSpec, load_catalog
from dsat_core.data.importers import ImportReport, get_importer, import_report_markdown, run_import
from dsat_core.data.stac_server import serve_static_catalog
from flows.refresh_dataset import RefreshParams, RefreshResult, refresh_dataset


class ImportParams(BaseModel):
    """What to import. Unset values come from the catalog's `importer:` block."""

    catalog: str = Field(description="catalogs/<name>.yaml (with an `importer:` block) or a YAML path")
    source: str | None = Field(None, description="the dataset copy: a folder or s3:// prefix")
    out_dir: str | None = Field(None, description="static catalog folder; default data/imported/<catalog>")
    options: dict[str, Any] = Field(default_factory=dict, description="importer options, over the YAML's")
    storage_options: dict[str, Any] | None = Field(None, description="fsspec options for s3:// copies")
    dask_address: str | None = Field(None, description="an existing Dask scheduler")
    n_workers: int = Field(2, ge=0, description="LocalCluster workers (0: in the flow's process)")
    limit: int | None = Field(None, gt=0, description="import only the first N images")
    store_uri: str | None = Field(None, description="also refresh this Zarr store from the imported items")

    def resolved_out_dir(self, config: CatalogConfig) -> str:
        return self.out_dir or f"data/imported/{config.name}"


class ImportResult(BaseModel):
    out_dir: str
    n_records: int
    n_items: int
    n_rejected: int
    refresh: RefreshResult | None = None


@task(name="load-catalog")
def load_config(catalog: str) -> CatalogConfig:
    config = load_catalog(catalog)
    _importer_spec(config)
    return config


def _importer_spec(config: CatalogConfig) -> ImporterSpec:
    if config.importer is None:
        raise ValueError(f"catalog {config.name!r} has no `importer:` block; it is searched, not imported")
    return config.importer


@task(name="import-items", retries=1, retry_delay_seconds=10)
def import_items(config: CatalogConfig, params: ImportParams) -> ImportReport:
    spec = _importer_spec(config)
    importer = get_importer(spec.name, **(spec.options | params.options))
    return run_import(
        importer,
        params.source or spec.source,
        params.resolved_out_dir(config),
        scheduler_address=params.dask_address,
        n_workers=params.n_workers,
        storage_options=params.storage_options,
        limit=params.limit,
    )


@flow(name="import-dataset", log_prints=True)
def import_dataset(params: ImportParams) -> ImportResult:
    logger = get_run_logger()
    config = load_config(params.catalog)
    report = import_items(config, params)
    create_markdown_artifact(import_report_markdown(report), key="import-dataset-report")
    logger.info("%d items, %d rejected -> %s", report.n_items, len(report.rejected), report.out_dir)
    result = ImportResult(
        out_dir=report.out_dir,
        n_records=report.n_records,
        n_items=report.n_items,
        n_rejected=len(report.rejected),
    )
    if params.store_uri and report.n_items:
        with serve_static_catalog(report.out_dir, config.collections[0]) as url:
            refresh = RefreshParams(
                catalog=params.catalog,
                store_uri=params.store_uri,
                stac_api=url,
                dask_address=params.dask_address,
                read_options=params.storage_options,  # the assets live in the copy
            )
            result.refresh = refresh_dataset(refresh)
    return result
