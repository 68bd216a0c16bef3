"""`ingest_items` on a real 2-worker Dask LocalCluster with the synthetic reader."""

from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Iterator
from concurrent.futures import CancelledError
from pathlib import Path
from typing import Any
from unittest import mock

import cloudpickle
import numpy as np
import pytest
from distributed import Client, LocalCluster, get_task_stream

from dsat_core.data.cluster import dask_client
from dsat_core.data.ingest import MAX_BATCH, guided_batches, ingest_items, ingest_report_markdown
from dsat_core.data.store import DatasetStore
from dsat_core.data.synthetic import (
    make_synthetic_store,
    synthetic_catalog,
    synthetic_item,
    synthetic_reader,
    synthetic_scene,
)

CONFIG = synthetic_catalog(("rgb",), size=16)
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # so workers can run the readers defined here


def raising_reader(item, config, *, aoi_bbox=None, storage_options=None):
    if item["properties"]["synthetic:index"] == 1:
        raise OSError("connection reset by peer")
    return synthetic_reader(item, config, aoi_bbox=aoi_bbox, storage_options=storage_options)


def unstageable_reader(item, config, *, aoi_bbox=None, storage_options=None):
    if item["properties"]["synthetic:index"] == 1:
        return None  # not a SceneTiles: staging raises on the worker, so the whole task fails
    return synthetic_reader(item, config, aoi_bbox=aoi_bbox, storage_options=storage_options)


def failing_copy(*args: object) -> None:
    raise OSError("no space left on device")


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    with dask_client(n_workers=2) as own:  # the LocalCluster that ingest_items starts when given no client
        yield own


def _zarr_threads() -> object:
    import zarr

    return zarr.config.get("threading.max_workers")


def test_local_cluster_workers_are_single_threaded_for_zarr_too(client: Client) -> None:
    """One task at a time per worker, and zarr's codec pool of each worker capped at one thread (zarr's
    default, cores + 4 threads in every worker, oversubscribes the cores); the driver keeps zarr's default."""
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    assert [w["nthreads"] for w in workers] == [1, 1]
    assert list(client.run(_zarr_threads).values()) == [1, 1]
    assert _zarr_threads() is None


def _background_work(dask_worker: Any) -> tuple[bool, float]:
    return "profile" in dask_worker.periodic_callbacks, dask_worker._tick_interval


def test_local_cluster_servers_skip_background_work(client: Client) -> None:
    """No statistical profiler in the workers, and event-loop checks twice a second, not 50 times, in the
    workers and the scheduler (`QUIET_BACKGROUND`); a LocalCluster made without it has both."""
    assert list(client.run(_background_work).values()) == [(False, 0.5), (False, 0.5)]
    assert client.run_on_scheduler(lambda dask_scheduler: dask_scheduler._tick_interval) == 0.5
    with (
        mock.patch.dict(os.environ),  # a Dask nanny sets MALLOC_TRIM_THRESHOLD_ in this process too
        LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address="127.0.0.1:0") as cluster,
        Client(cluster) as dask_default,
    ):
        assert list(dask_default.run(_background_work).values()) == [(True, 0.02)]


def _page_faults_per_allocation(n: int = 8, kib: int = 1536) -> float:
    """Minor page faults per ``kib`` KiB array allocated, filled and freed, after two warm-up rounds (under
    2 MiB, so that no transparent huge page can back it: 4 KiB pages, hundreds of faults when mapped anew)."""
    for _ in range(2):
        np.ones(kib << 7)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        np.ones(kib << 7)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / n


def test_local_cluster_workers_reuse_freed_memory(client: Client) -> None:
    """The project's workers keep glibc's malloc defaults: a freed scene-sized array is reused, not unmapped
    and page-faulted in again as under Dask's own worker environment (MALLOC_TRIM_THRESHOLD_=65536), while
    Dask's other worker settings (one OpenMP thread) stay."""
    assert list(client.run(os.environ.get, "MALLOC_TRIM_THRESHOLD_").values()) == [None, None]
    assert list(client.run(os.environ.get, "OMP_NUM_THREADS").values()) == ["1", "1"]
    ours = list(client.run(_page_faults_per_allocation).values())
    with (
        mock.patch.dict(os.environ),  # a Dask nanny sets MALLOC_TRIM_THRESHOLD_ in this process too
        LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address="127.0.0.1:0") as cluster,
        Client(cluster) as dask_default,
    ):
        theirs = list(dask_default.run(_page_faults_per_allocation).values())
    assert theirs[0] > 100  # 1.5 MiB mapped anew each time: 384 pages
    assert max(ours) < 0.1 * theirs[0]


