"""The store on S3 (a real moto server): write, read back with xarray, ingest, TileDataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from dsat_core.data.store import DatasetStore
from dsat_core.data.synthetic import make_synthetic_store, synthetic_catalog, synthetic_item, synthetic_reader


def test_store_on_s3_matches_local(s3_server: dict, s3_bucket: str, tmp_path: Path) -> None:
    uri = f"s3://{s3_bucket}/x.zarr"
    make_synthetic_store(uri, n_scenes=3, tiles_per_scene=2, size=16, storage_options=s3_server)
    local = make_synthetic_store(str(tmp_path / "x.zarr"), n_scenes=3, tiles_per_scene=2, size=16)

    remote = xr.open_zarr(uri, group="rgb", consolidated=False, storage_options=s3_server)
    expected = xr.open_zarr(local, group="rgb", consolidated=False)
    assert remote.sizes["tile"] == 6 and list(remote.band.values) == ["red", "green", "blue"]
    np.testing.assert_array_equal(remote.images.values, expected.images.values)
    for name in ("lon", "cloud_cover", "year", "transform", "window"):
        np.testing.assert_array_equal(remote[name].values, expected[name].values)
    assert list(remote.caption.values) == list(expected.caption.values)
    store = DatasetStore.open(uri, storage_options=s3_server)
    assert store.content_hash == DatasetStore.open(local).content_hash
    assert store.open_xarray("rgb").sizes["tile"] == 6


def test_idempotent_commit_and_dataset_on_s3(s3_server: dict, s3_bucket: str) -> None:
    from dsat_core.data.dataset import TileDataset

    uri = f"s3://{s3_bucket}/y.zarr"
    config = synthetic_catalog(size=16)
    store = DatasetStore.open(uri, storage_options=s3_server, create=True, catalog=config)
    scenes = [synthetic_reader(synthetic_item(i, tiles=2, rejected_tiles=1), config) for i in range(2)]
    first = store.commit([store.stage(s) for s in scenes])
    again = store.commit([store.stage(s) for s in scenes])
    assert (
        first.added_tiles == {"rgb": 4}
        and again.added_tiles == {}
        and again.content_hash == first.content_hash
    )
    assert len(store.rejected()) == 2 and store.staged() == []
    ds = TileDataset(uri, storage_options=s3_server, resolution=8)
    sample = ds[3]
    assert sample["pixel_values"].shape == (3, 8, 8) and sample["item_id"] == scenes[1].item_id


def test_shard_copies_on_workers_on_s3(s3_server: dict, s3_bucket: str, tmp_path: Path) -> None:
    """Whole shards copied by other threads through their own S3 connections: same store as a local commit."""
    from concurrent.futures import ThreadPoolExecutor

    from dsat_core.data.synthetic import synthetic_scene

    uri = f"s3://{s3_bucket}/shards.zarr"
    config = synthetic_catalog(size=8)
    store = DatasetStore.open(uri, storage_options=s3_server, create=True, catalog=config)
    local = DatasetStore.open(str(tmp_path / "l.zarr"), create=True, catalog=config)
    scenes = [synthetic_scene(i, 50, 8) for i in range(3)]  # 150 tiles: two whole shards and a tail
    with ThreadPoolExecutor(2) as pool:
        result = store.commit([store.stage(s) for s in scenes], batch_tiles=64, submit=pool.submit)
    local.commit([local.stage(s) for s in scenes])
    assert result.added_tiles == {"rgb": 150} and store.content_hash == local.content_hash
    np.testing.assert_array_equal(
        store.open_xarray("rgb").images.values, local.open_xarray("rgb").images.values
    )
