"""The versioned Zarr store: layout, idempotence, order-independent hash, crash safety, rejections."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from dsat_core.data.store import DatasetStore, StoreError, has_latents, write_latents
from dsat_core.data.synthetic import (
    make_scene_tiles,
    make_synthetic_store,
    synthetic_catalog,
    synthetic_scene,
)
from dsat_core.data.tiles import Rejection, SceneTiles

REPO = Path(__file__).resolve().parents[1]


def _new(tmp_path: Path, name: str = "s.zarr") -> DatasetStore:
    return DatasetStore.open(str(tmp_path / name), create=True, catalog=synthetic_catalog())


def _ingest(store: DatasetStore, scenes: list[SceneTiles]):
    return store.commit([store.stage(s) for s in scenes])


def test_layout_readable_by_xarray(tmp_path: Path) -> None:
    uri = make_synthetic_store(str(tmp_path / "s.zarr"), n_scenes=2, tiles_per_scene=4, size=16)
    ds = xr.open_zarr(uri, group="rgb", consolidated=False)
    assert ds.images.dims == ("tile", "band", "y", "x")
    assert ds.images.dtype == np.uint8 and ds.sizes["tile"] == 8
    assert list(ds.band.values) == ["red", "green", "blue"]
    for name in (
        "lon",
        "lat",
        "gsd",
        "cloud_cover",
        "year",
        "month",
        "day",
        "caption",
        "item_id",
        "tile_hash",
    ):
        assert ds[name].dims == ("tile",), name
    assert ds.transform.shape == (8, 6) and ds.window.shape == (8, 4) and ds.scale_min.shape == (8, 3)
    # odd synthetic scenes have unknown cloud cover: NaN, never 0
    assert np.isnan(ds.cloud_cover.values[4:]).all() and not np.isnan(ds.cloud_cover.values[:4]).any()
    assert ds.caption.values[0].startswith("a satellite image of")
    images = zarr.open_group(uri, mode="r", path="rgb", use_consolidated=False)["images"]
    assert images.chunks == (1, 3, 16, 16) and images.shards == (64, 3, 16, 16)
    store = DatasetStore.open(uri)
    attrs = store.attrs
    assert attrs["schema_version"] == 1 and attrs["catalog"]["name"] == "synthetic"
    assert (
        attrs["n_tiles"] == {"rgb": 8} and len(attrs["items"]) == 2 and attrs["versions"][0]["version"] == 1
    )
    assert store.root["rgb"].attrs["n_tiles"] == 8 and store.root["rgb"].attrs["bands"] == [
        "red",
        "green",
        "blue",
    ]
    # the images read back exactly
    scene = synthetic_scene(0, 4, 16)
    np.testing.assert_array_equal(ds.images.values[:4], scene.products["rgb"].images)
    assert store.open_xarray("rgb").attrs["content_hash"] == store.content_hash


def test_open_missing_store_names_it(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no dataset store"):
        DatasetStore.open(str(tmp_path / "nothing.zarr"))


def test_catalog_mismatch_is_refused(tmp_path: Path) -> None:
    uri = str(tmp_path / "s.zarr")
    DatasetStore.open(uri, create=True, catalog=synthetic_catalog(size=32))
    with pytest.raises(StoreError, match="tile_size"):
        DatasetStore.open(uri, catalog=synthetic_catalog(size=64))


def test_idempotent_commit(tmp_path: Path) -> None:
    store = _new(tmp_path)
    scenes = [synthetic_scene(i, 3, 16) for i in range(2)]
    first = _ingest(store, scenes)
    assert first.added_tiles == {"rgb": 6} and first.version == 1
    again = _ingest(store, scenes)
    assert again.added_tiles == {} and again.skipped_duplicates == {"rgb": 6}
    assert again.content_hash == first.content_hash and store.version == 1
    assert store.n_tiles("rgb") == 6
    assert store.staged() == []  # staging cleaned up


def test_hash_is_order_independent_and_content_sensitive(tmp_path: Path) -> None:
    scenes = [synthetic_scene(i, 2, 16) for i in range(3)]
    a, b = _new(tmp_path, "a.zarr"), _new(tmp_path, "b.zarr")
    _ingest(a, scenes)
    for scene in reversed(scenes):  # other order, one commit per scene
        _ingest(b, [scene])
    assert a.content_hash == b.content_hash and b.version == 3
    assert list(a.open_xarray("rgb").item_id.values) != list(b.open_xarray("rgb").item_id.values)
    c = _new(tmp_path, "c.zarr")
    changed = synthetic_scene(0, 2, 16)
    changed.products["rgb"].images[0, 0, 0, 0] ^= 1  # one pixel differs
    _ingest(c, [changed, *scenes[1:]])
    assert c.content_hash != a.content_hash


def _rows_on_disk(uri: str) -> tuple[int, int]:
    """(rows of rgb/images, tiles committed) as the store's metadata files say, read as another process
    would; (0, 0) while a file is being rewritten."""
    try:
        images = json.loads((Path(uri) / "rgb" / "images" / "zarr.json").read_text())
        root = json.loads((Path(uri) / "zarr.json").read_text())
    except (OSError, json.JSONDecodeError):
        return 0, 0
    return images["shape"][0], root["attributes"]["n_tiles"]["rgb"]


def test_commit_killed_midway_is_invisible_and_the_next_commit_completes_it(tmp_path: Path) -> None:
    """A real kill: a process commits 16 staged scenes and is SIGKILLed once its image rows are on disk
    but before its commit point. Readers see the old version; the staged scenes survive; the next commit
    truncates the torn tail and gives the store a clean ingest would."""
    from dsat_core.data.dataset import TileDataset

    uri = make_synthetic_store(str(tmp_path / "s.zarr"), n_scenes=1, tiles_per_scene=4, size=16)
    hash_before = DatasetStore.open(uri).content_hash
    scenes = range(1, 17)  # 64 tiles each: the commit writes 16 shards, about a second of work
    script = textwrap.dedent(f"""
        from dsat_core.data.store import DatasetStore
        from dsat_core.data.synthetic import synthetic_scene
        store = DatasetStore.open({uri!r})
        staged = [store.stage(synthetic_scene(i, 64, 16)) for i in {list(scenes)!r}]
        store.commit(staged, batch_tiles=64)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while (rows := _rows_on_disk(uri))[0] <= rows[1] or rows[1] != 4:  # no torn tail yet
            assert proc.poll() is None, f"the commit ended before it was killed: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "no image rows written within 120 s"
            time.sleep(0.005)  # then read again; the kill follows the read that shows the torn tail
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()

    store = DatasetStore.open(uri)
    assert store.root["rgb"]["images"].shape[0] > 4  # the arrays did grow...
    assert store.n_tiles("rgb") == 4 and store.version == 1 and store.content_hash == hash_before  # ...unseen
    assert store.open_xarray("rgb").sizes["tile"] == 4 and len(TileDataset(uri, resolution=None)) == 4
    assert len(store.staged()) == len(scenes)  # every staged scene survived the kill

    result = store.commit()
    assert result.added_tiles == {"rgb": 64 * len(scenes)} and store.version == 2
    ds = store.open_xarray("rgb")
    identities = {(i, tuple(w)) for i, w in zip(ds.item_id.values, ds.window.values.tolist(), strict=True)}
    assert len(identities) == 4 + 64 * len(scenes) == store.root["rgb"]["images"].shape[0]
    clean = _new(tmp_path, "clean.zarr")
    _ingest(clean, [synthetic_scene(0, 4, 16), *(synthetic_scene(i, 64, 16) for i in scenes)])
    assert store.content_hash == clean.content_hash
    first = synthetic_scene(1, 64, 16)
    rows = ds.item_id.values == first.item_id
    np.testing.assert_array_equal(ds.images.values[rows], first.products["rgb"].images)


