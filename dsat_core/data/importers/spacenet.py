"""SpaceNet buildings (SpaceNet 2+: Las Vegas, Paris, Shanghai, Khartoum) as STAC items.

Published layouts, both read (https://spacenet.ai/, AWS Registry of Open Data ``s3://spacenet-dataset/``):

- as extracted from the challenge tarballs (``spacenet/SN2_buildings/tarballs/*.tar.gz``), with the AOI
  folder directly under ``<root>`` or one level down (the tarball's own folder)::

    <root>/AOI_<n>_<City>_Train/<product>/<product>_AOI_<n>_<City>_img<k>.tif
    <root>/AOI_<n>_<City>_Train/geojson/buildings/buildings_AOI_<n>_<City>_img<k>.geojson

- the browsable copy in the bucket (``s3://spacenet-dataset/spacenet/SN2_buildings/``), products renamed
  (``RGB-PanSharpen`` → ``PS-RGB``, ``MUL-PanSharpen`` → ``PS-MS``, ``MUL`` → ``MS``)::

    <root>/<split>/AOI_<n>_<City>/PS-RGB/SN2_buildings_<split>_AOI_<n>_<City>_PS-RGB_img<k>.tif
    <root>/<split>/AOI_<n>_<City>/geojson_buildings/SN2_buildings_<split>_AOI_<n>_<City>_geojson_buildings_img<k>.geojson

Rules:

- One product is imported per run (``product``, default ``RGB-PanSharpen``: 3-band uint16 R, G, B at
  0.3 m; ``MUL-PanSharpen`` 8 bands at 0.3 m, ``MUL`` 8 bands at 1.24 m, ``PAN`` 1 band at 0.3 m). The
  GeoTIFFs are georeferenced: bbox and projection come from their header (a missing, corrupt or
  CRS-less file, or one with the wrong band count, is rejected).
- Labels: the building count of the GeoJSON (``spacenet:buildings``) gives ``dsat:class`` ``buildings``
  when there is at least one (none: no class). An AOI folder without label folder (the public test
  sets) gives items without labels; a missing or malformed GeoJSON where labels exist rejects the image.
- Acquisition: WorldView-3 (``platform`` worldview-3, ``gsd`` of the product). SpaceNet does not publish
  one acquisition date per AOI tile set that we could rely on, so dates are never guessed: the
  ``acquisitions`` option (AOI name → ``datetime`` or ``start_datetime``/``end_datetime``, ``platform``,
  ``gsd``, ``cloud_cover``) complements and overrides the defaults; without a date there, the GeoTIFF's
  ``TIFFTAG_DATETIME`` is used when present (taken as UTC); otherwise the item gets the only interval we
  know to be true: from the WorldView-3 launch (2014-08-13) to the file's last modification (the upload of
  the copy); the reader treats intervals over a month as no date, so the date fields of its tiles stay
  missing (``spacenet:datetime_source`` says which applied). Without a modification time, ``datetime`` is
  null with no interval (served and ingested, but not valid STAC 1.1).
- One item per image, id ``spacenet-<split>-<AOI>_img<k>_<product>``; ``dsat:group`` is the AOI. The tiles
  of an AOI are neighbours, not repeats of one place, so `link` adds nothing (no sequence).
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import fsspec

from dsat_core.data.importers.base import (
    DatasetImporter,
    ImportRecord,
    LinkKey,
    MalformedRecord,
    bbox_of,
    check_lonlat,
    parse_datetime,
    read_geotiff_header,
    read_json,
    stac_item,
)
from dsat_core.data.importers.fmow import MS_BANDS, RGB_BANDS, href

# classic product name -> (bucket folder name, bands, nominal GSD in m)
PRODUCTS: dict[str, tuple[str, list[dict[str, str]], float]] = {
    "RGB-PanSharpen": ("PS-RGB", RGB_BANDS, 0.3),
    "MUL-PanSharpen": ("PS-MS", [{"name": n, "common_name": n} for n in MS_BANDS[8]], 0.3),
    "MUL": ("MS", [{"name": n, "common_name": n} for n in MS_BANDS[8]], 1.24),
    "PAN": ("PAN", [{"name": "pan", "common_name": "pan"}], 0.3),
}
WORLDVIEW3_LAUNCH = "2014-08-13T00:00:00Z"
ACQUISITION_KEYS = ("datetime", "start_datetime", "end_datetime", "platform", "gsd", "cloud_cover")
_AOI = r"AOI_\d+_[A-Za-z]+"
_CHALLENGE = re.compile(
    rf"^(?:[^/]+/)?(?P<folder>(?P<aoi>{_AOI})_(?P<split>[A-Za-z_]+))/(?P<product>[^/]+)/"
    rf"(?P=product)_(?P=aoi)_img(?P<image>\d+)\.tif$"
)
_BUCKET = re.compile(
    rf"^(?P<split>[^/]+)/(?P<aoi>{_AOI})/(?P<product>[^/]+)/"
    rf"SN\d+_buildings_.+_(?P=aoi)_(?P=product)_img(?P<image>\d+)\.tif$"
)


class SpaceNetImporter(DatasetImporter):
    """SpaceNet building tiles → STAC items (see the module docstring)."""

    name = "spacenet"
    collection = "spacenet"
    description = "SpaceNet buildings: WorldView-3 tiles (0.3 m pan-sharpened) with building footprints."
    license = "CC-BY-SA-4.0"

    def __init__(
        self,
        product: str = "RGB-PanSharpen",
        acquisitions: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        if product not in PRODUCTS:
            raise ValueError(f"spacenet product {product!r} unknown; choose from {sorted(PRODUCTS)}")
        self.product = product
        self.acquisitions = {aoi: _checked_acquisition(aoi, a) for aoi, a in (acquisitions or {}).items()}

    # ---------------------------------------------------------------------------------------- listing
    def records(self, fs: fsspec.AbstractFileSystem, root: str) -> Iterator[ImportRecord]:
        folder = PRODUCTS[self.product][0]
        patterns = [f"AOI_*/{self.product}/*.tif", f"*/AOI_*/{self.product}/*.tif", f"*/AOI_*/{folder}/*.tif"]
        paths = sorted({p for pattern in patterns for p in fs.glob(posixpath.join(root, pattern))})
        has_labels: dict[str, bool] = {}
        for path in paths:
            record = self._record(path, root)
            if record is None:
                continue
            labels = record.files["labels"]
            labels_dir = posixpath.dirname(labels)
            if labels_dir not in has_labels:
                has_labels[labels_dir] = fs.isdir(labels_dir)
            if not has_labels[labels_dir]:
                record = ImportRecord(record.key, {"image": path}, record.fields)
            yield record

    def _record(self, path: str, root: str) -> ImportRecord | None:
        """The record of a GeoTIFF under `root` (files: image, expected labels), or None if not ours."""
        rel = posixpath.relpath(path, root)
        name = posixpath.basename(path)
        if (match := _CHALLENGE.match(rel)) and match["product"] == self.product:
            aoi_dir = posixpath.join(root, posixpath.dirname(posixpath.dirname(rel)))
            labels = posixpath.join(
                aoi_dir, "geojson", "buildings", f"buildings_{match['aoi']}_img{match['image']}.geojson"
            )
        elif (match := _BUCKET.match(rel)) and match["product"] == PRODUCTS[self.product][0]:
            aoi_dir = posixpath.join(root, match["split"], match["aoi"])
            stem = name.replace(f"_{match['product']}_img", "_geojson_buildings_img")[: -len(".tif")]
            labels = posixpath.join(aoi_dir, "geojson_buildings", f"{stem}.geojson")
        else:
            return None
        split = match["split"].lower()
        key = f"spacenet-{split}-{match['aoi']}_img{match['image']}_{self.product}"
        fields = {"aoi": match["aoi"], "split": split, "image": int(match["image"])}
        return ImportRecord(key, {"image": path, "labels": labels}, fields)

    # ---------------------------------------------------------------------------------------- one item
    def to_item(self, fs: fsspec.AbstractFileSystem, record: ImportRecord) -> dict[str, Any]:
        image, fields = record.files["image"], record.fields
        _, bands, gsd = PRODUCTS[self.product]
        header = read_geotiff_header(fs, image)
        if header.count != len(bands):
            raise MalformedRecord(
                f"image {image}: {header.count} band(s), expected {len(bands)} for {self.product}"
            )
        acquisition = self.acquisitions.get(fields["aoi"], {})
        properties: dict[str, Any] = {
            **self._dates(acquisition, header.tags, image, fs),
            "gsd": float(acquisition.get("gsd", gsd)),
            "platform": str(acquisition.get("platform", "worldview-3")),
        }
        if "cloud_cover" in acquisition:
            properties["eo:cloud_cover"] = float(acquisition["cloud_cover"])
        properties |= {
            "dsat:group": f"spacenet/{fields['aoi']}",
            "spacenet:aoi": fields["aoi"],
            "spacenet:split": fields["split"],
            "spacenet:image_id": fields["image"],
            "spacenet:product": self.product,
        }
        assets: dict[str, dict[str, Any]] = {
            "image": {
                "href": href(fs, image),
                "type": "image/tiff; application=geotiff",
                "roles": ["data"],
                "eo:bands": bands,
                **header.projection,
            }
        }
        labels = record.files.get("labels")
        if labels is not None:
            buildings = self._buildings(fs, labels, header.bbox)
            properties["spacenet:buildings"] = buildings
            if buildings:
                properties["dsat:class"] = "buildings"
            assets["labels"] = {"href": href(fs, labels), "type": "application/geo+json", "roles": ["labels"]}
        return stac_item(
            record.key, bbox=header.bbox, properties=properties, assets=assets, collection=self.collection
        )

    @staticmethod
    def _dates(
        acquisition: Mapping[str, Any], tags: Mapping[str, str], image: str, fs: fsspec.AbstractFileSystem
    ) -> dict[str, Any]:
        """``datetime`` (+ interval) from the AOI's acquisition, else TIFFTAG_DATETIME, else the launch →
        file-modification interval, else null."""
        if "datetime" in acquisition or "start_datetime" in acquisition:
            keys = ("datetime", "start_datetime", "end_datetime")
            dates = {k: acquisition[k] for k in keys if k in acquisition}
            return {"datetime": None} | dates | {"spacenet:datetime_source": "acquisitions"}
        raw = tags.get("TIFFTAG_DATETIME")
        if isinstance(raw, str) and raw.strip():
            try:  # TIFF: "YYYY:MM:DD HH:MM:SS", no time zone
                when = parse_datetime(raw.strip().replace(":", "-", 2).replace(" ", "T", 1), image)
            except MalformedRecord:
                pass  # an unreadable optional tag: no date rather than a guess
            else:
                return {"datetime": when, "spacenet:datetime_source": "TIFFTAG_DATETIME"}
        modified = _modified(fs, image)
        if modified is not None and modified > WORLDVIEW3_LAUNCH:
            return {
                "datetime": None,
                "start_datetime": WORLDVIEW3_LAUNCH,
                "end_datetime": modified,
                "spacenet:datetime_source": "launch-to-file-modification",
            }
        return {"datetime": None, "spacenet:datetime_source": ""}

    @staticmethod
    def _buildings(fs: fsspec.AbstractFileSystem, labels: str, bbox: Sequence[float]) -> int:
        """The number of building footprints in the GeoJSON; `MalformedRecord` if not this image's labels."""
        import shapely.geometry
        from shapely.errors import GEOSException

        data = read_json(fs, labels, "labels")
        features = data.get("features")
        if data.get("type") != "FeatureCollection" or not isinstance(features, list):
            raise MalformedRecord(f"labels {labels}: not a GeoJSON FeatureCollection with a 'features' list")
        corners = []
        for k, feature in enumerate(features):
            where = f"labels {labels}: features[{k}]"
            if not isinstance(feature, dict) or feature.get("type") != "Feature":
                raise MalformedRecord(f"{where} is not a GeoJSON Feature")
            try:
                shape = shapely.geometry.shape(feature.get("geometry"))
            except (GEOSException, AttributeError, IndexError, KeyError, TypeError, ValueError) as err:
                raise MalformedRecord(f"{where}: not a GeoJSON geometry ({err})") from err
            if shape.geom_type not in ("Polygon", "MultiPolygon") or shape.is_empty:
                raise MalformedRecord(f"{where}: a {shape.geom_type}, not a building polygon")
            west, south, east, north = shape.bounds
            corners += [(west, south), (east, north)]
        check_lonlat(corners, f"labels {labels}")
        if corners:
            west, south, east, north = bbox_of(corners)
            if east < bbox[0] or west > bbox[2] or north < bbox[1] or south > bbox[3]:
                raise MalformedRecord(f"labels {labels}: the buildings lie outside the image {list(bbox)}")
        return len(features)

    def link(self, keys: Sequence[LinkKey]) -> dict[str, dict[str, Any]]:
        """Nothing: an AOI's tiles are neighbours, not a sequence of one place."""
        return {}