def test_ingest_matches_direct_store_and_refresh_adds_only_new(client: Client, tmp_path: Path) -> None:
    uri = str(tmp_path / "s.zarr")
    items = [synthetic_item(i, tiles=3) for i in range(5)]
    report = ingest_items(items, CONFIG, uri, client=client, reader=synthetic_reader)
    assert report.added_tiles == {"rgb": 15} and report.version == 1
    assert sorted(report.items_added) == sorted(i["id"] for i in items) and report.skipped_items == []
    # same content hash as the scenes written directly through the store API, in one process
    direct = make_synthetic_store(str(tmp_path / "direct.zarr"), n_scenes=5, tiles_per_scene=3, size=16)
    assert report.content_hash == DatasetStore.open(direct).content_hash
    # both workers did some of the staging
    assert len(client.scheduler_info(n_workers=-1)["workers"]) == 2

    new = [synthetic_item(i, tiles=3) for i in (5, 6)]
    refresh = ingest_items(items + new, CONFIG, uri, client=client, reader=synthetic_reader)
    assert sorted(refresh.skipped_items) == sorted(i["id"] for i in items)
    assert refresh.added_tiles == {"rgb": 6} and refresh.version == 2 and refresh.total_tiles == {"rgb": 21}
    assert sorted(refresh.items_added) == sorted(i["id"] for i in new)

    nothing = ingest_items(items + new, CONFIG, uri, client=client, reader=synthetic_reader)
    assert nothing.added_tiles == {} and nothing.version == 2 and nothing.content_hash == refresh.content_hash
    store = DatasetStore.open(uri)
    assert store.staged() == [] and store.n_tiles("rgb") == 21


def test_rejections_are_reported_and_stored(client: Client, tmp_path: Path) -> None:
    uri = str(tmp_path / "s.zarr")
    items = [
        synthetic_item(0, tiles=2, rejected_tiles=1),
        synthetic_item(1, tiles=2),
        synthetic_item(2, fail="eo:cloud_cover 93 > 50"),
        {"type": "Feature", "properties": {}},  # no id
    ]
    report = ingest_items(items, CONFIG, uri, client=client, reader=raising_reader, max_in_flight=1)
    reasons = {(r.item_id, r.tile_index): r.reason for r in report.rejected}
    assert reasons[(items[0]["id"], 2)].startswith("nodata")
    assert reasons[(items[1]["id"], -1)] == "reader error: OSError: connection reset by peer"
    assert reasons[(items[2]["id"], -1)] == "eo:cloud_cover 93 > 50"
    assert reasons[("None", -1)] == "STAC item has no string 'id'"
    assert report.added_tiles == {"rgb": 2} and report.items_added == [items[0]["id"]]
    store = DatasetStore.open(uri)
    assert len(store.rejected()) == 4
    # scene-level failures are retried on the next refresh; the good item is skipped
    retry = ingest_items(items[:3], CONFIG, uri, client=client, reader=synthetic_reader)
    assert retry.skipped_items == [items[0]["id"]] and retry.added_tiles == {"rgb": 2}
    assert [r.item_id for r in retry.rejected] == [items[2]["id"]] and len(store.refresh().rejected()) == 5

    md = ingest_report_markdown(report)
    assert "| rgb | 2 | 0 | 2 |" in md and "eo:cloud_cover 93 > 50" in md and "reader error" in md
    assert items[2]["id"] in md


def test_guided_batches_shrink_to_single_items() -> None:
    items = list(range(96))
    sizes = [len(b) for b in guided_batches(items, 2)]
    assert [x for b in guided_batches(items, 2) for x in b] == items  # consecutive, each item once
    assert sizes[:4] == [12, 10, 9, 8] and sizes[-3:] == [1, 1, 1] and len(sizes) < 40
    assert sizes == sorted(sizes, reverse=True)
    many = [len(b) for b in guided_batches(list(range(1000)), 1)]
    assert many[0] == max(many) == MAX_BATCH and many[-1] == 1
    assert list(guided_batches([], 2)) == []


