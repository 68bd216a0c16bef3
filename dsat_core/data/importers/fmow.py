"""fMoW (Functional Map of the World; Christie et al., CVPR 2018), RGB and full, as STAC items.

Published layout (``fmow-rgb`` and ``fmow-full``, e.g. ``s3://spacenet-dataset/Hosted-Datasets/fmow/``)::

    <root>/<split>/<category>/<category>_<location>/<category>_<location>_<image>_<kind>.json
    <root>/<split>/<category>/<category>_<location>/<category>_<location>_<image>_<kind>.jpg|.tif

``kind`` is ``rgb`` (pan-sharpened RGB), ``msrgb`` (RGB of the multispectral bands) or ``ms`` (the 4 or 8
multispectral bands, fmow-full). The JSON sidecar gives ``gsd`` (m), ``img_width`` / ``img_height``,
``timestamp``, ``cloud_cover`` (percent), ``country_code`` (ISO 3166 alpha-3), ``utm`` and
``bounding_boxes`` [{``box`` [x, y, w, h] in pixels, ``category``, ``raw_location`` (WKT lon/lat polygon)}],
optionally ``sensor_platform_name`` and ``img_filename``.

The chips carry no georeferencing. Each item gets one from its boxes: the pixel extent of every box is
mapped onto the lon/lat envelope of its ``raw_location`` (fMoW chips are north-up), fitted by least squares
over all boxes (`proj:code` EPSG:4326 + `proj:transform`, which the reader applies). A fit whose pixel size
disagrees with the sidecar's ``gsd`` by more than 3× is rejected (box and polygon do not match).

One item per image, id ``fmow-<split>-<category>_<location>_<image>_<kind>``; the images of one location
share ``dsat:group`` = ``fmow/<split>/<category>_<location>`` (the temporal sequence; `link` orders it in time
and sets the group's common ``dsat:aoi_bbox``), ``dsat:class`` is the category for captions.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterator
from typing import Any

import fsspec

from dsat_core.data.importers.base import (
    DatasetImporter,
    ImportRecord,
    MalformedRecord,
    bbox_of,
    check_lonlat,
    fit_affine,
    image_footprint,
    lonlat_pixel_m,
    parse_datetime,
    parse_wkt_polygon,
    read_json,
    require,
    stac_item,
)

KINDS = ("rgb", "msrgb", "ms")
_NAME = re.compile(r"^(?P<location>.+_\d+)_(?P<image>\d+)_(?P<kind>rgb|msrgb|ms)\.json$")
RGB_BANDS = [{"name": n, "common_name": n} for n in ("red", "green", "blue")]
MS_BANDS = {  # WorldView / QuickBird / GeoEye multispectral band order
    4: ["blue", "green", "red", "nir"],
    8: ["coastal", "blue", "green", "yellow", "red", "rededge", "nir", "nir09"],
}


def href(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """An asset href for `path`: an absolute local path, or a URL with the filesystem's scheme."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return path if "file" in protocols or "local" in protocols else fs.unstrip_protocol(path)


def platform_name(raw: Any) -> str:
    """``WORLDVIEW02`` → ``worldview-2``, ``GEOEYE01`` → ``geoeye-1``; "" when absent."""
    if not isinstance(raw, str) or not raw.strip():
        return ""
    text = raw.strip().lower().replace("_vnir", "").replace("_multi", "")
    match = re.match(r"^([a-z]+)0*(\d+)$", text)
    return f"{match[1]}-{match[2]}" if match else text


def location_group(split: str, location: str) -> str:
    """``dsat:group`` of the images of one fMoW location (``<category>_<id>``), shared with fMoW-Sentinel."""
    return f"fmow/{split}/{location}"


