"""Miniature copies of the paper's datasets in their published layouts, generated in code.

A few small images each, with sidecars shaped like the real ones, for the tests and for trying the
importers offline. Every writer returns the facts it wrote (per image: location, date, GSD, ...) so that
tests can check the imported items against them.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dsat_core.data.synthetic import smooth_image

METRES_PER_DEGREE = 111_320.0


@dataclass(frozen=True)
class Place:
    """A labelled object on the ground: its centre and the size of its bounding box (metres)."""

    category: str
    location: int
    lon: float
    lat: float
    country_code: str
    box_m: float = 60.0


# Real places in distinct countries, so that reverse geocoding names them.
PLACES = (
    Place("airport", 0, 2.5500, 49.0097, "FRA"),  # Paris-Charles de Gaulle
    Place("stadium", 3, 13.2395, 52.5147, "DEU"),  # Berlin Olympiastadion
)


def _degrees(metres: float, lat: float) -> tuple[float, float]:
    """(Δlon, Δlat) of a distance in metres at a latitude."""
    return metres / (METRES_PER_DEGREE * math.cos(math.radians(lat))), metres / METRES_PER_DEGREE


def _wkt_box(west: float, south: float, east: float, north: float) -> str:
    ring = [(west, south), (east, south), (east, north), (west, north), (west, south)]
    return "POLYGON ((" + ", ".join(f"{x:.8f} {y:.8f}" for x, y in ring) + "))"


def write_fmow(
    root: str | Path,
    *,
    dates: tuple[str, ...] = ("2016-03-05T10:02:11Z", "2017-07-21T10:30:40Z", "2018-05-02T11:12:00Z"),
    size: int = 96,
    gsd: float = 1.0,
    split: str = "train",
    seed: int = 0,
    kind: str = "rgb",
) -> list[dict]:
    """fMoW layout: per place, one image + JSON sidecar per date; returns the sidecars written.

    ``kind`` "rgb" writes fmow-rgb's ``_rgb.jpg``; "ms" writes fmow-full's 4-band uint16 ``_ms.tif`` (no
    georeferencing, like the JPEGs). The object box sits in the middle of the chip; each date's chip is
    shifted by a few pixels (as real revisits are) so the footprints differ but overlap.
    """
    rng = np.random.default_rng(seed)
    written = []
    for place in PLACES:
        name = f"{place.category}_{place.location}"
        folder = Path(root) / split / place.category / name
        folder.mkdir(parents=True, exist_ok=True)
        dlon, dlat = _degrees(gsd, place.lat)  # one pixel
        half_box = place.box_m / gsd / 2
        for image_id, when in enumerate(dates):
            shift = 3 * image_id  # pixels
            box_x, box_y = size / 2 - half_box + shift, size / 2 - half_box - shift
            west = place.lon - half_box * dlon
            north = place.lat + half_box * dlat
            raw = _wkt_box(west, north - 2 * half_box * dlat, west + 2 * half_box * dlon, north)
            stem = f"{name}_{image_id}_{kind}"
            filename = _write_fmow_image(
                folder / stem, kind, smooth_image(rng, 3 if kind == "rgb" else 4, size)
            )
            sidecar = {
                "gsd": gsd,
                "img_filename": filename,
                "img_width": size,
                "img_height": size,
                "country_code": place.country_code,
                "cloud_cover": 5 * image_id,
                "timestamp": when,
                "utm": "31U",
                "sensor_platform_name": "WORLDVIEW02",
                "bounding_boxes": [
                    {
                        "box": [round(box_x), round(box_y), round(2 * half_box), round(2 * half_box)],
                        "category": place.category,
                        "raw_location": raw,
                        "ID": 1000 * place.location + image_id,
                    }
                ],
            }
            if kind == "ms":
                sidecar["approximate_wavelengths"] = [0.48, 0.545, 0.66, 0.83]  # blue, green, red, nir (µm)
            (folder / f"{stem}.json").write_text(json.dumps(sidecar))
            written.append({"path": str(folder / f"{stem}.json"), "place": place, **sidecar})
    return written


def _write_fmow_image(stem: Path, kind: str, pixels: np.ndarray) -> str:
    """An fMoW chip without georeferencing: RGB JPEG, or a multispectral uint16 TIFF; returns its name."""
    if kind == "rgb":
        Image.fromarray(np.moveaxis(pixels, 0, -1)).save(stem.with_suffix(".jpg"), quality=95)
        return stem.name + ".jpg"
    import rasterio

    bands, height, width = pixels.shape
    profile = {"driver": "GTiff", "width": width, "height": height, "count": bands, "dtype": "uint16"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(stem.with_suffix(".tif"), "w", **profile) as dst:
            dst.write(pixels.astype(np.uint16) * 16)
    return stem.name + ".tif"


def write_fmow_sentinel(
    root: str | Path,
    *,
    dates: tuple[str, ...] = ("2017-07-25T10:40:21Z", "2019-04-02T10:50:00Z"),
    size: int = 24,
    split: str = "train",
    seed: int = 1,
) -> list[dict]:
    """fMoW-Sentinel layout: ``<split>.csv`` + 13-band uint16 GeoTIFFs (EPSG:4326, 10 m) per place, date."""
    import rasterio
    from rasterio.transform import from_origin

    rng = np.random.default_rng(seed)
    rows = []
    for place in PLACES:
        name = f"{place.category}_{place.location}"
        folder = Path(root) / split / place.category / name
        folder.mkdir(parents=True, exist_ok=True)
        dlon, dlat = _degrees(10.0, place.lat)
        west, north = place.lon - size / 2 * dlon, place.lat + size / 2 * dlat
        half_lon, half_lat = _degrees(place.box_m / 2, place.lat)
        polygon = _wkt_box(
            place.lon - half_lon, place.lat - half_lat, place.lon + half_lon, place.lat + half_lat
        )
        for image_id, when in enumerate(dates):
            path = folder / f"{name}_{image_id}.tif"
            data = smooth_image(rng, 13, size, "uint16") // 16  # reflectance-like 0..4095
            profile = {
                "driver": "GTiff",
                "width": size,
                "height": size,
                "count": 13,
                "dtype": "uint16",
                "crs": "EPSG:4326",
                "transform": from_origin(west, north, dlon, dlat),
            }
            with rasterio.open(path, "w", **profile) as dst:
                dst.write(data)
            rows.append(
                {
                    "category": place.category,
                    "location_id": place.location,
                    "image_id": image_id,
                    "timestamp": when,
                    "polygon": polygon,
                    "path": str(path),
                    "place": place,
                }
            )
    header = "category,location_id,image_id,timestamp,polygon\n"
    lines = [
        f'{r["category"]},{r["location_id"]},{r["image_id"]},{r["timestamp"]},"{r["polygon"]}"\n'
        for r in rows
    ]
    (Path(root) / f"{split}.csv").write_text(header + "".join(lines))
    return rows


# ------------------------------------------------------------------------------------------------ xBD
@dataclass(frozen=True)
class Disaster:
    """An xBD event at a real place: the tile's centre, the two capture dates, the sensor, the damage."""

    name: str
    kind: str
    lon: float
    lat: float
    country: str
    pre: str
    post: str
    sensor: str
    damage: tuple[str, ...]  # subtype of each building of `XBD_BUILDINGS` after the event


