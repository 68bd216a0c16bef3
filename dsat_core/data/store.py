"""The versioned Zarr v3 dataset store: tiles, metadata, captions and lineage, appended per commit.

Layout (one group per product; every per-tile array has ``tile`` as its first dimension)::

    /                      attrs: schema_version, catalog, content_hash, items, n_tiles {product: n},
                                  n_rejected, versions [...], created, updated   <- the commit point
    /<product>/images      uint8|uint16 (tile, band, y, x); one chunk per tile inside shards of 64 tiles
    /<product>/band        str (band,): band names (an xarray coordinate)
    /<product>/lon|lat|gsd|cloud_cover          float64 (tile,), NaN = missing
    /<product>/year|month|day                   int64 (tile,), -1 = missing
    /<product>/caption|item_id|asset_href|crs|scene_datetime|platform|tile_hash   str (tile,)
    /<product>/transform   float64 (tile, affine=6);  /<product>/window  int64 (tile, window_field=4)
    /<product>/scale_min|scale_max              float64 (tile, band)
    /<product>/latents     optional float16 (tile, latent_channel, latent_y, latent_x), NaN = not computed
    /rejected/item_id|tile_index|product|reason  1-D, appended, never overwritten
    /_staging/<key>/...    one scene staged by a worker; attr ``complete`` is written last

The metadata arrays live directly in the product group (not in a ``metadata`` subgroup) so that
``xr.open_zarr(uri, group="rgb", consolidated=False)`` gives one Dataset with ``images(tile, band, y, x)`` and
every per-tile column as a 1-D/2-D variable along ``tile``.

Commit protocol (single writer): staged tiles whose identity ``(item id, window)`` is new are appended
(arrays are resized, then written; the committer decides every row, and may hand the copies of whole image
shards from staging to other processes, no shard in two tasks, and waits for all of them), then rejections,
then the ROOT attrs are rewritten in one atomic object write (the commit point: committed counts
``n_tiles``/``n_rejected``, items, content hash, versions), then the product attrs mirror, then the staging
groups are deleted. Readers (`DatasetStore.open_xarray`, `TileDataset`) slice every array to the committed
counts, so a commit that dies midway is invisible to them; the next commit truncates the uncommitted tail
and redoes the work. Raw ``xr.open_zarr`` of a product group shows the physical arrays, which can hold such
a tail after a crash: slice with the ``n_tiles`` attr.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import CancelledError
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import zarr
import zarr.core.sync
import zarr.storage

from dsat_core.data.catalog import CatalogConfig
from dsat_core.data.tiles import LINEAGE_FIELDS, ProductTiles, Rejection, SceneTiles
from dsat_core.metadata import FIELD_NAMES

SCHEMA_VERSION = 1
TILES_PER_SHARD = 64
COLUMN_CHUNK = 4096
IMAGE_ROWS_AHEAD = 16 * TILES_PER_SHARD  # a commit grows the images array by this much more
SHARDS_PER_COPY_TASK = 4  # a commit's image copies: fewer, larger tasks (each costs the scheduler)
STAGING = "_staging"
# Image writes store every chunk: zarr's default compares each chunk with the fill value to skip empty ones,
# a pass over the pixels of every tile, to save the bytes of tiles that the quality filters reject anyway
# (constant tiles); an all-fill tile that does get through is stored, and reads back the same.
WRITE_EVERY_CHUNK = {"write_empty_chunks": True}
# Staged arrays name their chunks c.0.0.0.0 rather than c/0/0/0/0: on a file system each staged scene is then
# 9 files and folders instead of 18, which the worker creates and the commit deletes.
FLAT_CHUNK_KEYS = {"name": "default", "separator": "."}
REJECTED = "rejected"
FLOAT_FIELDS = ("lon", "lat", "gsd", "cloud_cover")
INT_FIELDS = ("year", "month", "day")
STRING_COLUMNS = (*LINEAGE_FIELDS, "tile_hash")
REJECTION_COLUMNS = ("item_id", "tile_index", "product", "reason")
_STR = np.dtypes.StringDType()
# name -> (extra dimension names after `tile`, numpy dtype); `images` is handled separately.
_COLUMNS: dict[str, tuple[tuple[str, ...], Any]] = {
    **{name: ((), np.float64) for name in FLOAT_FIELDS},
    **{name: ((), np.int64) for name in INT_FIELDS},
    **{name: ((), _STR) for name in STRING_COLUMNS},
    "transform": (("affine",), np.float64),
    "window": (("window_field",), np.int64),
    "scale_min": (("band",), np.float64),
    "scale_max": (("band",), np.float64),
}


class StoreError(ValueError):
    """A store that cannot be opened or written as asked; the message says which store and why."""


@dataclass(frozen=True)
class StagedScene:
    """A scene written to the staging area by `DatasetStore.stage` (small; safe to return from a worker).

    ``contents`` carries what the committer would otherwise read back from the staging group (per-tile
    columns and rejections, no pixels), so a commit right after staging makes no extra reads.
    """

    item_id: str
    key: str
    n_tiles: dict[str, int]
    n_rejected: int
    scene_rejected: bool
    contents: tuple[dict[str, Any], dict[str, _StagedProduct], list[Rejection]] | None = field(
        default=None, repr=False, compare=False
    )


@dataclass(frozen=True)
class _StagedProduct:
    """One product of a staged scene as the committer reads it: columns, bands, image shape/dtype."""

    columns: dict[str, np.ndarray]
    bands: list[str]
    image_shape: tuple[int, ...]
    image_dtype: np.dtype


# (staging key, ascending rows of its images-<product> array): where a run of image rows comes from
ImageSource = tuple[str, np.ndarray]
# like `Executor.submit` / `distributed.Client.submit`: submit(fn, *args) -> a future with .exception()
Submit = Callable[..., Any]


@dataclass
class CommitResult:
    """What one `DatasetStore.commit` did."""

    version: int
    added_tiles: dict[str, int] = field(default_factory=dict)
    skipped_duplicates: dict[str, int] = field(default_factory=dict)
    rejected: list[Rejection] = field(default_factory=list)  # appended to the store's log by this commit
    items_added: list[str] = field(default_factory=list)
    content_hash: str = ""


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def staging_key(item_id: str) -> str:
    """A path-safe, collision-free name for an item's staging group."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", item_id)[:80]
    return f"{safe}-{hashlib.sha1(item_id.encode()).hexdigest()[:10]}"


