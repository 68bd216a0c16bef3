"""`TileDataset` over a synthetic store: samples, filters, resizing, latents, DataLoader workers."""

from __future__ import annotations

import gc
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dsat_core.data.dataset import TileDataset
from dsat_core.data.store import DatasetStore, StoreError, write_latents
from dsat_core.data.synthetic import make_synthetic_store, synthetic_scene
from dsat_core.metadata import SatMetadata


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    # 4 scenes: Havelland 2016 (sentinel-2a), Porto Velho 2017 (landsat-8), Tiris Zemmour 2018, Andros 2019
    path = tmp_path_factory.mktemp("dataset") / "s.zarr"
    return make_synthetic_store(
        str(path), n_scenes=4, tiles_per_scene=4, size=16, products=("rgb", "multispectral")
    )


def test_sample_contents(store_uri: str) -> None:
    ds = TileDataset(store_uri)
    assert len(ds) == 16 and ds.bands == ["red", "green", "blue"]
    sample = ds[5]
    assert sample["pixel_values"].shape == (3, 16, 16) and sample["pixel_values"].dtype == torch.float32
    assert sample["pixel_values"].min() >= -1.0 and sample["pixel_values"].max() <= 1.0
    scene = synthetic_scene(1, 4, 16, ("rgb",))
    expected = torch.from_numpy(scene.products["rgb"].images[1].astype(np.float32)) / 255 * 2 - 1
    torch.testing.assert_close(sample["pixel_values"], expected)
    vector, mask = scene.products["rgb"].metadata[1].encode()
    torch.testing.assert_close(sample["metadata"], torch.from_numpy(vector.astype(np.float32)))
    assert sample["metadata_mask"].dtype == torch.bool and sample["metadata_mask"].tolist() == mask.tolist()
    assert not sample["metadata_mask"][3]  # scene 1 (landsat-8) has unknown cloud cover
    assert sample["metadata"][3] == 0
    assert sample["caption"] == scene.products["rgb"].caption[1] and sample["item_id"] == scene.item_id
    assert sample["index"] == 5
    assert ds[-1]["index"] == 15
    with pytest.raises(IndexError):
        ds[16]


def test_uint16_product_scaled_by_dtype_max(store_uri: str) -> None:
    ds = TileDataset(store_uri, "multispectral")
    raw = synthetic_scene(0, 4, 16, ("multispectral",)).products["multispectral"].images[0]
    torch.testing.assert_close(ds[0]["pixel_values"], torch.from_numpy(raw / 65535.0 * 2 - 1).float())
    assert ds[0]["pixel_values"].shape[0] == 4


def test_filters(store_uri: str) -> None:
    germany = TileDataset(store_uri, bbox=(12.0, 52.0, 14.0, 53.5))
    assert len(germany) == 4 and {germany[i]["item_id"] for i in range(4)} == {synthetic_scene(0).item_id}
    landsat = TileDataset(store_uri, platform="landsat-8")
    assert len(landsat) == 8 and set(landsat._platforms.tolist()) == {"landsat-8"}
    both = TileDataset(store_uri, platform=["landsat-8", "sentinel-2a"])
    assert len(both) == 16
    dated = TileDataset(store_uri, start="2017-01-01", end="2018-12-31")
    years = {dated.metadata(i).year for i in range(len(dated))}
    assert years == {2017, 2018} and len(dated) == 8
    assert len(TileDataset(store_uri, start="2019-01-01", platform="sentinel-2a")) == 0
    assert len(TileDataset(store_uri, bbox=(0.0, 0.0, 1.0, 1.0))) == 0


def test_resolution_and_effective_gsd(store_uri: str) -> None:
    native = TileDataset(store_uri)
    ds = TileDataset(store_uri, resolution=32)
    sample = ds[0]
    assert sample["pixel_values"].shape == (3, 32, 32)
    gsd = SatMetadata.decode(sample["metadata"].double().numpy(), sample["metadata_mask"].numpy()).gsd
    assert gsd == pytest.approx(native.metadata(0).gsd * 16 / 32)
    # a transform sees and may change the whole sample
    flipped = TileDataset(store_uri, transform=lambda s: {**s, "pixel_values": s["pixel_values"].flip(-1)})
    torch.testing.assert_close(flipped[0]["pixel_values"], native[0]["pixel_values"].flip(-1))


