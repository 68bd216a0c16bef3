"""A STAC item opened on the AOI's grid at the model's input GSD, read one window at a time.

It goes through the reader of the dataset pipeline (`dsat_core.data.reader`): the same band mapping (by
asset key or common name), href checks (allowed roots and schemes), header checks (`max_pixels`), target
grid (CRS, GSD, footprint ∩ AOI), reprojection onto that grid, scaling (fixed or per-scene percentiles,
computed once per scene on a decimated read) and cloud mask as ingest uses — but instead of cutting the
whole scene into tiles it keeps the opened sources and reads only the windows it is asked for, so memory
stays flat in the AOI size.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.windows import Window

from dsat_core.data import reader as _reader
from dsat_core.data.catalog import CatalogConfig
from dsat_core.data.grid import GridError, TargetGrid
from dsat_core.data.scaling import DTYPE_MAX, scale
from dsat_core.data.security import UnsafeHrefError
from dsat_core.metadata import SatMetadata


class ItemUnusable(ValueError):
    """One item cannot be applied to (no overlap, href not allowed, missing band, ...): its reason."""

    def __init__(self, item_id: str, reason: str) -> None:
        super().__init__(f"{item_id}: {reason}")
        self.item_id = item_id
        self.reason = reason


@dataclass
class PlaceSource:
    """One item's product on the AOI grid: `read` gives scaled frames of any window of ``grid``."""

    item_id: str
    product: str
    bands: list[str]
    grid: TargetGrid
    properties: Mapping[str, Any]
    hrefs: list[str]
    dtype: str
    scale_min: np.ndarray
    scale_max: np.ndarray
    _plan: Any = field(repr=False)
    _sources: dict[str, Any] = field(repr=False)
    _cloud: Any = field(repr=False, default=None)
    _cloud_classes: tuple[int, ...] = ()

    @property
    def has_cloud_mask(self) -> bool:
        return self._cloud is not None

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """float32 (C, h, w) in [-1, 1] (the scaled values, as the store's datasets give them) and bool
        (h, w) validity of ``window`` (0 / invalid where the source has nodata or no data)."""
        reads = {href: source.read(window) for href, source in self._sources.items()}
        data, valid = _reader._stack(self._plan, reads, self._sources)
        scaled = scale(data, valid, self.scale_min, self.scale_max, self.dtype)
        return scaled.astype(np.float32) / float(DTYPE_MAX[self.dtype]) * 2.0 - 1.0, valid

    def cloud(self, window: Window) -> np.ndarray:
        """bool (h, w): the pixels the catalog's cloud mask marks as cloud in ``window``."""
        if self._cloud is None:
            raise ValueError(f"{self.item_id}: the catalog has no cloud mask (cloud_mask in its YAML)")
        values, ok = self._cloud.read(window)
        return np.isin(values[0], self._cloud_classes) & ok[0]

    def metadata(self, window: Window) -> SatMetadata:
        """The metadata of a window of the input grid: centre lon/lat, GSD, cloud cover and date."""
        lon, lat = self.grid.centre_lonlat(window)
        when, _ = _reader.scene_dates(self.properties)
        cloud = _reader._scene_cloud(self.properties)
        return SatMetadata.from_datetime(when, lon=lon, lat=lat, gsd=self.grid.gsd_m, cloud_cover=cloud)

    @property
    def scene_datetime(self) -> str:
        return _reader.scene_dates(self.properties)[1]


@contextmanager
def open_place(
    item: Mapping[str, Any],
    config: CatalogConfig,
    product: str,
    aoi_bbox: tuple[float, float, float, float],
    *,
    storage_options: dict | None = None,
    cloud_mask: bool = False,
    grid: TargetGrid | None = None,
) -> Iterator[PlaceSource]:
    """``product`` of ``item`` on its AOI grid (`PlaceSource`); `ItemUnusable` names why it cannot be.

    ``config`` is the catalog with the grid the model wants (``target_gsd`` = the input GSD); its tile size
    is only the smallest area accepted. ``cloud_mask``: also open the catalog's cloud-mask band. ``grid``:
    read on this grid (another date's, for the temporal task) instead of the item's own AOI grid.
    """
    if product not in config.products:
        raise ValueError(
            f"catalog {config.name!r} has no product {product!r} (it has {sorted(config.products)})"
        )
    spec = {**config.products[product].model_dump(), "required": True}
    single = config.with_overrides(products={product: spec})
    item_id = str(item.get("id", "<no id>")) if isinstance(item, Mapping) else "<no id>"
    with ExitStack() as stack:
        try:
            place = _open(item, single, product, aoi_bbox, storage_options, cloud_mask, stack, grid)
        except (_reader._SceneRejected, GridError, RasterioError, OSError) as err:
            raise ItemUnusable(item_id, getattr(err, "reason", None) or str(err)) from err
        except UnsafeHrefError as err:
            raise ItemUnusable(item_id, f"href not allowed: {err}") from err
        yield place


def _open(
    item: Mapping[str, Any],
    config: CatalogConfig,
    product: str,
    aoi_bbox: tuple[float, float, float, float],
    storage_options: dict | None,
    cloud_mask: bool,
    stack: ExitStack,
    grid: TargetGrid | None = None,
) -> PlaceSource:
    """The reader's steps up to the scene grid and scaling (see `dsat_core.data.reader._read`)."""
    item_id, assets, properties = _reader._item_parts(item)
    checked = _reader._href_checker(config, None, _reader._self_href(item))
    rejected: list = []
    plans, asset_keys = _reader._plan_products(item_id, config, assets, checked, rejected)
    plan = plans[0]
    cloud_ref = _reader._cloud_mask_href(config, assets, checked, asset_keys) if cloud_mask else None
    needed = _reader._needed_bands(plans)
    to_open = {**needed, **({cloud_ref: [1]} if cloud_ref and cloud_ref not in needed else {})}
    asset_of = {href: assets[asset_keys[href]] for href in to_open}
    opened = _reader._open_sources(to_open, asset_of, properties, config, storage_options, stack)
    if grid is None:
        grid = _reader._scene_grid(list(opened.values()), item, properties, config, aoi_bbox)
    sources = {
        href: _reader._on_grid(opened[href], grid, idx, Resampling.bilinear, stack)
        for href, idx in needed.items()
    }
    cloud = None
    if cloud_ref is not None and config.cloud_mask is not None:
        cloud = _reader._on_grid(opened[cloud_ref], grid, [1], Resampling.nearest, stack)
    _reader._set_scaling(plans, sources, grid, stack)
    return PlaceSource(
        item_id=item_id,
        product=product,
        bands=list(plan.band_names),
        grid=grid,
        properties=properties,
        hrefs=list(dict.fromkeys(href for href, _ in plan.bands)),
        dtype=plan.spec.scaling.dtype,
        scale_min=np.asarray(plan.low, dtype=np.float64),
        scale_max=np.asarray(plan.high, dtype=np.float64),
        _plan=plan,
        _sources=sources,
        _cloud=cloud,
        _cloud_classes=tuple(config.cloud_mask.classes) if config.cloud_mask else (),
    )


__all__ = ["ItemUnusable", "PlaceSource", "open_place"]