def test_commit_point_and_staging_completion_are_one_metadata_write_each(tmp_path: Path, monkeypatch) -> None:
    """A crash can fall between any two writes: the root's new version (items, counts, hash) and a staged
    scene's ``complete`` flag with its counts must each land in one write of their zarr.json."""
    store = _new(tmp_path)
    writes: list[tuple[str, list[str]]] = []
    save = zarr.core.group.AsyncGroup._save_metadata

    async def counting(self, *args, **kwargs):
        writes.append((self.store_path.path, sorted(self.metadata.attributes)))
        return await save(self, *args, **kwargs)

    monkeypatch.setattr(zarr.core.group.AsyncGroup, "_save_metadata", counting)
    staged = store.stage(synthetic_scene(1, 4, 16))
    completed = [keys for path, keys in writes if path.endswith(staged.key) and "complete" in keys]
    assert len(completed) == 1 and {"n_tiles", "item_id"} <= set(completed[0])
    writes.clear()
    store.commit([staged])
    root = [keys for path, keys in writes if path == "" and "versions" in keys]
    assert len(root) == 1, f"the commit wrote the root metadata {len(root)} times"
    assert store.version == 1 and store.n_tiles("rgb") == 4


def test_rejections_appended_across_commits(tmp_path: Path) -> None:
    store = _new(tmp_path)
    _ingest(store, [make_scene_tiles("a", n_tiles=2, size=16, rejected_tiles=2)])
    failed = SceneTiles("b", rejected=[Rejection("b", "HTTP 503 reading B04.tif")])
    result = _ingest(store, [failed, make_scene_tiles("c", n_tiles=1, size=16, rejected_tiles=1)])
    rejected = store.rejected()
    assert result.rejected == rejected[2:]  # what this commit appended, as the store now lists it
    assert [(r.item_id, r.tile_index) for r in rejected] == [("a", 2), ("a", 3), ("b", -1), ("c", 1)]
    assert rejected[0].product == "rgb" and rejected[2].reason == "HTTP 503 reading B04.tif"
    # a scene rejected whole is retried later (not recorded as ingested); its new failure is appended too
    assert store.ingested_items() == {"a", "c"}
    _ingest(store, [failed])
    assert len(store.rejected()) == 5
    # re-committing an already ingested item does not repeat its tile rejections
    _ingest(store, [make_scene_tiles("a", n_tiles=2, size=16, rejected_tiles=2)])
    assert len(store.rejected()) == 5


