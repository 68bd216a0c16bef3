"""fMoW-Sentinel (Cong et al., SatMAE, NeurIPS 2022) as STAC items, linked to fMoW for super-resolution.

Published layout (https://purl.stanford.edu/vg497cb6002)::

    <root>/<split>.csv      category,location_id,image_id,timestamp,polygon   (polygon: WKT lon/lat)
    <root>/<split>/<category>/<category>_<location_id>/<category>_<location_id>_<image_id>.tif

Each GeoTIFF holds the 13 Sentinel-2 bands (B1…B12 with B8A) of one date, georeferenced. One item per CSV
row, id ``fmow-sentinel-<split>-<category>_<location_id>_<image_id>``, with ``dsat:group`` =
``fmow/<split>/<category>_<location_id>``: the same group as the fMoW images of that location.

With ``fmow_root`` (a copy of fMoW-rgb), each Sentinel item is also paired with the fMoW image of its
location nearest in time: the item gains that image as asset ``hr_image`` (with its georeferencing), its
footprint becomes the overlap of the two images, its ``gsd`` the fMoW GSD (so the reader puts both on the
high-resolution grid), and ``dsat:pair`` names the fMoW item. Read with ``catalogs/fmow-sentinel.yaml``,
the store then holds ``multispectral`` (Sentinel) and ``rgb`` (fMoW) tiles of the same item and window:
the super-resolution pairs of `dsat_core.data.tasks.SuperResolutionDataset` (use a recipe with
``factor=1, blur_sigma=0``: the input is already low resolution).
"""

from __future__ import annotations

import csv
import posixpath
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import fsspec

from dsat_core.data.grid import intersect_bbox
from dsat_core.data.importers.base import (
    DatasetImporter,
    ImportRecord,
    MalformedRecord,
    check_lonlat,
    parse_datetime,
    parse_wkt_polygon,
    read_geotiff_header,
    stac_item,
)
from dsat_core.data.importers.fmow import FmowImporter, href, location_group

SENTINEL_BANDS = [  # (name, STAC common name) in the file's band order
    ("B1", "coastal"),
    ("B2", "blue"),
    ("B3", "green"),
    ("B4", "red"),
    ("B5", "rededge071"),
    ("B6", "rededge075"),
    ("B7", "rededge078"),
    ("B8", "nir"),
    ("B8A", "nir08"),
    ("B9", "nir09"),
    ("B10", "cirrus"),
    ("B11", "swir16"),
    ("B12", "swir22"),
]
SENTINEL_GSD = 10.0  # m, the finest Sentinel-2 bands (the 20 / 60 m bands are resampled in the files)
FMOW_CACHE_LOCATIONS = 64  # fMoW location folders whose items are kept while pairing
CSV_COLUMNS = ("category", "location_id", "image_id", "timestamp", "polygon")