def make_zarr_store(uri: str, *, storage_options: Mapping[str, Any] | None = None, read_only: bool = False):
    """A zarr v3 store for a local path or an fsspec URL (``s3://bucket/prefix``, ``memory://...``)."""
    if "://" in uri and not uri.startswith("file://"):
        return zarr.storage.FsspecStore.from_url(
            uri, storage_options=dict(storage_options or {}), read_only=read_only
        )
    path = uri.removeprefix("file://")
    return zarr.storage.LocalStore(path, read_only=read_only)


def tile_hashes(tiles: ProductTiles) -> list[str]:
    """sha256 per tile over its identity, image bytes (with dtype/shape), metadata and lineage."""
    meta = tiles.metadata_arrays()
    out = []
    for i, identity in enumerate(tiles.identities()):
        h = hashlib.sha256()
        h.update(f"{tiles.product}|{identity}|{tiles.images.dtype.str}|{tiles.images.shape[1:]}".encode())
        h.update(np.ascontiguousarray(tiles.images[i]).tobytes())
        for name in FIELD_NAMES:
            h.update(np.asarray(meta[name][i]).tobytes())
        for name in LINEAGE_FIELDS:
            h.update(b"\0" + getattr(tiles, name)[i].encode())
        for name in ("transform", "window", "scale_min", "scale_max"):
            h.update(np.ascontiguousarray(getattr(tiles, name)[i]).tobytes())
        out.append(h.hexdigest())
    return out


def combine_hashes(hashes: Iterable[str]) -> str:
    """Order-independent content hash: sha256 of the sorted per-tile hashes."""
    return hashlib.sha256("\n".join(sorted(hashes)).encode()).hexdigest()


def _columns(tiles: ProductTiles) -> dict[str, np.ndarray]:
    cols: dict[str, np.ndarray] = {"images": np.ascontiguousarray(tiles.images)}
    cols.update(tiles.metadata_arrays())
    for name in LINEAGE_FIELDS:
        cols[name] = np.array(getattr(tiles, name), dtype=_STR)
    cols["tile_hash"] = np.array(tile_hashes(tiles), dtype=_STR)
    cols["transform"] = np.asarray(tiles.transform, dtype=np.float64).reshape(len(tiles), 6)
    cols["window"] = np.asarray(tiles.window, dtype=np.int64).reshape(len(tiles), 4)
    cols["scale_min"] = np.asarray(tiles.scale_min, dtype=np.float64).reshape(len(tiles), len(tiles.bands))
    cols["scale_max"] = np.asarray(tiles.scale_max, dtype=np.float64).reshape(len(tiles), len(tiles.bands))
    return cols


def _rejection_columns(rejections: list[Rejection]) -> dict[str, np.ndarray]:
    return {
        "item_id": np.array([r.item_id for r in rejections], dtype=_STR),
        "tile_index": np.array([r.tile_index for r in rejections], dtype=np.int64),
        "product": np.array([r.product for r in rejections], dtype=_STR),
        "reason": np.array([r.reason for r in rejections], dtype=_STR),
    }


def _to_json(values: np.ndarray) -> list[Any]:
    """Exact JSON form of a column (floats round-trip through repr; NaN becomes null)."""
    if values.dtype.kind == "f":
        out = values.astype(object)
        out[np.isnan(values)] = None
        return out.tolist()
    return values.tolist()


def _from_json(values: list[Any], dtype: Any) -> np.ndarray:
    if dtype is _STR:
        return np.array(values, dtype=_STR)
    if np.dtype(dtype).kind == "f":
        return np.array(values, dtype=object).astype(np.float64)  # None -> nan
    return np.array(values, dtype=dtype)


