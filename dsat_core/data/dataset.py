"""`TileDataset`: a PyTorch map-style dataset over one product of a dataset store."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from datetime import date, datetime
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
import zarr
from torch.utils.data import Dataset

from dsat_core.data.store import DatasetStore, StoreError, make_zarr_store
from dsat_core.metadata import FIELD_NAMES, effective_gsd, from_arrays


def _as_date(value: str | date | datetime | None) -> tuple[int, int, int] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return (value.year, value.month, value.day)


def holdout_score(item_id: str, window: Sequence[int]) -> float:
    """A tile's place in [0, 1) for the train / holdout split: sha256 of its identity (item id + window).

    Stable across processes, machines and store order (unlike Python's salted ``hash``), and independent of
    every other tile, so adding scenes to the store never moves an existing tile between the splits.
    """
    identity = f"{item_id}:{','.join(str(int(v)) for v in window)}"
    digest = hashlib.sha256(identity.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def holdout_mask(item_ids: Sequence[str] | np.ndarray, windows: np.ndarray, fraction: float) -> np.ndarray:
    """bool (N,): True where a tile is held out (its `holdout_score` is below ``fraction``)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1], got {fraction}")
    scores = [holdout_score(str(i), w) for i, w in zip(np.asarray(item_ids).tolist(), windows, strict=True)]
    return np.asarray(scores, dtype=np.float64) < fraction


