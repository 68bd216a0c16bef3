"""One STAC item + a `CatalogConfig` → `SceneTiles` (tiles, metadata, captions, lineage, rejections).

`read_item` never raises for bad input: a failure of the whole item (malformed JSON, missing asset or
band, href not allowed, unreadable or corrupt file, no CRS, a raster larger than `quality.max_pixels`, no
overlap with the AOI) becomes a `Rejection(item_id, reason, tile_index=-1)`; a tile failing a quality check
becomes a `Rejection(item_id, reason, tile_index=k, product=...)`.

How it reads:
1. Bands: each `BandSpec` is found by asset key, or by `common_name` in an asset's `eo:bands` (or STAC 1.1
   `bands` / `eo:common_name`), giving (href, 1-based band). A product with a missing band is rejected
   for this item; a missing `required` product, or no product left, rejects the scene.
2. Opening (rasterio/GDAL): local paths directly, http(s) through `/vsicurl/` (range requests, no
   directory listing), `s3://` through fsspec/s3fs with `storage_options` (`opener=`). Sizes and CRS are
   checked from the header before any pixel is read. A file without georeferencing (e.g. the JPEG/PNG
   chips of fMoW or xBD) is placed by the STAC projection extension: `proj:code` (or `proj:epsg`) and
   `proj:transform` of the asset, else of the item, applied through an in-memory VRT; the file's own
   georeferencing always wins.
3. Grid: see `dsat_core.data.grid` (CRS, GSD, footprint ∩ AOI, snapping). Each asset is read through a
   `WarpedVRT` on that grid (bilinear; nearest for the cloud-mask band), so assets of different
   resolution land on one pixel grid; when the grid IS the asset's pixel grid, windows are read directly
   (exact values, and GDAL fetches exactly the blocks needed). Only the windows needed are read.
4. Tiles: regular grid, stride = tile_size - overlap from the grid's top-left, partial right/bottom tiles
   dropped (`dsat_core.data.grid`). One strip of tile rows is read at a time: memory is bounded by the
   grid width, not the scene size.
5. Quality per tile and product: nodata fraction (a pixel is invalid when any band of the product is
   nodata, NaN, or outside the source), cloud fraction (`config.cloud_mask` classes when given, else the
   scene's `eo:cloud_cover` / 100 for every tile; a scene above `max_cloud_fraction` is then rejected
   once, as a whole), constant tiles (largest per-band std of the scaled tile < `min_std`).
6. Scaling (`dsat_core.data.scaling`): 'fixed' range, or per-scene 'percentile' of valid pixels, computed
   on a decimated read (≤ 1024 px a side, from source overviews where present) before the strips.
7. Metadata: tile centre lon/lat (WGS84), GSD in metres (the grid's, or the product's finest asset-level
   `gsd` when that is coarser: a product upsampled onto a finer grid keeps its real resolution), cloud
   cover, year/month/day from `datetime`, else from `start_datetime` when the item's interval is at most
   `MAX_DATE_INTERVAL_DAYS` long (a longer interval is no acquisition date: the fields stay missing).
   Lineage: hrefs read, CRS, tile transform, window, `scene_datetime` (ISO datetime, or the ISO interval
   `start/end`), platform.

An item may narrow its own grid with the property `dsat:aoi_bbox` (WGS84, intersected with the run's AOI):
importers use it to give every image of one place the same grid, so their tiles share windows (temporal
sequences, `dsat_core.data.tasks.TemporalDataset`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from xml.sax.saxutils import escape

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import MaskFlags, Resampling
from rasterio.errors import CRSError, NotGeoreferencedWarning, RasterioError
from rasterio.io import MemoryFile
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from dsat_core.captions import caption_for
from dsat_core.data.catalog import BandSpec, CatalogConfig, ProductSpec
from dsat_core.data.grid import (
    GridError,
    SourceGeometry,
    TargetGrid,
    build_grid,
    intersect_bbox,
    resolution_m,
)
from dsat_core.data.quality import cloud_fraction, tile_problem
from dsat_core.data.scaling import scale, scene_range
from dsat_core.data.security import UnsafeHrefError, check_href, check_vrt
from dsat_core.data.tiles import ProductTiles, Rejection, SceneTiles
from dsat_core.metadata import SatMetadata

MAX_DATE_INTERVAL_DAYS = 31
STATS_MAX_SIDE = 1024
GDAL_OPTIONS = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "GDAL_CACHEMAX": 128 * 1024 * 1024,  # bytes (a small integer would be read as bytes by rasterio)
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    "GDAL_HTTP_MAX_RETRY": 2,
    "GDAL_HTTP_RETRY_DELAY": 1,
    "GDAL_HTTP_TIMEOUT": 60,
    "GDAL_VRT_ENABLE_RAWRASTERBAND": "NO",
}
_SKIP_ROLES = {"thumbnail", "overview", "metadata"}


class _SceneRejected(Exception):
    def __init__(self, reason: str, product: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.product = product


# ----------------------------------------------------------------------------------------------- item & bands
def _item_parts(item: Any) -> tuple[str, dict, dict]:
    if not isinstance(item, Mapping):
        raise _SceneRejected(f"malformed item: expected a JSON object, got {type(item).__name__}")
    item_id = item.get("id")
    if not isinstance(item_id, str) or not item_id:
        raise _SceneRejected("malformed item: missing or non-string 'id'")
    assets = item.get("assets")
    if not isinstance(assets, Mapping) or not assets:
        raise _SceneRejected("malformed item: no 'assets' object")
    properties = item.get("properties") or {}
    if not isinstance(properties, Mapping):
        raise _SceneRejected("malformed item: 'properties' is not an object")
    for key, asset in assets.items():
        if not isinstance(asset, Mapping) or not isinstance(asset.get("href"), str):
            raise _SceneRejected(f"malformed item: asset {key!r} has no string 'href'")
    return item_id, dict(assets), dict(properties)


def _asset_bands(asset: Mapping) -> list[tuple[str, str]]:
    """(name, common_name) of each band of an asset (STAC 1.0 `eo:bands` or STAC 1.1 `bands`)."""
    out = []
    for band in asset.get("eo:bands") or asset.get("bands") or []:
        if isinstance(band, Mapping):
            common = band.get("common_name") or band.get("eo:common_name") or ""
            out.append((str(band.get("name") or ""), str(common)))
    return out


def find_band(spec: BandSpec, assets: Mapping[str, Mapping]) -> tuple[str, int] | None:
    """(asset key, 1-based band index) for a band spec, or None.

    By asset key when `spec.asset` is given (then `common_name`, if any, picks the band inside it);
    otherwise the asset named like the common name, then assets with role `data`, then any asset listing
    that common name.
    """
    if spec.asset is not None:
        asset = assets.get(spec.asset)
        if asset is None:
            return None
        if spec.common_name:
            for i, (_, common) in enumerate(_asset_bands(asset), start=1):
                if common == spec.common_name:
                    return spec.asset, i
        return spec.asset, 1
    name = spec.common_name
    candidates = sorted(
        (k for k, a in assets.items() if not _SKIP_ROLES & set(a.get("roles") or [])),
        key=lambda k: (k != name, "data" not in (assets[k].get("roles") or [])),
    )
    for key in candidates:
        bands = _asset_bands(assets[key])
        for i, (_, common) in enumerate(bands, start=1):
            if common == name:
                return key, i
        if key == name and len(bands) <= 1:
            return key, 1
    return None


def resolve_product(
    product: str, spec: ProductSpec, assets: Mapping[str, Mapping]
) -> list[tuple[str, str, int]]:
    """(band name, asset key, band index) per band, or `_SceneRejected` naming the first missing band."""
    out = []
    for band in spec.bands:
        found = find_band(band, assets)
        if found is None:
            how = f"asset {band.asset!r}" if band.asset else f"common_name {band.common_name!r}"
            raise _SceneRejected(
                f"band {band.name!r} ({how}) not found in assets {sorted(assets)}", product=product
            )
        out.append((band.name, *found))
    return out


def _self_href(item: Mapping) -> str | None:
    for link in item.get("links") or []:
        if isinstance(link, Mapping) and link.get("rel") == "self" and isinstance(link.get("href"), str):
            return link["href"]
    return None


# ----------------------------------------------------------------------------------------------- opening
def _open(href: str, config: CatalogConfig, storage_options: dict | None) -> rasterio.DatasetReader:
    scheme = href.split("://", 1)[0].lower() if "://" in href else "file"
    try:
        if scheme in ("http", "https"):
            return rasterio.open(f"/vsicurl/{href}")
        if scheme == "s3":
            import fsspec

            fs = fsspec.filesystem("s3", **(storage_options or {}))
            return rasterio.open(href, opener=fs)
        if href.lower().endswith(".vrt"):
            check_vrt(href, config)
        with warnings.catch_warnings():  # chips placed by the item's proj:* fields are handled by the caller
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(href)
    except UnsafeHrefError:
        raise
    except (RasterioError, OSError, ValueError) as err:
        raise _SceneRejected(f"cannot open {href}: {err}") from err


def _check_header(src: rasterio.DatasetReader, href: str, band_indexes: list[int], max_pixels: int) -> None:
    pixels = src.width * src.height
    if pixels > max_pixels:
        raise _SceneRejected(
            f"{href}: raster is {src.width} x {src.height} = {pixels:.3g} pixels "
            f"> max_pixels {max_pixels:.3g}"
        )
    if src.crs is None:
        raise _SceneRejected(f"{href}: no CRS")
    if src.transform == Affine.identity():
        raise _SceneRejected(f"{href}: no geotransform")
    too_high = [i for i in band_indexes if i > src.count]
    if too_high:
        raise _SceneRejected(f"{href}: band {too_high[0]} requested but the file has {src.count} band(s)")


_GDAL_TYPES = {
    "uint8": "Byte", "int8": "Int8", "uint16": "UInt16", "int16": "Int16", "uint32": "UInt32",
    "int32": "Int32", "float32": "Float32", "float64": "Float64",
}  # fmt: skip


def asset_georeference(asset: Mapping, properties: Mapping) -> tuple[CRS, Affine] | None:
    """(CRS, transform) from the projection extension of the asset, else of the item; None if absent."""
    for where in (asset, properties):
        code = where.get("proj:code") or (f"EPSG:{where['proj:epsg']}" if where.get("proj:epsg") else None)
        code = code or where.get("proj:wkt2")
        values = where.get("proj:transform")
        if not code or not isinstance(values, list | tuple) or len(values) not in (6, 9):
            continue
        try:
            return CRS.from_user_input(code), Affine(*(float(v) for v in values[:6]))
        except (CRSError, TypeError, ValueError) as err:
            raise _SceneRejected(f"bad projection fields {code!r} / {values!r}: {err}") from err
    return None


def _georeferenced(
    src: rasterio.DatasetReader,
    href: str,
    georef: tuple[CRS, Affine],
    storage_options: dict | None,
    stack: ExitStack,
) -> rasterio.DatasetReader:
    """`src` seen through an in-memory VRT carrying the STAC item's CRS and geotransform."""
    name = src.name
    if href.lower().startswith("s3://"):  # GDAL cannot see fsspec files: hold the (small) chip in memory
        import fsspec

        with fsspec.open(href, "rb", **(storage_options or {})) as f:
            name = stack.enter_context(MemoryFile(f.read())).name
    crs, t = georef
    nodata = "" if src.nodata is None else f"<NoDataValue>{src.nodata!r}</NoDataValue>"
    bands = []
    for i, dtype in enumerate(src.dtypes, start=1):
        bands.append(
            f'<VRTRasterBand dataType="{_GDAL_TYPES.get(dtype, "Float64")}" band="{i}">{nodata}'
            f'<SimpleSource><SourceFilename relativeToVRT="0">{escape(name)}</SourceFilename>'
            f"<SourceBand>{i}</SourceBand></SimpleSource></VRTRasterBand>"
        )
    xml = (
        f'<VRTDataset rasterXSize="{src.width}" rasterYSize="{src.height}">'
        f"<SRS>{escape(crs.to_wkt())}</SRS><GeoTransform>{t.c!r}, {t.a!r}, {t.b!r}, {t.f!r}, {t.d!r}, "
        f"{t.e!r}</GeoTransform>{''.join(bands)}</VRTDataset>"
    )
    return stack.enter_context(stack.enter_context(MemoryFile(xml.encode(), ext=".vrt")).open())