def _checked_acquisition(aoi: str, acquisition: Mapping[str, Any]) -> dict[str, Any]:
    """One AOI's acquisition option, validated (dates normalised to ISO UTC); `ValueError` if not usable."""
    unknown = set(acquisition) - set(ACQUISITION_KEYS)
    if unknown:
        raise ValueError(f"spacenet acquisitions[{aoi!r}]: unknown key(s) {sorted(unknown)}")
    out = dict(acquisition)
    where = f"spacenet acquisitions[{aoi!r}]"
    try:
        for key in ("datetime", "start_datetime", "end_datetime"):
            if out.get(key) is not None:
                out[key] = parse_datetime(str(out[key]), where)
    except MalformedRecord as err:
        raise ValueError(str(err)) from err
    if ("start_datetime" in out) != ("end_datetime" in out):
        raise ValueError(f"{where}: give both start_datetime and end_datetime, or neither")
    for key, low, high in (("gsd", 0.0, 100.0), ("cloud_cover", 0.0, 100.0)):
        value = out.get(key)
        if value is not None and not (isinstance(value, int | float) and low <= value <= high):
            raise ValueError(f"{where}: {key} = {value!r} is not a number in [{low}, {high}]")
    if out.get("gsd") == 0:
        raise ValueError(f"{where}: gsd must be positive")
    return out


def _modified(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    """The file's last modification as an ISO UTC datetime (S3 ``LastModified``, local ``mtime``), or None."""
    info = fs.info(path)
    value = info.get("LastModified") or info.get("mtime")
    if isinstance(value, int | float):
        value = datetime.fromtimestamp(value, UTC)
    if not isinstance(value, datetime):
        return None
    value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return value.replace(microsecond=0).isoformat().replace("+00:00", "Z")
