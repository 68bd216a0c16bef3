"""The mosaic of a run's finished tiles → one Cloud-Optimised GeoTIFF, written strip by strip.

Each strip of output rows is blended from the tiles that meet it (`TilePlan.weights`), so memory is one
strip of the mosaic plus the tiles it touches, whatever the AOI. The strips go into a tiled GeoTIFF in a
staging folder, which GDAL's COG driver then copies (streaming) into the COG: deflate, 256 px blocks,
overviews (average) down to one block, at least one level. Output pixels without input data are marked by
the internal mask (``nodata: mask``): every uint8 value stays available to valid pixels, so a fill task's
clear pixels come back exactly. Pixels to keep (``keep`` in the scratch) are copied from ``known``, not
blended.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window

from dsat_core.apply.scratch import ScratchTiles
from dsat_core.apply.tiling import TilePlan

BLOCK = 256


def overview_count(height: int, width: int) -> int:
    """Overview levels: halvings until the mosaic fits one block, at least one (small mosaics too)."""
    return max(1, math.ceil(math.log2(max(height, width) / BLOCK)))


def blend_strip(plan: TilePlan, scratch: ScratchTiles, y0: int, y1: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (3, y1 - y0, W) blended output rows [y0, y1) and their bool validity."""
    height, width = y1 - y0, plan.out_shape[1]
    total = np.zeros((3, height, width), np.float64)
    weight = np.zeros((height, width), np.float64)
    valid = np.zeros((height, width), bool)
    keep = np.zeros((height, width), bool)
    known = np.zeros((3, height, width), np.uint8)
    side = plan.out_tile
    for tile in plan.rows_touching(y0, y1):
        image, ok, kp, kn = scratch.read(tile.index)
        w = plan.weights(tile)
        ty, tx = plan.out_origin(tile)
        a, b = max(ty, y0), min(ty + side, y1)
        rows, dst = slice(a - ty, b - ty), slice(a - y0, b - y0)
        cols = slice(tx, tx + side)
        total[:, dst, cols] += image[:, rows] * w[rows]
        weight[dst, cols] += w[rows]
        valid[dst, cols] |= ok[rows]
        keep[dst, cols] |= kp[rows]
        known[:, dst, cols] = np.where(kp[rows][None], kn[:, rows], known[:, dst, cols])
    blended = total / np.maximum(weight, 1e-12)
    out = np.clip(np.rint(blended * 255.0), 0, 255).astype(np.uint8)
    out = np.where(keep[None], known, out)
    return out, valid & (weight > 0)


def write_mosaic_cog(
    path: str | Path,
    plan: TilePlan,
    scratch: ScratchTiles,
    crs: CRS,
    transform: Affine,
    bands: Sequence[str],
    tags: Mapping[str, str],
    staging: str | Path,
) -> Path:
    """Blend every tile of ``scratch`` into ``path`` (a COG on ``crs`` / ``transform``); returns ``path``."""
    height, width = plan.out_shape
    staging = Path(staging)
    staging.mkdir(parents=True, exist_ok=True)
    tmp = staging / (Path(path).stem + ".strips.tif")
    profile = {
        "driver": "GTiff", "width": width, "height": height, "count": 3, "dtype": "uint8",
        "crs": crs, "transform": transform, "tiled": True, "blockxsize": BLOCK, "blockysize": BLOCK,
        "compress": "deflate",
    }  # fmt: skip
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(tmp, "w", **profile) as dst:
        for y0 in range(0, height, BLOCK):
            y1 = min(y0 + BLOCK, height)
            strip, valid = blend_strip(plan, scratch, y0, y1)
            window = Window(0, y0, width, y1 - y0)
            dst.write(strip, window=window)
            dst.write_mask(np.where(valid, 255, 0).astype(np.uint8), window=window)
        for i, name in enumerate(bands, start=1):
            dst.set_band_description(i, name)
        dst.update_tags(**dict(tags))
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True):
        rasterio.shutil.copy(
            tmp, str(path), driver="COG", compress="DEFLATE", blocksize=BLOCK,
            overview_resampling="AVERAGE", overview_count=overview_count(height, width),
        )  # fmt: skip
    tmp.unlink()
    return Path(path)


def write_mask_cog(
    path: str | Path,
    shape: tuple[int, int],
    strip: Callable[[int, int], np.ndarray],
    crs: CRS,
    transform: Affine,
    staging: str | Path,
) -> Path:
    """The fill mask actually used as a single-band uint8 COG sidecar (1 = filled, 0 = kept, 255 = nodata),
    written strip by strip: ``strip(y0, y1)`` gives output rows [y0, y1) as uint8 (y1 - y0, W)."""
    height, width = shape
    staging = Path(staging)
    staging.mkdir(parents=True, exist_ok=True)
    tmp = staging / (Path(path).stem + ".strips.tif")
    profile = {
        "driver": "GTiff", "width": width, "height": height, "count": 1, "dtype": "uint8", "crs": crs,
        "transform": transform, "tiled": True, "blockxsize": BLOCK, "blockysize": BLOCK,
        "compress": "deflate", "nodata": 255,
    }  # fmt: skip
    with rasterio.open(tmp, "w", **profile) as dst:
        for y0 in range(0, height, BLOCK):
            y1 = min(y0 + BLOCK, height)
            dst.write(strip(y0, y1).astype(np.uint8)[None], window=Window(0, y0, width, y1 - y0))
        dst.set_band_description(1, "fill_mask")
    rasterio.shutil.copy(tmp, str(path), driver="COG", compress="DEFLATE", blocksize=BLOCK,
                         overview_resampling="NEAREST")  # fmt: skip
    tmp.unlink()
    return Path(path)


__all__ = ["blend_strip", "write_mask_cog", "write_mosaic_cog"]