def _mismatch(staged: _StagedProduct, attrs: Mapping[str, Any]) -> str | None:
    """Why a staged product does not fit the store product with these attrs (None: it fits)."""
    bands, dtype, size = staged.bands, staged.image_dtype, list(staged.image_shape[2:])
    if list(attrs["bands"]) != list(bands):
        return f"bands {bands} differ from the store's {attrs['bands']}"
    if attrs["dtype"] != str(dtype):
        return f"dtype {dtype} differs from the store's {attrs['dtype']}"
    if list(attrs["tile_size"]) != size:
        return f"tile size {size} differs from the store's {attrs['tile_size']}"
    return None


def _identities(item_ids: np.ndarray, windows: np.ndarray) -> list[str]:
    return [f"{i}:{','.join(map(str, w))}" for i, w in zip(item_ids.tolist(), windows.tolist(), strict=True)]


def _create_column(group: zarr.Group, name: str, data_shape: tuple[int, ...], dtype: Any, dims: list[str]):
    n_rows = max(1, min(COLUMN_CHUNK, data_shape[0] or COLUMN_CHUNK))
    chunks = (n_rows, *data_shape[1:])
    return group.create_array(
        name,
        shape=data_shape,
        dtype=str if dtype is _STR else dtype,
        chunks=chunks,
        dimension_names=dims,
        fill_value="" if dtype is _STR else None,
    )


