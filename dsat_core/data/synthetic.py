"""Synthetic scenes and stores for tests and demos: smooth random imagery with realistic metadata."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import date as Date
from typing import Any

import numpy as np
from scipy.ndimage import zoom

from dsat_core.data.catalog import BandSpec, CatalogConfig, ProductSpec, ScalingSpec
from dsat_core.data.tiles import ProductTiles, Rejection, SceneTiles
from dsat_core.metadata import SatMetadata

# (name, lon, lat, country) of a few places with real imagery in ../shared/data/real.
PLACES: tuple[tuple[str, float, float, str], ...] = (
    ("Havelland", 12.73, 52.83, "Germany"),
    ("Porto Velho", -63.93, -8.74, "Brazil"),
    ("Tiris Zemmour", -11.43, 24.80, "Mauritania"),
    ("Andros", -77.77, 24.56, "The Bahamas"),
    ("Madre de Dios", -69.99, -12.88, "Peru"),
)
PLATFORMS = ("sentinel-2a", "landsat-8")
CLASSES = ("farmland", "forest", "desert", "river", "coast")
DEFAULT_BANDS = {"rgb": ("red", "green", "blue"), "multispectral": ("blue", "green", "red", "nir08")}


def _utm_epsg(lon: float, lat: float) -> int:
    zone = int((lon + 180) // 6) + 1
    return (32600 if lat >= 0 else 32700) + zone


def smooth_image(rng: np.random.Generator, n_bands: int, size: int, dtype: str = "uint8") -> np.ndarray:
    """(band, size, size) smooth random image: a few octaves of upsampled noise, correlated across bands."""
    field = np.zeros((size, size))
    for octave, weight in ((4, 1.0), (8, 0.5), (16, 0.25)):
        coarse = rng.standard_normal((octave + 1, octave + 1))
        field += (
            weight * zoom(coarse, size / (octave + 1), order=3, grid_mode=True, mode="nearest")[:size, :size]
        )
    field = (field - field.min()) / (np.ptp(field) + 1e-9)
    bands = []
    for _ in range(n_bands):
        gain, offset = rng.uniform(0.6, 1.0), rng.uniform(0.0, 0.3)
        texture = rng.normal(0.0, 0.02, (size, size))
        bands.append(np.clip(offset + gain * field * (1 - offset) + texture, 0.0, 1.0))
    top = np.iinfo(dtype).max
    return (np.stack(bands) * top).round().astype(dtype)


def make_scene_tiles(
    item_id: str,
    n_tiles: int = 4,
    size: int = 32,
    bands: Sequence[str] = ("red", "green", "blue"),
    product: str = "rgb",
    seed: int = 0,
    lon: float = 12.73,
    lat: float = 52.83,
    date: str | Date = "2020-06-15",
    *,
    gsd: float = 10.0,
    cloud_cover: float | None = 0.05,
    platform: str = "sentinel-2a",
    place: str = "Germany",
    land_class: str = "farmland",
    dtype: str = "uint8",
    rejected_tiles: int = 0,
) -> SceneTiles:
    """A scene with ``n_tiles`` tiles on a regular grid (row-major) around (lon, lat).

    Metadata and lineage look like what the reader produces: UTM CRS and transform, windows on the scene
    grid, per-band scale range, a caption from class and place. ``rejected_tiles`` extra tile indices are
    reported as rejected (``nodata``), as a real reader's quality filter would.
    """
    rng = np.random.default_rng([seed, *item_id.encode()])
    when = Date.fromisoformat(date) if isinstance(date, str) else date
    per_row = max(1, math.ceil(math.sqrt(n_tiles)))
    epsg = _utm_epsg(lon, lat)
    # rough UTM origin of the scene (a proper projection is the reader's job; this only has to look real)
    x0 = 500_000.0 + (lon - ((int((lon + 180) // 6) * 6) - 177)) * 111_320.0 * math.cos(math.radians(lat))
    y0 = lat * 110_574.0 + (10_000_000.0 if lat < 0 else 0.0)
    images, windows, transforms, metas = [], [], [], []
    deg_per_px = gsd / 111_320.0
    for t in range(n_tiles):
        row, col = divmod(t, per_row)
        images.append(smooth_image(rng, len(bands), size, dtype))
        windows.append((row * size, col * size, size, size))
        transforms.append((gsd, 0.0, x0 + col * size * gsd, 0.0, -gsd, y0 - row * size * gsd))
        centre_lon = lon + (col + 0.5 - per_row / 2) * size * deg_per_px / max(
            math.cos(math.radians(lat)), 0.1
        )
        centre_lat = lat - (row + 0.5 - per_row / 2) * size * deg_per_px
        metas.append(
            SatMetadata(
                lon=centre_lon,
                lat=centre_lat,
                gsd=gsd,
                cloud_cover=cloud_cover,
                year=when.year,
                month=when.month,
                day=when.day,
            )
        )
    n = len(images)
    top = float(np.iinfo(dtype).max)
    caption = f"a satellite image of {land_class} in {place}"
    tiles = ProductTiles(
        product=product,
        bands=list(bands),
        images=np.stack(images) if images else np.zeros((0, len(bands), size, size), dtype),
        metadata=metas,
        caption=[caption] * n,
        item_id=[item_id] * n,
        asset_href=[" ".join(f"https://data.example.org/{item_id}/{b}.tif" for b in bands)] * n,
        crs=[f"EPSG:{epsg}"] * n,
        scene_datetime=[f"{when.isoformat()}T10:30:00Z"] * n,
        platform=[platform] * n,
        transform=np.array(transforms, dtype=np.float64).reshape(n, 6),
        window=np.array(windows, dtype=np.int64).reshape(n, 4),
        scale_min=np.zeros((n, len(bands))),
        scale_max=np.full((n, len(bands)), 3000.0 if top > 255 else 255.0),
    )
    rejected = [
        Rejection(item_id, "nodata fraction 0.62 > 0.10", n + k, product) for k in range(rejected_tiles)
    ]
    return SceneTiles(item_id=item_id, products={product: tiles}, rejected=rejected)


def synthetic_catalog(products: Sequence[str] = ("rgb",), size: int = 32) -> CatalogConfig:
    """A `CatalogConfig` describing the synthetic products (for a store's ``catalog`` attr)."""
    specs = {}
    for name in products:
        bands = DEFAULT_BANDS.get(name, ("red", "green", "blue"))
        dtype = "uint16" if name == "multispectral" else "uint8"
        specs[name] = ProductSpec(bands=[BandSpec(name=b) for b in bands], scaling=ScalingSpec(dtype=dtype))
    return CatalogConfig(
        name="synthetic",
        description="generated by dsat_core.data.synthetic",
        stac_api="http://127.0.0.1:1/stac",
        collections=["synthetic"],
        products=specs,
        tile_size=size,
    )


def synthetic_scene(
    index: int,
    tiles_per_scene: int = 4,
    size: int = 32,
    products: Sequence[str] = ("rgb",),
    seed: int = 0,
    item_prefix: str = "synthetic",
) -> SceneTiles:
    """Scene number ``index`` of a synthetic store: places, dates and platforms vary with the index.

    Odd scenes come from ``landsat-8`` with unknown cloud cover (to exercise missing metadata).
    """
    name, lon, lat, country = PLACES[index % len(PLACES)]
    platform = PLATFORMS[index % len(PLATFORMS)]
    when = Date(2016 + index % 6, 1 + (index * 5) % 12, 1 + (index * 7) % 28)
    item_id = f"{item_prefix}-{index:04d}-{platform}-{when:%Y%m%d}"
    scene = SceneTiles(item_id=item_id)
    for product in products:
        bands = DEFAULT_BANDS.get(product, ("red", "green", "blue"))
        part = make_scene_tiles(
            item_id,
            n_tiles=tiles_per_scene,
            size=size,
            bands=bands,
            product=product,
            seed=seed,
            lon=lon,
            lat=lat,
            date=when,
            gsd=10.0 if platform == "sentinel-2a" else 30.0,
            cloud_cover=None if index % 2 else 0.04 * (index % 5),
            platform=platform,
            place=country,
            land_class=CLASSES[index % len(CLASSES)],
            dtype="uint16" if product == "multispectral" else "uint8",
        )
        scene.products[product] = part.products[product]
    return scene


def make_synthetic_store(
    uri: str,
    n_scenes: int = 2,
    tiles_per_scene: int = 4,
    size: int = 32,
    products: Sequence[str] = ("rgb",),
    seed: int = 0,
    storage_options: Mapping[str, Any] | None = None,
) -> str:
    """Write ``n_scenes`` synthetic scenes into a store (new or existing) via the store API; returns uri."""
    from dsat_core.data.store import DatasetStore

    store = DatasetStore.open(
        uri, storage_options=storage_options, create=True, catalog=synthetic_catalog(products, size)
    )
    staged = [
        store.stage(synthetic_scene(i, tiles_per_scene, size, products, seed=seed)) for i in range(n_scenes)
    ]
    store.commit(staged)
    return uri


def synthetic_item(
    index: int,
    *,
    tiles: int = 4,
    fail: str | None = None,
    rejected_tiles: int = 0,
    sleep: float = 0.0,
    item_prefix: str = "synthetic",
) -> dict[str, Any]:
    """A STAC item (dict) that `synthetic_reader` turns into `synthetic_scene(index, ...)`.

    ``fail`` makes the reader reject the whole scene with that reason; ``sleep`` simulates I/O time.
    """
    scene_id = synthetic_scene(index, 1, 8, item_prefix=item_prefix).item_id
    name, lon, lat, _ = PLACES[index % len(PLACES)]
    platform = scene_id.split("-")[2] + "-" + scene_id.split("-")[3]
    when = scene_id.rsplit("-", 1)[1]
    return {
        "type": "Feature",
        "stac_version": "1.1.0",
        "id": scene_id,
        "collection": "synthetic",
        "bbox": [lon - 0.05, lat - 0.05, lon + 0.05, lat + 0.05],
        "geometry": {"type": "Point", "coordinates": [lon, lat]},
        "properties": {
            "datetime": f"{when[:4]}-{when[4:6]}-{when[6:]}T10:30:00Z",
            "platform": platform,
            "title": name,
            "synthetic:index": index,
            "synthetic:tiles": tiles,
            "synthetic:fail": fail,
            "synthetic:rejected_tiles": rejected_tiles,
            "synthetic:sleep": sleep,
            "synthetic:prefix": item_prefix,
        },
        "assets": {},
        "links": [],
    }


def synthetic_reader(
    item: Mapping[str, Any], config: CatalogConfig, *, aoi_bbox: Any = None, storage_options: Any = None
) -> SceneTiles:
    """Same signature as `dsat_core.data.reader.read_item`, for items made by `synthetic_item`.

    Products and tile size come from ``config``; like the real reader it never raises.
    """
    import time

    props = item.get("properties", {})
    item_id = str(item.get("id"))
    if "synthetic:index" not in props:
        return SceneTiles(item_id, rejected=[Rejection(item_id, "not a synthetic item")])
    if props.get("synthetic:sleep"):
        time.sleep(float(props["synthetic:sleep"]))
    if props.get("synthetic:fail"):
        return SceneTiles(item_id, rejected=[Rejection(item_id, str(props["synthetic:fail"]))])
    scene = synthetic_scene(
        int(props["synthetic:index"]),
        int(props.get("synthetic:tiles", 4)),
        config.tile_size,
        tuple(config.products),
        item_prefix=props.get("synthetic:prefix", "synthetic"),
    )
    product = next(iter(scene.products))
    n = len(scene.products[product])
    scene.rejected = [
        Rejection(item_id, "nodata fraction 0.62 > 0.10", n + k, product)
        for k in range(int(props.get("synthetic:rejected_tiles", 0)))
    ]
    return scene


__all__ = [
    "PLACES",
    "make_scene_tiles",
    "make_synthetic_store",
    "smooth_image",
    "synthetic_catalog",
    "synthetic_item",
    "synthetic_reader",
    "synthetic_scene",
]
