"""Georeferenced images: the UTM zone of a point, the grid of an image centred there, and COG writing.

Needs rasterio and pyproj (imported with this module only, never by training or sampling).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import rasterio
from pyproj import CRS, Transformer
from rasterio.transform import Affine


def utm_epsg(lon: float, lat: float) -> int:
    """EPSG code of the WGS84 UTM zone holding (lon, lat): 326zz north of the equator, 327zz south."""
    if not (-180 <= lon <= 180 and -90 <= lat <= 90):
        raise ValueError(f"lon/lat ({lon}, {lat}) out of range")
    zone = min(int((lon + 180.0) // 6.0) + 1, 60)
    return (32600 if lat >= 0 else 32700) + zone


def image_georeference(
    lon: float, lat: float, gsd: float, height: int, width: int, crs: str = "utm"
) -> tuple[CRS, Affine]:
    """CRS and affine transform of an image centred on (lon, lat) with square `gsd`-metre pixels, north-up.

    `crs`: "utm" (zone of the point) or any projected CRS with metre units ("EPSG:3857", ...).
    """
    target = CRS.from_epsg(utm_epsg(lon, lat)) if crs == "utm" else CRS.from_user_input(crs)
    if not target.is_projected or target.axis_info[0].unit_name not in ("metre", "meter"):
        raise ValueError(f"crs {crs!r} must be 'utm' or a projected CRS in metres (gsd is in metres)")
    if not gsd > 0:
        raise ValueError(f"gsd must be positive, got {gsd}")
    x, y = Transformer.from_crs("EPSG:4326", target, always_xy=True).transform(lon, lat)
    transform = Affine(gsd, 0.0, x - width * gsd / 2.0, 0.0, -gsd, y + height * gsd / 2.0)
    return target, transform


def write_cog(
    path: Path, image: np.ndarray, crs: CRS, transform: Affine, bands: Sequence[str], tags: dict[str, str]
) -> None:
    """Write one (C, H, W) uint8 image as a deflate-compressed COG (GDAL `COG` driver)."""
    count, height, width = image.shape
    profile = {
        "driver": "COG",
        "width": width,
        "height": height,
        "count": count,
        "dtype": "uint8",
        "crs": crs.to_wkt(),
        "transform": transform,
        "compress": "deflate",
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(image)
        for i, name in enumerate(bands, start=1):
            dst.set_band_description(i, name)
        dst.update_tags(**tags)


__all__ = ["image_georeference", "utm_epsg", "write_cog"]