class DatasetStore:
    """A dataset store at a local path or fsspec URL. Create/open with `DatasetStore.open`."""

    def __init__(self, uri: str, root: zarr.Group, storage_options: Mapping[str, Any] | None):
        self.uri = uri
        self.root = root
        self.storage_options = dict(storage_options or {})

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls,
        uri: str,
        *,
        storage_options: Mapping[str, Any] | None = None,
        create: bool = False,
        catalog: CatalogConfig | None = None,
        read_only: bool = False,
    ) -> DatasetStore:
        """Open a store; ``create=True`` creates it when missing (recording ``catalog`` in the root attrs).

        An existing store whose catalog disagrees with ``catalog`` on what the tiles are (products, bands,
        dtype, tile size, CRS, GSD) raises `StoreError`; other fields (e.g. the STAC API URL) are updated.
        """
        store = make_zarr_store(uri, storage_options=storage_options, read_only=read_only)
        try:
            root = zarr.open_group(
                store, mode="r" if read_only else "r+", zarr_format=3, use_consolidated=False
            )
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError) as err:
            if not create or read_only:
                raise StoreError(f"{uri}: no dataset store there (pass create=True to make one)") from err
            root = zarr.open_group(store, mode="a", zarr_format=3, use_consolidated=False)
            now = _now()
            root.create_group(STAGING)
            root.create_group(REJECTED)
            root.update_attributes(  # one metadata write (`attrs.update` writes once per key)
                {
                    "schema_version": SCHEMA_VERSION,
                    "catalog": catalog.model_dump(mode="json") if catalog else None,
                    "content_hash": combine_hashes([]),
                    "items": [],
                    "n_tiles": {},
                    "n_rejected": 0,
                    "versions": [],
                    "created": now,
                    "updated": now,
                }
            )
            return cls(uri, root, storage_options)
        self = cls(uri, root, storage_options)
        if root.attrs.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(
                f"{uri}: schema_version {root.attrs.get('schema_version')!r}, "
                f"this code reads {SCHEMA_VERSION}"
            )
        if catalog is not None and not read_only:
            self._check_catalog(catalog)
        return self

    def _check_catalog(self, catalog: CatalogConfig) -> None:
        old = self.root.attrs.get("catalog")
        new = catalog.model_dump(mode="json")
        if old:
            keys = ("products", "tile_size", "overlap", "target_crs", "target_gsd")
            diff = [k for k in keys if old.get(k) != new.get(k)]
            if diff:
                raise StoreError(
                    f"{self.uri}: catalog {new['name']!r} differs from the store's "
                    f"{old.get('name')!r} in {', '.join(diff)}; use a new store"
                )
        if old != new:
            self.root.attrs["catalog"] = new

    # ------------------------------------------------------------------ reading
    def refresh(self) -> DatasetStore:
        """Re-read the root metadata: a store object is a snapshot of the version it was opened at."""
        self.root = zarr.open_group(
            self.root.store, mode="r" if self.root.read_only else "r+", zarr_format=3, use_consolidated=False
        )
        return self

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.root.attrs)

    @property
    def content_hash(self) -> str:
        return self.root.attrs["content_hash"]

    @property
    def version(self) -> int:
        versions = self.root.attrs.get("versions", [])
        return versions[-1]["version"] if versions else 0

    def products(self) -> list[str]:
        return sorted(self.root.attrs.get("n_tiles", {}))

    def n_tiles(self, product: str) -> int:
        return int(self.root.attrs.get("n_tiles", {}).get(product, 0))

    def ingested_items(self) -> set[str]:
        """Item ids whose read was committed (scene-level rejections are retried, so not listed)."""
        return set(self.root.attrs.get("items", []))

    def rejected(self) -> list[Rejection]:
        """Every committed rejection, oldest first."""
        n = int(self.root.attrs.get("n_rejected", 0))
        if n == 0:
            return []
        group = self.root[REJECTED]
        cols = {name: group[name][:n] for name in REJECTION_COLUMNS}
        return [
            Rejection(item_id=str(i), reason=str(r), tile_index=int(t), product=str(p))
            for i, t, p, r in zip(
                cols["item_id"], cols["tile_index"], cols["product"], cols["reason"], strict=True
            )
        ]

    def product_group(self, product: str) -> zarr.Group:
        if product not in self.root.attrs.get("n_tiles", {}):
            raise StoreError(f"{self.uri}: no product {product!r} (has {self.products()})")
        return self.root[product]

    def open_xarray(self, product: str):
        """The product as an `xarray.Dataset` (lazy, Dask-backed) sliced to the committed tiles.

        A commit that died midway can leave arrays of different lengths (image rows are written ahead of
        the per-tile columns), which one `xr.open_zarr` refuses: arrays of each length are then opened
        apart, sliced, and merged.
        """
        import xarray as xr

        n = self.n_tiles(product)
        by_length: dict[int, list[str]] = {}
        for name, arr in self.product_group(product).arrays():
            if name != "band":
                by_length.setdefault(arr.shape[0], []).append(name)
        names = [name for same in by_length.values() for name in same]
        parts = [
            xr.open_zarr(
                self.uri,
                group=product,
                consolidated=False,
                zarr_format=3,
                storage_options=self.storage_options or None,
                drop_variables=[name for name in names if name not in same] or None,
            ).isel(tile=slice(0, n))
            for same in by_length.values()
        ]
        ds = parts[0] if len(parts) == 1 else xr.merge(parts, combine_attrs="override", join="exact")
        ds.attrs.update(n_tiles=n, content_hash=self.content_hash, version=self.version)
        return ds

    # ------------------------------------------------------------------ staging (many writers)
    def stage(self, scene: SceneTiles) -> StagedScene:
        """Write a scene's tiles and rejections to ``_staging/<key>``; the ``complete`` attr goes last.

        A staged scene is a few objects (object stores charge per request): one ``images-<product>``
        array per product and one ``payload`` array holding the per-tile columns and rejections as UTF-8
        JSON. Safe from many processes at once as long as each stages a different item.
        """
        key = staging_key(scene.item_id)
        group = self.root.create_group(f"{STAGING}/{key}", overwrite=True)
        payload: dict[str, Any] = {"item_id": scene.item_id, "products": {}, "rejected": []}
        staged_products: dict[str, _StagedProduct] = {}
        for name, tiles in scene.products.items():
            if len(tiles) == 0:
                continue
            cols = _columns(tiles)
            images = cols.pop("images")
            staged_products[name] = _StagedProduct(cols, list(tiles.bands), images.shape, images.dtype)
            arr = group.create_array(
                f"images-{name}",
                shape=images.shape,
                dtype=images.dtype,
                chunks=(min(len(images), TILES_PER_SHARD), *images.shape[1:]),
                compressors=None,  # read back once by the commit: raw bytes are cheapest
                config=WRITE_EVERY_CHUNK,
                chunk_key_encoding=FLAT_CHUNK_KEYS,
            )
            arr[...] = images
            payload["products"][name] = {
                "bands": list(tiles.bands),
                "columns": {c: _to_json(v) for c, v in cols.items()},
            }
        payload["rejected"] = [[r.item_id, r.tile_index, r.product, r.reason] for r in scene.rejected]
        blob = np.frombuffer(json.dumps(payload, allow_nan=False).encode(), dtype=np.uint8)
        payload_array = group.create_array(
            "payload",
            shape=blob.shape,
            dtype=np.uint8,
            chunks=(max(1, len(blob)),),
            chunk_key_encoding=FLAT_CHUNK_KEYS,
        )
        payload_array[...] = blob
        counts = {name: len(p["columns"]["item_id"]) for name, p in payload["products"].items()}
        scene_rejected = any(r.tile_index < 0 and not r.product for r in scene.rejected) and not counts
        attrs = {
            "item_id": scene.item_id,
            "n_tiles": counts,
            "n_rejected": len(scene.rejected),
            "scene_rejected": scene_rejected,
            "staged": _now(),
            "complete": True,
        }
        group.update_attributes(attrs)  # one write, last: commit ignores groups without `complete`
        contents = (attrs, staged_products, list(scene.rejected))
        return StagedScene(scene.item_id, key, counts, len(scene.rejected), scene_rejected, contents)

    def staged(self) -> list[str]:
        """Keys of complete staging groups (waiting for a commit)."""
        staging = self.root.require_group(STAGING)
        return sorted(k for k, g in staging.groups() if g.attrs.get("complete"))

    def _read_staged(self, key: str) -> tuple[dict[str, Any], dict[str, _StagedProduct], list[Rejection]]:
        """A staged scene's attrs, per-product columns and rejections; image bytes stay in the store."""
        group = self.root[f"{STAGING}/{key}"]
        attrs = dict(group.attrs)
        payload = json.loads(group["payload"][...].tobytes())
        products = {}
        for name, part in payload["products"].items():
            images = group[f"images-{name}"]
            cols = {col: _from_json(values, _COLUMNS[col][1]) for col, values in part["columns"].items()}
            products[name] = _StagedProduct(cols, list(part["bands"]), tuple(images.shape), images.dtype)
        rejections = [
            Rejection(item_id=i, reason=r, tile_index=t, product=p) for i, t, p, r in payload["rejected"]
        ]
        return attrs, products, rejections

    # ------------------------------------------------------------------ commit (single writer)
    def _ensure_product(self, product: str, staged: _StagedProduct) -> zarr.Group:
        if product in self.root.attrs.get("n_tiles", {}) or product in self.root:
            return self.root[product]
        group = self.root.create_group(product)
        _, n_bands, height, width = staged.image_shape
        bands = staged.bands
        group.create_array(
            "images",
            shape=(0, n_bands, height, width),
            dtype=staged.image_dtype,
            chunks=(1, n_bands, height, width),
            shards=(TILES_PER_SHARD, n_bands, height, width),
            dimension_names=["tile", "band", "y", "x"],
            fill_value=0,
        )
        band = group.create_array(
            "band", shape=(n_bands,), dtype=str, chunks=(n_bands,), dimension_names=["band"]
        )
        band[...] = np.array(bands, dtype=_STR)
        for col, (dims, dtype) in _COLUMNS.items():
            extra = {"affine": 6, "window_field": 4, "band": n_bands}
            _create_column(group, col, (0, *(extra[d] for d in dims)), dtype, ["tile", *dims])
        group.update_attributes(
            {
                "bands": list(bands),
                "dtype": str(staged.image_dtype),
                "n_tiles": 0,
                "tile_size": [height, width],
            }
        )
        return group

    def _truncate(self, product: str, n: int) -> None:
        """Drop an uncommitted tail left by a commit that died (arrays longer than the committed count)."""
        group = self.root[product]
        for name, arr in group.arrays():
            if name != "band" and arr.shape[0] != n:
                arr.resize((n, *arr.shape[1:]))

    def _append_columns(self, product: str, start: int, cols: dict[str, np.ndarray]) -> int:
        """Write the per-tile columns of rows ``start..`` (the images are written by `write_image_rows`)."""
        group = self.root[product]
        end = start + len(cols["item_id"])
        for name in _COLUMNS:
            arr = group[name]
            arr.resize((end, *arr.shape[1:]))
            arr[start:end] = cols[name]
        if "latents" in group:
            latents = group["latents"]
            latents.resize((end, *latents.shape[1:]))
        return end

    def commit(
        self,
        staged: Iterable[str | StagedScene] | None = None,
        *,
        batch_tiles: int = 256,
        submit: Submit | None = None,
    ) -> CommitResult:
        """Append staged scenes (from `stage`, or every complete one) and make them visible in one version.

        Only one process may commit at a time. Tiles whose identity is already in the store are skipped,
        so committing the same scene twice is a no-op. See `begin_commit` to append while staging goes on
        and for ``submit``.
        """
        keys = self.staged() if staged is None else list(staged)
        transaction = self.begin_commit(batch_tiles=batch_tiles, submit=submit)
        for key in keys:
            transaction.add(key)
        return transaction.finish()

    def begin_commit(self, *, batch_tiles: int = 256, submit: Submit | None = None) -> CommitTransaction:
        """Start a commit: `add` staged scenes as they arrive (their tiles are appended at once, invisible to
        readers), then `finish` to publish them as one version. Single writer.

        ``submit`` (like ``Executor.submit`` or ``distributed.Client.submit``: ``submit(fn, *args)`` returns
        a future with ``result()``) runs the image copies elsewhere, in tasks of up to
        `SHARDS_PER_COPY_TASK` whole shards, so no two tasks write the same shard object; the driver still
        decides every row, writes the per-tile columns and rejections, waits for the tasks and then writes
        the commit point. Without it everything is written in this process.
        """
        return CommitTransaction(self, batch_tiles=batch_tiles, submit=submit)

    def _hashes(self, product: str, n: int) -> list[str]:
        return list(self.root[product]["tile_hash"][:n]) if n else []

    def _rejected_group(self) -> zarr.Group:
        group = self.root.require_group(REJECTED)
        for col in REJECTION_COLUMNS:
            if col not in group:
                dtype = np.int64 if col == "tile_index" else _STR
                _create_column(group, col, (0,), dtype, ["rejection"])
        return group

    def _truncate_rejections(self, n: int) -> None:
        if REJECTED in self.root:
            for _, arr in self.root[REJECTED].arrays():
                if arr.shape[0] != n:
                    arr.resize((n,))

    def _append_rejections(self, start: int, rejections: list[Rejection]) -> int:
        group = self._rejected_group()
        end = start + len(rejections)
        for col, data in _rejection_columns(rejections).items():
            arr = group[col]
            arr.resize((end,))
            arr[start:end] = data
        return end

    def discard_staged(self, keys: Iterable[str] | None = None) -> None:
        """Delete staging groups (all of them, complete or not, when ``keys`` is None); a missing one is
        not an error. The prefixes are deleted straight through the store, zarr's ``async.concurrency`` at
        a time (object stores: a few requests each); asking the group whether each key exists first would
        read its metadata."""
        staging = self.root.require_group(STAGING)
        keys = list(staging.group_keys()) if keys is None else list(keys)

        async def drop_all() -> None:
            limit = asyncio.Semaphore(zarr.config.get("async.concurrency"))

            async def drop(key: str) -> None:
                async with limit:
                    await (staging.store_path / key).delete_dir()

            await asyncio.gather(*(drop(key) for key in keys))

        zarr.core.sync.sync(drop_all())


