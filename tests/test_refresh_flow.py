"""The `refresh-dataset` Prefect flow (a thin layer over `ingest_items`) against real STAC APIs (rustac)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from dsat_core.data.catalog import load_catalog
from dsat_core.data.stac import StacApiUnreachable
from dsat_core.data.stac_server import free_port
from dsat_core.data.store import DatasetStore
from flows.refresh_dataset import RefreshParams, refresh_dataset

pytestmark = pytest.mark.usefixtures("prefect_api")


def _catalog_yaml(tmp_path, extra_root):
    """local-samples, but searching the test API's collection and also allowing `extra_root`."""
    config = load_catalog("local-samples")
    data = config.model_dump(mode="json")
    data.update(collections=["real-samples"], allowed_roots=[*config.allowed_roots, str(extra_root)])
    import yaml

    path = tmp_path / "real-samples.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_refresh_writes_store_with_metadata_and_report(tmp_path, stac_api, real_items):
    from prefect.client.orchestration import get_client

    store_uri = str(tmp_path / "store.zarr")
    params = RefreshParams(
        catalog=str(_catalog_yaml(tmp_path, tmp_path)), store_uri=store_uri, stac_api=stac_api
    )
    result = refresh_dataset(params)

    assert sorted(result.items_added) == sorted(
        real_items
    )  # every scene ingested (tiles or recorded rejection)
    assert result.tiles_added["rgb"] > 50
    ds = xr.open_zarr(store_uri, group="rgb", consolidated=False)
    assert ds["images"].dims == ("tile", "band", "y", "x") and list(ds["band"].values) == [
        "red",
        "green",
        "blue",
    ]
    for item_id in {str(i) for i in ds["item_id"].values}:
        item = real_items[item_id]
        west, south, east, north = item["bbox"]
        rows = ds["item_id"].values == item_id
        assert np.all((ds["lon"].values[rows] >= west) & (ds["lon"].values[rows] <= east))
        assert np.all((ds["lat"].values[rows] >= south) & (ds["lat"].values[rows] <= north))
        assert np.allclose(ds["gsd"].values[rows], item["properties"]["gsd"], rtol=0.01)
    rondonia = ds["item_id"].values == "landsat8-oli-sr-rondonia-20190727"
    assert set(ds["year"].values[rondonia]) == {2019} and set(ds["month"].values[rondonia]) == {7}
    assert all("Brazil" in str(c) for c in ds["caption"].values[rondonia])

    store = DatasetStore.open(store_uri)
    reasons = {(r.item_id, r.reason) for r in store.rejected()}
    # The single-band (green) Sentinel-2 L1C scenes have no red band: recorded, not silently dropped.
    assert any(i.startswith("sentinel2-l1c") and "red" in reason for i, reason in reasons)

    async def artifact_markdown():
        async with get_client() as client:
            artifacts = await client.read_latest_artifacts()
            return [a.data for a in artifacts if a.key == "refresh-dataset-report"]

    markdown = asyncio.run(artifact_markdown())
    assert markdown and result.content_hash[:16] in markdown[0] and "Rejected" in markdown[0]

    again = refresh_dataset(params)
    assert again.items_added == [] and again.content_hash == result.content_hash
    assert DatasetStore.open(store_uri).n_tiles("rgb") == store.n_tiles("rgb")


def test_refresh_records_corrupt_scene_and_goes_on(tmp_path, stac_api, real_items):
    """A corrupt GeoTIFF served by the API is rejected with a reason; the other scenes are written."""
    from dsat_core.data.stac_server import start_stac_server

    corrupt = tmp_path / "corrupt.tif"
    corrupt.write_bytes(b"II*\x00" + b"\x13" * 4000)
    good = real_items["landsat8-oli-sr-madre-de-dios-20180906"]
    bad = {**good, "id": "corrupt-scene", "collection": "real-samples"}
    bad["assets"] = {"image": {**good["assets"]["image"], "href": str(corrupt)}}
    server = start_stac_server([{**good, "collection": "real-samples"}, bad])
    try:
        store_uri = str(tmp_path / "dask.zarr")
        params = RefreshParams(
            catalog=str(_catalog_yaml(tmp_path, tmp_path)),
            store_uri=store_uri,
            stac_api=server.url,
            n_workers=2,
        )
        result = refresh_dataset(params)
    finally:
        server.stop()
    assert result.tiles_added["rgb"] >= 1
    rejected = {r.item_id: r.reason for r in DatasetStore.open(store_uri).rejected()}
    assert "corrupt-scene" in rejected and "corrupt.tif" in rejected["corrupt-scene"]


SAMPLES = Path(__file__).resolve().parents[1] / "catalogs" / "samples"


def test_local_samples_catalog_is_served_by_the_run_itself(tmp_path):
    """`catalogs/local-samples.yaml` names a static catalog: no STAC API to start, the run serves it."""
    assert load_catalog("local-samples").stac_api is None
    result = refresh_dataset(RefreshParams(store_uri=str(tmp_path / "samples.zarr"), n_workers=1))
    shipped = [json.loads(line)["id"] for line in (SAMPLES / "items.ndjson").read_text().splitlines()]
    assert sorted(result.items_added) == sorted(shipped) and result.tiles_added["rgb"] > 50


def test_an_unreachable_stac_api_fails_the_flow_at_once(tmp_path):
    """`StacApiUnreachable` is not retried: one run of the search task, no AwaitingRetry, one-line error."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    url = f"http://127.0.0.1:{free_port()}/"  # nothing listens there
    params = RefreshParams(store_uri=str(tmp_path / "s.zarr"), stac_api=url)
    state = refresh_dataset(params, return_state=True)
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, StacApiUnreachable) and error.url == url and "\n" not in str(error)

    async def search_runs():
        async with get_client() as client:
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
            )
            found = [r for r in runs if r.name.startswith("search-stac")]
            return [(r.run_count, [s.name for s in await client.read_task_run_states(r.id)]) for r in found]

    [(run_count, states)] = asyncio.run(search_runs())
    assert run_count == 1 and "AwaitingRetry" not in states and states[-1] == "Failed", states
    assert not (tmp_path / "s.zarr").exists()  # nothing was written