def _grid_offset(src: rasterio.DatasetReader, grid: TargetGrid) -> tuple[int, int] | None:
    """(row, col) of the grid origin in source pixels when the grid IS the source pixel grid, else None."""
    s, g = src.transform, grid.transform
    if (
        src.crs != grid.crs
        or s.b
        or s.d
        or g.b
        or g.d
        or not (math.isclose(s.a, g.a) and math.isclose(s.e, g.e))
    ):
        return None
    col, row = (g.c - s.c) / s.a, (g.f - s.f) / s.e
    if abs(col - round(col)) > 1e-6 or abs(row - round(row)) > 1e-6:
        return None
    return round(row), round(col)


@dataclass
class _Source:
    """One opened asset on the target grid: a WarpedVRT, or direct windowed reads when no warp is needed."""

    href: str
    src: rasterio.DatasetReader
    vrt: WarpedVRT | None
    indexes: list[int]  # bands to read (1-based)
    offset: tuple[int, int] | None = None  # grid origin in source pixels (direct reads)

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """float32 (len(indexes), h, w) values and bool validity per band."""
        if self.vrt is not None:
            return _read_valid(self.vrt, self.src.nodata, self.indexes, window)
        # Direct reads let GDAL fetch exactly the blocks of the window (one multi-range request over HTTP).
        h, w = int(window.height), int(window.width)
        row_offset, col_offset = self.offset or (0, 0)
        r0, c0 = int(window.row_off) + row_offset, int(window.col_off) + col_offset
        data = np.zeros((len(self.indexes), h, w), np.float32)
        valid = np.zeros(data.shape, bool)
        rs, re = max(r0, 0), min(r0 + h, self.src.height)
        cs, ce = max(c0, 0), min(c0 + w, self.src.width)
        if rs < re and cs < ce:
            part = Window(cs, rs, ce - cs, re - rs)
            values = self.src.read(self.indexes, window=part).astype(np.float32, copy=False)
            ok = np.isfinite(values)
            nodata = self.src.nodata
            if nodata is not None and not math.isnan(nodata):
                ok &= values != np.float32(nodata)
            flags = [self.src.mask_flag_enums[i - 1] for i in self.indexes]
            if nodata is None and not all(MaskFlags.all_valid in f for f in flags):
                ok &= self.src.read_masks(self.indexes, window=part) > 0
            data[:, rs - r0 : re - r0, cs - c0 : ce - c0] = values
            valid[:, rs - r0 : re - r0, cs - c0 : ce - c0] = ok
        return data, valid