class CommitTransaction:
    """One commit in progress (see `DatasetStore.begin_commit`)."""

    def __init__(self, store: DatasetStore, *, batch_tiles: int = 256, submit: Submit | None = None) -> None:
        self.store = store.refresh()  # start from the latest committed version
        self.batch_tiles = max(TILES_PER_SHARD, batch_tiles)
        self.submit = submit
        self.attrs = dict(store.root.attrs)
        self.n_tiles: dict[str, int] = dict(self.attrs.get("n_tiles", {}))
        self._committed = dict(self.n_tiles)
        for product, n in self.n_tiles.items():  # repair after a commit that died before its commit point
            store._truncate(product, n)
        self.items = list(self.attrs.get("items", []))
        self.known_items = set(self.items)
        self.keys: list[str] = []
        self.result = CommitResult(version=store.version)
        self._seen: dict[str, set[str]] = {}
        self._hashes: dict[str, list[str]] = {}
        # images: staged rows not yet assigned to a write, and the end of the rows already assigned
        self._image_sources: dict[str, list[ImageSource]] = {}
        self._image_end: dict[str, int] = {}
        self._images: dict[str, zarr.Array] = {}  # the images arrays being appended to
        # per-tile columns: pending rows (kept on the driver, written in chunk-sized batches)
        self._columns: dict[str, list[dict[str, np.ndarray]]] = {}
        self._futures: list[Any] = []
        self._rejections: list[Rejection] = []
        self._product_attrs: dict[str, dict[str, Any]] = {}  # bands / dtype / tile size, read once

    def _existing(self, product: str) -> set[str]:
        if product not in self._seen:
            n = self.n_tiles.get(product, 0)
            if n:
                group = self.store.root[product]
                self._seen[product] = set(_identities(group["item_id"][:n], group["window"][:n]))
                self._hashes[product] = list(group["tile_hash"][:n])
            else:
                self._seen[product], self._hashes[product] = set(), []
        return self._seen[product]

    def _flush_images(self, product: str, final: bool = False) -> None:
        """Assign pending staged rows to image rows and copy them; before the end only up to a shard
        boundary (no shard is written twice). With ``submit`` the copies are tasks of
        `SHARDS_PER_COPY_TASK` shards, and before the end only whole tasks go; else all is local."""
        sources = self._image_sources.pop(product, [])
        total = sum(len(rows) for _, rows in sources)
        if not total:
            return
        start = self._image_end.get(product, self._committed.get(product, 0))
        unit = TILES_PER_SHARD * (1 if self.submit is None else SHARDS_PER_COPY_TASK)
        count = total if final else (start + total) // unit * unit - start  # whole shards / copy tasks
        if count <= 0:
            self._image_sources[product] = sources
            return
        if product not in self._images:
            self._images[product] = self.store.root[product]["images"]
        images, end = self._images[product], start + count
        if images.shape[0] < end:  # grown ahead (fewer metadata writes), cut to size by `finish`
            images.resize((end + IMAGE_ROWS_AHEAD, *images.shape[1:]))
        self._image_end[product] = end
        if self.submit is None:
            part, sources = _split_sources(sources, count)
            _copy_image_rows(self.store.root.store, product, start, part)
        else:  # up to SHARDS_PER_COPY_TASK shards a task, one at the end (to spread the last copies)
            uri, options = self.store.uri, self.store.storage_options
            step = TILES_PER_SHARD * (1 if final else SHARDS_PER_COPY_TASK)
            mid_shard = start % TILES_PER_SHARD  # then the first task only fills up that shard
            first = start + step if not mid_shard else start - mid_shard + TILES_PER_SHARD
            bounds = [start, *range(first, end, step), end]
            for row, stop in itertools.pairwise(bounds):
                part, sources = _split_sources(sources, stop - row)
                self._futures.append(self.submit(write_image_rows, uri, options, product, row, part))
        if sources:
            self._image_sources[product] = sources

    def _flush_columns(self, product: str) -> None:
        batch = self._columns.pop(product, [])
        if batch:
            cols = {name: np.concatenate([b[name] for b in batch]) for name in batch[0]}
            self.n_tiles[product] = self.store._append_columns(product, self.n_tiles.get(product, 0), cols)

    def add(self, staged: str | StagedScene) -> None:
        """Queue the tiles of one staged scene (new identities only) and its rejections; whole shards of
        images are copied as soon as they are complete."""
        store, result = self.store, self.result
        key = staged.key if isinstance(staged, StagedScene) else staged
        if isinstance(staged, StagedScene) and staged.contents is not None:
            sattrs, products, scene_rejections = staged.contents  # as the worker staged it: no read back
            scene_rejections = list(scene_rejections)
        else:
            if key not in store.root[STAGING] or not store.root[f"{STAGING}/{key}"].attrs.get("complete"):
                raise StoreError(f"{store.uri}: staged scene {key!r} is missing or incomplete")
            sattrs, products, scene_rejections = store._read_staged(key)
        self.keys.append(key)
        item_id = sattrs["item_id"]
        for product, part in products.items():
            if product not in self._product_attrs:  # created by the first scene that has it
                self._product_attrs[product] = dict(store._ensure_product(product, part).attrs)
            problem = _mismatch(part, self._product_attrs[product])
            if problem:
                scene_rejections.append(Rejection(item_id, f"store: {problem}", -1, product))
                continue
            cols = part.columns
            ids = _identities(cols["item_id"], cols["window"])
            have = self._existing(product)
            keep = np.zeros(len(ids), dtype=bool)
            for row, ident in enumerate(ids):  # also collapses duplicates inside the scene
                if ident not in have:
                    keep[row] = True
                    have.add(ident)
            if skipped := int((~keep).sum()):
                result.skipped_duplicates[product] = result.skipped_duplicates.get(product, 0) + skipped
            if not keep.any():
                continue
            kept = {name: arr[keep] for name, arr in cols.items()}
            self._hashes[product].extend(kept["tile_hash"].tolist())
            self._image_sources.setdefault(product, []).append((key, np.flatnonzero(keep)))
            self._columns.setdefault(product, []).append(kept)
            result.added_tiles[product] = result.added_tiles.get(product, 0) + int(keep.sum())
            if sum(len(rows) for _, rows in self._image_sources[product]) >= self.batch_tiles:
                self._flush_images(product)
            if sum(len(b["item_id"]) for b in self._columns[product]) >= COLUMN_CHUNK:
                self._flush_columns(product)
        if item_id not in self.known_items:
            self._rejections.extend(scene_rejections)  # an item already committed keeps its old log
            if not sattrs.get("scene_rejected"):
                self.known_items.add(item_id)
                self.items.append(item_id)
                result.items_added.append(item_id)

    def _wait(self) -> None:
        """Wait for every submitted image copy; on a failure wait for the rest too, then raise.

        ``exception()`` rather than ``result()``: a Dask future's result is fetched from its worker, one
        round trip per copy, and the copies return nothing the commit needs."""
        futures, self._futures = self._futures, []
        error: BaseException | None = None
        for future in futures:
            try:
                failure = future.exception()
                if failure is None and future.cancelled():  # a Dask future's exception() is None then
                    failure = CancelledError(f"image copy {future!r} was cancelled")
            except BaseException as err:  # noqa: BLE001 - re-raised below, after the others finished
                failure = err
            error = error or failure
        if error is not None:
            raise error

    def finish(self) -> CommitResult:
        """Write the rest, then the commit point (root attrs), then delete the staging groups."""
        store, result, attrs, n_tiles = self.store, self.result, self.attrs, self.n_tiles
        n_rejected = int(attrs.get("n_rejected", 0))
        try:  # the driver writes columns and rejections while the last image copies run
            for product in list(self._image_sources):
                self._flush_images(product, final=True)
            for product in list(self._columns):
                self._flush_columns(product)
            if self._rejections:
                n_rejected = store._append_rejections(n_rejected, self._rejections)
            else:
                store._truncate_rejections(n_rejected)
        finally:
            self._wait()  # no copy may still be running once this returns or raises
        for product, images in self._images.items():
            if images.shape[0] != n_tiles[product]:
                images.resize((n_tiles[product], *images.shape[1:]))
        result.rejected = list(self._rejections)
        all_hashes = [
            h
            for p in n_tiles
            for h in (self._hashes[p] if p in self._hashes else store._hashes(p, n_tiles[p]))
        ]
        content_hash = combine_hashes(all_hashes)
        if result.added_tiles or self._rejections or result.items_added:
            now = _now()
            version = store.version + 1
            entry = {
                "version": version,
                "created": now,
                "n_tiles": dict(n_tiles),
                "n_rejected": n_rejected,
                "items_added": result.items_added,
                "added_tiles": result.added_tiles,
                "content_hash": content_hash,
            }
            # THE commit point: one atomic write of the root metadata (zarr's `attrs.update` would write
            # once per key, leaving a half-updated root after a crash between two of them).
            store.root.update_attributes(
                {
                    "n_tiles": n_tiles,
                    "n_rejected": n_rejected,
                    "items": self.items,
                    "content_hash": content_hash,
                    "versions": [*attrs.get("versions", []), entry],
                    "updated": now,
                }
            )
            for product, n in n_tiles.items():  # a mirror for people browsing the product group
                store.root[product].attrs["n_tiles"] = n
            result.version = version
        result.content_hash = content_hash
        store.discard_staged(self.keys)
        return result