class FmowImporter(DatasetImporter):
    """fMoW images → STAC items (see the module docstring)."""

    name = "fmow"
    collection = "fmow"
    description = "Functional Map of the World (fMoW): WorldView/QuickBird/GeoEye chips with 62 classes."
    license = "other"  # fMoW Challenge Public License

    def __init__(self, kinds: tuple[str, ...] = ("rgb",), splits: tuple[str, ...] | None = None) -> None:
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"fmow kinds {sorted(unknown)} unknown; choose from {KINDS}")
        self.kinds = tuple(kinds)
        self.splits = splits

    # ---------------------------------------------------------------------------------------- listing
    def records(self, fs: fsspec.AbstractFileSystem, root: str) -> Iterator[ImportRecord]:
        for path in sorted(fs.glob(posixpath.join(root, "*", "*", "*", "*.json"))):
            record = self.record_for(path, root)
            if record is not None:
                yield record

    def record_for(self, sidecar: str, root: str) -> ImportRecord | None:
        """The record of a sidecar path under `root`, or None when it is not an fMoW sidecar we import."""
        parts = posixpath.relpath(sidecar, root).split("/")
        match = _NAME.match(parts[-1])
        if len(parts) != 4 or match is None or match["kind"] not in self.kinds:
            return None
        split, category = parts[0], parts[1]
        if self.splits is not None and split not in self.splits:
            return None
        key = f"fmow-{split}-{match['location']}_{match['image']}_{match['kind']}"
        fields = {"split": split, "category": category, "location": match["location"]}
        return ImportRecord(
            key, {"sidecar": sidecar}, fields | {"image": match["image"], "kind": match["kind"]}
        )

    def group_of(self, record: ImportRecord) -> str:
        """``fmow/<split>/<location>``: the sorted listing yields each location's images together."""
        return location_group(record.fields["split"], record.fields["location"])

    # ---------------------------------------------------------------------------------------- one item
    def to_item(self, fs: fsspec.AbstractFileSystem, record: ImportRecord) -> dict[str, Any]:
        sidecar = record.files["sidecar"]
        meta = read_json(fs, sidecar)
        where = sidecar
        gsd = float(require(meta, "gsd", (int, float), where))
        width = int(require(meta, "img_width", int, where))
        height = int(require(meta, "img_height", int, where))
        if gsd <= 0 or width <= 0 or height <= 0:
            raise MalformedRecord(f"{where}: gsd {gsd}, size {width} x {height} must be positive")
        when = parse_datetime(require(meta, "timestamp", str, where), where)
        cloud = float(require(meta, "cloud_cover", (int, float), where))
        if not 0.0 <= cloud <= 100.0:
            raise MalformedRecord(f"{where}: cloud_cover {cloud} is not a percentage")
        boxes = require(meta, "bounding_boxes", list, where)
        transform, category = self._georeference(boxes, where)
        self._check_gsd(transform, gsd, where)
        image = self._image_path(fs, sidecar, meta, record.fields["kind"])
        bbox = image_footprint(transform, width, height)
        check_lonlat([bbox[:2], bbox[2:]], f"{where}: georeferenced footprint")
        fields = record.fields
        category = category or fields["category"]
        projection = {
            "proj:code": "EPSG:4326",
            "proj:transform": list(transform)[:6],
            "proj:shape": [height, width],
        }
        properties = {
            "datetime": when,
            "gsd": gsd,
            "eo:cloud_cover": cloud,
            "platform": platform_name(meta.get("sensor_platform_name")),
            "dsat:class": category,
            "dsat:group": self.group_of(record),
            "fmow:split": fields["split"],
            "fmow:category": category,
            "fmow:location": fields["location"],
            "fmow:image_id": int(fields["image"]),
            "fmow:kind": fields["kind"],
            "fmow:country_code": str(meta.get("country_code") or ""),
            "fmow:utm": str(meta.get("utm") or ""),
            **projection,
        }
        is_jpeg = image.lower().endswith((".jpg", ".jpeg"))
        assets: dict[str, dict[str, Any]] = {
            "image": {
                "href": href(fs, image),
                "type": "image/jpeg" if is_jpeg else "image/tiff",
                "roles": ["data"],
                "eo:bands": self._bands(fields["kind"], meta),
                **projection,
            },
            "metadata": {"href": href(fs, sidecar), "type": "application/json", "roles": ["metadata"]},
        }
        return stac_item(
            record.key, bbox=bbox, properties=properties, assets=assets, collection=self.collection
        )

    @staticmethod
    def _georeference(boxes: list, where: str) -> tuple[Any, str]:
        pixels, lonlats, category = [], [], ""
        for k, entry in enumerate(boxes):
            label = f"{where}: bounding_boxes[{k}]"
            if not isinstance(entry, dict):
                raise MalformedRecord(f"{label} is not an object")
            box = require(entry, "box", list, label)
            if (
                len(box) != 4
                or not all(isinstance(v, int | float) for v in box)
                or box[2] <= 0
                or box[3] <= 0
            ):
                raise MalformedRecord(f"{label}: box {box!r} is not [x, y, width, height]")
            points = parse_wkt_polygon(require(entry, "raw_location", str, label), label)
            check_lonlat(points, label)
            west, south, east, north = bbox_of(points)
            x, y, w, h = (float(v) for v in box)
            pixels += [(x, y), (x + w, y), (x + w, y + h), (x, y + h)]
            lonlats += [(west, north), (east, north), (east, south), (west, south)]
            category = category or str(entry.get("category") or "")
        if not pixels:
            raise MalformedRecord(f"{where}: no bounding_boxes to georeference the image")
        return fit_affine(pixels, lonlats, where), category

    @staticmethod
    def _check_gsd(transform: Any, gsd: float, where: str) -> None:
        metres = lonlat_pixel_m(transform)
        if not gsd / 3 <= metres <= gsd * 3:
            raise MalformedRecord(
                f"{where}: boxes and raw_location give {metres:.2f} m/pixel but gsd is {gsd} m "
                "(box and polygon do not match)"
            )

    @staticmethod
    def _image_path(fs: fsspec.AbstractFileSystem, sidecar: str, meta: dict, kind: str) -> str:
        folder, stem = posixpath.dirname(sidecar), posixpath.basename(sidecar)[: -len(".json")]
        named = meta.get("img_filename")
        candidates = [posixpath.join(folder, posixpath.basename(named))] if isinstance(named, str) else []
        candidates += [posixpath.join(folder, f"{stem}{ext}") for ext in (".jpg", ".tif")]
        for path in candidates:
            if fs.exists(path):
                return path
        raise MalformedRecord(f"{sidecar}: image missing (looked for {', '.join(candidates)})")

    @staticmethod
    def _bands(kind: str, meta: dict) -> list[dict[str, str]]:
        if kind != "ms":
            return RGB_BANDS
        count = len(meta.get("approximate_wavelengths") or []) or 4
        names = MS_BANDS.get(count)
        if names is None:
            raise MalformedRecord(f"fmow ms image with {count} bands; expected 4 or 8")
        return [{"name": n, "common_name": n} for n in names]