DISASTERS = (
    Disaster(
        "hurricane-harvey", "flooding", -95.3698, 29.7604, "United States",
        "2016-04-12T16:51:21.000Z", "2017-08-31T17:03:27.000Z", "WORLDVIEW02",
        ("no-damage", "minor-damage", "major-damage"),
    ),
    Disaster(
        "mexico-earthquake", "earthquake", -99.1332, 19.4326, "Mexico",
        "2017-05-26T17:05:19.000Z", "2017-09-26T17:24:08.000Z", "GEOEYE01",
        ("no-damage", "destroyed", "no-damage"),
    ),
)  # fmt: skip
# Building outlines as fractions of the tile (x, y): a rectangle, an L-shape, a rotated quad.
XBD_BUILDINGS = (
    ((0.15, 0.20), (0.35, 0.20), (0.35, 0.32), (0.15, 0.32)),
    ((0.55, 0.25), (0.75, 0.25), (0.75, 0.50), (0.65, 0.50), (0.65, 0.35), (0.55, 0.35)),
    ((0.40, 0.62), (0.56, 0.66), (0.52, 0.80), (0.36, 0.76)),
)


def _wkt_polygon(points: list[tuple[float, float]], digits: int) -> str:
    ring = [*points, points[0]]
    return "POLYGON ((" + ", ".join(f"{x:.{digits}f} {y:.{digits}f}" for x, y in ring) + "))"