def test_latents(tmp_path: Path) -> None:
    uri = make_synthetic_store(str(tmp_path / "l.zarr"), n_scenes=1, tiles_per_scene=3, size=16)
    with pytest.raises(StoreError, match="no latents"):
        TileDataset(uri, return_latents=True)
    latents = np.arange(3 * 4 * 2 * 2, dtype=np.float32).reshape(3, 4, 2, 2) / 10
    write_latents(uri, "rgb", latents[:2], 0, {"vae_id": "x", "scaling_factor": 0.18215})
    ds = TileDataset(uri, return_latents=True)
    torch.testing.assert_close(ds[1]["latents"], torch.from_numpy(latents[1]).half().float())
    with pytest.raises(StoreError, match="not computed"):
        ds[2]


def _fd_count(target: int | None = None) -> int:
    """Open fds of this process; with ``target``, wait (≤ 3 s) for worker pipes to finish closing."""
    for _ in range(30):
        gc.collect()
        count = len(os.listdir("/proc/self/fd"))
        if target is None or count <= target:
            break
        time.sleep(0.1)
    return count


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc")
def test_dataloader_workers_fork_safe_no_fd_leak(store_uri: str) -> None:
    ds = TileDataset(store_uri, resolution=16)
    ds[0]  # the parent opens its own handles first: workers must not reuse them
    state = pickle.loads(pickle.dumps(ds))
    assert state._arrays == {} and state._pid is None
    loader = DataLoader(ds, batch_size=4, num_workers=2, multiprocessing_context="fork", shuffle=True)
    before = _fd_count()
    counts = []
    for _ in range(3):
        indices = []
        for batch in loader:
            assert batch["pixel_values"].shape[1:] == (3, 16, 16) and batch["metadata"].shape[1:] == (7,)
            indices += batch["index"].tolist()
        assert sorted(indices) == list(range(16))
        del batch  # a batch holds shared-memory fds until it is freed
        counts.append(_fd_count(before))
    assert counts == [before] * 3, (before, counts)


def test_store_ordering_consistent_with_xarray(store_uri: str) -> None:
    ds = TileDataset(store_uri, platform="landsat-8")
    xds = DatasetStore.open(store_uri).open_xarray("rgb")
    row = ds[3]["index"]
    assert ds[3]["caption"] == str(xds.caption.values[row])
    np.testing.assert_allclose(
        (ds[3]["pixel_values"].numpy() + 1) / 2 * 255, xds.images.values[row], atol=1e-3
    )


def test_train_holdout_split_is_deterministic_disjoint_and_stable(store_uri: str, tmp_path: Path) -> None:
    import hashlib

    from dsat_core.data.dataset import holdout_score

    full = TileDataset(store_uri)
    train = TileDataset(store_uri, split="train", holdout_fraction=0.3)
    held = TileDataset(store_uri, split="holdout", holdout_fraction=0.3)
    rows_train, rows_held = set(train.indices.tolist()), set(held.indices.tolist())
    assert rows_train.isdisjoint(rows_held) and rows_train | rows_held == set(full.indices.tolist())
    assert 0 < len(held) < len(full)
    # the rule, recomputed by hand from the store's identity columns: sha256("item:x,y,w,h") < fraction
    group = DatasetStore.open(store_uri).product_group("rgb")
    for row in range(len(full)):
        identity = f"{group['item_id'][row]}:{','.join(str(int(v)) for v in group['window'][row])}"
        score = int.from_bytes(hashlib.sha256(identity.encode()).digest()[:8], "big") / 2.0**64
        assert score == holdout_score(str(group["item_id"][row]), group["window"][row])
        assert (row in rows_held) == (score < 0.3)
    # combined with other filters, and the extremes
    assert set(
        TileDataset(store_uri, split="holdout", holdout_fraction=0.3, platform="landsat-8").indices
    ) <= (rows_held)
    assert len(TileDataset(store_uri, split="holdout", holdout_fraction=0.0)) == 0
    assert len(TileDataset(store_uri, split="train", holdout_fraction=1.0)) == 0
    # a store holding the same scenes plus another, written in another order, holds out the same tiles
    from dsat_core.data.synthetic import synthetic_catalog

    def held_identities(uri: str) -> set[str]:
        grp = DatasetStore.open(uri).product_group("rgb")
        rows = TileDataset(uri, split="holdout", holdout_fraction=0.3).indices
        return {f"{grp['item_id'][r]}:{list(grp['window'][r])}" for r in rows}

    other = str(tmp_path / "other.zarr")
    store = DatasetStore.open(other, create=True, catalog=synthetic_catalog(("rgb", "multispectral"), 16))
    store.commit([store.stage(synthetic_scene(i, 4, 16, ("rgb", "multispectral"))) for i in (5, 3, 2, 1, 0)])
    assert held_identities(store_uri) <= held_identities(other)
    with pytest.raises(ValueError, match="split"):
        TileDataset(store_uri, split="test")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="holdout_fraction"):
        TileDataset(store_uri, split="holdout", holdout_fraction=1.5)
