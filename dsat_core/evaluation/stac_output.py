"""Generated images as a self-contained STAC catalog of Cloud-Optimised GeoTIFFs, with provenance.

Layout (pystac best practice, relative hrefs):
```
out_dir/catalog.json
out_dir/<collection_id>/collection.json
out_dir/<collection_id>/<item_id>/<item_id>.json
out_dir/<collection_id>/<item_id>/<item_id>.tif      (COG)
```
Georeferencing: each image is centred on its metadata (lon, lat) in the UTM zone of that point (standard
6-degree zones, no Norway/Svalbard exceptions), north-up, square pixels of the metadata GSD. lon, lat and gsd
are therefore required; a missing one raises a `ValueError` naming the image index.

Item properties: `SatMetadata.to_stac_properties()` (gsd, eo:cloud_cover, datetime, dsat:<field>), the
prompt, seed, model URI and version (`dsat:prompt`, `dsat:seed`, `dsat:model_uri`, `dsat:model_version`,
`dsat:generated`), the processing extension (`processing:software`, `processing:lineage`,
`processing:datetime`) and the projection extension (`proj:code`, `proj:shape`, `proj:transform`, `proj:bbox`,
`proj:centroid`). When the metadata has no full date, `datetime` is the generation time.

Offline validation (`validate_catalog`): pystac bundles the STAC 1.1.0 core JSON schemas (item, catalog,
collection, GeoJSON) and validates against them without network. Extension schemas are NOT bundled (pystac and
`rustac validate` both fetch them over HTTP), so the projection / processing / eo / dsat fields are checked
here by explicit rules instead of their JSON schemas.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import pystac
import rasterio
from pyproj import CRS, Transformer
from pystac.extensions.eo import EOExtension
from pystac.extensions.projection import ProjectionExtension
from pystac.validation.stac_validator import JsonSchemaSTACValidator
from rasterio.transform import Affine

from dsat_core.metadata import SatMetadata

PROCESSING_SCHEMA = "https://stac-extensions.github.io/processing/v1.2.0/schema.json"
DEFAULT_COLLECTION = "dsat-generated"


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


def _footprint(target: CRS, transform: Affine, height: int, width: int) -> tuple[dict, list[float]]:
    """WGS84 polygon (corners, counter-clockwise as RFC 7946 asks) and bbox of the image footprint."""
    to_wgs84 = Transformer.from_crs(target, "EPSG:4326", always_xy=True)
    cols = np.array([0, 0, width, width], dtype=float)  # top-left, bottom-left, bottom-right, top-right
    rows = np.array([0, height, height, 0], dtype=float)
    xs = transform.a * cols + transform.b * rows + transform.c
    ys = transform.d * cols + transform.e * rows + transform.f
    lons, lats = to_wgs84.transform(xs, ys)
    ring = [[float(a), float(b)] for a, b in zip(lons, lats, strict=True)]
    ring.append(ring[0])
    bbox = [float(np.min(lons)), float(np.min(lats)), float(np.max(lons)), float(np.max(lats))]
    return {"type": "Polygon", "coordinates": [ring]}, bbox


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


def _software_version() -> str:
    try:
        return version("dsat-core")
    except PackageNotFoundError:
        return "unknown"


def write_generated_stac(
    images: np.ndarray,
    metadata: Sequence[SatMetadata],
    prompts: Sequence[str],
    seeds: Sequence[int],
    model_uri: str,
    model_version: str,
    out_dir: str | Path,
    crs: str = "utm",
    bands: Sequence[str] | None = None,
    collection_id: str = DEFAULT_COLLECTION,
    description: str = "Images generated by a DiffusionSat model",
) -> Path:
    """Write `images` (N, C, H, W) uint8 as COGs + a self-contained STAC catalog; returns catalog.json."""
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {images.shape}")
    n, count, height, width = images.shape
    for name, seq in (("metadata", metadata), ("prompts", prompts), ("seeds", seeds)):
        if len(seq) != n:
            raise ValueError(f"{len(seq)} {name} for {n} images")
    if bands is None:
        bands = ["red", "green", "blue"] if count == 3 else [f"band{i + 1}" for i in range(count)]
    if len(bands) != count:
        raise ValueError(f"{len(bands)} band names for {count} channels")
    for i, meta in enumerate(metadata):
        missing = [f for f in ("lon", "lat", "gsd") if getattr(meta, f) is None]
        if missing:
            raise ValueError(f"image {i}: metadata lacks {', '.join(missing)}; needed to georeference it")

    out_dir = Path(out_dir).resolve()
    now = datetime.now(UTC).replace(microsecond=0)
    software = {
        "dsat-core": _software_version(),
        "rasterio": rasterio.__version__,
        "pystac": pystac.__version__,
    }
    items: list[pystac.Item] = []
    for i in range(n):
        meta, prompt, seed = metadata[i], str(prompts[i]), int(seeds[i])
        item_id = f"{collection_id}-{i:06d}"
        target, transform = image_georeference(meta.lon, meta.lat, meta.gsd, height, width, crs)
        geometry, bbox = _footprint(target, transform, height, width)
        props: dict[str, Any] = meta.to_stac_properties()
        when = props.pop("datetime", None)
        when_dt = datetime.fromisoformat(when.replace("Z", "+00:00")) if when else now
        props.update(
            {
                "dsat:generated": True,
                "dsat:prompt": prompt,
                "dsat:seed": seed,
                "dsat:model_uri": model_uri,
                "dsat:model_version": str(model_version),
                "processing:software": software,
                "processing:lineage": (
                    f"Generated by model {model_uri} (version {model_version}) from the prompt in "
                    f"dsat:prompt and the metadata in dsat:*, sampling seed {seed}"
                ),
                "processing:datetime": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "created": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
        )
        item = pystac.Item(item_id, geometry, bbox, when_dt, props, collection=collection_id)
        item_dir = out_dir / collection_id / item_id
        item_dir.mkdir(parents=True, exist_ok=True)
        tif = item_dir / f"{item_id}.tif"
        tags = {"dsat_prompt": prompt, "dsat_seed": str(seed), "dsat_model_uri": model_uri,
                "dsat_model_version": str(model_version)}  # fmt: skip
        write_cog(tif, images[i], target, transform, bands, tags)
        item.add_asset(
            "image",
            pystac.Asset(
                str(tif),
                title="generated image",
                media_type=pystac.MediaType.COG,
                roles=["data"],
                extra_fields={"dsat:bands": list(bands)},
            ),  # fmt: skip
        )
        proj = ProjectionExtension.ext(item, add_if_missing=True)
        epsg = target.to_epsg()
        proj.code = f"EPSG:{epsg}" if epsg else None
        if epsg is None:
            proj.wkt2 = target.to_wkt()
        proj.shape = [height, width]
        proj.transform = list(transform)[:6]
        x0, y1 = transform.c, transform.f  # north-up: top-left corner
        proj.bbox = [x0, y1 + transform.e * height, x0 + transform.a * width, y1]
        proj.centroid = {"lat": round(float(meta.lat), 7), "lon": round(float(meta.lon), 7)}
        if "eo:cloud_cover" in props:
            EOExtension.add_to(item)
        item.stac_extensions.append(PROCESSING_SCHEMA)
        items.append(item)

    extent = pystac.Extent.from_items(items)
    collection = pystac.Collection(
        collection_id,
        description,
        extent,
        license="other",
        extra_fields={"dsat:model_uri": model_uri, "dsat:model_version": str(model_version)},
    )
    collection.add_items(items)
    catalog = pystac.Catalog(f"{collection_id}-catalog", f"{description} (catalog root)")
    catalog.add_child(collection)
    catalog.normalize_hrefs(str(out_dir))
    catalog.make_all_asset_hrefs_relative()
    catalog.save(catalog_type=pystac.CatalogType.SELF_CONTAINED)
    return out_dir / "catalog.json"


# --------------------------------------------------------------------------------------------- validation
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_extension_fields(d: dict[str, Any], where: str) -> None:
    """Rules for the projection (v2), processing (v1.2), eo (cloud cover) and dsat fields we write."""
    fields = {**d.get("properties", {})}
    for asset in d.get("assets", {}).values():
        fields.update({k: v for k, v in asset.items() if k.startswith("proj:")})
    errors = []
    if "proj:code" in fields and not (
        fields["proj:code"] is None or re.fullmatch(r"[A-Za-z]+:\w+", str(fields["proj:code"]))
    ):
        errors.append(f"proj:code {fields['proj:code']!r} is not AUTHORITY:CODE")
    if "proj:shape" in fields:
        s = fields["proj:shape"]
        if not (isinstance(s, list) and len(s) == 2 and all(isinstance(v, int) and v > 0 for v in s)):
            errors.append(f"proj:shape {s!r} is not two positive integers")
    if "proj:transform" in fields:
        t = fields["proj:transform"]
        if not (isinstance(t, list) and len(t) in (6, 9) and all(_is_number(v) for v in t)):
            errors.append(f"proj:transform {t!r} is not 6 or 9 numbers")
    if "proj:bbox" in fields:
        b = fields["proj:bbox"]
        if not (isinstance(b, list) and len(b) in (4, 6) and all(_is_number(v) for v in b)):
            errors.append(f"proj:bbox {b!r} is not 4 or 6 numbers")
    if "proj:centroid" in fields:
        c = fields["proj:centroid"]
        if not (isinstance(c, dict) and -90 <= c.get("lat", 999) <= 90 and -180 <= c.get("lon", 999) <= 180):
            errors.append(f"proj:centroid {c!r} is not {{lat, lon}} in range")
    if "processing:software" in fields:
        sw = fields["processing:software"]
        if not (
            isinstance(sw, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in sw.items())
        ):
            errors.append("processing:software must map names to version strings")
    if "processing:datetime" in fields and not _RFC3339.match(str(fields["processing:datetime"])):
        errors.append(f"processing:datetime {fields['processing:datetime']!r} is not RFC 3339")
    if "processing:lineage" in fields and not isinstance(fields["processing:lineage"], str):
        errors.append("processing:lineage must be a string")
    if "eo:cloud_cover" in fields and not (
        _is_number(fields["eo:cloud_cover"]) and 0 <= fields["eo:cloud_cover"] <= 100
    ):
        errors.append(f"eo:cloud_cover {fields['eo:cloud_cover']!r} is not a percentage")
    if fields.get("dsat:generated"):
        for key, kind in (
            ("dsat:prompt", str),
            ("dsat:seed", int),
            ("dsat:model_uri", str),
            ("dsat:model_version", str),
        ):
            if not isinstance(fields.get(key), kind):
                errors.append(f"{key} missing or not {kind.__name__}")
        try:
            SatMetadata.from_stac_properties(fields)
        except (ValueError, TypeError) as err:
            errors.append(f"dsat metadata: {err}")
    if errors:
        raise ValueError(f"{where}: " + "; ".join(errors))


_OBJECT_TYPES = {
    "Catalog": pystac.STACObjectType.CATALOG,
    "Collection": pystac.STACObjectType.COLLECTION,
    "Feature": pystac.STACObjectType.ITEM,
}


def _walk_json(root: Path):
    """Yield (path, dict) for the root and every child / item reachable through relative links."""
    stack, seen = [root.resolve()], set()
    while stack:
        path = stack.pop()
        if path in seen:
            continue
        seen.add(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: cannot read STAC JSON ({err})") from None
        yield path, d
        for link in d.get("links", []):
            if link.get("rel") in ("child", "item"):
                href = str(link.get("href", ""))
                if "://" in href or Path(href).is_absolute():
                    raise ValueError(
                        f"{path}: {link['rel']} link {href!r} is not relative (not self-contained)"
                    )
                stack.append((path.parent / href).resolve())


def validate_object(d: dict[str, Any], where: str) -> pystac.STACObjectType:
    """Validate one STAC object dict OFFLINE: the core JSON schema, then our extension-field rules."""
    kind = _OBJECT_TYPES.get(d.get("type"))
    if kind is None:
        raise ValueError(f"{where}: unknown STAC type {d.get('type')!r}")
    JsonSchemaSTACValidator().validate_core(d, kind, d.get("stac_version", ""), href=where)
    _check_extension_fields(d, where)
    return kind


def validate_catalog(catalog_path: str | Path) -> int:
    """Validate every object under a static catalog OFFLINE; returns how many were validated.

    Each JSON file (catalog, collections, items, found through relative `child` / `item` links) is checked
    against the STAC 1.1.0 core JSON schemas bundled with pystac, then its extension fields by explicit
    rules; items must round-trip through `pystac.Item.from_dict` and have relative asset hrefs to existing
    files. Raises `pystac.errors.STACValidationError` or `ValueError` naming the file.
    """
    count = 0
    for path, d in _walk_json(Path(catalog_path)):
        kind = validate_object(d, str(path))
        if kind == pystac.STACObjectType.ITEM:
            again = pystac.Item.from_dict(d, preserve_dict=True)
            if again.id != d["id"] or again.to_dict(include_self_link=False)["properties"] != d["properties"]:
                raise ValueError(f"{path}: item does not round-trip through pystac.Item.from_dict")
            for key, asset in d.get("assets", {}).items():
                href = Path(asset["href"])
                if href.is_absolute() or "://" in asset["href"]:
                    raise ValueError(f"{path}: asset {key} href {asset['href']!r} is not relative")
                if not (path.parent / href).is_file():
                    raise ValueError(f"{path}: asset {key} file {path.parent / href} is missing")
        count += 1
    return count
