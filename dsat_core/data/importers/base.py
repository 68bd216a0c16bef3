"""What every dataset importer shares: records → STAC items on Dask, linking, the static catalog written.

An importer (one module per dataset) knows its published layout:

- `records(fs, root)` lists the images cheaply (paths only, no pixels, no sidecar parsing), one
  `ImportRecord` each;
- `to_item(fs, record)` reads one record's sidecars and returns a STAC item dict, or raises
  `MalformedRecord` with the reason (a malformed sidecar, a missing image, no georeferencing);
- `link(keys)` sees one small `LinkKey` per item (never the items) and returns extra properties per item
  id: the sequence of images of one place, the pairs of a change or super-resolution task.

`run_import` maps `to_item` over batches of records on Dask workers (at most ``max_in_flight`` batches
submitted), which send back each batch's items already encoded as ndjson text. Linking needs the images of
a group side by side: when the importer's listing yields each group's records together (`group_of`; fMoW
locations and xBD tiles are folders / file-name prefixes of a sorted listing), batches end only where the
group changes and `link` runs per batch on the workers, so the driver keeps nothing per image beyond the
listing's paths. Otherwise (e.g. the fMoW-Sentinel CSV, in no promised order) workers send
one small `LinkKey` per item, the driver links them all at the end (a few hundred bytes per image) and
rewrites the items once. Then the static catalog is written::

    <out>/collection.json      the collection (extent from the items)
    <out>/items.ndjson         one item per line (`rustac serve collection.json items.ndjson` serves it)
    <out>/rejected.ndjson      {"record", "reason"} per rejected image
    <out>/import.json          counts, source, importer, timestamps

Item ids are the record keys, so a rerun over the same copy writes the same items (the Zarr refresh then
adds nothing). Files are read through fsspec: a local folder or ``s3://`` with ``storage_options``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import Any, ClassVar

import fsspec
from fsspec.core import url_to_fs

from dsat_core.data.cluster import dask_client, n_workers_of

log = logging.getLogger(__name__)
STAC_VERSION = "1.1.0"
PROJECTION_EXTENSION = "https://stac-extensions.github.io/projection/v2.0.0/schema.json"
EO_EXTENSION = "https://stac-extensions.github.io/eo/v1.1.0/schema.json"
VIEW_EXTENSION = "https://stac-extensions.github.io/view/v1.0.0/schema.json"
METRES_PER_DEGREE = 111_320.0


class MalformedRecord(ValueError):
    """One image cannot become a STAC item; the message is the reason recorded for it."""


@dataclass(frozen=True)
class ImportRecord:
    """One image of a dataset as found by the listing: its item id and the files that describe it."""

    key: str
    files: Mapping[str, str]  # role -> path or URL (e.g. "image", "sidecar", "labels")
    fields: Mapping[str, Any] = field(default_factory=dict)  # e.g. the image's row of a CSV index


@dataclass(frozen=True, slots=True)
class LinkKey:
    """What `link` needs of an item: id, group (one place / one event), datetime, footprint."""

    item_id: str
    group: str
    datetime: str
    bbox: tuple[float, float, float, float]
    role: str = ""  # e.g. "pre" / "post"

    @classmethod
    def of(cls, item: Mapping[str, Any]) -> LinkKey:
        props = item["properties"]
        return cls(
            item["id"],
            str(props.get("dsat:group") or ""),
            str(props.get("datetime") or ""),
            tuple(item["bbox"]),
            str(props.get("dsat:role") or ""),
        )


@dataclass
class ImportReport:
    """The outcome of one import: where the catalog is and what went in or not."""

    importer: str
    source: str
    out_dir: str
    collection: str
    n_records: int = 0
    n_items: int = 0
    rejected: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    finished: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class DatasetImporter:
    """Base class of the importers (see the module docstring)."""

    name: ClassVar[str]
    collection: ClassVar[str]
    description: ClassVar[str]
    license: ClassVar[str] = "other"

    def records(self, fs: fsspec.AbstractFileSystem, root: str) -> Iterator[ImportRecord]:
        raise NotImplementedError

    def to_item(self, fs: fsspec.AbstractFileSystem, record: ImportRecord) -> dict[str, Any]:
        raise NotImplementedError

    def link(self, keys: Sequence[LinkKey]) -> dict[str, dict[str, Any]]:
        """Extra properties per item id; by default images of one group form a sequence in time."""
        return sequence_properties(keys)

    def group_of(self, record: ImportRecord) -> str | None:
        """The record's link group (its items' ``dsat:group``) when the listing alone tells it AND yields
        each group's records one after another; then `link` runs per batch on the workers and the driver
        keeps nothing per image. None (the default): `link` sees every key, on the driver."""
        return None


# ------------------------------------------------------------------------------------------------ helpers
def read_json(fs: fsspec.AbstractFileSystem, path: str, what: str = "sidecar") -> dict[str, Any]:
    """A JSON object from `path`, or `MalformedRecord` naming the file and the problem."""
    try:
        with fs.open(path, "rb") as f:
            data = json.load(f)
    except FileNotFoundError as err:
        raise MalformedRecord(f"{what} {path} is missing") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MalformedRecord(f"{what} {path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise MalformedRecord(f"{what} {path}: expected a JSON object, got {type(data).__name__}")
    return data


def require(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """`data[key]` if present and of `kind`, else `MalformedRecord` naming the field."""
    if key not in data or data[key] is None:
        raise MalformedRecord(f"{where}: field {key!r} is missing")
    value = data[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise MalformedRecord(f"{where}: field {key!r} = {value!r} is not a {_kind_name(kind)}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def parse_datetime(value: Any, where: str) -> str:
    """An ISO 8601 UTC datetime string (``...Z``) from a sidecar timestamp, else `MalformedRecord`."""
    if not isinstance(value, str):
        raise MalformedRecord(f"{where}: timestamp {value!r} is not a string")
    try:
        when = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError as err:
        raise MalformedRecord(f"{where}: timestamp {value!r} is not ISO 8601") from err
    when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    return when.isoformat().replace("+00:00", "Z")


def parse_wkt_polygon(text: Any, where: str) -> list[tuple[float, float]]:
    """Vertices of a WKT ``POLYGON`` / ``MULTIPOLYGON`` (outer ring(s) only), else `MalformedRecord`."""
    import shapely
    from shapely.errors import GEOSException

    try:
        geometry = shapely.from_wkt(text)
    except (GEOSException, TypeError, ValueError) as err:
        raise MalformedRecord(f"{where}: not a WKT polygon: {str(text)[:80]!r}") from err
    polygons = getattr(geometry, "geoms", [geometry])
    if geometry is None or geometry.is_empty or geometry.geom_type not in ("Polygon", "MultiPolygon"):
        raise MalformedRecord(f"{where}: not a WKT polygon: {str(text)[:80]!r}")
    return [(float(x), float(y)) for poly in polygons for x, y in list(poly.exterior.coords)[:-1]]


def check_lonlat(points: Iterable[tuple[float, float]], where: str) -> None:
    for lon, lat in points:
        if not (-180.0 <= lon <= 180.0 and -90.0 <= lat <= 90.0):
            raise MalformedRecord(f"{where}: ({lon}, {lat}) is not a WGS84 lon/lat")


def bbox_of(points: Iterable[tuple[float, float]]) -> tuple[float, float, float, float]:
    xs, ys = zip(*points, strict=True)
    return min(xs), min(ys), max(xs), max(ys)


def bbox_polygon(bbox: Sequence[float]) -> dict[str, Any]:
    left, bottom, right, top = bbox
    ring = [[left, bottom], [right, bottom], [right, top], [left, top], [left, bottom]]
    return {"type": "Polygon", "coordinates": [ring]}


def fit_affine(pixels: Sequence[tuple[float, float]], lonlats: Sequence[tuple[float, float]], where: str):
    """Least-squares pixel (col, row) → lon/lat affine from matching points (≥ 3, not collinear)."""
    import numpy as np
    from affine import Affine

    if len(pixels) != len(lonlats) or len(pixels) < 3:
        raise MalformedRecord(f"{where}: {len(pixels)} point pairs, need at least 3 to georeference")
    a = np.column_stack([np.asarray(pixels, float), np.ones(len(pixels))])
    b = np.asarray(lonlats, float)
    coef, _, rank, _ = np.linalg.lstsq(a, b, rcond=None)
    if rank < 3:
        raise MalformedRecord(f"{where}: the label points are collinear; cannot georeference")
    scale = np.abs(coef[:2]).max()
    coef[:2][np.abs(coef[:2]) < 1e-9 * scale] = 0.0  # an exactly north-up fit has no rounding-noise shear
    return Affine(coef[0, 0], coef[1, 0], coef[2, 0], coef[0, 1], coef[1, 1], coef[2, 1])


def image_footprint(transform: Any, width: int, height: int) -> tuple[float, float, float, float]:
    corners = [transform @ (x, y) for x, y in ((0, 0), (width, 0), (width, height), (0, height))]
    return bbox_of(corners)


def lonlat_pixel_m(transform: Any, lat: float | None = None) -> float:
    """Metres per pixel (square root of the pixel's ground area) of a pixel → lon/lat affine at `lat`.

    `lat` defaults to the transform's origin: good enough for the small images of the datasets.
    """
    lat = transform.f if lat is None else lat
    area_deg2 = abs(transform.a * transform.e - transform.b * transform.d)
    return math.sqrt(area_deg2 * math.cos(math.radians(lat))) * METRES_PER_DEGREE


@dataclass(frozen=True)
class GeoTiffHeader:
    """What an importer needs of a georeferenced raster, read from its header only (no pixels)."""

    bbox: tuple[float, float, float, float]  # WGS84
    projection: dict[str, Any]  # proj:code, proj:transform, proj:shape
    count: int
    dtype: str
    tags: dict[str, str]  # dataset tags of the default domain (e.g. TIFFTAG_DATETIME)


def read_geotiff_header(fs: fsspec.AbstractFileSystem, path: str) -> GeoTiffHeader:
    """The header of a georeferenced raster at `path` (through `fs`), else `MalformedRecord` naming it."""
    import rasterio
    from rasterio.errors import RasterioError
    from rasterio.warp import transform_bounds

    if not fs.exists(path):
        raise MalformedRecord(f"image {path} is missing")
    try:
        with rasterio.open(path, opener=fs) as src:
            if src.crs is None:
                raise MalformedRecord(f"image {path}: no CRS (not a GeoTIFF)")
            return GeoTiffHeader(
                bbox=tuple(transform_bounds(src.crs, "EPSG:4326", *src.bounds, densify_pts=21)),
                projection={
                    "proj:code": src.crs.to_string(),
                    "proj:transform": list(src.transform)[:6],
                    "proj:shape": [src.height, src.width],
                },
                count=src.count,
                dtype=src.dtypes[0],
                tags=dict(src.tags()),
            )
    except RasterioError as err:
        raise MalformedRecord(f"image {path}: not a readable GeoTIFF: {err}") from err


def stac_item(
    item_id: str,
    *,
    bbox: Sequence[float],
    properties: Mapping[str, Any],
    assets: Mapping[str, Mapping[str, Any]],
    collection: str,
    links: Sequence[Mapping[str, Any]] = (),
    extensions: Sequence[str] = (),
) -> dict[str, Any]:
    """A STAC 1.1 item dict (geometry = the bbox polygon) with the eo, projection and other `extensions`."""
    return {
        "type": "Feature",
        "stac_version": STAC_VERSION,
        "stac_extensions": [EO_EXTENSION, PROJECTION_EXTENSION, *extensions],
        "id": item_id,
        "collection": collection,
        "bbox": [float(v) for v in bbox],
        "geometry": bbox_polygon(bbox),
        "properties": dict(properties),
        "assets": {k: dict(v) for k, v in assets.items()},
        "links": [{"rel": "collection", "href": "./collection.json", "type": "application/json"}, *links],
    }


def sequence_properties(keys: Sequence[LinkKey]) -> dict[str, dict[str, Any]]:
    """Per grouped item: its place in the group's time order, the group size, and ``dsat:aoi_bbox``.

    ``dsat:aoi_bbox`` is the area every image of the group covers (the intersection of their footprints),
    so the reader gives them one grid and their tiles line up (temporal sequences); omitted when the
    footprints do not all overlap.
    """
    groups: dict[str, list[LinkKey]] = {}
    for key in keys:
        if key.group:
            groups.setdefault(key.group, []).append(key)
    out: dict[str, dict[str, Any]] = {}
    for members in groups.values():
        members.sort(key=lambda k: (k.datetime, k.item_id))
        left = max(k.bbox[0] for k in members)
        bottom = max(k.bbox[1] for k in members)
        right = min(k.bbox[2] for k in members)
        top = min(k.bbox[3] for k in members)
        common = [left, bottom, right, top] if left < right and bottom < top else None
        for index, key in enumerate(members):
            extra: dict[str, Any] = {"dsat:sequence_index": index, "dsat:sequence_size": len(members)}
            if common is not None and len(members) > 1:
                extra["dsat:aoi_bbox"] = common
            out[key.item_id] = extra
    return out


# ------------------------------------------------------------------------------------------------ running
@dataclass
class _BatchResult:
    """What a batch sends back: its items as ndjson text, their extent, link keys (when linked on the
    driver) and rejections."""

    text: str
    n_items: int
    bbox: tuple[float, float, float, float] | None
    dates: tuple[str, str] | None
    keys: list[LinkKey] | None
    rejected: list[dict[str, str]]


def _items_of_batch(
    importer: DatasetImporter, fs: fsspec.AbstractFileSystem, records: list[ImportRecord], link_here: bool
) -> _BatchResult:
    """`to_item` over a batch (a failure rejects that record only), linked here when ``link_here``; items
    are encoded as ndjson here, on the worker."""
    items, keys, rejected = [], [], []
    for record in records:
        try:
            item = importer.to_item(fs, record)
        except MalformedRecord as err:
            rejected.append({"record": record.key, "reason": str(err)})
        except Exception as err:  # noqa: BLE001 - one bad image never stops an import
            rejected.append({"record": record.key, "reason": f"unexpected {type(err).__name__}: {err}"})
        else:
            items.append(item)
            keys.append(LinkKey.of(item))
    if link_here:
        extra = importer.link(keys)
        for item in items:
            item["properties"].update(extra.get(item["id"], {}))
    text = "".join(json.dumps(item) + "\n" for item in items)
    driver_keys = None if link_here else keys
    return _BatchResult(text, len(items), _extent(keys), _date_range(keys), driver_keys, rejected)


def _extent(keys: Sequence[LinkKey]) -> tuple[float, float, float, float] | None:
    if not keys:
        return None
    return (
        min(k.bbox[0] for k in keys),
        min(k.bbox[1] for k in keys),
        max(k.bbox[2] for k in keys),
        max(k.bbox[3] for k in keys),
    )


def _date_range(keys: Sequence[LinkKey]) -> tuple[str, str] | None:
    dates = [k.datetime for k in keys if k.datetime]
    return (min(dates), max(dates)) if dates else None


def _batches(
    records: Iterable[ImportRecord], size: int, group_of: Callable[[ImportRecord], str | None] | None = None
) -> Iterator[list[ImportRecord]]:
    """Batches of about ``size`` records; with ``group_of`` a batch ends only where the group changes, and
    a group seen in an earlier batch again (a listing that does not keep groups together) is an error."""
    if group_of is None:
        it = iter(records)
        while chunk := list(islice(it, size)):
            yield chunk
        return
    batch: list[ImportRecord] = []
    closed: set[str] = set()
    current: str | None = None
    for record in records:
        group = group_of(record) or ""
        if group != current:
            if current is not None:
                closed.add(current)
            if group in closed:
                raise ValueError(f"record {record.key}: group {group!r} listed in two places")
            if len(batch) >= size:
                yield batch
                batch = []
            current = group
        batch.append(record)
    if batch:
        yield batch


def _map_batches(
    fn: Callable[[list[ImportRecord]], _BatchResult],
    batches: Iterator[list[ImportRecord]],
    client: Any | None,
    max_in_flight: int,
) -> Iterator[_BatchResult]:
    """Results of ``fn`` per batch, in completion order; at most ``max_in_flight`` batches submitted."""
    if client is None:
        yield from map(fn, batches)
        return
    from distributed import as_completed

    ac = as_completed()

    def submit_next() -> None:
        batch = next(batches, None)
        if batch is not None:
            ac.add(client.submit(fn, batch, pure=False, key=f"import-{batch[0].key}-{time.time_ns()}"))

    for _ in range(max_in_flight):
        submit_next()
    for future in ac:
        result = future.result()
        future.release()
        submit_next()
        yield result


def _collection(
    importer: DatasetImporter,
    bbox: tuple[float, float, float, float] | None,
    dates: tuple[str, str] | None,
) -> dict[str, Any]:
    return {
        "type": "Collection",
        "stac_version": STAC_VERSION,
        "id": importer.collection,
        "description": importer.description,
        "license": importer.license,
        "extent": {
            "spatial": {"bbox": [list(bbox or (-180.0, -90.0, 180.0, 90.0))]},
            "temporal": {"interval": [list(dates or (None, None))]},
        },
        "links": [],
    }


def _union(a: tuple | None, b: tuple | None, pick: tuple[Callable, ...]) -> tuple | None:
    if a is None or b is None:
        return a or b
    return tuple(f(x, y) for f, x, y in zip(pick, a, b, strict=True))


def run_import(
    importer: DatasetImporter,
    source: str,
    out_dir: str | os.PathLike,
    *,
    client: Any | None = None,
    scheduler_address: str | None = None,
    n_workers: int = 0,
    storage_options: Mapping[str, Any] | None = None,
    batch_size: int = 256,
    max_in_flight: int | None = None,
    limit: int | None = None,
) -> ImportReport:
    """Import the dataset copy at ``source`` (folder or ``s3://`` prefix) as a static catalog in ``out_dir``.

    Runs on ``client`` / ``scheduler_address`` / a new ``LocalCluster(n_workers)``; ``n_workers=0`` with
    neither runs in this process. ``limit`` stops after that many records (a first look at a large copy).
    """
    began = time.perf_counter()
    fs, root = url_to_fs(source, **(storage_options or {}))
    if not fs.exists(root):
        raise FileNotFoundError(f"{importer.name}: dataset copy {source!r} not found")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = ImportReport(importer.name, source, str(out), importer.collection)
    records = _counted(importer.records(fs, root), report, limit)
    keys: list[LinkKey] = []  # only when linking needs every key (see `DatasetImporter.group_of`)
    bbox: tuple | None = None
    dates: tuple | None = None
    link_here = _groups_listed_together(importer)
    with ExitStack() as stack:
        if client is not None or scheduler_address or n_workers > 0:
            client = stack.enter_context(
                dask_client(client, scheduler_address=scheduler_address, n_workers=max(n_workers, 1))
            )
        in_flight = max_in_flight or 2 * (n_workers_of(client, n_workers) if client is not None else 1)
        suffix = ".partial" if link_here else ".ndjson.tmp"
        raw = stack.enter_context(tempfile.NamedTemporaryFile("w+", dir=out, suffix=suffix, delete=False))
        stack.callback(Path(raw.name).unlink, missing_ok=True)
        batches = _batches(records, batch_size, importer.group_of if link_here else None)
        for result in _map_batches(_BatchFn(importer, fs, link_here), batches, client, in_flight):
            raw.write(result.text)
            report.n_items += result.n_items
            bbox = _union(bbox, result.bbox, (min, min, max, max))
            dates = _union(dates, result.dates, (min, max))
            keys.extend(result.keys or [])
            report.rejected.extend(result.rejected)
        raw.flush()
        if link_here:
            raw.close()
            Path(raw.name).replace(out / "items.ndjson")
        else:
            extra = importer.link(keys)
            raw.seek(0)
            lines = (_with_extra(line, extra.get(key.item_id)) for line, key in zip(raw, keys, strict=True))
            _write_atomic(out / "items.ndjson", lines)
    _write_atomic(out / "collection.json", [json.dumps(_collection(importer, bbox, dates), indent=2)])
    _write_atomic(out / "rejected.ndjson", (json.dumps(r) + "\n" for r in report.rejected))
    report.seconds = round(time.perf_counter() - began, 3)
    report.finished = datetime.now(UTC).isoformat()
    _write_atomic(out / "import.json", [json.dumps(report.to_dict() | {"rejected": len(report.rejected)})])
    log.info("%s: %d items, %d rejected -> %s", importer.name, report.n_items, len(report.rejected), out)
    return report


@dataclass(frozen=True)
class _BatchFn:
    """A picklable `_items_of_batch` bound to an importer and a filesystem (sent to Dask workers)."""

    importer: DatasetImporter
    fs: Any
    link_here: bool

    def __call__(self, records: list[ImportRecord]) -> _BatchResult:
        return _items_of_batch(self.importer, self.fs, records, self.link_here)


def _groups_listed_together(importer: DatasetImporter) -> bool:
    return type(importer).group_of is not DatasetImporter.group_of


def _counted(
    records: Iterable[ImportRecord], report: ImportReport, limit: int | None
) -> Iterator[ImportRecord]:
    for record in islice(records, limit):
        report.n_records += 1
        yield record


def _with_extra(line: str, extra: Mapping[str, Any] | None) -> str:
    if not extra:
        return line
    item = json.loads(line)
    item["properties"].update(extra)
    return json.dumps(item) + "\n"


def _write_atomic(path: Path, chunks: Iterable[str]) -> None:
    """Write through a temporary file and rename, so a reader never sees half a catalog file."""
    tmp = path.with_name(path.name + ".partial")
    with tmp.open("w") as f:
        f.writelines(chunks)
    tmp.replace(path)


def read_items(catalog_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The items of an imported static catalog (for `start_stac_server` or a direct ingest)."""
    with open(Path(catalog_dir) / "items.ndjson") as f:
        return [json.loads(line) for line in f if line.strip()]


def import_report_markdown(report: ImportReport, *, max_reasons: int = 20) -> str:
    """A markdown summary of an import: counts and the first rejections with their reasons."""
    lines = [
        f"# Import of {report.importer}",
        f"- source: `{report.source}`",
        f"- catalog: `{report.out_dir}` (collection `{report.collection}`)",
        f"- images: {report.n_records}, items: {report.n_items}, rejected: {len(report.rejected)}",
        f"- seconds: {report.seconds}",
    ]
    if report.rejected:
        lines += ["", "| image | reason |", "|---|---|"]
        lines += [f"| {r['record']} | {r['reason']} |" for r in report.rejected[:max_reasons]]
        if len(report.rejected) > max_reasons:
            lines.append(f"| … | {len(report.rejected) - max_reasons} more in rejected.ndjson |")
    return "\n".join(lines)
