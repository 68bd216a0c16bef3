"""The target pixel grid of a scene and its tiles.

Tiling policy: a regular grid of `tile_size` x `tile_size` tiles with stride `tile_size - overlap`,
starting at the grid's top-left pixel, numbered row-major (`tile_index = row * n_cols + col`). Partial
tiles at the right and bottom edges are dropped, so every tile is full size.

Grid policy: the CRS is `target_crs` ('utm' = the UTM zone of the scene centre, 'native' = the CRS of the
first asset read, or 'EPSG:n'). The extent is the item footprint (its WGS84 `bbox`) intersected with an
optional AOI (WGS84) and with the source rasters' bounds, all in the target CRS. When the target CRS is
the source CRS and no GSD is forced, the grid is the source's own pixel grid (no resampling). Otherwise
pixels are square, GSD = `target_gsd`, else the item's `gsd`, else the source resolution, and the extent
is snapped outwards to GSD multiples (inwards with `snap_inward`). Special UTM zones (Norway, Svalbard)
and footprints crossing the antimeridian are not handled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

from affine import Affine
from pyproj import Transformer
from rasterio.crs import CRS
from rasterio.warp import transform_bounds
from rasterio.windows import Window

WGS84 = CRS.from_epsg(4326)
METRES_PER_DEGREE = 111_320.0
_EPS = 1e-6


class GridError(ValueError):
    """No usable target grid (no overlap with the AOI, no CRS, ...)."""


@dataclass(frozen=True)
class SourceGeometry:
    """What the grid needs to know about one source raster (read from its header)."""

    crs: CRS
    transform: Affine
    width: int
    height: int

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        left, top = self.transform @ (0, 0)
        right, bottom = self.transform @ (self.width, self.height)
        return min(left, right), min(top, bottom), max(left, right), max(top, bottom)


@dataclass(frozen=True)
class TargetGrid:
    crs: CRS
    transform: Affine
    width: int
    height: int
    gsd_m: float  # metres per pixel, as reported in the tile metadata

    @property
    def crs_string(self) -> str:
        epsg = self.crs.to_epsg()
        return f"EPSG:{epsg}" if epsg else self.crs.to_wkt()

    def tile_layout(self, tile_size: int, stride: int) -> tuple[int, int]:
        """(n_rows, n_cols) of full tiles."""
        n_rows = 0 if self.height < tile_size else (self.height - tile_size) // stride + 1
        n_cols = 0 if self.width < tile_size else (self.width - tile_size) // stride + 1
        return n_rows, n_cols

    def tile_window(self, row: int, col: int, tile_size: int, stride: int) -> Window:
        return Window(col * stride, row * stride, tile_size, tile_size)

    def window_transform(self, window: Window) -> Affine:
        return self.transform @ Affine.translation(window.col_off, window.row_off)

    @cached_property
    def _to_wgs84(self) -> Transformer:
        return Transformer.from_crs(self.crs, WGS84, always_xy=True)

    def centre_lonlat(self, window: Window) -> tuple[float, float]:
        x, y = self.transform @ (window.col_off + window.width / 2, window.row_off + window.height / 2)
        lon, lat = self._to_wgs84.transform(x, y)
        return float(lon), float(lat)


def utm_crs(lon: float, lat: float) -> CRS:
    """WGS84 / UTM CRS of the zone holding (lon, lat)."""
    zone = int(math.floor((lon + 180.0) / 6.0)) % 60 + 1
    return CRS.from_epsg((32600 if lat >= 0 else 32700) + zone)


def choose_crs(target: str, native: CRS, centre: tuple[float, float]) -> CRS:
    if target == "native":
        return native
    if target == "utm":
        return utm_crs(*centre)
    return CRS.from_string(target)


def intersect_bbox(a: tuple[float, ...], b: tuple[float, ...]) -> tuple[float, float, float, float] | None:
    """The overlap of two (left, bottom, right, top) boxes, or None."""
    box = (max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    return box if box[0] < box[2] and box[1] < box[3] else None


def _snap(value: float, direction: int) -> int:
    """floor (direction 1) or ceil (direction -1) of a pixel coordinate, tolerant of rounding noise."""
    return math.floor(value + _EPS) if direction > 0 else math.ceil(value - _EPS)


def _gsd_in_crs_units(gsd_m: float, crs: CRS) -> float:
    if crs.is_geographic:
        return gsd_m / METRES_PER_DEGREE
    return gsd_m / (crs.linear_units_factor[1] if crs.linear_units_factor else 1.0)


def resolution_m(source: SourceGeometry, lat: float) -> float:
    res = (abs(source.transform.a) + abs(source.transform.e)) / 2
    if source.crs.is_geographic:
        return res * METRES_PER_DEGREE * math.cos(math.radians(lat))
    return res * (source.crs.linear_units_factor[1] if source.crs.linear_units_factor else 1.0)


def build_grid(
    sources: list[SourceGeometry],
    *,
    target_crs: str,
    target_gsd: float | None,
    item_gsd: float | None,
    item_bbox: tuple[float, float, float, float] | None,
    aoi_bbox: tuple[float, float, float, float] | None,
    snap_inward: bool = False,
) -> TargetGrid:
    """The target grid for a scene (see the module docstring). Raises `GridError`.

    `snap_inward` snaps the extent inwards instead of outwards, so the grid never leaves the AOI (used
    when the AOI is an area every source is known to cover, e.g. an importer's `dsat:aoi_bbox`).
    """
    inner = -1 if snap_inward else 1  # +1: floor the start and ceil the end; -1: the reverse
    if not sources:
        raise GridError("no source rasters")
    first = sources[0]
    footprint = transform_bounds(first.crs, WGS84, *first.bounds, densify_pts=21)
    for source in sources[1:]:
        other = transform_bounds(source.crs, WGS84, *source.bounds, densify_pts=21)
        footprint = (*map(min, footprint[:2], other[:2]), *map(max, footprint[2:], other[2:]))
    wgs84 = footprint
    if item_bbox is not None:
        wgs84 = intersect_bbox(wgs84, item_bbox)
        if wgs84 is None:
            raise GridError(f"item bbox {tuple(item_bbox)} does not overlap the raster footprint {footprint}")
    if aoi_bbox is not None:
        wgs84 = intersect_bbox(wgs84, tuple(aoi_bbox))
        if wgs84 is None:
            raise GridError(f"no overlap with AOI {tuple(aoi_bbox)}")
    centre = ((wgs84[0] + wgs84[2]) / 2, (wgs84[1] + wgs84[3]) / 2)
    crs = choose_crs(target_crs, first.crs, centre)
    box = transform_bounds(WGS84, crs, *wgs84, densify_pts=21)
    raster = None
    for source in sources:
        b = transform_bounds(source.crs, crs, *source.bounds, densify_pts=21)
        raster = b if raster is None else (*map(min, raster[:2], b[:2]), *map(max, raster[2:], b[2:]))
    if raster is None:
        raise ValueError("build_grid needs at least one source")
    box = intersect_bbox(box, raster)
    if box is None:
        raise GridError("no overlap between the footprint and the rasters in the target CRS")
    left, bottom, right, top = box

    if target_gsd is None and crs == first.crs:
        # The source's own pixel grid: snap to it, no resampling.
        t = first.transform
        if t.b != 0 or t.d != 0:
            raise GridError("rotated source geotransforms need an explicit target_gsd")
        rx, ry = abs(t.a), abs(t.e)
        col0 = _snap((left - t.c) / rx, inner)
        col1 = _snap((right - t.c) / rx, -inner)
        row0 = _snap((t.f - top) / ry, inner)
        row1 = _snap((t.f - bottom) / ry, -inner)
        transform = Affine(rx, 0.0, t.c + col0 * rx, 0.0, -ry, t.f - row0 * ry)
        return TargetGrid(crs, transform, col1 - col0, row1 - row0, resolution_m(first, centre[1]))

    gsd_m = target_gsd or item_gsd or resolution_m(first, centre[1])
    g = _gsd_in_crs_units(gsd_m, crs)
    x0 = _snap(left / g, inner) * g
    x1 = _snap(right / g, -inner) * g
    y1 = _snap(top / g, -inner) * g
    y0 = _snap(bottom / g, inner) * g
    if x1 <= x0 or y1 <= y0:
        raise GridError(f"the AOI is smaller than one {gsd_m} m pixel")
    width, height = round((x1 - x0) / g), round((y1 - y0) / g)
    return TargetGrid(crs, Affine(g, 0.0, x0, 0.0, -g, y1), width, height, float(gsd_m))
