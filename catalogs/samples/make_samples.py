"""Regenerate the shipped sample scenes from `../shared/data/real` (run from anywhere).

Writes, next to this script:
- Cloud-Optimised GeoTIFF copies (GDAL driver COG, deflate; pixel values, CRS, transform and nodata unchanged)
  of three small real Landsat scenes;
- `catalog/`: a static STAC catalog (pystac layout, relative asset hrefs `../../<file>.tif`);
- `items.ndjson` (collection `local-samples`, asset hrefs relative to this folder) and `collection.json`,
  for `rustac serve collection.json items.ndjson` started from this folder;
- `LICENSES.md` (origin and licence of each file).

- `extra/`: more real scenes (Sentinel-2 L2A / L1C crops, Landsat 7 Everest, Landsat 8 South Carolina),
  a separate static catalog (`extra/catalog/`, collection `local-samples-extra`, plus `extra/collection.json`
  and `extra/items.ndjson`) built by `extra_scenes.py`; origins and licences are appended to `LICENSES.md`.

Usage: `python catalogs/samples/make_samples.py [--source ../shared/data/real] [--mirror DIR]`, where DIR
holds the files cut from public repositories (see `extra_scenes.MIRRORED`); without `--mirror` the extra
catalog is left as it is.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
from pathlib import Path

import numpy as np
import rasterio
from extra_scenes import build_extra, collection_extent  # a sibling script (this folder is on sys.path)
from rasterio.windows import Window

HERE = Path(__file__).resolve().parent
DEFAULT_SOURCE = HERE.parents[2] / "shared" / "data" / "real"
COLLECTION_ID = "local-samples"
FILES = {
    "landsat7-etm-bahamas-rgb": "landsat7_etm_bahamas_rgb_300m.tif",
    "landsat8-oli-sr-rondonia-20190727": "landsat8_oli_sr_rondonia_20190727_6band_30m.tif",
    "landsat8-oli-sr-madre-de-dios-20180906": "landsat8_oli_sr_madre_de_dios_20180906_6band_30m.tif",
}
_COG_NOTE = "converted to a Cloud-Optimised GeoTIFF (GDAL COG driver, deflate); pixel values unchanged"


def write_cog(src_path: Path, dst_path: Path, window: Window | None = None) -> None:
    """Copy `src_path` (or its `window`) to a deflate COG and check that every pixel value is unchanged."""
    with rasterio.open(src_path) as src:
        profile = src.profile.copy()
        data = src.read(window=window)
        tags = src.tags()
        if window is not None:
            profile.update(width=data.shape[2], height=data.shape[1], transform=src.window_transform(window))
    for key in ("blockxsize", "blockysize", "tiled", "interleave", "compress"):
        profile.pop(key, None)
    profile.update(driver="COG", compress="DEFLATE", blocksize=256, overview_resampling="nearest")
    with rasterio.open(dst_path, "w", **profile) as dst:
        dst.write(data)
        dst.update_tags(**tags)
    with rasterio.open(dst_path) as check:
        if not np.array_equal(check.read(), data) or check.crs != profile["crs"]:
            raise RuntimeError(f"{dst_path}: COG copy differs from {src_path}")


def _item(source: Path, item_id: str) -> dict:
    return json.loads((source / "catalog" / item_id / f"{item_id}.json").read_text())


def _with_cog(item: dict, href: str, size: int) -> dict:
    item = copy.deepcopy(item)
    asset = item["assets"]["image"]
    asset["href"] = href
    asset["type"] = "image/tiff; application=geotiff; profile=cloud-optimized"
    asset["file:size"] = size
    asset.pop("file:checksum", None)
    props = item["properties"]
    props["realdata:processing"] = f"{props.get('realdata:processing', '')}; {_COG_NOTE}".lstrip("; ")
    return item


def _collection(items: list[dict]) -> dict:
    return {
        "type": "Collection",
        "stac_version": "1.1.0",
        "id": COLLECTION_ID,
        "title": "DiffusionSat local samples",
        "description": "Three small real Landsat scenes (Bahamas, Rondonia, Madre de Dios) as COGs.",
        "license": "other",
        "extent": collection_extent(items),
        "links": [{"rel": "license", "href": "./LICENSES.md", "type": "text/markdown"}],
    }


def _licenses(readme: str) -> str:
    sections = []
    for name in FILES.values():
        match = re.search(rf"### `{re.escape(name)}`\n(.*?)(?=\n### |\n## |\Z)", readme, flags=re.S)
        body = match.group(1).strip() if match else "(provenance section not found in the source README)"
        body = body.replace(
            "This copy is byte-identical.",
            "The copy in `shared/data/real` is byte-identical; the one here is a COG re-encoding of it.",
        )
        sections.append(f"## `{name}`\n\n{body}\n- **Processing here:** {_COG_NOTE} by `make_samples.py`.\n")
    header = (
        "# Sample scenes: origin and licences\n\n"
        "Copied from `shared/data/real/README.md` (the files there are byte-identical to their origins).\n"
        "The copies in this folder were re-encoded as Cloud-Optimised GeoTIFFs; pixel values, CRS,\n"
        "transform and nodata are unchanged (checked by `make_samples.py`).\n\n"
    )
    return header + "\n".join(sections)


def main(source: Path = DEFAULT_SOURCE, out: Path = HERE, mirror: Path | None = None) -> None:
    source = source.resolve()
    catalog_dir = out / "catalog"
    catalog_dir.mkdir(parents=True, exist_ok=True)
    root = json.loads((source / "catalog" / "catalog.json").read_text())
    root["id"] = COLLECTION_ID + "-catalog"
    root["description"] = "Static STAC catalog of the local sample COGs (see ../LICENSES.md)."
    root["links"] = [link for link in root["links"] if link["rel"] != "item"]
    api_items = []
    for item_id, name in FILES.items():
        write_cog(source / name, out / name)
        size = (out / name).stat().st_size
        static = _with_cog(_item(source, item_id), f"../../{name}", size)
        (catalog_dir / item_id).mkdir(exist_ok=True)
        (catalog_dir / item_id / f"{item_id}.json").write_text(json.dumps(static, indent=2) + "\n")
        root["links"].append(
            {"rel": "item", "href": f"./{item_id}/{item_id}.json", "type": "application/geo+json"}
        )
        api = _with_cog(_item(source, item_id), name, size)
        api["collection"] = COLLECTION_ID
        api["links"] = []
        api_items.append(api)
    (catalog_dir / "catalog.json").write_text(json.dumps(root, indent=2) + "\n")
    (out / "items.ndjson").write_text("".join(json.dumps(it) + "\n" for it in api_items))
    (out / "collection.json").write_text(json.dumps(_collection(api_items), indent=2) + "\n")
    licences = _licenses((source / "README.md").read_text())
    if mirror is not None:
        build_extra(source, mirror.resolve(), out / "extra")
    extra_licences = out / "extra" / "LICENSES.md"
    if extra_licences.is_file():
        licences += "\n" + extra_licences.read_text()
    (out / "LICENSES.md").write_text(licences)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--mirror", type=Path, default=None)
    args = parser.parse_args()
    main(args.source, mirror=args.mirror)
