"""Low-level imaging shared by data, training, pipelines and evaluation: RGB views and grids (`rgb`),
the classical task baselines (`baselines`) and georeferenced COG output (`geotiff`).

Names are imported on first use: only the GeoTIFF part loads rasterio / pyproj.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dsat_core._lazy import lazy_exports

if TYPE_CHECKING:
    from dsat_core.imaging.baselines import (
        bicubic_upsample,
        classical_inpaint,
        nearest_date_frame,
        nearest_date_index,
    )
    from dsat_core.imaging.geotiff import image_georeference, utm_epsg, write_cog
    from dsat_core.imaging.rgb import RGB_ALIASES, image_grid, rgb_band_indices, rgb_preview, to_rgb

_MODULE_OF = {
    "RGB_ALIASES": "rgb",
    "bicubic_upsample": "baselines",
    "classical_inpaint": "baselines",
    "image_georeference": "geotiff",
    "image_grid": "rgb",
    "nearest_date_frame": "baselines",
    "nearest_date_index": "baselines",
    "rgb_band_indices": "rgb",
    "rgb_preview": "rgb",
    "to_rgb": "rgb",
    "utm_epsg": "geotiff",
    "write_cog": "geotiff",
}

__all__ = [
    "RGB_ALIASES",
    "bicubic_upsample",
    "classical_inpaint",
    "image_georeference",
    "image_grid",
    "nearest_date_frame",
    "nearest_date_index",
    "rgb_band_indices",
    "rgb_preview",
    "to_rgb",
    "utm_epsg",
    "write_cog",
]

__getattr__, __dir__ = lazy_exports(__name__, _MODULE_OF, globals())
