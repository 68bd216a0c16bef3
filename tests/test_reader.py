"""read_item on the real scenes, and every kind of bad input becoming a Rejection (never an exception)."""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import REPO, SAMPLES
from rasterio.windows import Window

from dsat_core.data.catalog import CatalogConfig, load_catalog
from dsat_core.data.reader import read_item, scene_dates
from dsat_core.data.tiles import SceneTiles

BAHAMAS = "landsat7-etm-bahamas-rgb"
RONDONIA = "landsat8-oli-sr-rondonia-20190727"
MADRE = "landsat8-oli-sr-madre-de-dios-20180906"
MAURITANIA = "sentinel2-l2a-T29RKH-20200219"
HAVEL_1 = "sentinel2-l1c-T33UUU-20160529-b03"
HAVEL_2 = "sentinel2-l1c-T33UUU-20160608-b03"
# Country of the nearest populated place (offline, nearest-city reverse geocoding: not point-in-polygon).
COUNTRY = {
    BAHAMAS: "Bahamas",
    RONDONIA: "Brazil",
    MADRE: "Peru",  # 100 km from Bolivia / Brazil: nearest towns are Peruvian
    MAURITANIA: "Mauritania",  # 60 km from the Western Sahara border: nearest town Bir Mogrein
    HAVEL_1: "Germany",
    HAVEL_2: "Germany",
}
# Tiles near a border may name the neighbour: nearest-city lookup, and GeoNames files Western Sahara towns
# under Morocco, which the Mauritanian tile's north-western corner is nearest to.
NEIGHBOURS = {MAURITANIA: {"Morocco", "Western Sahara"}}


def _config(roots: list[Path], **changes) -> CatalogConfig:
    base = {
        "name": "test",
        "stac_api": "http://127.0.0.1:1",
        "collections": ["c"],
        "products": {
            "rgb": {
                "bands": [{"name": "red"}, {"name": "green"}, {"name": "blue"}],
                "scaling": {"mode": "percentile"},
            },
            "green": {"bands": [{"name": "green"}], "scaling": {"mode": "percentile", "dtype": "uint16"}},
        },
        "target_crs": "native",
        "target_gsd": None,
        "tile_size": 128,
        "quality": {"max_nodata_fraction": 0.1, "min_std": 1.0},
        "allowed_schemes": ["file", "http", "https", "s3"],
        "allowed_roots": [str(r) for r in roots],
    }
    return CatalogConfig.model_validate({**base, **changes})


@pytest.fixture(scope="module")
def config(real_data: Path, tmp_path_factory: pytest.TempPathFactory) -> CatalogConfig:
    return _config([real_data], tile_size=64)


def _scene_rejection(scene: SceneTiles) -> str:
    reasons = [r.reason for r in scene.rejected if r.tile_index == -1 and not r.product]
    assert scene.n_tiles == 0 and len(reasons) == 1, scene.rejected
    return reasons[0]