def _on_grid(
    src: rasterio.DatasetReader,
    grid: TargetGrid,
    indexes: list[int],
    resampling: Resampling,
    stack: ExitStack,
) -> _Source:
    offset = _grid_offset(src, grid)
    if offset is not None:
        return _Source(src.name, src, None, indexes, offset)
    return _Source(src.name, src, stack.enter_context(_warp(src, grid, resampling)), indexes)


def _read_valid(
    vrt: WarpedVRT, nodata: float | None, indexes: list[int], window: Window | None = None
) -> tuple[np.ndarray, np.ndarray]:
    raw = vrt.read([*indexes, vrt.count], window=window)
    data = raw[:-1].astype(np.float32, copy=False)
    valid = (raw[-1] > 0)[None] & np.isfinite(data)
    if nodata is not None and not math.isnan(nodata):
        valid &= data != np.float32(nodata)
    return data, valid


def _warp(src: rasterio.DatasetReader, grid: TargetGrid, resampling: Resampling) -> WarpedVRT:
    return WarpedVRT(
        src,
        crs=grid.crs,
        transform=grid.transform,
        width=grid.width,
        height=grid.height,
        resampling=resampling,
        add_alpha=True,
    )


def _coarse_grid(grid: TargetGrid, max_side: int) -> TargetGrid:
    factor = max(1, math.ceil(max(grid.width, grid.height) / max_side))
    if factor == 1:
        return grid
    return TargetGrid(
        grid.crs,
        grid.transform @ Affine.scale(factor),
        math.ceil(grid.width / factor),
        math.ceil(grid.height / factor),
        grid.gsd_m * factor,
    )


