"""Write generated images to disk: PNGs, and GeoTIFFs (COG) placed by their metadata's lat/lon/GSD."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from dsat_core.imaging.geotiff import image_georeference, write_cog
from dsat_core.metadata import SatMetadata


def save_samples(
    images: np.ndarray | Sequence[np.ndarray],
    metadata: Sequence[SatMetadata],
    out_dir: str | Path,
    *,
    prompt: str,
    seeds: Sequence[int],
    prefix: str = "sample",
) -> list[Path]:
    """Save (N, H, W, 3) uint8 images as `<prefix>-<i>.png`, plus `.tif` where lat, lon and GSD are known.

    The GeoTIFF is north-up in the UTM zone of (lon, lat), centred there, with `gsd`-metre pixels; the
    prompt, seed and metadata are written as GeoTIFF tags.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for i, (image, meta, seed) in enumerate(zip(images, metadata, seeds, strict=True)):
        png = out / f"{prefix}-{i:03d}.png"
        Image.fromarray(image).save(png)
        written.append(png)
        if meta.lat is None or meta.lon is None or meta.gsd is None:
            continue
        height, width = image.shape[:2]
        crs, transform = image_georeference(meta.lon, meta.lat, meta.gsd, height, width)
        tags = {"prompt": prompt, "seed": str(seed), **{k: str(v) for k, v in meta.to_params("").items()}}
        tif = png.with_suffix(".tif")
        write_cog(tif, np.moveaxis(image, -1, 0), crs, transform, ["red", "green", "blue"], tags)
        written.append(tif)
    return written
