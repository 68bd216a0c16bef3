"""The data layer: catalog configs, STAC search, COG window reads and tiling, the Zarr store, the Dask ingest
driver, and the PyTorch dataset over the store.

Names are imported on first use, so a process that only reads the store (training, its DataLoader workers)
does not load GDAL (rasterio), pyproj, pystac or Dask, and one that only ingests does not load torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dsat_core._lazy import lazy_exports

if TYPE_CHECKING:
    from dsat_core.data.catalog import CatalogConfig, CatalogConfigError, list_catalogs, load_catalog
    from dsat_core.data.dataset import TileDataset
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

_MODULE_OF = {
    "CatalogConfig": "catalog",
    "CatalogConfigError": "catalog",
    "CommitResult": "store",
    "DatasetStore": "store",
    "IngestReport": "ingest",
    "ProductTiles": "tiles",
    "Rejection": "tiles",
    "SceneTiles": "tiles",
    "StagedScene": "store",
    "StoreError": "store",
    "TargetGrid": "grid",
    "TileDataset": "dataset",
    "UnsafeHrefError": "security",
    "build_grid": "grid",
    "check_href": "security",
    "check_vrt": "security",
    "filter_items": "stac",
    "has_latents": "store",
    "ingest_items": "ingest",
    "ingest_report_markdown": "ingest",
    "list_catalogs": "catalog",
    "load_catalog": "catalog",
    "load_static_catalog": "stac",
    "make_scene_tiles": "synthetic",
    "make_synthetic_store": "synthetic",
    "matches_query": "stac",
    "read_item": "reader",
    "scene_dates": "reader",
    "search_items": "stac",
    "utm_crs": "grid",
    "write_latents": "store",
}

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


__getattr__, __dir__ = lazy_exports(__name__, _MODULE_OF, globals())
