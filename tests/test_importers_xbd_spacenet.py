"""xBD and SpaceNet importers: miniature copies in the published layouts → STAC items → Zarr."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from affine import Affine
from shapely.geometry import Polygon, box

from dsat_core.data.importers import get_importer, read_items, run_import
from dsat_core.data.importers.miniature import write_spacenet, write_xbd
from dsat_core.data.store import DatasetStore
from dsat_core.evaluation.stac_output import validate_object


def _iso(capture_date: str) -> str:
    return capture_date.replace(".000Z", "Z")


def _contains(bbox, polygon: Polygon) -> bool:
    return box(*bbox).buffer(1e-12).contains(polygon)


# ------------------------------------------------------------------------------------------------ xBD
def test_xbd_items_follow_their_labels_and_pairs_are_linked(tmp_path):
    written = write_xbd(tmp_path / "xbd")
    report = run_import(get_importer("xbd"), str(tmp_path / "xbd"), tmp_path / "out")
    assert (report.n_records, report.n_items, report.rejected) == (4, 4, [])
    items = {item["id"]: item for item in read_items(tmp_path / "out")}
    assert set(items) == {w["item_id"] for w in written}
    for image in written:
        meta, disaster, role = image["metadata"], image["disaster"], image["role"]
        item = items[image["item_id"]]
        props = item["properties"]
        assert props["datetime"] == _iso(meta["capture_date"])
        assert props["gsd"] == meta["pan_resolution"] and props["xbd:gsd"] == meta["gsd"]
        assert props["platform"] == {"WORLDVIEW02": "worldview-2", "GEOEYE01": "geoeye-1"}[meta["sensor"]]
        assert props["view:off_nadir"] == meta["off_nadir_angle"]
        assert (props["view:sun_azimuth"], props["view:sun_elevation"]) == (
            meta["sun_azimuth"],
            meta["sun_elevation"],
        )
        assert props["xbd:disaster"] == disaster.name and props["xbd:disaster_type"] == disaster.kind
        assert props["dsat:group"] == f"xbd/train/{disaster.name}_{image['tile']}"
        assert props["dsat:role"] == role and props["dsat:class"] == "buildings"
        assert props["xbd:buildings"] == 3
        before_after = "before" if role == "pre" else "after"
        assert (
            props["dsat:event"]
            == {
                "hurricane-harvey": f"{before_after} the flooding of hurricane harvey",
                "mexico-earthquake": f"{before_after} the mexico earthquake",
            }[disaster.name]
        )
        if role == "post":
            damage = [b["subtype"] for b in image["buildings"]]
            assert props["xbd:damage_counts"] == {
                s: damage.count(s)
                for s in ("no-damage", "minor-damage", "major-damage", "destroyed", "un-classified")
            }
        else:
            assert "xbd:damage_counts" not in props
        # pre <-> post linked, both on the same grid
        partner = image["item_id"].rsplit("_", 1)[0] + ("_post" if role == "pre" else "_pre")
        assert props["dsat:pair"] == partner and items[partner]["properties"]["dsat:pair"] == item["id"]
        assert props["dsat:aoi_bbox"] == items[partner]["properties"]["dsat:aoi_bbox"]
        # georeferencing: every building's pixel centroid lands on its lng/lat centroid within a pixel
        transform = Affine(*item["assets"]["image"]["proj:transform"])
        assert item["assets"]["image"]["proj:shape"] == [meta["height"], meta["width"]]
        pixel_deg = abs(image["transform"].a)
        for building in image["buildings"]:
            centroid = Polygon(building["xy"]).centroid
            lonlat = Polygon(building["lng_lat"]).centroid
            assert np.allclose(transform @ (centroid.x, centroid.y), (lonlat.x, lonlat.y), atol=pixel_deg)
            assert _contains(item["bbox"], Polygon(building["lng_lat"]))
        assert np.allclose(item["bbox"][::2], [disaster.lon - 48 * pixel_deg, disaster.lon + 48 * pixel_deg])
        validate_object(item, item["id"])


def test_malformed_xbd_labels_are_rejected_with_reasons_on_dask(tmp_path):
    root = tmp_path / "xbd"
    by_split = {split: write_xbd(root, split=split, size=64) for split in ("train", "tier3", "hold")}

    def label(split: str, disaster: str, role: str) -> Path:
        return next(
            Path(w["label"]) for w in by_split[split] if w["disaster"].name == disaster and w["role"] == role
        )

    def edit(path: Path, change) -> None:
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))

    broken = {
        label("tier3", "hurricane-harvey", "pre"): "not valid JSON",
        label("tier3", "mexico-earthquake", "pre"): "no building polygons",
        label("tier3", "mexico-earthquake", "post"): "'capture_date' is missing",
        label("hold", "hurricane-harvey", "pre"): "is missing",
        label("hold", "hurricane-harvey", "post"): "disagree by up to",
        label("hold", "mexico-earthquake", "pre"): "but pan_resolution is 5.0, gsd is 20.0",
    }
    paths = list(broken)
    paths[0].write_text("{not json")
    edit(paths[1], lambda d: d["features"].update(lng_lat=[], xy=[]))
    edit(paths[2], lambda d: d["metadata"].pop("capture_date"))
    png = paths[3].parent.parent / "images" / paths[3].with_suffix(".png").name
    png.unlink()

    def shift_one_building(data: dict) -> None:  # its lon/lat polygon moved 10 pixels east
        feature = data["features"]["xy"][0]
        feature["wkt"] = feature["wkt"].replace("POLYGON ((", "POLYGON ((1").replace(", ", ", 1")

    edit(paths[4], shift_one_building)
    edit(paths[5], lambda d: d["metadata"].update(pan_resolution=5.0, gsd=20.0))

    report = run_import(get_importer("xbd"), str(root), tmp_path / "out", n_workers=2, batch_size=2)
    assert (report.n_records, report.n_items, len(report.rejected)) == (12, 6, 6)
    reasons = [r["reason"] for r in report.rejected]
    for path, why in broken.items():
        stem = path.name[: -len(".json")]
        matching = [r for r in reasons if f"{path.parent.parent}/" in r and stem in r]  # split folder
        assert len(matching) == 1 and why in matching[0], (path, matching)
    items = {item["id"]: item["properties"] for item in read_items(tmp_path / "out")}
    # the intact train pairs are linked; an image whose partner was rejected has no pair
    assert items["xbd-train-hurricane-harvey_00000000_pre"]["dsat:pair"].endswith("_post")
    assert items["xbd-train-mexico-earthquake_00000001_post"]["dsat:pair"].endswith("_pre")
    assert "dsat:pair" not in items["xbd-tier3-hurricane-harvey_00000000_post"]
    assert "dsat:pair" not in items["xbd-hold-mexico-earthquake_00000001_post"]
    lines = (tmp_path / "out" / "rejected.ndjson").read_text().splitlines()
    assert len(lines) == 6


@pytest.mark.usefixtures("prefect_api")
def test_xbd_import_serve_refresh_to_zarr(tmp_path, local_catalog):
    from dsat_core.data.stac_server import start_rustac
    from flows.refresh_dataset import RefreshParams, refresh_dataset

    written = write_xbd(tmp_path / "xbd")
    run_import(get_importer("xbd"), str(tmp_path / "xbd"), tmp_path / "imported")
    items = {i["id"]: i for i in read_items(tmp_path / "imported")}
    server = start_rustac(["collection.json", "items.ndjson"], tmp_path / "imported")
    try:
        store_uri = str(tmp_path / "xbd.zarr")
        params = RefreshParams(catalog=local_catalog("xbd"), store_uri=store_uri, stac_api=server.url)
        result = refresh_dataset(params)
    finally:
        server.stop()
    assert sorted(result.items_added) == sorted(items) and result.tiles_added["rgb"] > 0

    ds = DatasetStore.open(store_uri).open_xarray("rgb")
    windows = {}
    for image in written:
        rows = ds["item_id"].values == image["item_id"]
        assert rows.sum() >= 2, image["item_id"]
        left, bottom, right, top = items[image["item_id"]]["bbox"]
        assert np.all((ds["lon"].values[rows] > left) & (ds["lon"].values[rows] < right))
        assert np.all((ds["lat"].values[rows] > bottom) & (ds["lat"].values[rows] < top))
        year, month, day = (int(v) for v in image["metadata"]["capture_date"][:10].split("-"))
        assert set(ds["year"].values[rows]) == {year} and set(ds["month"].values[rows]) == {month}
        assert set(ds["day"].values[rows]) == {day}
        assert np.allclose(ds["gsd"].values[rows], image["metadata"]["pan_resolution"], rtol=0.01)
        disaster = image["disaster"]
        event = items[image["item_id"]]["properties"]["dsat:event"]
        caption = f"a satellite image of buildings in {disaster.country} {event}"
        assert {str(c) for c in ds["caption"].values[rows]} == {caption}
        assert disaster.name.replace("-", " ").split()[-1] in caption
        windows[image["item_id"]] = {tuple(t) for t in ds["transform"].values[rows].round(3)}
    # the pre and post images of a tile share their tile windows (inpainting / change pairs)
    for image in written:
        if image["role"] == "pre":
            assert windows[image["item_id"]] == windows[image["item_id"].replace("_pre", "_post")]


# ------------------------------------------------------------------------------------------------ SpaceNet
@pytest.mark.parametrize("layout", ["challenge", "bucket"])
def test_spacenet_items_follow_tiffs_and_labels(tmp_path, layout):
    written = write_spacenet(tmp_path / "spacenet", layout=layout)
    report = run_import(get_importer("spacenet"), str(tmp_path / "spacenet"), tmp_path / "out")
    assert (report.n_records, report.n_items, report.rejected) == (3, 3, [])
    items = {item["id"]: item for item in read_items(tmp_path / "out")}
    assert set(items) == {w["item_id"] for w in written}
    for image in written:
        item = items[image["item_id"]]
        props = item["properties"]
        assert np.allclose(item["bbox"], image["bbox"], atol=1e-9)
        assert props["gsd"] == 0.3 and props["platform"] == "worldview-3"
        assert props["dsat:group"] == "spacenet/AOI_2_Vegas" and props["spacenet:aoi"] == "AOI_2_Vegas"
        assert props["spacenet:buildings"] == len(image["buildings"])
        assert props.get("dsat:class") == ("buildings" if image["buildings"] else None)
        for ring in image["buildings"]:
            assert _contains(item["bbox"], Polygon(ring))
        asset = item["assets"]["image"]
        assert asset["proj:code"] == "EPSG:4326" and asset["proj:shape"] == [64, 64]
        assert [b["common_name"] for b in asset["eo:bands"]] == ["red", "green", "blue"]
        assert Path(item["assets"]["labels"]["href"]) == Path(image["labels"])
        if image["tiff_datetime"]:  # "YYYY:MM:DD HH:MM:SS" from the GeoTIFF
            day, time = image["tiff_datetime"].split()
            assert props["datetime"] == f"{day.replace(':', '-')}T{time}Z"
            assert props["spacenet:datetime_source"] == "TIFFTAG_DATETIME"
        else:  # no date anywhere: none invented, only the interval known to be true
            assert props["datetime"] is None and props["start_datetime"] == "2014-08-13T00:00:00Z"
            assert props["end_datetime"] > props["start_datetime"]
            assert props["spacenet:datetime_source"] == "launch-to-file-modification"
        validate_object(item, item["id"])
        assert "dsat:sequence_index" not in props  # an AOI's tiles are neighbours, not a sequence
    # the AOI's acquisition, when given, is the date of every tile (over the TIFF tag)
    acquisitions = {"AOI_2_Vegas": {"datetime": "2016-01-15T18:40:00Z", "cloud_cover": 2.5, "gsd": 0.31}}
    run_import(
        get_importer("spacenet", acquisitions=acquisitions), str(tmp_path / "spacenet"), tmp_path / "o2"
    )
    for item in read_items(tmp_path / "o2"):
        props = item["properties"]
        assert (props["datetime"], props["eo:cloud_cover"], props["gsd"]) == (
            "2016-01-15T18:40:00Z",
            2.5,
            0.31,
        )
        assert props["spacenet:datetime_source"] == "acquisitions"
    with pytest.raises(ValueError, match="unknown key"):
        get_importer("spacenet", acquisitions={"AOI_2_Vegas": {"date": "2016-01-15"}})
    with pytest.raises(ValueError, match="not ISO 8601"):
        get_importer("spacenet", acquisitions={"AOI_2_Vegas": {"datetime": "last winter"}})


def test_malformed_spacenet_files_are_rejected_with_reasons(tmp_path):
    written = write_spacenet(tmp_path / "spacenet")
    images = [Path(w["image"]) for w in written]
    labels = [Path(w["labels"]) for w in written]

    def copy_as(k: int, image: Path, geojson: Path | None) -> tuple[Path, Path]:
        new_image = image.with_name(image.name.replace("_img3", f"_img{k}").replace("_img2", f"_img{k}"))
        new_labels = labels[0].with_name(f"buildings_AOI_2_Vegas_img{k}.geojson")
        shutil.copy(image, new_image)
        if geojson is not None:
            shutil.copy(geojson, new_labels)
        return new_image, new_labels

    copy_as(4, images[2], labels[2])  # intact: imported
    copy_as(5, images[1], labels[0])  # img2's pixels with img1's buildings: outside the image
    _, missing = copy_as(6, images[2], None)  # no labels where the AOI has labels
    images[0].write_bytes(b"II*\x00" + b"\x13" * 2000)  # corrupt TIFF
    labels[1].write_text("{not json")
    labels[2].write_text(
        json.dumps(
            {
                "type": "FeatureCollection",
                "features": [{"type": "Feature", "geometry": {"type": "Point", "coordinates": [0, 0]}}],
            }
        )
    )
    report = run_import(get_importer("spacenet"), str(tmp_path / "spacenet"), tmp_path / "out")
    assert (report.n_records, report.n_items) == (6, 1)
    assert [i["id"] for i in read_items(tmp_path / "out")] == [
        "spacenet-train-AOI_2_Vegas_img4_RGB-PanSharpen"
    ]
    reasons = {r["record"].split("_img")[1].split("_")[0]: r["reason"] for r in report.rejected}
    assert str(images[0]) in reasons["1"] and "not a readable GeoTIFF" in reasons["1"]
    assert str(labels[1]) in reasons["2"] and "not valid JSON" in reasons["2"]
    assert str(labels[2]) in reasons["3"] and "Point, not a building polygon" in reasons["3"]
    assert "img5.geojson" in reasons["5"] and "outside the image" in reasons["5"]
    assert str(missing) in reasons["6"] and "is missing" in reasons["6"]


@pytest.mark.usefixtures("prefect_api")
def test_spacenet_import_flow_to_zarr(tmp_path, local_catalog):
    from flows.import_dataset import ImportParams, import_dataset

    written = write_spacenet(tmp_path / "spacenet")
    store_uri = str(tmp_path / "spacenet.zarr")
    params = ImportParams(
        catalog=local_catalog("spacenet"),
        source=str(tmp_path / "spacenet"),
        out_dir=str(tmp_path / "imported"),
        n_workers=0,
        store_uri=store_uri,
    )
    result = import_dataset(params)
    assert result.n_items == 3 and result.n_rejected == 0 and result.refresh is not None
    items = {i["id"]: i for i in read_items(tmp_path / "imported")}
    assert sorted(result.refresh.items_added) == sorted(items)

    ds = DatasetStore.open(store_uri).open_xarray("rgb")
    for image in written:
        rows = ds["item_id"].values == image["item_id"]
        assert rows.sum() >= 1, image["item_id"]
        left, bottom, right, top = items[image["item_id"]]["bbox"]
        assert np.all((ds["lon"].values[rows] > left) & (ds["lon"].values[rows] < right))
        assert np.all((ds["lat"].values[rows] > bottom) & (ds["lat"].values[rows] < top))
        assert np.allclose(ds["gsd"].values[rows], 0.3, rtol=0.01)
        if image["tiff_datetime"]:
            year, month, day = (int(v) for v in image["tiff_datetime"].split()[0].split(":"))
        else:
            year = month = day = -1  # missing: the model's learned "unknown" embedding
        assert set(ds["year"].values[rows]) == {year} and set(ds["month"].values[rows]) == {month}
        assert set(ds["day"].values[rows]) == {day}
        of_class = " of buildings" if image["buildings"] else ""
        assert {str(c) for c in ds["caption"].values[rows]} == {
            f"a satellite image{of_class} in United States"
        }
