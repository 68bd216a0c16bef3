"""xBD (Gupta et al., 2019): pre- and post-disaster image pairs with building polygons, as STAC items.

Published layout (https://xview2.org/dataset, after registration; splits ``train``, ``tier3``, ``test``,
``hold``)::

    <root>/<split>/images/<disaster>_<8-digit id>_<pre|post>_disaster.png
    <root>/<split>/labels/<disaster>_<8-digit id>_<pre|post>_disaster.json

The label JSON holds ``features.lng_lat`` and ``features.xy``: the same building polygons (WKT, matched by
``properties.uid``) in lon/lat and in pixel coordinates, with ``feature_type`` and, on post-disaster images,
the damage ``subtype`` (no-damage, minor-damage, major-damage, destroyed, un-classified); and ``metadata``:
``sensor``, ``gsd`` (the multispectral GSD, m), ``pan_resolution`` (m), ``capture_date``,
``off_nadir_angle``, ``sun_azimuth``, ``sun_elevation``, ``target_azimuth``, ``disaster``, ``disaster_type``,
``catalog_id``, ``width``, ``height``, ``img_name``.

Rules:

- The PNGs carry no georeferencing. The pixel → lon/lat affine is fitted by least squares over the vertices
  of the ``xy`` and ``lng_lat`` polygons of the same ``uid`` (`proj:code` EPSG:4326 + `proj:transform`, which
  the reader applies). An image without polygons cannot be placed and is rejected, as is one whose polygons
  disagree by more than ``MAX_RESIDUAL_PX`` pixels with the fit.
- ``gsd`` is the sidecar resolution describing the PNG's pixels: of ``pan_resolution`` and ``gsd``, the one
  nearest the fitted pixel size (the PNGs are pan-sharpened, so normally ``pan_resolution``); when neither
  is within 2× of the fit the labels are rejected. Both sidecar values are kept (``xbd:pan_resolution``,
  ``xbd:gsd``).
- ``capture_date`` → ``datetime`` (required); ``sensor`` → ``platform`` (``WORLDVIEW02`` → ``worldview-2``);
  the angles → the view extension (``view:off_nadir``, ``view:sun_azimuth``, ``view:sun_elevation``,
  ``view:azimuth`` from ``target_azimuth``).
- ``dsat:class`` is ``buildings`` when the image has building polygons (``xbd:buildings``); ``dsat:event``
  phrases the disaster for captions: "before the flooding of hurricane harvey", "after the mexico
  earthquake" (the type is left out when the disaster's name already says it). Post images count their
  buildings per damage subtype in ``xbd:damage_counts``.
- One item per image, id ``xbd-<split>-<disaster>_<id>_<pre|post>``; the pre and post images of one tile
  share ``dsat:group`` = ``xbd/<split>/<disaster>_<id>`` and ``dsat:role`` says which is which. `link`
  points each at the other (``dsat:pair``: the inpainting / change-detection pairs; an image whose partner
  is missing or rejected gets none) and gives both the common ``dsat:aoi_bbox``, so their tiles line up.
"""

from __future__ import annotations

import math
import posixpath
import re
import struct
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import fsspec

from dsat_core.data.importers.base import (
    VIEW_EXTENSION,
    DatasetImporter,
    ImportRecord,
    LinkKey,
    MalformedRecord,
    check_lonlat,
    fit_affine,
    image_footprint,
    lonlat_pixel_m,
    parse_datetime,
    parse_wkt_polygon,
    read_json,
    require,
    sequence_properties,
    stac_item,
)
from dsat_core.data.importers.fmow import RGB_BANDS, href, platform_name

SUBTYPES = ("no-damage", "minor-damage", "major-damage", "destroyed", "un-classified")
MAX_RESIDUAL_PX = 2.0
MAX_GSD_RATIO = 2.0
_NAME = re.compile(r"^(?P<disaster>.+)_(?P<tile>\d{8})_(?P<role>pre|post)_disaster\.json$")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_VIEW_FIELDS = (  # (sidecar field, item property, valid range)
    ("off_nadir_angle", "view:off_nadir", (0.0, 90.0)),
    ("sun_azimuth", "view:sun_azimuth", (0.0, 360.0)),
    ("sun_elevation", "view:sun_elevation", (-90.0, 90.0)),
    ("target_azimuth", "view:azimuth", (0.0, 360.0)),
)


def event_phrase(role: str, disaster: str, disaster_type: str) -> str:
    """``before the flooding of hurricane harvey``, ``after the mexico earthquake`` (caption words)."""
    name = disaster.replace("-", " ").replace("_", " ").strip()
    kind = disaster_type.replace("-", " ").replace("_", " ").strip()
    when = "before" if role == "pre" else "after"
    if not kind or kind in name:
        return f"{when} the {name}"
    return f"{when} the {kind} of {name}"