class FmowSentinelImporter(DatasetImporter):
    """fMoW-Sentinel rows → STAC items, optionally paired with fMoW images (see the module docstring)."""

    name = "fmow-sentinel"
    collection = "fmow-sentinel"
    description = "fMoW-Sentinel: Sentinel-2 L1C (13 bands) time series of the fMoW locations."
    license = "other"  # fMoW Challenge Public License (imagery: Copernicus Sentinel data)

    def __init__(
        self,
        fmow_root: str | None = None,
        splits: tuple[str, ...] = ("train", "val", "test_gt"),
        fmow_storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.splits = splits
        self.fmow_root = fmow_root
        self._fmow = FmowImporter(kinds=("rgb",))
        self._fmow_fs = None
        self._fmow_cache: dict[str, list[tuple[datetime, dict[str, Any]]]] = {}
        if fmow_root is not None:
            self._fmow_fs, self._fmow_path = fsspec.core.url_to_fs(fmow_root, **(fmow_storage_options or {}))

    def records(self, fs: fsspec.AbstractFileSystem, root: str) -> Iterator[ImportRecord]:
        for split in self.splits:
            index = posixpath.join(root, f"{split}.csv")
            if not fs.exists(index):
                continue
            with fs.open(index, "rt", newline="") as f:
                reader = csv.DictReader(f)
                missing = set(CSV_COLUMNS) - set(reader.fieldnames or [])
                if missing:
                    raise ValueError(f"{index}: CSV lacks column(s) {sorted(missing)}")
                for line, row in enumerate(reader, start=2):
                    yield self._record(root, split, index, line, row)

    @staticmethod
    def _record(root: str, split: str, index: str, line: int, row: dict[str, str]) -> ImportRecord:
        folder = _split_folder(split)
        name = f"{row['category']}_{row['location_id']}"
        image = posixpath.join(root, folder, row["category"], name, f"{name}_{row['image_id']}.tif")
        key = f"fmow-sentinel-{split}-{name}_{row['image_id']}"
        return ImportRecord(key, {"image": image, "index": f"{index}:{line}"}, dict(row) | {"split": split})

    def to_item(self, fs: fsspec.AbstractFileSystem, record: ImportRecord) -> dict[str, Any]:
        row, where = record.fields, record.files["index"]
        when = parse_datetime(row.get("timestamp"), where)
        if not str(row.get("image_id", "")).isdigit():
            raise MalformedRecord(f"{where}: image_id {row.get('image_id')!r} is not a number")
        polygon = parse_wkt_polygon(row.get("polygon"), where)
        check_lonlat(polygon, where)
        image = record.files["image"]
        header = read_geotiff_header(fs, image)
        if header.count != len(SENTINEL_BANDS):
            raise MalformedRecord(f"image {image}: {header.count} bands, expected {len(SENTINEL_BANDS)}")
        bbox, projection = header.bbox, header.projection
        split, location = _split_folder(row["split"]), f"{row['category']}_{row['location_id']}"
        properties: dict[str, Any] = {
            "datetime": when,
            "gsd": SENTINEL_GSD,
            "platform": "sentinel-2",
            "instruments": ["msi"],
            "dsat:class": row["category"],
            "dsat:group": location_group(split, location),
            "fmow:category": row["category"],
            "fmow:location": location,
            "fmow:image_id": int(row["image_id"]),
            "fmow:polygon": row["polygon"],
        }
        assets: dict[str, dict[str, Any]] = {
            "image": {
                "href": href(fs, image),
                "type": "image/tiff; application=geotiff",
                "roles": ["data"],
                "eo:bands": [{"name": n, "common_name": c} for n, c in SENTINEL_BANDS],
                "gsd": SENTINEL_GSD,
                **projection,
            }
        }
        links: list[dict[str, Any]] = []
        if self._fmow_fs is not None:
            folder = posixpath.join(self._fmow_path, split, row["category"], location)
            pair = self._nearest_fmow(folder, when)
            if pair is not None:
                overlap = intersect_bbox(bbox, pair["bbox"])
                if overlap is not None:
                    bbox = overlap
                    hr_gsd = pair["properties"]["gsd"]
                    target = {"roles": ["data", "target"], "gsd": hr_gsd}
                    assets["hr_image"] = pair["assets"]["image"] | target
                    properties.update({"gsd": hr_gsd, "dsat:pair": pair["id"]})
                    links.append({"rel": "related", "href": f"./{pair['id']}.json", "title": "fMoW target"})
        return stac_item(
            record.key,
            bbox=bbox,
            properties=properties,
            assets=assets,
            collection=self.collection,
            links=links,
        )

    def _nearest_fmow(self, folder: str, when: str) -> dict[str, Any] | None:
        """The fMoW-rgb item in a location folder nearest in time to `when` (None when there is none)."""
        target = datetime.fromisoformat(when.replace("Z", "+00:00"))
        candidates = self._fmow_items(folder)
        gaps = [abs((taken - target).total_seconds()) for taken, _ in candidates]
        return candidates[gaps.index(min(gaps))][1] if candidates else None

    def _fmow_items(self, folder: str) -> list[tuple[datetime, dict[str, Any]]]:
        """(date, item) of the fMoW-rgb images in a location folder; the last few folders are cached, as
        the dates of one location are usually neighbouring rows of the CSV."""
        if folder in self._fmow_cache:
            return self._fmow_cache[folder]
        fs = self._fmow_fs
        out: list[tuple[datetime, dict[str, Any]]] = []
        if fs is None:  # no fmow_root: no fMoW-rgb pairing
            return out
        name = posixpath.basename(folder)
        for sidecar in sorted(fs.glob(posixpath.join(folder, f"{name}_*_rgb.json"))):
            record = self._fmow.record_for(sidecar, self._fmow_path)
            if record is None:
                continue
            try:
                item = self._fmow.to_item(fs, record)
            except MalformedRecord:
                continue  # the fMoW import records it; here it is just not a candidate
            out.append((datetime.fromisoformat(item["properties"]["datetime"].replace("Z", "+00:00")), item))
        if len(self._fmow_cache) >= FMOW_CACHE_LOCATIONS:
            self._fmow_cache.pop(next(iter(self._fmow_cache)))
        self._fmow_cache[folder] = out
        return out


def _split_folder(split: str) -> str:
    """The image folder (and fMoW split) of a CSV split: ``test_gt.csv`` indexes ``test/``."""
    return split.removesuffix("_gt")