@pytest.mark.parametrize("item_id", list(COUNTRY))
def test_real_scene(item_id: str, real_items: dict, config: CatalogConfig) -> None:
    item = real_items[item_id]
    props = item["properties"]
    scene = read_item(item, config)
    assert scene.item_id == item_id and scene.n_tiles > 0, scene.rejected
    west, south, east, north = item["bbox"]
    when, _ = scene_dates(props)
    for product in scene.products.values():
        assert product.images.shape[2:] == (64, 64)
        assert set(product.crs) == {props["proj:code"]}
        for meta, caption in zip(product.metadata, product.caption, strict=True):
            assert west <= meta.lon <= east and south <= meta.lat <= north
            assert meta.gsd == pytest.approx(props["gsd"], rel=2e-4)  # native grid (Bahamas: 300.04 m)
            assert (meta.year, meta.month, meta.day) == (
                (when.year, when.month, when.day) if when else (None,) * 3
            )
            assert caption.startswith("a satellite image in ")
        countries = Counter(c.removeprefix("a satellite image in ") for c in product.caption)
        assert countries.most_common(1)[0][0] == COUNTRY[item_id]
        assert set(countries) <= {COUNTRY[item_id], *NEIGHBOURS.get(item_id, ())}
        if "eo:cloud_cover" in props:
            assert [m.cloud_cover for m in product.metadata] == pytest.approx(
                [props["eo:cloud_cover"] / 100] * len(product)
            )
        # lineage: transform of each tile = scene transform shifted by its window, and the asset read
        tf = np.array(props["proj:transform"])
        for window, transform in zip(product.window, product.transform, strict=True):
            row, col, h, w = window
            assert (h, w) == (64, 64)
            assert transform[2] == pytest.approx(tf[2] + col * tf[0]) and transform[5] == pytest.approx(
                tf[5] + row * tf[4]
            )
        assert set(product.asset_href) == {item["assets"]["image"]["href"]}
        assert set(product.platform) == {props["platform"]}
    # products whose bands are absent are rejected for this item, with the band named
    if item_id in (HAVEL_1, HAVEL_2):
        assert list(scene.products) == ["green"]
        assert any(r.product == "rgb" and "band 'red'" in r.reason for r in scene.rejected)


def test_dates(real_items: dict) -> None:
    assert scene_dates(real_items[MAURITANIA]["properties"])[0].isoformat().startswith("2020-02-19T11:34:25")
    when, text = scene_dates(real_items[BAHAMAS]["properties"])
    assert when is None and text == "1999-04-15T00:00:00Z/2014-09-01T00:00:00Z"  # 15-year interval: unknown
    assert (
        scene_dates({"start_datetime": "2020-01-01T00:00:00Z", "end_datetime": "2020-01-02T00:00:00Z"})[0].day
        == 1
    )
    assert scene_dates({}) == (None, "")


