"""Precompute VAE latents of every committed tile once and keep them in the store (`/<product>/latents`).

The array's attrs say which VAE made them (`vae_id`, a fingerprint of its config and weights), the
`scaling_factor` applied, the pixel `resolution` encoded and how many leading tiles are done
(`encoded_tiles`; commits only append, so new tiles are encoded incrementally). A different VAE or
resolution re-encodes everything.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL

from dsat_core.data.dataset import TileDataset
from dsat_core.data.store import DatasetStore, write_latents
from dsat_core.models.vae import encode_latents, vae_scale_factor


@dataclass(frozen=True)
class LatentCacheResult:
    store_uri: str
    product: str
    vae_id: str
    n_tiles: int
    n_encoded: int  # tiles encoded by this call (0 when the cache was already complete)
    latent_shape: tuple[int, ...]


def vae_fingerprint(vae: AutoencoderKL) -> str:
    """Stable id of a VAE: sha256 over its config and its weights (first 16 hex digits)."""
    digest = hashlib.sha256()
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return f"{type(vae).__name__}-{digest.hexdigest()[:16]}"


def latent_cache_info(
    store_uri: str, product: str, *, storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """Attrs of the product's latents array (plus `n_tiles` of the product), or None when there is none."""
    store = DatasetStore.open(store_uri, storage_options=storage_options, read_only=True)
    group = store.product_group(product)
    if "latents" not in group:
        return None
    arr = group["latents"]
    return {**dict(arr.attrs), "shape": tuple(arr.shape), "n_tiles": store.n_tiles(product)}


def is_cache_complete(
    store_uri: str,
    product: str,
    vae_id: str,
    resolution: int | None = None,
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> bool:
    info = latent_cache_info(store_uri, product, storage_options=storage_options)
    return bool(
        info
        and info.get("vae_id") == vae_id
        and (resolution is None or info.get("resolution") == resolution)
        and int(info.get("encoded_tiles", 0)) >= info["n_tiles"]
    )


@torch.no_grad()
def precompute_latents(
    store_uri: str,
    product: str,
    vae: AutoencoderKL,
    batch_size: int = 16,
    *,
    resolution: int | None = None,
    vae_id: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    device: torch.device | str | None = None,
) -> LatentCacheResult:
    """Encode every committed tile of `product` with `vae` (posterior mean × scaling factor) into the store.

    Skips tiles already encoded by the same VAE at the same `resolution` (None = the tiles' own size).
    Run it on one process (the training script does it on the main process before the others read).
    """
    vae_id = vae_id or vae_fingerprint(vae)
    device = torch.device(device) if device is not None else next(vae.parameters()).device
    vae = vae.to(device).eval()
    dataset = TileDataset(store_uri, product, resolution=resolution, storage_options=storage_options)
    n = dataset.n_store_tiles
    if len(dataset) != n:  # unfiltered dataset: row i of the dataset is tile i of the store
        raise RuntimeError(f"{store_uri}/{product}: unfiltered dataset has {len(dataset)} of {n} tiles")
    if n == 0:
        raise ValueError(f"{store_uri}/{product}: no committed tiles to encode")
    side = resolution or int(dataset[0]["pixel_values"].shape[-1])
    factor = vae_scale_factor(vae)
    latent_shape = (int(vae.config.latent_channels), side // factor, side // factor)

    info = latent_cache_info(store_uri, product, storage_options=storage_options)
    start = 0
    if info is not None:
        same = info.get("vae_id") == vae_id and info.get("resolution") == side
        if same and tuple(info["shape"][1:]) == latent_shape:
            start = int(info.get("encoded_tiles", 0))
        else:  # another VAE or resolution: drop the old cache
            group = DatasetStore.open(store_uri, storage_options=storage_options).product_group(product)
            del group["latents"]
    attrs = {
        "vae_id": vae_id,
        "scaling_factor": float(vae.config.scaling_factor),
        "shift_factor": float(getattr(vae.config, "shift_factor", None) or 0.0),
        "resolution": side,
        "posterior": "mean",
    }
    for begin in range(start, n, batch_size):
        rows = range(begin, min(begin + batch_size, n))
        pixels = torch.stack([dataset[i]["pixel_values"] for i in rows])
        latents = encode_latents(vae, pixels.to(device)).float().cpu().numpy()
        if not np.isfinite(latents).all():
            raise ValueError(
                f"{store_uri}/{product}: VAE gave non-finite latents for tiles {begin}..{rows[-1]}"
            )
        write_latents(
            store_uri,
            product,
            latents,
            begin,
            {**attrs, "encoded_tiles": rows[-1] + 1},
            storage_options=storage_options,
        )
    return LatentCacheResult(store_uri, product, vae_id, n, max(0, n - start), latent_shape)


class CachedLatentDataset(torch.utils.data.Dataset):
    """Training samples from the latent cache, held in memory (float16); no image is read or decoded.

    Uses the rows (filters) of `tiles` (a `TileDataset`) and yields what it yields minus `pixel_values`:
    `latents` float32 (4, h, w), `metadata` (with the GSD of the `resolution` px the latents encode),
    `metadata_mask`, `caption`, `index`, `item_id`.
    """

    def __init__(self, tiles: TileDataset, vae_id: str | None = None):
        from dsat_core.metadata import effective_gsd, encode_batch

        store = DatasetStore.open(tiles.store_uri, storage_options=tiles.storage_options, read_only=True)
        group = store.product_group(tiles.product)
        if "latents" not in group:
            raise ValueError(f"{tiles.store_uri}/{tiles.product}: no latent cache (run precompute_latents)")
        arr = group["latents"]
        attrs = dict(arr.attrs)
        if vae_id is not None and attrs.get("vae_id") != vae_id:
            raise ValueError(
                f"{tiles.store_uri}/{tiles.product}: latents come from VAE {attrs.get('vae_id')!r}, "
                f"not {vae_id!r}"
            )
        rows = np.asarray(tiles.indices, dtype=np.int64)
        if len(rows) and rows.max() >= int(attrs.get("encoded_tiles", 0)):
            raise ValueError(
                f"{tiles.store_uri}/{tiles.product}: tiles beyond row {attrs.get('encoded_tiles', 0)} "
                "have no cached latents (run precompute_latents)"
            )
        latents = np.asarray(arr[: int(rows.max()) + 1] if len(rows) else arr[:0])[rows]
        if not np.isfinite(latents).all():
            raise ValueError(f"{tiles.store_uri}/{tiles.product}: the latent cache has non-finite rows")
        self.latents = torch.from_numpy(latents)  # float16 in memory
        n = store.n_tiles(tiles.product)
        self.captions = [str(c) for c in group["caption"][:n][rows]]
        self.item_ids = [str(c) for c in group["item_id"][:n][rows]]
        self.rows = rows
        side = int(group["images"].shape[-1])
        resolution = int(attrs.get("resolution", side))
        items = []
        for i in range(len(rows)):
            meta = tiles.metadata(i)
            if meta.gsd is not None and resolution != side:
                meta = meta.replace(gsd=effective_gsd(meta.gsd, side, resolution))
            items.append(meta)
        values, mask = encode_batch(items)
        self.metadata = torch.from_numpy(values.astype(np.float32))
        self.metadata_mask = torch.from_numpy(mask)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {
            "latents": self.latents[i].float(),
            "metadata": self.metadata[i],
            "metadata_mask": self.metadata_mask[i],
            "caption": self.captions[i],
            "index": int(self.rows[i]),
            "item_id": self.item_ids[i],
        }