def write_xbd(
    root: str | Path,
    *,
    size: int = 96,
    pan_resolution: float = 0.5,
    split: str = "train",
    seed: int = 2,
) -> list[dict]:
    """xBD layout: per disaster one tile as ``_pre_disaster`` and ``_post_disaster`` PNG + label JSON.

    The tile is north-up, centred on the disaster's place, ``pan_resolution`` m per pixel (the label's
    ``gsd`` is the multispectral GSD, 4×, as in xBD); pre and post share the georeferencing and the building
    polygons, the post label adds each building's damage. Returns one dict per image written.
    """
    import uuid

    from affine import Affine

    rng = np.random.default_rng(seed)
    (Path(root) / split / "images").mkdir(parents=True, exist_ok=True)
    (Path(root) / split / "labels").mkdir(parents=True, exist_ok=True)
    written = []
    for number, disaster in enumerate(DISASTERS):
        tile = f"{number:08d}"
        dlon, dlat = _degrees(pan_resolution, disaster.lat)
        west, north = disaster.lon - size / 2 * dlon, disaster.lat + size / 2 * dlat
        transform = Affine(dlon, 0.0, west, 0.0, -dlat, north)
        outlines = [[(fx * size, fy * size) for fx, fy in outline] for outline in XBD_BUILDINGS]
        for role, when, off_nadir in (("pre", disaster.pre, 23.5), ("post", disaster.post, 31.2)):
            stem = f"{disaster.name}_{tile}_{role}_disaster"
            buildings, lng_lat, xy = [], [], []
            for b, (outline, damage) in enumerate(zip(outlines, disaster.damage, strict=True)):
                uid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"xbd/{disaster.name}/{tile}/{b}"))
                lonlats = [transform @ point for point in outline]
                props = {"feature_type": "building", "uid": uid}
                if role == "post":
                    props["subtype"] = damage
                lng_lat.append({"properties": props, "wkt": _wkt_polygon(lonlats, 12)})
                xy.append({"properties": props, "wkt": _wkt_polygon(outline, 4)})
                buildings.append({"uid": uid, "xy": outline, "lng_lat": lonlats} | props)
            metadata = {
                "sensor": disaster.sensor,
                "provider_asset_type": disaster.sensor,
                "gsd": round(4 * pan_resolution, 4),
                "capture_date": when,
                "off_nadir_angle": off_nadir,
                "pan_resolution": pan_resolution,
                "sun_azimuth": 141.6,
                "sun_elevation": 61.3,
                "target_azimuth": 208.9,
                "disaster": disaster.name,
                "disaster_type": disaster.kind,
                "catalog_id": f"10300100{number:04d}{'A' if role == 'pre' else 'B'}00",
                "original_width": size,
                "original_height": size,
                "width": size,
                "height": size,
                "id": str(uuid.uuid5(uuid.NAMESPACE_URL, stem)),
                "img_name": f"{stem}.png",
            }
            image = Path(root) / split / "images" / f"{stem}.png"
            label = Path(root) / split / "labels" / f"{stem}.json"
            Image.fromarray(np.moveaxis(smooth_image(rng, 3, size), 0, -1)).save(image)
            label.write_text(json.dumps({"features": {"lng_lat": lng_lat, "xy": xy}, "metadata": metadata}))
            written.append(
                {
                    "item_id": f"xbd-{split}-{disaster.name}_{tile}_{role}",
                    "image": str(image),
                    "label": str(label),
                    "split": split,
                    "tile": tile,
                    "role": role,
                    "disaster": disaster,
                    "transform": transform,
                    "buildings": buildings,
                    "metadata": metadata,
                }
            )
    return written