def test_mismatched_scene_becomes_rejection(tmp_path: Path) -> None:
    store = _new(tmp_path)
    _ingest(store, [make_scene_tiles("a", n_tiles=2, size=16)])
    wrong = make_scene_tiles("b", n_tiles=2, size=24)
    result = _ingest(store, [wrong])
    assert result.added_tiles == {} and "tile size" in store.rejected()[-1].reason
    assert store.rejected()[-1].item_id == "b"


def test_uint16_and_several_products(tmp_path: Path) -> None:
    uri = make_synthetic_store(
        str(tmp_path / "s.zarr"), n_scenes=2, tiles_per_scene=2, size=16, products=("rgb", "multispectral")
    )
    store = DatasetStore.open(uri)
    ms = store.open_xarray("multispectral")
    assert ms.images.dtype == np.uint16 and list(ms.band.values) == ["blue", "green", "red", "nir08"]
    assert ms.images.values.max() > 255
    assert store.attrs["n_tiles"] == {"rgb": 4, "multispectral": 4}


def test_latents_roundtrip_and_grow_with_commits(tmp_path: Path) -> None:
    uri = make_synthetic_store(str(tmp_path / "s.zarr"), n_scenes=1, tiles_per_scene=4, size=16)
    assert not has_latents(uri, "rgb")
    latents = np.random.default_rng(0).standard_normal((4, 4, 2, 2)).astype(np.float32)
    write_latents(uri, "rgb", latents[:2], 0, {"vae_id": "tiny-vae", "scaling_factor": 0.18215})
    write_latents(uri, "rgb", latents[2:], 2)
    assert has_latents(uri, "rgb")
    with pytest.raises(StoreError, match="outside"):
        write_latents(uri, "rgb", latents, 2)
    store = DatasetStore.open(uri)
    _ingest(store, [synthetic_scene(1, 4, 16)])
    arr = store.root["rgb"]["latents"]
    assert arr.shape == (8, 4, 2, 2) and arr.attrs["vae_id"] == "tiny-vae"
    np.testing.assert_allclose(arr[:4], latents.astype(np.float16))
    assert np.isnan(arr[4:]).all()
    assert store.open_xarray("rgb").latents.dims == ("tile", "latent_channel", "latent_y", "latent_x")


