"""The data layer: catalog configs, STAC search, COG window reads and tiling, the Zarr store, the Dask ingest
driver, and the PyTorch dataset over the store (imported lazily: it needs torch)."""

from dsat_core.data.catalog import CatalogConfig, CatalogConfigError, list_catalogs, load_catalog
from dsat_core.data.grid import TargetGrid, build_grid, utm_crs
from dsat_core.data.ingest import IngestReport, ingest_items, ingest_report_markdown
from dsat_core.data.reader import read_item, scene_dates
from dsat_core.data.security import UnsafeHrefError, check_href, check_vrt
from dsat_core.data.stac import filter_items, load_static_catalog, matches_query, search_items
from dsat_core.data.store import (
    CommitResult,
    DatasetStore,
    StagedScene,
    StoreError,
    has_latents,
    write_latents,
)
from dsat_core.data.synthetic import make_scene_tiles, make_synthetic_store
from dsat_core.data.tiles import ProductTiles, Rejection, SceneTiles

__all__ = [
    "CatalogConfig",
    "CatalogConfigError",
    "CommitResult",
    "DatasetStore",
    "IngestReport",
    "ProductTiles",
    "Rejection",
    "SceneTiles",
    "StagedScene",
    "StoreError",
    "TargetGrid",
    "TileDataset",
    "UnsafeHrefError",
    "build_grid",
    "check_href",
    "check_vrt",
    "filter_items",
    "has_latents",
    "ingest_items",
    "ingest_report_markdown",
    "list_catalogs",
    "load_catalog",
    "load_static_catalog",
    "make_scene_tiles",
    "make_synthetic_store",
    "matches_query",
    "read_item",
    "scene_dates",
    "search_items",
    "utm_crs",
    "write_latents",
]


def __getattr__(name: str):  # TileDataset imports torch: load it only when asked for
    if name == "TileDataset":
        from dsat_core.data.dataset import TileDataset

        return TileDataset
    raise AttributeError(f"module 'dsat_core.data' has no attribute {name!r}")