# ------------------------------------------------------------------------------------------------ SpaceNet
SPACENET_AOI = ("AOI_2_Vegas", -115.1728, 36.1147, "United States")  # the Las Vegas Strip
# Buildings per image as pixel boxes (x, y, w, h) of a 64 px tile; the third image has none.
SPACENET_BUILDINGS = (((8, 10, 14, 12), (36, 30, 18, 20)), ((20, 22, 22, 16),), ())


def write_spacenet(
    root: str | Path,
    *,
    size: int = 64,
    gsd: float = 0.3,
    layout: str = "challenge",
    tiff_datetimes: dict[int, str] | None = None,
    seed: int = 3,
) -> list[dict]:
    """SpaceNet 2 layout: one AOI, 3 neighbouring RGB-PanSharpen uint16 GeoTIFFs (EPSG:4326) + GeoJSON.

    ``layout`` ``challenge`` writes the tarballs' layout (``AOI_2_Vegas_Train/RGB-PanSharpen/...``),
    ``bucket`` the browsable copy's (``train/AOI_2_Vegas/PS-RGB/SN2_buildings_train_...``).
    ``tiff_datetimes`` (image number → ``YYYY:MM:DD HH:MM:SS``) sets TIFFTAG_DATETIME; by default image 1
    has one and the others none. Returns one dict per image written.
    """
    import rasterio
    from affine import Affine

    if layout not in ("challenge", "bucket"):
        raise ValueError(f"layout {layout!r} is 'challenge' or 'bucket'")
    tiff_datetimes = {1: "2015:10:22 18:32:09"} if tiff_datetimes is None else tiff_datetimes
    aoi, lon, lat, country = SPACENET_AOI
    rng = np.random.default_rng(seed)
    dlon, dlat = _degrees(gsd, lat)
    written = []
    for k, boxes in enumerate(SPACENET_BUILDINGS, start=1):
        if layout == "challenge":
            folder = Path(root) / f"{aoi}_Train"
            image = folder / "RGB-PanSharpen" / f"RGB-PanSharpen_{aoi}_img{k}.tif"
            labels = folder / "geojson" / "buildings" / f"buildings_{aoi}_img{k}.geojson"
        else:
            folder, prefix = Path(root) / "train" / aoi, f"SN2_buildings_train_{aoi}"
            image = folder / "PS-RGB" / f"{prefix}_PS-RGB_img{k}.tif"
            labels = folder / "geojson_buildings" / f"{prefix}_geojson_buildings_img{k}.geojson"
        image.parent.mkdir(parents=True, exist_ok=True)
        labels.parent.mkdir(parents=True, exist_ok=True)
        west, north = lon + (k - 1) * size * dlon, lat
        transform = Affine(dlon, 0.0, west, 0.0, -dlat, north)
        profile = {"driver": "GTiff", "width": size, "height": size, "count": 3, "dtype": "uint16",
                   "crs": "EPSG:4326", "transform": transform}  # fmt: skip
        with rasterio.open(image, "w", **profile) as dst:
            dst.write(smooth_image(rng, 3, size, "uint16") // 32)  # 11-bit values, as WorldView-3
            if k in tiff_datetimes:
                dst.update_tags(TIFFTAG_DATETIME=tiff_datetimes[k])
        rings = []
        for x, y, w, h in boxes:
            corners = [(x, y), (x + w, y), (x + w, y + h), (x, y + h), (x, y)]
            rings.append([transform @ corner for corner in corners])
        features = [
            {
                "type": "Feature",
                "properties": {"OBJECTID": 100 * k + b, "building": "yes"},
                "geometry": {"type": "Polygon", "coordinates": [[[x, y, 0.0] for x, y in ring]]},
            }
            for b, ring in enumerate(rings)
        ]
        labels.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
        written.append(
            {
                "item_id": f"spacenet-train-{aoi}_img{k}_RGB-PanSharpen",
                "image": str(image),
                "labels": str(labels),
                "aoi": aoi,
                "country": country,
                "bbox": (west, north - size * dlat, west + size * dlon, north),
                "buildings": rings,
                "tiff_datetime": tiff_datetimes.get(k),
            }
        )
    return written