class TileDataset(Dataset):
    """Tiles of ``product`` from the store at ``store_uri``, optionally filtered.

    Filters (computed once at construction from the small per-tile arrays): ``bbox`` (lon_min, lat_min,
    lon_max, lat_max) on the tile centre, ``start`` / ``end`` (inclusive dates; tiles without a date are
    dropped when either is given), ``platform`` (one name or several), ``split`` ("train" / "holdout": a
    deterministic split by tile identity, a tile is held out when its `holdout_score` < ``holdout_fraction``;
    training uses "train", evaluation "holdout").

    Each sample is a dict: ``pixel_values`` float32 (C, H, W) in [-1, 1] (resized to ``resolution`` when
    given, and then ``metadata`` carries the effective GSD), ``metadata`` float32 (7,) (`SatMetadata.encode`),
    ``metadata_mask`` bool (7,), ``caption``, ``index`` (row in the store), ``item_id`` and, with
    ``return_latents``, ``latents`` float32 (C, h, w). ``transform`` is applied to the whole dict.

    Only the URI travels to DataLoader workers: zarr arrays are opened lazily in each process (a pid change
    re-opens them), so forked workers never share a connection or a file handle.
    """

    def __init__(
        self,
        store_uri: str,
        product: str = "rgb",
        *,
        bbox: Sequence[float] | None = None,
        start: str | date | datetime | None = None,
        end: str | date | datetime | None = None,
        platform: str | Sequence[str] | None = None,
        resolution: int | None = None,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        storage_options: Mapping[str, Any] | None = None,
        return_latents: bool = False,
        split: Literal["train", "holdout"] | None = None,
        holdout_fraction: float = 0.1,
    ) -> None:
        self.store_uri = store_uri
        self.product = product
        self.resolution = resolution
        self.transform = transform
        self.storage_options = dict(storage_options or {})
        self.return_latents = return_latents
        if split not in (None, "train", "holdout"):
            raise ValueError(f"split must be 'train', 'holdout' or None, got {split!r}")
        self.split = split
        self.holdout_fraction = holdout_fraction
        store = DatasetStore.open(store_uri, storage_options=storage_options, read_only=True)
        group = store.product_group(product)
        n = store.n_tiles(product)
        self.n_store_tiles = n
        self.bands: list[str] = list(group.attrs["bands"])
        self.dtype = np.dtype(group.attrs["dtype"])
        self.content_hash = store.content_hash
        if return_latents and "latents" not in group:
            raise StoreError(f"{store_uri}/{product}: return_latents=True but the store has no latents")
        meta = {name: group[name][:n] for name in FIELD_NAMES}
        platforms = group["platform"][:n]
        keep = np.ones(n, dtype=bool)
        if bbox is not None:
            lon_min, lat_min, lon_max, lat_max = bbox
            with np.errstate(invalid="ignore"):
                keep &= (meta["lon"] >= lon_min) & (meta["lon"] <= lon_max)
                keep &= (meta["lat"] >= lat_min) & (meta["lat"] <= lat_max)
        if start is not None or end is not None:
            ymd = meta["year"] * 10_000 + meta["month"] * 100 + meta["day"]
            keep &= (meta["year"] >= 0) & (meta["month"] >= 0) & (meta["day"] >= 0)
            if (first := _as_date(start)) is not None:
                keep &= ymd >= first[0] * 10_000 + first[1] * 100 + first[2]
            if (last := _as_date(end)) is not None:
                keep &= ymd <= last[0] * 10_000 + last[1] * 100 + last[2]
        if platform is not None:
            wanted = [platform] if isinstance(platform, str) else list(platform)
            keep &= np.isin(platforms.astype(object), wanted)
        if split is not None:
            held = holdout_mask(group["item_id"][:n], np.asarray(group["window"][:n]), holdout_fraction)
            keep &= held if split == "holdout" else ~held
        self.indices = np.nonzero(keep)[0]
        self._meta = {name: values[self.indices] for name, values in meta.items()}
        self._captions = group["caption"][:n][self.indices]
        self._item_ids = group["item_id"][:n][self.indices]
        self._platforms = platforms[self.indices]
        self._pid: int | None = None
        self._arrays: dict[str, zarr.Array] = {}

    # ------------------------------------------------------------------ process-local zarr handles
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_arrays"], state["_pid"] = {}, None
        return state

    def _array(self, name: str) -> zarr.Array:
        if self._pid != os.getpid():  # first use, or we are in a forked / spawned worker
            store = make_zarr_store(self.store_uri, storage_options=self.storage_options, read_only=True)
            group = zarr.open_group(store, path=self.product, mode="r", zarr_format=3, use_consolidated=False)
            self._arrays = {"images": group["images"]}
            if self.return_latents:
                self._arrays["latents"] = group["latents"]
            self._pid = os.getpid()
        return self._arrays[name]

    # ------------------------------------------------------------------ Dataset
    def __len__(self) -> int:
        return len(self.indices)

    def metadata(self, i: int):
        """`SatMetadata` of sample ``i`` as stored (native GSD)."""
        return from_arrays(self._meta, i)

    @property
    def item_ids(self) -> list[str]:
        """The item id of every sample, in order (read at construction: no pixels)."""
        return [str(v) for v in np.asarray(self._item_ids).tolist()]

    @property
    def platforms(self) -> list[str]:
        """The platform (sensor) of every sample, in order."""
        return [str(v) for v in np.asarray(self._platforms).tolist()]

    def item_id(self, i: int) -> str:
        """The item id of sample ``i``."""
        return str(self._item_ids[i])

    def stored_image(self, i: int) -> np.ndarray:
        """Sample ``i``'s pixels as stored: (C, H, W) in the store's dtype, at the stored tile size."""
        return np.asarray(self._array("images")[int(self.indices[i])])

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} tiles")
        i = int(i) % len(self)
        row = int(self.indices[i])
        image = torch.from_numpy(self.stored_image(i).astype(np.float32))
        image = image / float(np.iinfo(self.dtype).max) * 2.0 - 1.0
        meta = self.metadata(i)
        if self.resolution is not None and tuple(image.shape[1:]) != (self.resolution, self.resolution):
            short_side = min(image.shape[1:])
            image = F.interpolate(
                image[None],
                size=(self.resolution, self.resolution),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )[0].clamp_(-1.0, 1.0)
            if meta.gsd is not None:
                meta = meta.replace(gsd=effective_gsd(meta.gsd, short_side, self.resolution))
        vector, mask = meta.encode()
        sample: dict[str, Any] = {
            "pixel_values": image.contiguous(),
            "metadata": torch.from_numpy(vector.astype(np.float32)),
            "metadata_mask": torch.from_numpy(mask),
            "caption": str(self._captions[i]),
            "index": row,
            "item_id": self.item_id(i),
        }
        if self.return_latents:
            latents = np.asarray(self._array("latents")[row]).astype(np.float32)
            if np.isnan(latents).any():
                raise StoreError(f"{self.store_uri}/{self.product}: latents of tile {row} are not computed")
            sample["latents"] = torch.from_numpy(latents)
        return self.transform(sample) if self.transform is not None else sample

    def __repr__(self) -> str:
        return (
            f"TileDataset({self.store_uri!r}, product={self.product!r}, tiles={len(self)}/"
            f"{self.n_store_tiles}, bands={self.bands})"
        )


__all__ = ["TileDataset", "holdout_mask", "holdout_score"]