def _split_sources(sources: list[ImageSource], n: int) -> tuple[list[ImageSource], list[ImageSource]]:
    """The first ``n`` rows of ``sources`` and the rest."""
    head: list[ImageSource] = []
    rest = list(sources)
    while n > 0:
        key, rows = rest.pop(0)
        if len(rows) > n:
            rest.insert(0, (key, rows[n:]))
            rows = rows[:n]
        head.append((key, rows))
        n -= len(rows)
    return head, rest


_batching_lock = threading.Lock()
_batching_users = 0
_batching_saved: Any = None


@contextmanager
def _shard_batching() -> Iterator[None]:
    """Let zarr encode a shard's inner chunks (one per tile) in one batch, not one by one (about a third
    faster). The zarr setting is process-wide, so concurrent users share it; the last one restores it."""
    global _batching_users, _batching_saved
    with _batching_lock:
        if _batching_users == 0:
            _batching_saved = zarr.config.get("codec_pipeline.batch_size")
            zarr.config.set({"codec_pipeline.batch_size": TILES_PER_SHARD})
        _batching_users += 1
    try:
        yield
    finally:
        with _batching_lock:
            _batching_users -= 1
            if _batching_users == 0:
                zarr.config.set({"codec_pipeline.batch_size": _batching_saved})