def test_native_grid_keeps_pixel_values(real_items: dict, real_data: Path) -> None:
    bands = [{"name": "red"}, {"name": "green"}, {"name": "blue"}]
    products = {"rgb": {"bands": bands, "scaling": {"mode": "fixed", "range": [0, 255]}}}
    config = _config([real_data], products=products, tile_size=64)
    scene = read_item(real_items[BAHAMAS], config)
    rgb = scene.products["rgb"]
    assert len(rgb) == 76 and len(scene.rejected) == 132 - 76  # border tiles: nodata collar
    assert all(r.reason.startswith("nodata fraction") for r in scene.rejected)
    with rasterio.open(real_items[BAHAMAS]["assets"]["image"]["href"]) as src:
        for k in (0, len(rgb) // 2, len(rgb) - 1):
            row, col, h, w = rgb.window[k]
            expected = src.read(window=Window(col, row, w, h))
            assert np.array_equal(rgb.images[k], expected)


def test_resampling_to_60m(real_items: dict, real_data: Path) -> None:
    native = read_item(real_items[RONDONIA], _config([real_data], tile_size=32))
    coarse = read_item(real_items[RONDONIA], _config([real_data], tile_size=32, target_gsd=60.0))
    n, c = native.products["rgb"], coarse.products["rgb"]
    assert {m.gsd for m in c.metadata} == {60.0} and {m.gsd for m in n.metadata} == {30.0}
    assert set(c.transform[:, 0]) == {60.0} and set(c.transform[:, 4]) == {-60.0}
    assert (c.transform[:, 2] % 60 == 0).all() and (c.transform[:, 5] % 60 == 0).all()  # snapped to the GSD
    n_rows, n_cols = n.window[:, 0].max() // 32 + 1, n.window[:, 1].max() // 32 + 1
    c_rows, c_cols = c.window[:, 0].max() // 32 + 1, c.window[:, 1].max() // 32 + 1
    assert (n_rows, n_cols) == (7, 9)
    assert c_rows in (n_rows // 2, n_rows // 2 + 1) and c_cols in (n_cols // 2, n_cols // 2 + 1)
    # the same ground: the coarse first tile covers the native 2x2 tiles of its corner, similar brightness
    assert abs(c.images[0].mean() - n.images[0].mean()) < 40
    west, south, east, north = real_items[RONDONIA]["bbox"]
    assert all(west <= m.lon <= east and south <= m.lat <= north for m in c.metadata)


def test_utm_and_epsg_targets(real_items: dict, real_data: Path) -> None:
    utm = read_item(real_items[MADRE], _config([real_data], tile_size=32, target_crs="utm", target_gsd=30.0))
    assert set(utm.products["rgb"].crs) == {"EPSG:32719"}
    other = read_item(
        real_items[MADRE], _config([real_data], tile_size=32, target_crs="EPSG:32720", target_gsd=30.0)
    )
    assert set(other.products["rgb"].crs) == {"EPSG:32720"} and other.n_tiles > 0


def test_aoi(real_items: dict, real_data: Path) -> None:
    config = _config([real_data], tile_size=64)
    west, south, east, north = real_items[MAURITANIA]["bbox"]
    aoi = (west, south, (west + east) / 2, (south + north) / 2)
    scene = read_item(real_items[MAURITANIA], config, aoi_bbox=aoi)
    full = read_item(real_items[MAURITANIA], config)
    assert 0 < scene.n_tiles < full.n_tiles / 3
    for meta in scene.products["rgb"].metadata:
        assert aoi[0] <= meta.lon <= aoi[2] and aoi[1] <= meta.lat <= aoi[3]
    outside = read_item(real_items[MAURITANIA], config, aoi_bbox=(0.0, 0.0, 1.0, 1.0))
    assert "no overlap with AOI" in _scene_rejection(outside)


def _item_for(path: Path, item_id: str = "bad", **asset) -> dict:
    return {
        "type": "Feature",
        "id": item_id,
        "properties": {"datetime": "2020-01-01T00:00:00Z"},
        "assets": {
            "image": {"href": str(path), "eo:bands": [{"name": "g", "common_name": "green"}], **asset}
        },
    }


def test_corrupt_and_missing_files(tmp_path: Path) -> None:
    config = _config([tmp_path])
    garbage = tmp_path / "garbage.tif"
    garbage.write_bytes(b"II*\x00" + bytes(range(256)) * 40)
    reason = _scene_rejection(read_item(_item_for(garbage), config))
    assert "cannot open" in reason and "garbage.tif" in reason
    reason = _scene_rejection(read_item(_item_for(tmp_path / "absent.tif"), config))
    assert "cannot open" in reason and "absent.tif" in reason


def test_truncated_cog(tmp_path: Path) -> None:
    source = (SAMPLES / "landsat8_oli_sr_rondonia_20190727_6band_30m.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(source[: len(source) // 2])
    scene = read_item(
        _item_for(tmp_path / "cut.tif"), _config([tmp_path], products={"g": {"bands": [{"name": "green"}]}})
    )
    reason = _scene_rejection(scene)
    assert "cut.tif" in reason or "read failed" in reason


def test_no_crs_and_huge_header(tmp_path: Path) -> None:
    config = _config([tmp_path])
    plain = tmp_path / "plain.tif"
    with rasterio.open(plain, "w", driver="GTiff", width=64, height=64, count=1, dtype="uint8") as dst:
        dst.write(np.full((1, 64, 64), 7, np.uint8))
    assert "no CRS" in _scene_rejection(read_item(_item_for(plain), config))
    huge = tmp_path / "huge.vrt"
    huge.write_text(
        '<VRTDataset rasterXSize="1000000" rasterYSize="1000000"><SRS>EPSG:32633</SRS>'
        "<GeoTransform>300000, 10, 0, 5800000, 0, -10</GeoTransform>"
        '<VRTRasterBand dataType="UInt16" band="1"/></VRTDataset>'
    )
    t0 = time.monotonic()
    reason = _scene_rejection(read_item(_item_for(huge), config))
    assert "1000000 x 1000000" in reason and "max_pixels" in reason
    assert time.monotonic() - t0 < 5  # decided from the header
    # a tiny target GSD would make a huge grid out of a small file: refused too
    madre = SAMPLES / "landsat8_oli_sr_madre_de_dios_20180906_6band_30m.tif"
    small = _config([SAMPLES], target_gsd=0.01)
    assert "target grid" in _scene_rejection(read_item(_item_for(madre), small))


def test_nodata_tile_region(tmp_path: Path) -> None:
    src_path = SAMPLES / "landsat8_oli_sr_rondonia_20190727_6band_30m.tif"
    path = tmp_path / "holes.tif"
    shutil.copy(src_path, path)
    with rasterio.open(path, "r+", IGNORE_COG_LAYOUT_BREAK="YES") as dst:
        dst.write(
            np.full((6, 64, 64), -9999, np.int16), window=Window(64, 0, 64, 64)
        )  # tile 1 (row 0, col 1)
        dst.write(np.full((6, 64, 64), 1234, np.int16), window=Window(128, 64, 64, 64))  # tile 6: constant
        nir = dst.read(4, window=Window(0, 64, 64, 64))
        nir[:20] = -9999  # only the nir band is nodata in part of tile 4: any band invalid => pixel invalid
        dst.write(nir, 4, window=Window(0, 64, 64, 64))
    item = json.loads((SAMPLES / "items.ndjson").read_text().splitlines()[1])
    assert item["id"] == RONDONIA
    item["assets"]["image"]["href"] = str(path)
    scene = read_item(item, load_catalog("local-samples").with_overrides(allowed_roots=[str(tmp_path)]))
    by_tile = {(r.product, r.tile_index): r.reason for r in scene.rejected}
    assert by_tile[("rgb", 1)] == "nodata fraction 1.00 > 0.10"
    assert by_tile[("multispectral", 1)] == "nodata fraction 1.00 > 0.10"
    assert by_tile[("rgb", 6)].startswith("constant tile: std 0.00")
    assert by_tile[("multispectral", 4)] == "nodata fraction 0.31 > 0.10"
    assert ("rgb", 4) not in by_tile  # rgb does not use nir
    assert len(scene.products["rgb"]) == 10 and len(scene.products["multispectral"]) == 9


def test_cloud_mask_and_scene_cloud_cover(tmp_path: Path, real_items: dict, real_data: Path) -> None:
    madre = SAMPLES / "landsat8_oli_sr_madre_de_dios_20180906_6band_30m.tif"
    with rasterio.open(madre) as src:
        profile = {**src.profile, "count": 1, "dtype": "uint8", "driver": "GTiff", "nodata": None}
    classes = np.zeros((104, 110), np.uint8)
    classes[:32, :32] = 9  # clouds in tile 0 only (tile 32 px)
    classes[32:48, 32:64] = 8  # half of tile 4
    with rasterio.open(tmp_path / "scl.tif", "w", **profile) as dst:
        dst.write(classes[None])
    shutil.copy(madre, tmp_path / "madre.tif")
    item = _item_for(tmp_path / "madre.tif", "clouds")
    item["assets"] = {
        "image": {**copy.deepcopy(real_items[MADRE]["assets"]["image"]), "href": str(tmp_path / "madre.tif")},
        "scl": {"href": str(tmp_path / "scl.tif")},
    }
    config = _config([tmp_path], tile_size=32, cloud_mask={"asset": "scl", "classes": [8, 9, 10]})
    scene = read_item(item, config)
    assert {(r.tile_index, r.reason) for r in scene.rejected if r.product == "rgb"} == {
        (0, "cloud fraction 1.00 > 0.50")
    }
    rgb = scene.products["rgb"]
    clouds = {tuple(w[:2]): m.cloud_cover for w, m in zip(rgb.window, rgb.metadata, strict=True)}
    assert clouds[(32, 32)] == 0.5 and clouds[(0, 32)] == 0.0
    # without a mask the scene's eo:cloud_cover applies; above the threshold the scene is rejected once
    cloudy = copy.deepcopy(real_items[MAURITANIA])
    cloudy["properties"]["eo:cloud_cover"] = 80.0
    assert "scene cloud cover 0.80 > 0.50" in _scene_rejection(read_item(cloudy, _config([real_data])))


def test_bad_items_never_raise(tmp_path: Path, real_items: dict, real_data: Path) -> None:
    config = _config([real_data])
    assert "malformed item" in _scene_rejection(read_item("not an item", config))  # type: ignore[arg-type]
    assert "malformed item" in _scene_rejection(read_item({"id": "x", "assets": {}}, config))
    assert "malformed item" in _scene_rejection(
        read_item({"id": "x", "assets": {"a": {"title": "no href"}}}, config)
    )
    broken = copy.deepcopy(real_items[RONDONIA])
    broken["properties"] = ["not", "a", "dict"]
    assert "malformed item" in _scene_rejection(read_item(broken, config))
    # a required product whose band is missing rejects the scene, naming the band
    required = _config([real_data], products={"ms": {"bands": [{"name": "nir"}], "required": True}})
    scene = read_item(real_items[BAHAMAS], required)
    assert (
        scene.n_tiles == 0
        and "band 'nir'" in scene.rejected[-1].reason
        and scene.rejected[-1].tile_index == -1
    )
    by_asset = _config([real_data], products={"b4": {"bands": [{"name": "red", "asset": "B04"}]}})
    reason = read_item(real_items[RONDONIA], by_asset).rejected[0].reason
    assert "band 'red' (asset 'B04') not found" in reason
    # hrefs that are not allowed
    outside = copy.deepcopy(real_items[RONDONIA])
    assert "outside the allowed roots" in _scene_rejection(read_item(outside, _config([tmp_path])))
    traversal = copy.deepcopy(real_items[RONDONIA])
    traversal["assets"]["image"]["href"] = str(real_data / ".." / ".." / ".." / "etc" / "passwd")
    assert "href not allowed" in _scene_rejection(read_item(traversal, config))
    ftp = copy.deepcopy(real_items[RONDONIA])
    ftp["assets"]["image"]["href"] = "ftp://example.com/a.tif"
    assert "scheme 'ftp'" in _scene_rejection(read_item(ftp, config))


def test_http_range_reads(real_items: dict) -> None:
    spec = importlib.util.spec_from_file_location("http_range", REPO / "bench" / "http_range.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with module.RangeHTTPServer(SAMPLES) as server:
        item = copy.deepcopy(real_items[MADRE])
        item["assets"]["image"]["href"] = f"{server.url}/landsat8_oli_sr_madre_de_dios_20180906_6band_30m.tif"
        config = _config([], allowed_schemes=["http"], tile_size=32)
        scene = read_item(item, config)
        local = read_item(
            real_items[MADRE],
            _config([Path(real_items[MADRE]["assets"]["image"]["href"]).parent], tile_size=32),
        )
        assert scene.n_tiles == local.n_tiles > 0
        assert np.array_equal(scene.products["rgb"].images, local.products["rgb"].images)
        assert server.bytes_served > 0 and server.range_requests > 0


def _moto_port() -> tuple[subprocess.Popen, int]:
    exe = shutil.which("moto_server")
    if exe is None:
        pytest.skip("moto_server is not installed")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.1)
    proc.terminate()
    pytest.fail("moto_server did not start")


def test_s3_reads_through_fsspec(real_items: dict) -> None:
    s3fs = pytest.importorskip("s3fs")
    proc, port = _moto_port()
    try:
        options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing"}
        fs = s3fs.S3FileSystem(**options)
        fs.mkdir("scenes")
        fs.put(str(SAMPLES / "landsat8_oli_sr_madre_de_dios_20180906_6band_30m.tif"), "scenes/madre.tif")
        item = copy.deepcopy(real_items[MADRE])
        item["assets"]["image"]["href"] = "s3://scenes/madre.tif"
        scene = read_item(item, _config([], allowed_schemes=["s3"], tile_size=32), storage_options=options)
        assert scene.n_tiles > 0, scene.rejected
        assert set(scene.products["rgb"].asset_href) == {"s3://scenes/madre.tif"}
    finally:
        proc.terminate()
        proc.wait(timeout=10)
