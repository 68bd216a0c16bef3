"""fMoW and fMoW-Sentinel importers: miniature copies in the published layouts → STAC items → Zarr."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pystac
import pytest
from affine import Affine

from dsat_core.data.catalog import load_catalog
from dsat_core.data.importers import get_importer, import_report_markdown, read_items, run_import
from dsat_core.data.importers.base import bbox_of, parse_wkt_polygon
from dsat_core.data.importers.miniature import PLACES, write_fmow, write_fmow_sentinel
from dsat_core.data.store import DatasetStore
from dsat_core.data.tasks import SuperResolutionDataset, TemporalDataset
from dsat_core.evaluation.stac_output import validate_object

COUNTRIES = {"FRA": "France", "DEU": "Germany"}


def test_fmow_items_follow_their_sidecars(tmp_path):
    written = write_fmow(tmp_path / "fmow")
    report = run_import(get_importer("fmow"), str(tmp_path / "fmow"), tmp_path / "out")
    assert (report.n_records, report.n_items, report.rejected) == (6, 6, [])
    items = {item["id"]: item for item in read_items(tmp_path / "out")}
    for sidecar in written:
        place = sidecar["place"]
        image_id = sidecar["img_filename"].split("_")[-2]
        item = items[f"fmow-train-{place.category}_{place.location}_{image_id}_rgb"]
        props = item["properties"]
        assert props["datetime"] == sidecar["timestamp"]
        assert props["gsd"] == sidecar["gsd"] and props["eo:cloud_cover"] == sidecar["cloud_cover"]
        assert props["platform"] == "worldview-2" and props["dsat:class"] == place.category
        assert props["fmow:country_code"] == place.country_code
        assert props["dsat:group"] == f"fmow/train/{place.category}_{place.location}"
        assert props["dsat:sequence_index"] == int(image_id) and props["dsat:sequence_size"] == 3
        # georeferencing: the labelled box's pixel corners land on its polygon's corners
        transform = Affine(*item["assets"]["image"]["proj:transform"])
        x, y, w, h = sidecar["bounding_boxes"][0]["box"]
        west, south, east, north = bbox_of(
            parse_wkt_polygon(sidecar["bounding_boxes"][0]["raw_location"], "")
        )
        pixel = abs(transform.a)
        assert np.allclose(transform @ (x, y), (west, north), atol=pixel)
        assert np.allclose(transform @ (x + w, y + h), (east, south), atol=pixel)
        left, bottom, right, top = item["bbox"]
        assert left <= west and east <= right and bottom <= south and north <= top
    # the images of one place share the area they all cover
    groups = {}
    for item in items.values():
        groups.setdefault(item["properties"]["dsat:group"], set()).add(
            tuple(item["properties"]["dsat:aoi_bbox"])
        )
    assert all(len(boxes) == 1 for boxes in groups.values()) and len(groups) == len(PLACES)
    validate_object(json.loads((tmp_path / "out" / "collection.json").read_text()), "collection.json")
    for item in items.values():
        validate_object(item, item["id"])
        assert pystac.Item.from_dict(item).id == item["id"]
    again = run_import(get_importer("fmow"), str(tmp_path / "fmow"), tmp_path / "out")
    assert again.n_items == 6 and {i["id"]: i for i in read_items(tmp_path / "out")} == items


def test_malformed_fmow_sidecars_are_rejected_with_reasons_on_dask(tmp_path):
    written = write_fmow(tmp_path / "fmow")
    paths = [Path(w["path"]) for w in written]
    paths[0].write_text("{not json")
    broken = json.loads(paths[1].read_text())
    del broken["timestamp"]
    paths[1].write_text(json.dumps(broken))
    mismatched = json.loads(paths[2].read_text())
    mismatched["gsd"] = 10.0  # the box/polygon say about 1 m per pixel
    paths[2].write_text(json.dumps(mismatched))
    paths[3].with_suffix(".jpg").unlink()
    report = run_import(
        get_importer("fmow"), str(tmp_path / "fmow"), tmp_path / "out", n_workers=2, batch_size=2
    )
    assert report.n_records == 6 and report.n_items == 2
    reasons = {r["record"]: r["reason"] for r in report.rejected}
    assert len(reasons) == 4
    by_path = {str(p): reason for p in paths[:4] for reason in reasons.values() if str(p) in reason}
    assert "not valid JSON" in by_path[str(paths[0])]
    assert "'timestamp' is missing" in by_path[str(paths[1])]
    assert "gsd is 10.0" in by_path[str(paths[2])]
    assert "image missing" in by_path[str(paths[3])]
    markdown = import_report_markdown(report)
    assert "images: 6, items: 2, rejected: 4" in markdown and by_path[str(paths[0])] in markdown
    lines = (tmp_path / "out" / "rejected.ndjson").read_text().splitlines()
    assert {json.loads(line)["record"] for line in lines} == set(reasons)


@pytest.mark.usefixtures("prefect_api")
def test_fmow_import_flow_to_zarr_links_temporal_sequences(tmp_path, local_catalog):
    from flows.import_dataset import ImportParams, import_dataset

    written = write_fmow(tmp_path / "fmow")
    store_uri = str(tmp_path / "fmow.zarr")
    params = ImportParams(
        catalog=local_catalog("fmow"),
        source=str(tmp_path / "fmow"),
        out_dir=str(tmp_path / "imported"),
        n_workers=0,
        store_uri=store_uri,
    )
    result = import_dataset(params)
    assert result.n_items == 6 and result.refresh is not None
    assert sorted(result.refresh.items_added) == sorted(i["id"] for i in read_items(tmp_path / "imported"))

    store = DatasetStore.open(store_uri)
    ds = store.open_xarray("rgb")
    items = {i["id"]: i for i in read_items(tmp_path / "imported")}
    for sidecar in written:
        place = sidecar["place"]
        item_id = f"fmow-train-{place.category}_{place.location}_{sidecar['img_filename'].split('_')[-2]}_rgb"
        rows = ds["item_id"].values == item_id
        assert rows.sum() == 4  # the common 2 x 2 tiles of 32 px at 1 m
        year, month, day = (int(v) for v in sidecar["timestamp"][:10].split("-"))
        assert set(ds["year"].values[rows]) == {year} and set(ds["month"].values[rows]) == {month}
        assert set(ds["day"].values[rows]) == {day}
        assert np.allclose(ds["gsd"].values[rows], 1.0)
        left, bottom, right, top = items[item_id]["bbox"]
        assert np.all((ds["lon"].values[rows] > left) & (ds["lon"].values[rows] < right))
        assert np.all((ds["lat"].values[rows] > bottom) & (ds["lat"].values[rows] < top))
        article = "an" if place.category[0] in "aeiou" else "a"
        caption = f"a fmow satellite image of {article} {place.category} in {COUNTRIES[place.country_code]}"
        assert {str(c) for c in ds["caption"].values[rows]} == {caption}
    # the images of one location share tile windows: each tile has two other dates as its sequence
    temporal = TemporalDataset(store_uri, "rgb", sequence_length=2)
    assert len(temporal) == store.n_tiles("rgb") == 24
    sample = temporal[0]
    group = items[sample["item_id"]]["properties"]["dsat:group"]
    assert {items[i]["properties"]["dsat:group"] for i in sample["cond_item_ids"]} == {group}
    assert sample["item_id"] not in sample["cond_item_ids"]


@pytest.mark.usefixtures("prefect_api")
def test_fmow_sentinel_pairs_become_super_resolution_pairs(tmp_path, local_catalog):
    from flows.import_dataset import ImportParams, import_dataset

    write_fmow(tmp_path / "fmow")
    rows = write_fmow_sentinel(tmp_path / "fmow-sentinel")
    store_uri = str(tmp_path / "sr.zarr")
    params = ImportParams(
        catalog=local_catalog("fmow-sentinel"),
        source=str(tmp_path / "fmow-sentinel"),
        out_dir=str(tmp_path / "imported"),
        options={"fmow_root": str(tmp_path / "fmow")},
        n_workers=0,
        store_uri=store_uri,
    )
    result = import_dataset(params)
    assert result.n_items == len(rows) == 4 and result.n_rejected == 0
    items = {i["id"]: i for i in read_items(tmp_path / "imported")}
    # each Sentinel image is paired with the fMoW image of its place nearest in time
    expected = {"2017-07-25": "1", "2019-04-02": "2"}
    for item in items.values():
        props = item["properties"]
        fmow_image = expected[props["datetime"][:10]]
        assert props["dsat:pair"] == f"fmow-train-{props['fmow:location']}_{fmow_image}_rgb"
        assert props["dsat:group"] == f"fmow/train/{props['fmow:location']}"
        assert item["assets"]["hr_image"]["href"].endswith(f"{props['fmow:location']}_{fmow_image}_rgb.jpg")

    store = DatasetStore.open(store_uri)
    assert set(store.products()) == {"multispectral", "rgb"}
    assert store.n_tiles("rgb") == store.n_tiles("multispectral") > 0
    # each product keeps its own resolution on the shared 1 m grid: the Sentinel input says 10 m
    assert np.allclose(store.open_xarray("rgb")["gsd"].values, 1.0)
    assert np.allclose(store.open_xarray("multispectral")["gsd"].values, 10.0)
    sr = SuperResolutionDataset(store_uri, recipe={"factor": 1, "blur_sigma": 0.0})
    assert len(sr) == store.n_tiles("rgb")
    sample = sr[0]
    assert sample["cond"].shape == (13, 1, 32, 32) and sample["pixel_values"].shape == (3, 32, 32)
    assert sample["item_id"] in items


@pytest.mark.usefixtures("prefect_api")
def test_fmow_copy_on_s3_imports_and_ingests(tmp_path, s3_server, s3_bucket, local_catalog):
    """A copy in an S3 bucket (moto server): sidecars listed and read through s3fs, chips read from S3
    (the copy's storage options reach the reader) and placed on the location's grid."""
    import s3fs

    from flows.import_dataset import ImportParams, import_dataset

    write_fmow(tmp_path / "fmow")
    fs = s3fs.S3FileSystem(**s3_server)
    fs.put(str(tmp_path / "fmow") + "/", f"{s3_bucket}/fmow-rgb/", recursive=True)
    params = ImportParams(
        catalog=local_catalog("fmow"),
        source=f"s3://{s3_bucket}/fmow-rgb",
        out_dir=str(tmp_path / "out"),
        storage_options=s3_server,
        n_workers=0,
        store_uri=str(tmp_path / "fmow.zarr"),
    )
    result = import_dataset(params)
    assert (result.n_items, result.n_rejected) == (6, 0)
    items = {i["id"]: i for i in read_items(tmp_path / "out")}
    assert all(
        i["assets"]["image"]["href"].startswith(f"s3://{s3_bucket}/fmow-rgb/train/") for i in items.values()
    )
    assert result.refresh is not None and sorted(result.refresh.items_added) == sorted(items)
    ds = DatasetStore.open(str(tmp_path / "fmow.zarr")).open_xarray("rgb")
    assert ds.sizes["tile"] == 24 and all(str(h).startswith("s3://") for h in ds["asset_href"].values)
    for item_id, item in items.items():
        west, south, east, north = item["properties"]["dsat:aoi_bbox"]
        rows = ds["item_id"].values == item_id
        assert np.all((ds["lon"].values[rows] > west) & (ds["lon"].values[rows] < east))
        assert np.all((ds["lat"].values[rows] > south) & (ds["lat"].values[rows] < north))


@pytest.mark.usefixtures("prefect_api")
def test_dsat_import_command(tmp_path, capsys, local_catalog):
    from flows.cli import main

    write_fmow(tmp_path / "fmow")
    argv = ["import", "--catalog", local_catalog("fmow"), "--source", str(tmp_path / "fmow")]
    assert main([*argv, "--out", str(tmp_path / "out"), "--workers", "0", "--option", "kinds=[rgb]"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["n_items"], result["n_rejected"], result["refresh"]) == (6, 0, None)
    assert len(read_items(tmp_path / "out")) == 6


def test_fmow_full_multispectral_chips_are_read_on_the_sidecar_grid(tmp_path, local_catalog):
    """fmow-full `_ms.tif` chips (4 bands, no georeferencing) import and read like the RGB JPEGs."""
    from dsat_core.data.reader import read_item

    written = write_fmow(tmp_path / "fmow-full", kind="ms")
    report = run_import(get_importer("fmow", kinds=("ms",)), str(tmp_path / "fmow-full"), tmp_path / "out")
    assert report.n_items == len(written) and report.rejected == []
    item = read_items(tmp_path / "out")[0]
    asset = item["assets"]["image"]
    assert asset["type"] == "image/tiff" and asset["href"].endswith("_ms.tif")
    assert [b["common_name"] for b in asset["eo:bands"]] == ["blue", "green", "red", "nir"]
    bands = [{"name": n, "asset": "image", "common_name": n} for n in ("blue", "green", "red", "nir")]
    scaling = {"mode": "fixed", "range": [0, 4095], "dtype": "uint16"}
    config = load_catalog(local_catalog("fmow")).with_overrides(
        products={"multispectral": {"bands": bands, "scaling": scaling, "required": True}}
    )
    scene = read_item(item, config)
    assert scene.rejected == [] and scene.products["multispectral"].images.shape == (4, 4, 32, 32)
    west, south, east, north = item["properties"]["dsat:aoi_bbox"]
    assert all(
        west < m.lon < east and south < m.lat < north for m in scene.products["multispectral"].metadata
    )