def _stats_read(source: _Source, grid: TargetGrid, stack: ExitStack) -> tuple[np.ndarray, np.ndarray]:
    """A decimated read of the whole grid for scene statistics, from the best source overview."""
    coarse = _coarse_grid(grid, STATS_MAX_SIDE)
    if coarse is grid:
        return source.read(Window(0, 0, grid.width, grid.height))
    src = source.src
    lat = grid.centre_lonlat(Window(0, 0, grid.width, grid.height))[1]
    native_m = resolution_m(SourceGeometry(src.crs, src.transform, src.width, src.height), lat)
    wanted = coarse.gsd_m / native_m  # decimation relative to the source
    level = None
    for i, factor in enumerate(src.overviews(1)):
        if factor <= wanted:
            level = i
    if level is not None:
        try:
            src = stack.enter_context(rasterio.open(source.src.name, overview_level=level))
        except (RasterioError, OSError):  # e.g. datasets opened through an fsspec opener
            src = source.src
    vrt = stack.enter_context(_warp(src, coarse, Resampling.nearest))
    return _read_valid(vrt, source.src.nodata, source.indexes)


# ----------------------------------------------------------------------------------------------- metadata
def _parse_dt(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def scene_dates(properties: Mapping[str, Any]) -> tuple[datetime | None, str]:
    """(acquisition datetime or None, lineage string) — see the module docstring for the interval rule."""
    when = _parse_dt(properties.get("datetime"))
    if when is not None:
        return when, properties["datetime"]
    start, end = _parse_dt(properties.get("start_datetime")), _parse_dt(properties.get("end_datetime"))
    if start is None:
        return None, ""
    if end is None:
        return start, properties["start_datetime"]
    lineage = f"{properties['start_datetime']}/{properties['end_datetime']}"
    short = (end - start).total_seconds() <= MAX_DATE_INTERVAL_DAYS * 86400
    return (start if short else None), lineage


def _scene_cloud(properties: Mapping[str, Any]) -> float | None:
    try:
        cover = float(properties["eo:cloud_cover"])
    except (KeyError, TypeError, ValueError):
        return None
    return cover / 100.0 if 0.0 <= cover <= 100.0 else None


def _item_bbox(item: Mapping) -> tuple[float, float, float, float] | None:
    bbox = item.get("bbox")
    if isinstance(bbox, list | tuple) and len(bbox) in (4, 6):
        try:
            values = [float(v) for v in bbox]
        except (TypeError, ValueError):
            return None
        west, south, east, north = (
            (values[0], values[1], values[3], values[4]) if len(values) == 6 else values
        )
        return west, south, east, north
    return None


def _narrowed_aoi(
    aoi_bbox: tuple[float, float, float, float] | None, properties: Mapping[str, Any]
) -> tuple[float, float, float, float] | None:
    """The run's AOI intersected with the item's own `dsat:aoi_bbox` (either may be absent)."""
    own = _item_bbox({"bbox": properties.get("dsat:aoi_bbox")})
    if own is None or aoi_bbox is None:
        return own or aoi_bbox
    both = intersect_bbox(own, tuple(aoi_bbox))
    if both is None:
        raise _SceneRejected(f"dsat:aoi_bbox {own} does not overlap the AOI {tuple(aoi_bbox)}")
    return both


def _item_gsd(properties: Mapping[str, Any]) -> float | None:
    try:
        gsd = float(properties["gsd"])
    except (KeyError, TypeError, ValueError):
        return None
    return gsd if gsd > 0 else None


# ----------------------------------------------------------------------------------------------- products
@dataclass
class _ProductPlan:
    name: str
    spec: ProductSpec
    bands: list[tuple[str, int]]  # (source href, band index) per output band
    band_names: list[str]
    gsd_m: float | None = None  # the finest asset-level `gsd` of the product's assets, when they state one
    low: np.ndarray | None = None
    high: np.ndarray | None = None

    def scaling_range(self) -> tuple[np.ndarray, np.ndarray]:
        """The scene's per-band (low, high), set by `_set_scaling` before any tile is read."""
        if self.low is None or self.high is None:
            raise RuntimeError(f"product {self.name!r}: scaling range read before it was set")
        return self.low, self.high


class _ProductBuffer:
    def __init__(self, plan: _ProductPlan) -> None:
        self.plan = plan
        self.rows: dict[str, list] = {
            k: [] for k in ("images", "metadata", "caption", "transform", "window", "scale_min", "scale_max")
        }

    def add(
        self, image: np.ndarray, metadata: SatMetadata, caption: str, transform: Affine, window: Window
    ) -> None:
        """One accepted tile with its lineage and the product's scaling range."""
        rows = self.rows
        rows["images"].append(image)
        rows["metadata"].append(metadata)
        rows["caption"].append(caption)
        rows["transform"].append(tuple(transform)[:6])
        rows["window"].append(
            (int(window.row_off), int(window.col_off), int(window.height), int(window.width))
        )
        rows["scale_min"].append(self.plan.low)
        rows["scale_max"].append(self.plan.high)

    def build(self, item_id: str, hrefs: str, crs: str, when: str, platform: str, tile: int) -> ProductTiles:
        n = len(self.rows["images"])
        dtype = self.plan.spec.scaling.dtype
        bands = len(self.plan.band_names)
        images = np.stack(self.rows["images"]) if n else np.zeros((0, bands, tile, tile), dtype=dtype)
        return ProductTiles(
            product=self.plan.name,
            bands=self.plan.band_names,
            images=images,
            metadata=self.rows["metadata"],
            caption=self.rows["caption"],
            item_id=[item_id] * n,
            asset_href=[hrefs] * n,
            crs=[crs] * n,
            scene_datetime=[when] * n,
            platform=[platform] * n,
            transform=np.array(self.rows["transform"], dtype=np.float64).reshape(n, 6),
            window=np.array(self.rows["window"], dtype=np.int64).reshape(n, 4),
            scale_min=np.array(self.rows["scale_min"], dtype=np.float64).reshape(n, bands),
            scale_max=np.array(self.rows["scale_max"], dtype=np.float64).reshape(n, bands),
        )


def _stack(plan: _ProductPlan, reads: dict[str, tuple[np.ndarray, np.ndarray]], sources: dict[str, _Source]):
    data, valid = [], []
    for href, index in plan.bands:
        position = sources[href].indexes.index(index)
        data.append(reads[href][0][position])
        valid.append(reads[href][1][position])
    return np.stack(data), np.logical_and.reduce(valid)


# ----------------------------------------------------------------------------------------------- main
def read_item(
    item: dict,
    config: CatalogConfig,
    *,
    aoi_bbox: tuple[float, float, float, float] | None = None,
    storage_options: dict | None = None,
    base_href: str | None = None,
) -> SceneTiles:
    """Read one STAC item dict into tiles (see the module docstring). Never raises for bad input.

    `base_href` resolves relative asset hrefs (default: the item's `self` link, then `config.allowed_roots`).
    """
    given = item.get("id") if isinstance(item, Mapping) else None
    item_id = given if isinstance(given, str) else "<no id>"
    rejected: list[Rejection] = []
    try:
        with rasterio.Env(**GDAL_OPTIONS):
            return _read(item, config, aoi_bbox, storage_options, base_href, rejected)
    except _SceneRejected as err:
        reason, product = err.reason, err.product
    except UnsafeHrefError as err:
        reason, product = f"href not allowed: {err}", ""
    except GridError as err:
        reason, product = str(err), ""
    except (RasterioError, OSError) as err:
        reason, product = f"read failed: {err}", ""
    except Exception as err:  # noqa: BLE001 - the contract is: never raise for one bad item
        reason, product = f"unexpected {type(err).__name__}: {err}", ""
    return SceneTiles(item_id, rejected=[*rejected, Rejection(item_id, reason, -1, product)])


def _read(
    item: Mapping,
    config: CatalogConfig,
    aoi_bbox: tuple[float, float, float, float] | None,
    storage_options: dict | None,
    base_href: str | None,
    rejected: list[Rejection],
) -> SceneTiles:
    item_id, assets, properties = _item_parts(item)
    checked = _href_checker(config, base_href, _self_href(item))
    plans, asset_keys = _plan_products(item_id, config, assets, checked, rejected)
    cloud_ref = _cloud_mask_href(config, assets, checked, asset_keys)
    needed = _needed_bands(plans)
    with ExitStack() as stack:
        to_open = {**needed, **({cloud_ref: [1]} if cloud_ref and cloud_ref not in needed else {})}
        asset_of = {href: assets[asset_keys[href]] for href in to_open}
        opened = _open_sources(to_open, asset_of, properties, config, storage_options, stack)
        grid = _scene_grid(list(opened.values()), item, properties, config, aoi_bbox)
        sources = {
            href: _on_grid(opened[href], grid, idx, Resampling.bilinear, stack)
            for href, idx in needed.items()
        }
        cloud_source = None
        if cloud_ref is not None:
            cloud_source = _on_grid(opened[cloud_ref], grid, [1], Resampling.nearest, stack)
        scene_cloud = _checked_scene_cloud(properties, config, masked=cloud_source is not None)
        _set_scaling(plans, sources, grid, stack)
        scene = _SceneGrid(
            item_id, properties, config, grid, plans, sources, cloud_source, scene_cloud, rejected
        )
        return scene.read_tiles()


def _href_checker(
    config: CatalogConfig, base_href: str | None, self_href: str | None
) -> Callable[[str], str]:
    """`check_href` against the base an item's relative hrefs resolve from (see `read_item`)."""

    def checked(href: str) -> str:
        if base_href is not None:
            return check_href(href, config, base_href=base_href)
        if self_href is None or self_href.split("://")[0].lower() not in ("http", "https"):
            return check_href(href, config, base_href=self_href)
        # An API item's self link points at the API, which does not serve files (rustac serves relative
        # hrefs verbatim): look under the allowed roots first, then resolve against the link (the STAC rule).
        try:
            return check_href(href, config)
        except UnsafeHrefError:
            return check_href(href, config, base_href=self_href)

    return checked


def _plan_products(
    item_id: str,
    config: CatalogConfig,
    assets: Mapping[str, Mapping],
    checked: Callable[[str], str],
    rejected: list[Rejection],
) -> tuple[list[_ProductPlan], dict[str, str]]:
    """A plan per product the item has all bands of (the others rejected), and checked href → asset key."""
    plans: list[_ProductPlan] = []
    asset_keys: dict[str, str] = {}
    for name, spec in config.products.items():
        try:
            resolved = resolve_product(name, spec, assets)
        except _SceneRejected as err:
            if spec.required:
                raise _SceneRejected(f"required product {name!r}: {err.reason}", name) from err
            rejected.append(Rejection(item_id, err.reason, -1, name))
            continue
        bands = [(checked(assets[key]["href"]), index) for _, key, index in resolved]
        asset_keys.update((href, key) for (href, _), (_, key, _) in zip(bands, resolved, strict=True))
        asset_gsds = [_item_gsd(assets[key]) for _, key, _ in resolved]
        finest = min((g for g in asset_gsds if g is not None), default=None)
        plans.append(_ProductPlan(name, spec, bands, [b for b, _, _ in resolved], finest))
    if not plans:
        raise _SceneRejected("no product has all its bands (see the product rejections)")
    return plans, asset_keys


def _cloud_mask_href(
    config: CatalogConfig,
    assets: Mapping[str, Mapping],
    checked: Callable[[str], str],
    asset_keys: dict[str, str],
) -> str | None:
    """The checked href of the cloud-mask asset (added to ``asset_keys``), or None without a cloud mask."""
    if config.cloud_mask is None:
        return None
    mask_asset = assets.get(config.cloud_mask.asset)
    if mask_asset is None:
        raise _SceneRejected(f"cloud mask asset {config.cloud_mask.asset!r} not found in {sorted(assets)}")
    href = checked(mask_asset["href"])
    asset_keys.setdefault(href, config.cloud_mask.asset)
    return href


def _needed_bands(plans: list[_ProductPlan]) -> dict[str, list[int]]:
    """href → the 1-based bands the products read from it, in first-use order."""
    needed: dict[str, list[int]] = {}
    for plan in plans:
        for href, index in plan.bands:
            bands = needed.setdefault(href, [])
            if index not in bands:
                bands.append(index)
    return needed


def _open_sources(
    bands_of: Mapping[str, list[int]],
    asset_of: Mapping[str, Mapping],
    properties: Mapping[str, Any],
    config: CatalogConfig,
    storage_options: dict | None,
    stack: ExitStack,
) -> dict[str, rasterio.DatasetReader]:
    """Each href opened (placed by the projection fields when it has no georeferencing), header checked."""
    opened: dict[str, rasterio.DatasetReader] = {}
    for href, bands in bands_of.items():
        src = stack.enter_context(_open(href, config, storage_options))
        georef = asset_georeference(asset_of[href], properties)
        if georef is not None and (src.crs is None or src.transform == Affine.identity()):
            src = _georeferenced(src, href, georef, storage_options, stack)
        _check_header(src, href, bands, config.quality.max_pixels)
        opened[href] = src
    return opened


def _scene_grid(
    opened: list[rasterio.DatasetReader],
    item: Mapping,
    properties: Mapping[str, Any],
    config: CatalogConfig,
    aoi_bbox: tuple[float, float, float, float] | None,
) -> TargetGrid:
    """The scene's target grid; `_SceneRejected` when it exceeds `max_pixels` or holds no full tile."""
    grid = build_grid(
        [SourceGeometry(s.crs, s.transform, s.width, s.height) for s in opened],
        target_crs=config.target_crs,
        target_gsd=config.target_gsd,
        item_gsd=_item_gsd(properties),
        item_bbox=_item_bbox(item),
        aoi_bbox=_narrowed_aoi(aoi_bbox, properties),
        snap_inward="dsat:aoi_bbox" in properties,
    )
    grid_pixels = grid.width * grid.height
    if grid_pixels > config.quality.max_pixels:
        raise _SceneRejected(
            f"target grid {grid.width} x {grid.height} = {grid_pixels:.3g} pixels > max_pixels "
            f"{config.quality.max_pixels:.3g} (target_gsd {config.target_gsd})"
        )
    n_rows, n_cols = grid.tile_layout(config.tile_size, config.stride)
    if n_rows * n_cols == 0:
        raise _SceneRejected(
            f"target grid {grid.width} x {grid.height} is smaller than one {config.tile_size}px tile"
        )
    return grid


def _checked_scene_cloud(
    properties: Mapping[str, Any], config: CatalogConfig, *, masked: bool
) -> float | None:
    """The scene's `eo:cloud_cover` fraction; without a cloud mask a scene above the limit is rejected."""
    scene_cloud = _scene_cloud(properties)
    if not masked and scene_cloud is not None and scene_cloud > config.quality.max_cloud_fraction:
        raise _SceneRejected(
            f"scene cloud cover {scene_cloud:.2f} > {config.quality.max_cloud_fraction:.2f} (eo:cloud_cover)"
        )
    return scene_cloud


def _set_scaling(
    plans: list[_ProductPlan], sources: dict[str, _Source], grid: TargetGrid, stack: ExitStack
) -> None:
    """Each product's scaling range: 'percentile' from a decimated read of the scene, else the fixed one."""
    stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if any(plan.spec.scaling.mode == "percentile" for plan in plans):
        stats = {href: _stats_read(source, grid, stack) for href, source in sources.items()}
    for plan in plans:
        if plan.spec.scaling.mode == "percentile":
            data, valid = _stack(plan, stats, sources)
        else:
            data, valid = np.zeros((len(plan.bands), 0, 0)), np.zeros((0, 0), bool)
        plan.low, plan.high = scene_range(data, valid, plan.spec.scaling)


@dataclass
class _SceneGrid:
    """One scene on its target grid, read into per-product tiles one strip of tile rows at a time."""

    item_id: str
    properties: Mapping[str, Any]
    config: CatalogConfig
    grid: TargetGrid
    plans: list[_ProductPlan]
    sources: dict[str, _Source]
    cloud_source: _Source | None
    scene_cloud: float | None
    rejected: list[Rejection]

    def __post_init__(self) -> None:
        self.when, self.when_text = scene_dates(self.properties)

    def read_tiles(self) -> SceneTiles:
        """Every tile of every product (memory bounded by the grid width), failing tiles rejected."""
        buffers = {plan.name: _ProductBuffer(plan) for plan in self.plans}
        tile, stride = self.config.tile_size, self.config.stride
        n_rows, n_cols = self.grid.tile_layout(tile, stride)
        for row in range(n_rows):
            stacked, cloud_strip = self._read_strip(
                Window(0, row * stride, (n_cols - 1) * stride + tile, tile)
            )
            for col in range(n_cols):
                window = self.grid.tile_window(row, col, tile, stride)
                self._add_tiles(buffers, stacked, cloud_strip, row * n_cols + col, window)
        return self._scene_tiles(buffers)

    def _read_strip(
        self, strip: Window
    ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], np.ndarray | None]:
        """Each product's (values, validity) over one strip, and the cloudy pixels of the cloud mask there."""
        reads = {href: source.read(strip) for href, source in self.sources.items()}
        cloud_strip = None
        if self.cloud_source is not None and self.config.cloud_mask is not None:
            values, ok = self.cloud_source.read(strip)
            cloud_strip = np.isin(values[0], self.config.cloud_mask.classes) & ok[0]
        return {plan.name: _stack(plan, reads, self.sources) for plan in self.plans}, cloud_strip

    def _add_tiles(
        self,
        buffers: dict[str, _ProductBuffer],
        stacked: dict[str, tuple[np.ndarray, np.ndarray]],
        cloud_strip: np.ndarray | None,
        k: int,
        window: Window,
    ) -> None:
        """Tile ``k`` (at ``window``) of every product into its buffer, or its rejection."""
        cols = slice(int(window.col_off), int(window.col_off) + self.config.tile_size)
        lon, lat = self.grid.centre_lonlat(window)
        for plan in self.plans:
            data, valid = stacked[plan.name][0][:, :, cols], stacked[plan.name][1][:, cols]
            cloud = self.scene_cloud if cloud_strip is None else cloud_fraction(cloud_strip[:, cols], valid)
            scaled = scale(data, valid, *plan.scaling_range(), plan.spec.scaling.dtype)
            problem = tile_problem(valid, scaled, cloud, self.config.quality)
            if problem is not None:
                self.rejected.append(Rejection(self.item_id, problem, k, plan.name))
                continue
            cover = None if cloud is None else min(max(cloud, 0.0), 1.0)
            gsd = max(self.grid.gsd_m, plan.gsd_m or 0.0)
            metadata = SatMetadata.from_datetime(self.when, lon=lon, lat=lat, gsd=gsd, cloud_cover=cover)
            caption = caption_for(metadata, self.properties, self.config)
            buffers[plan.name].add(scaled, metadata, caption, self.grid.window_transform(window), window)

    def _scene_tiles(self, buffers: dict[str, _ProductBuffer]) -> SceneTiles:
        scene = SceneTiles(self.item_id, rejected=self.rejected)
        platform = str(self.properties.get("platform") or "")
        for plan in self.plans:
            hrefs = " ".join(dict.fromkeys(href for href, _ in plan.bands))
            scene.products[plan.name] = buffers[plan.name].build(
                self.item_id, hrefs, self.grid.crs_string, self.when_text, platform, self.config.tile_size
            )
        return scene