class XbdImporter(DatasetImporter):
    """xBD pre/post-disaster images → STAC items, pairs linked (see the module docstring)."""

    name = "xbd"
    collection = "xbd"
    description = "xBD: pre- and post-disaster WorldView/GeoEye image pairs with building damage labels."
    license = "CC-BY-NC-SA-4.0"

    def __init__(self, splits: Sequence[str] | None = None) -> None:
        self.splits = tuple(splits) if splits is not None else None

    # ---------------------------------------------------------------------------------------- listing
    def records(self, fs: fsspec.AbstractFileSystem, root: str) -> Iterator[ImportRecord]:
        for label in sorted(fs.glob(posixpath.join(root, "*", "labels", "*_disaster.json"))):
            split = posixpath.relpath(label, root).split("/")[0]
            match = _NAME.match(posixpath.basename(label))
            if match is None or (self.splits is not None and split not in self.splits):
                continue
            stem = posixpath.basename(label)[: -len(".json")]
            image = posixpath.join(root, split, "images", f"{stem}.png")
            key = f"xbd-{split}-{match['disaster']}_{match['tile']}_{match['role']}"
            yield ImportRecord(key, {"labels": label, "image": image}, {"split": split, **match.groupdict()})

    def group_of(self, record: ImportRecord) -> str:
        """``xbd/<split>/<disaster>_<tile>``: the sorted listing yields a tile's post and pre together."""
        return f"xbd/{record.fields['split']}/{record.fields['disaster']}_{record.fields['tile']}"

    # ---------------------------------------------------------------------------------------- one item
    def to_item(self, fs: fsspec.AbstractFileSystem, record: ImportRecord) -> dict[str, Any]:
        label, image = record.files["labels"], record.files["image"]
        data = read_json(fs, label, "label")
        meta = require(data, "metadata", dict, label)
        features = require(data, "features", dict, label)
        when = parse_datetime(require(meta, "capture_date", str, label), label)
        width, height = self._png_size(fs, image, meta, label)
        transform, buildings = self._georeference(features, label)
        gsd = self._gsd(meta, transform, label)
        bbox = image_footprint(transform, width, height)
        check_lonlat([bbox[:2], bbox[2:]], f"{label}: georeferenced footprint")

        fields = record.fields
        disaster = str(meta.get("disaster") or fields["disaster"])
        disaster_type = str(meta.get("disaster_type") or "")
        projection = {
            "proj:code": "EPSG:4326",
            "proj:transform": list(transform)[:6],
            "proj:shape": [height, width],
        }
        properties: dict[str, Any] = {
            "datetime": when,
            "gsd": gsd,
            "platform": platform_name(meta.get("sensor")),
            **self._view(meta, label),
            "dsat:group": self.group_of(record),
            "dsat:role": fields["role"],
            "dsat:event": event_phrase(fields["role"], disaster, disaster_type),
            "xbd:split": fields["split"],
            "xbd:disaster": disaster,
            "xbd:disaster_type": disaster_type,
            "xbd:tile_id": fields["tile"],
            "xbd:buildings": len(buildings),
            "xbd:gsd": meta.get("gsd"),
            "xbd:pan_resolution": meta.get("pan_resolution"),
            "xbd:catalog_id": str(meta.get("catalog_id") or ""),
            **projection,
        }
        if buildings:
            properties["dsat:class"] = "buildings"
        if fields["role"] == "post":
            counts = Counter(str(b.get("subtype") or "un-classified") for b in buildings)
            properties["xbd:damage_counts"] = {s: counts[s] for s in SUBTYPES} | dict(counts)
        assets = {
            "image": {
                "href": href(fs, image),
                "type": "image/png",
                "roles": ["data"],
                "eo:bands": RGB_BANDS,
                **projection,
            },
            "labels": {"href": href(fs, label), "type": "application/json", "roles": ["labels", "metadata"]},
        }
        return stac_item(
            record.key,
            bbox=bbox,
            properties=properties,
            assets=assets,
            collection=self.collection,
            extensions=(VIEW_EXTENSION,),
        )

    @staticmethod
    def _png_size(fs: fsspec.AbstractFileSystem, image: str, meta: dict, label: str) -> tuple[int, int]:
        """(width, height) from the PNG header (24 bytes read), checked against the label's."""
        try:
            head = fs.cat_file(image, start=0, end=24)
        except FileNotFoundError as err:
            raise MalformedRecord(f"image {image} is missing") from err
        if len(head) < 24 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
            raise MalformedRecord(f"image {image} is not a PNG")
        width, height = struct.unpack(">II", head[16:24])
        stated = (meta.get("width"), meta.get("height"))
        if all(isinstance(v, int) for v in stated) and stated != (width, height):
            raise MalformedRecord(f"{label}: width x height {stated} but {image} is {width} x {height}")
        return width, height

    @staticmethod
    def _features(features: dict, kind: str, label: str) -> dict[str, tuple[list, dict]]:
        """uid → (vertices, properties) of ``features[kind]``."""
        out = {}
        for k, feature in enumerate(require(features, kind, list, f"{label}: features")):
            where = f"{label}: features.{kind}[{k}]"
            if not isinstance(feature, dict):
                raise MalformedRecord(f"{where} is not an object")
            props = require(feature, "properties", dict, where)
            uid = str(require(props, "uid", str, where))
            out[uid] = (parse_wkt_polygon(require(feature, "wkt", str, where), where), props)
        return out

    def _georeference(self, features: dict, label: str) -> tuple[Any, list[dict]]:
        """The fitted pixel → lon/lat affine and the properties of the buildings."""
        lonlat = self._features(features, "lng_lat", label)
        pixel = self._features(features, "xy", label)
        pixels, lonlats = [], []
        for uid, (points, _) in lonlat.items():
            if uid not in pixel:
                continue
            check_lonlat(points, f"{label}: lng_lat polygon {uid}")
            xy = pixel[uid][0]
            if len(xy) != len(points):
                raise MalformedRecord(
                    f"{label}: polygon {uid} has {len(xy)} xy but {len(points)} lng_lat vertices"
                )
            pixels += xy
            lonlats += points
        if not pixels:
            raise MalformedRecord(
                f"{label}: no building polygons (xy and lng_lat by uid) to georeference the image"
            )
        transform = fit_affine(pixels, lonlats, label)
        inverse = ~transform
        residual = max(math.dist(inverse @ ll, xy) for xy, ll in zip(pixels, lonlats, strict=True))
        if residual > MAX_RESIDUAL_PX:
            raise MalformedRecord(
                f"{label}: the xy and lng_lat polygons disagree by up to {residual:.1f} pixels"
            )
        buildings = [p for _, p in lonlat.values() if p.get("feature_type", "building") == "building"]
        return transform, buildings

    @staticmethod
    def _gsd(meta: dict, transform: Any, label: str) -> float:
        """The sidecar resolution (``pan_resolution`` or ``gsd``) nearest the fitted pixel size."""
        fitted = lonlat_pixel_m(transform)
        stated = {
            name: float(require(meta, name, (int, float), label))
            for name in ("pan_resolution", "gsd")
            if meta.get(name) is not None
        }
        if any(value <= 0 for value in stated.values()):
            raise MalformedRecord(f"{label}: resolutions {stated} must be positive")
        if not stated:
            raise MalformedRecord(f"{label}: fields 'gsd' and 'pan_resolution' are missing")
        name, value = min(stated.items(), key=lambda kv: abs(math.log(kv[1] / fitted)))
        if not value / MAX_GSD_RATIO <= fitted <= value * MAX_GSD_RATIO:
            given = ", ".join(f"{k} is {v}" for k, v in stated.items())
            raise MalformedRecord(
                f"{label}: the polygons give {fitted:.2f} m/pixel but {given} (xy and lng_lat do not match)"
            )
        return value

    @staticmethod
    def _view(meta: dict, label: str) -> dict[str, float]:
        out = {}
        for field, prop, (low, high) in _VIEW_FIELDS:
            if meta.get(field) is None:
                continue
            value = float(require(meta, field, (int, float), label))
            if not low <= value <= high:
                raise MalformedRecord(f"{label}: field {field!r} = {value} is not in [{low}, {high}] degrees")
            out[prop] = value
        return out

    # ---------------------------------------------------------------------------------------- linking
    def link(self, keys: Sequence[LinkKey]) -> dict[str, dict[str, Any]]:
        """Pre ↔ post pairs (``dsat:pair``) and the common grid of a tile's images (`sequence_properties`)."""
        extra = sequence_properties(keys)
        roles: dict[str, dict[str, list[str]]] = {}
        for key in keys:
            roles.setdefault(key.group, {}).setdefault(key.role, []).append(key.item_id)
        for by_role in roles.values():
            pre, post = by_role.get("pre", []), by_role.get("post", [])
            if len(pre) == 1 and len(post) == 1:
                extra[pre[0]]["dsat:pair"] = post[0]
                extra[post[0]]["dsat:pair"] = pre[0]
        return extra