def test_concurrent_staging_from_processes(tmp_path: Path) -> None:
    """Several processes stage different items into one store at once; one commit takes them all."""
    uri = str(tmp_path / "s.zarr")
    DatasetStore.open(uri, create=True, catalog=synthetic_catalog(size=16))
    script = textwrap.dedent(f"""
        import sys
        from dsat_core.data.store import DatasetStore
        from dsat_core.data.synthetic import synthetic_scene
        store = DatasetStore.open({uri!r})
        for i in range(int(sys.argv[1]), int(sys.argv[1]) + 3):
            store.stage(synthetic_scene(i, 2, 16))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(k)], cwd=REPO) for k in (0, 3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    store = DatasetStore.open(uri)
    assert len(store.staged()) == 6
    assert store.commit().added_tiles == {"rgb": 12} and len(store.ingested_items()) == 6
    assert store.staged() == [] and list(store.root["_staging"].group_keys()) == []


def test_a_staged_scene_is_a_few_flat_files(tmp_path: Path) -> None:
    """Group, payload and images: a metadata file each, and chunk files named c.0... beside them (no
    folder per chunk index), which the commit reads back."""
    store = _new(tmp_path)
    staged = store.stage(synthetic_scene(0, 100, 8))  # 100 tiles: two image chunks
    folder = tmp_path / "s.zarr" / "_staging" / staged.key
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files == [
        "images-rgb/c.0.0.0.0",
        "images-rgb/c.1.0.0.0",
        "images-rgb/zarr.json",
        "payload/c.0",
        "payload/zarr.json",
        "zarr.json",
    ]
    assert store.commit([staged.key]).added_tiles == {"rgb": 100}


def test_discard_staged_deletes_the_given_groups_or_all(tmp_path: Path) -> None:
    store = _new(tmp_path)
    keys = [store.stage(synthetic_scene(i, 2, 8)).key for i in range(3)]
    store.root.create_group("_staging/incomplete")  # a stage that died before its `complete` attr
    store.discard_staged([keys[0], "no-such-key"])  # a missing key is not an error
    assert store.staged() == keys[1:]
    store.discard_staged()
    assert list(store.root["_staging"].group_keys()) == []


def test_transaction_appends_invisibly_until_finish(tmp_path: Path) -> None:
    store = _new(tmp_path)
    scenes = [synthetic_scene(i, 50, 8) for i in range(3)]  # 150 tiles: crosses shard boundaries (64)
    staged = [store.stage(s) for s in scenes]
    transaction = store.begin_commit(batch_tiles=64)
    transaction.add(staged[0])
    transaction.add(staged[1])
    images = store.root["rgb"]["images"]
    assert images.shape[0] >= 64 and images[:64].any()  # whole shards are written early...
    assert DatasetStore.open(store.uri).n_tiles("rgb") == 0  # ...but nothing is visible yet
    transaction.add(staged[2])
    result = transaction.finish()
    assert result.added_tiles == {"rgb": 150} and store.n_tiles("rgb") == 150
    assert store.root["rgb"]["images"].shape[0] == 150  # grown ahead while appending, cut to size
    reference = _new(tmp_path, "ref.zarr")
    _ingest(reference, scenes)
    assert store.content_hash == reference.content_hash
    np.testing.assert_array_equal(
        store.open_xarray("rgb").images.values, reference.open_xarray("rgb").images.values
    )


def test_shard_copies_on_an_executor_match_local_commit(tmp_path: Path, monkeypatch) -> None:
    """``submit`` runs the whole-shard image copies elsewhere: same bytes, rows and hash as a local commit;
    a failed copy leaves nothing visible and the next commit repairs the store."""
    from concurrent.futures import ThreadPoolExecutor

    import dsat_core.data.store as store_module

    monkeypatch.setattr(store_module, "COLUMN_CHUNK", 40)  # columns are flushed before and between shards

    first = [synthetic_scene(i, 50, 8) for i in range(6)]  # 300 tiles: the next commit starts mid-shard
    second = [synthetic_scene(i, 50, 8) for i in range(6, 9)]
    reference = _new(tmp_path, "ref.zarr")
    _ingest(reference, first)
    _ingest(reference, second)
    store = _new(tmp_path)
    commits: list[list[tuple[int, int]]] = []
    with ThreadPoolExecutor(2) as pool:

        def submit(fn, *args):
            commits[-1].append((args[3], sum(len(rows) for _, rows in args[4])))  # (first row, rows)
            return pool.submit(fn, *args)

        commits.append([])
        store.commit([store.stage(s) for s in first], batch_tiles=150, submit=submit)
        staged = [store.stage(s) for s in second]

        def failing(fn, *args):
            return pool.submit(lambda: (_ for _ in ()).throw(OSError("worker lost")))

        with pytest.raises(OSError, match="worker lost"):
            store.commit(staged, submit=failing)
        assert DatasetStore.open(store.uri).n_tiles("rgb") == 300 and len(store.staged()) == 3
        commits.append([])
        store.commit(batch_tiles=64, submit=submit)
    # rows 0-256 (a whole task of SHARDS_PER_COPY_TASK shards) went as soon as they were staged, the final
    # partial shard in its own task; a commit with less than a whole task copies a shard per task at the end
    assert store_module.SHARDS_PER_COPY_TASK * 64 == 256
    assert commits[0] == [(0, 256), (256, 44)]
    assert commits[1] == [(300, 20), (320, 64), (384, 64), (448, 2)]  # the first up to the next boundary
    for copies in commits:  # within a commit no shard is written by two tasks
        shards = [shard for row, n in copies for shard in range(row // 64, (row + n - 1) // 64 + 1)]
        assert len(shards) == len(set(shards))
    assert store.n_tiles("rgb") == 450 and store.content_hash == reference.content_hash
    ours, ref = store.open_xarray("rgb"), reference.open_xarray("rgb")
    np.testing.assert_array_equal(ours.images.values, ref.images.values)
    np.testing.assert_array_equal(ours.tile_hash.values, ref.tile_hash.values)
    assert store.root["rgb"]["images"].shape[0] == 450 and store.staged() == []


def test_a_scene_that_does_not_fit_the_product_is_rejected_not_written(tmp_path: Path) -> None:
    """Same product, other tile size or bands: recorded as a rejection; the rest of the commit goes in."""
    store = _new(tmp_path)
    _ingest(store, [make_scene_tiles("a", n_tiles=2, size=16)])
    small = make_scene_tiles("b", n_tiles=2, size=8)
    two_bands = make_scene_tiles("c", n_tiles=2, size=16, bands=("red", "green"))
    fits = make_scene_tiles("d", n_tiles=2, size=16, seed=1)
    _ingest(store, [small, two_bands, fits])
    store = DatasetStore.open(store.uri)
    assert store.n_tiles("rgb") == 4 and sorted(store.ingested_items()) == ["a", "b", "c", "d"]
    reasons = {r.item_id: r.reason for r in store.rejected()}
    assert "tile size [8, 8] differs from the store's [16, 16]" in reasons["b"]
    assert "bands ['red', 'green'] differ" in reasons["c"] and "d" not in reasons