def test_a_failed_task_is_recorded_as_a_rejection_and_the_run_goes_on(client: Client, tmp_path: Path) -> None:
    """Item 1 fails its task: the first batch (items 0-2) fails, its items are tried again one task each,
    and only item 1 is rejected."""
    uri = str(tmp_path / "s.zarr")
    items = [synthetic_item(i, tiles=2) for i in range(24)]
    with get_task_stream(client) as stream:
        report = ingest_items(items, CONFIG, uri, client=client, reader=unstageable_reader)
    reasons = {(r.item_id, r.tile_index): r.reason for r in report.rejected}
    assert list(reasons) == [(items[1]["id"], -1)]
    assert reasons[(items[1]["id"], -1)].startswith("ingest task failed: AttributeError: ")
    assert report.added_tiles == {"rgb": 46} and sorted(report.items_added) == sorted(
        item["id"] for k, item in enumerate(items) if k != 1
    )
    store = DatasetStore.open(uri)
    assert items[1]["id"] not in store.ingested_items() and len(store.rejected()) == 1  # retried next time
    reads = [t for t in stream.data if t["key"].startswith("ingest-")]
    failed = [t for t in reads if t["status"] == "error"]
    assert [t["key"].split("-")[-2] for t in failed] == ["3", "1"]  # the batch, then item 1 alone
    assert len(reads) < len(items)  # batches: fewer tasks than items


def test_a_failed_or_cancelled_shard_copy_on_dask_fails_the_commit(client: Client, tmp_path: Path) -> None:
    """A commit whose image copies are Dask tasks raises when one fails or is cancelled (a cancelled Dask
    future's ``exception()`` is None), publishes nothing and keeps its staged scenes for the next commit."""
    store = DatasetStore.open(str(tmp_path / "s.zarr"), create=True, catalog=CONFIG)
    staged = [store.stage(synthetic_scene(i, 40, 16)) for i in range(2)]  # 80 tiles: two copy tasks

    def cancelled(fn, *args):
        future = client.submit(time.sleep, 0.2, pure=False)
        future.cancel()
        return future

    def failing(fn, *args):
        return client.submit(failing_copy, *args, pure=False)

    for submit, error in ((cancelled, CancelledError), (failing, OSError)):
        with pytest.raises(error):
            store.commit(staged, batch_tiles=64, submit=submit)
        assert DatasetStore.open(store.uri).n_tiles("rgb") == 0 and len(store.staged()) == 2
    assert store.commit(submit=client.submit).added_tiles == {"rgb": 80} and store.staged() == []


def test_commit_every_scheduler_address_and_progress_hook(client: Client, tmp_path: Path) -> None:
    uri = str(tmp_path / "s.zarr")
    items = [synthetic_item(i, tiles=1) for i in range(5)]
    calls: list[tuple[int, int]] = []
    report = ingest_items(
        items,
        CONFIG,
        uri,
        scheduler_address=client.scheduler.address,
        reader=synthetic_reader,
        commit_every=2,
        progress=lambda done, total: calls.append((done, total)),
    )
    store = DatasetStore.open(uri)
    assert report.version == 3 and [v["n_tiles"]["rgb"] for v in store.attrs["versions"]] == [2, 4, 5]
    assert report.added_tiles == {"rgb": 5} and len(report.items_added) == 5
    assert calls == [(k, 5) for k in range(1, 6)]  # once per item, on the driver


def test_default_local_cluster(tmp_path: Path) -> None:
    report = ingest_items(
        [synthetic_item(0, tiles=2)], CONFIG, str(tmp_path / "s.zarr"), n_workers=1, reader=synthetic_reader
    )
    assert report.added_tiles == {"rgb": 2}


def test_real_scenes_with_real_reader(client: Client, real_items: dict[str, dict], tmp_path: Path) -> None:
    """The real `read_item` on the six real scenes (skipped when ../shared/data/real is absent)."""
    from dsat_core.data.catalog import load_catalog
    from dsat_core.data.dataset import TileDataset

    config = load_catalog("local-samples")
    uri = str(tmp_path / "real.zarr")
    report = ingest_items(list(real_items.values()), config, uri, client=client)
    assert report.added_tiles["rgb"] > 100 and report.added_tiles["multispectral"] > 0
    rejected_scenes = {r.item_id for r in report.rejected if r.tile_index == -1 and r.product == "rgb"}
    assert rejected_scenes == {i for i in real_items if "T33UUU" in i}  # single-band B03: no red band
    ds = TileDataset(uri, "rgb", bbox=(-80.0, 23.0, -76.0, 26.0))  # the Bahamas
    assert len(ds) > 0 and all(ds[i]["item_id"] == "landsat7-etm-bahamas-rgb" for i in range(len(ds)))
    sample = ds[0]
    assert sample["pixel_values"].shape == (3, 64, 64) and sample["metadata_mask"][:3].all()
    assert "Bahamas" in sample["caption"] or "satellite" in sample["caption"]
    again = ingest_items(list(real_items.values()), config, uri, client=client)
    assert again.added_tiles == {} and again.content_hash == report.content_hash
