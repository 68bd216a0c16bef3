"""The `refresh-dataset` Prefect flow against a real STAC API (rustac) over the real scenes."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from dsat_core.data.catalog import load_catalog
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

    import asyncio

    async def artifact_markdown():
        async with get_client() as client:
            artifacts = await client.read_latest_artifacts()
            return [a.data for a in artifacts if a.key == "refresh-dataset-report"]

    markdown = asyncio.run(artifact_markdown())
    assert markdown and result.content_hash[:16] in markdown[0] and "Rejected" in markdown[0]

    again = refresh_dataset(params)
    assert again.items_added == [] and again.content_hash == result.content_hash
    assert DatasetStore.open(store_uri).n_tiles("rgb") == store.n_tiles("rgb")


def test_refresh_on_dask_records_corrupt_scene_and_goes_on(tmp_path, stac_api, real_items):
    """A corrupt GeoTIFF served by the API is rejected with a reason; the other scenes are written (Dask)."""
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
            use_dask=True,
            n_workers=2,
        )
        result = refresh_dataset(params)
    finally:
        server.stop()
    assert result.tiles_added["rgb"] >= 1
    rejected = {r.item_id: r.reason for r in DatasetStore.open(store_uri).rejected()}
    assert "corrupt-scene" in rejected and "corrupt.tif" in rejected["corrupt-scene"]