def _copy_image_rows(zstore: Any, product: str, start: int, sources: list[ImageSource]) -> int:
    parts = []
    for key, rows in sources:
        staged = zarr.open_array(zstore, path=f"{STAGING}/{key}/images-{product}", mode="r", zarr_format=3)
        lo, hi = int(rows[0]), int(rows[-1]) + 1  # rows ascend
        block = staged[lo:hi]
        parts.append(block if hi - lo == len(rows) else block[rows - lo])
    data = np.concatenate(parts) if len(parts) > 1 else parts[0]
    images = zarr.open_array(zstore, path=f"{product}/images", mode="r+", zarr_format=3)
    images = images.with_config(WRITE_EVERY_CHUNK)
    if images.shape[0] < start + len(data):
        raise StoreError(
            f"{product}/images has {images.shape[0]} rows, cannot write rows {start}..{start + len(data)}"
        )
    with _shard_batching():
        images[start : start + len(data)] = data
    return len(data)


def write_image_rows(
    uri: str,
    storage_options: Mapping[str, Any] | None,
    product: str,
    start: int,
    sources: list[ImageSource],
) -> int:
    """Copy staged tiles into ``/<product>/images[start:]`` (a task of `CommitTransaction`, on a worker).

    ``sources`` are ``(staging key, ascending rows of its images-<product> array)``; returns the rows written.
    """
    return _copy_image_rows(make_zarr_store(uri, storage_options=storage_options), product, start, sources)


# ---------------------------------------------------------------------- latents (written by training)
def has_latents(store_uri: str, product: str, *, storage_options: Mapping[str, Any] | None = None) -> bool:
    store = DatasetStore.open(store_uri, storage_options=storage_options, read_only=True)
    return "latents" in store.product_group(product)


def write_latents(
    store_uri: str,
    product: str,
    latents: np.ndarray,
    start: int,
    attrs: Mapping[str, Any] | None = None,
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> None:
    """Write VAE latents (n, C, h, w) for committed tiles ``start .. start+n`` into ``/<product>/latents``.

    The array is float16 (tile, latent_channel, latent_y, latent_x), one chunk per tile, NaN where not yet
    computed; ``attrs`` (e.g. ``vae_id``, ``scaling_factor``) go on the array. Later commits grow it.
    """
    store = DatasetStore.open(store_uri, storage_options=storage_options)
    group = store.product_group(product)
    n = store.n_tiles(product)
    latents = np.asarray(latents)
    if latents.ndim != 4:
        raise StoreError(f"{store_uri}/{product}: latents must be (n, C, h, w), got {latents.shape}")
    if start < 0 or start + len(latents) > n:
        raise StoreError(f"{store_uri}/{product}: rows {start}..{start + len(latents)} outside the {n} tiles")
    if "latents" not in group:
        group.create_array(
            "latents",
            shape=(n, *latents.shape[1:]),
            dtype=np.float16,
            chunks=(1, *latents.shape[1:]),
            fill_value=np.nan,
            dimension_names=["tile", "latent_channel", "latent_y", "latent_x"],
        )
    arr = group["latents"]
    if tuple(arr.shape[1:]) != latents.shape[1:]:
        raise StoreError(
            f"{store_uri}/{product}: latents {latents.shape[1:]} differ from stored {arr.shape[1:]}"
        )
    if arr.shape[0] < n:
        arr.resize((n, *arr.shape[1:]))
    arr[start : start + len(latents)] = latents.astype(np.float16)
    if attrs:
        arr.update_attributes(dict(attrs))


__all__ = [
    "SCHEMA_VERSION",
    "CommitResult",
    "CommitTransaction",
    "DatasetStore",
    "StagedScene",
    "StoreError",
    "combine_hashes",
    "has_latents",
    "make_zarr_store",
    "staging_key",
    "tile_hashes",
    "write_image_rows",
    "write_latents",
]
