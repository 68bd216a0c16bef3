"""STAC search on a real rustac API (127.0.0.1), client-side filters, static catalogs, shipped samples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REAL_COLLECTION, SAMPLES
from pystac_client import Client

from dsat_core.data.catalog import CatalogConfig, load_catalog
from dsat_core.data.reader import read_item
from dsat_core.data.stac import (
    filter_items,
    item_signer,
    load_static_catalog,
    matches_query,
    search_items,
    validate_query,
)

BAHAMAS = "landsat7-etm-bahamas-rgb"
S2_L2A = "sentinel2-l2a-T29RKH-20200219"
HAVELLAND = {"sentinel2-l1c-T33UUU-20160529-b03", "sentinel2-l1c-T33UUU-20160608-b03"}


def _config(**changes) -> CatalogConfig:
    base = {
        "name": "real",
        "stac_api": "http://127.0.0.1:1",  # overridden by api_url in the tests
        "collections": [REAL_COLLECTION],
        "products": {"rgb": {"bands": [{"name": "red"}, {"name": "green"}, {"name": "blue"}]}},
    }
    return CatalogConfig.model_validate({**base, **changes})


def _ids(items: list[dict]) -> set[str]:
    return {item["id"] for item in items}


def test_search_all_bbox_datetime_collections(stac_api: str, real_items: dict) -> None:
    assert _ids(search_items(_config(), api_url=stac_api)) == set(real_items)
    assert _ids(search_items(_config(), api_url=stac_api, bbox=(-79.5, 23.0, -76.0, 26.0))) == {BAHAMAS}
    assert _ids(search_items(_config(), api_url=stac_api, datetime="2016-05-01/2016-06-30")) == HAVELLAND
    # the Bahamas item has only a 1999..2014 interval: it matches dates inside it
    assert _ids(search_items(_config(), api_url=stac_api, datetime="2005-01-01/2005-12-31")) == {BAHAMAS}
    assert search_items(_config(collections=["no-such-collection"]), api_url=stac_api) == []
    berlin = {"type": "Polygon", "coordinates": [[[12.7, 52.8], [12.8, 52.8], [12.8, 52.85], [12.7, 52.8]]]}
    assert _ids(search_items(_config(), api_url=stac_api, intersects=berlin)) == HAVELLAND
    # config defaults apply when no argument is given
    assert _ids(search_items(_config(bbox=(12.0, 52.0, 13.0, 53.0)), api_url=stac_api)) == HAVELLAND


def test_search_reads_every_page(stac_api: str, real_items: dict) -> None:
    pages = list(Client.open(stac_api).search(collections=[REAL_COLLECTION], limit=2).pages())
    assert len(pages) == 3  # the server really pages at limit=2
    items = search_items(_config(), api_url=stac_api, page_size=2)
    assert len(items) == len(real_items) and _ids(items) == set(real_items)
    assert len(search_items(_config(), api_url=stac_api, page_size=2, max_items=3)) == 3
    assert len(search_items(_config(max_items=4), api_url=stac_api, page_size=2)) == 4


def test_cloud_and_query_filters_are_client_side(stac_api: str, real_items: dict) -> None:
    # only the Sentinel-2 L2A item has eo:cloud_cover (4.05 %); items without it are kept
    assert S2_L2A not in _ids(search_items(_config(max_cloud_cover=3.0), api_url=stac_api))
    assert len(search_items(_config(max_cloud_cover=3.0), api_url=stac_api)) == len(real_items) - 1
    assert S2_L2A in _ids(search_items(_config(max_cloud_cover=5.0), api_url=stac_api))
    landsat8 = search_items(_config(query={"platform": {"eq": "landsat-8"}}), api_url=stac_api)
    assert {i["properties"]["platform"] for i in landsat8} == {"landsat-8"} and len(landsat8) == 2
    assert len(search_items(_config(query={"platform": "sentinel-2a"}), api_url=stac_api)) == 3
    assert _ids(search_items(_config(query={"eo:cloud_cover": {"lt": 20}}), api_url=stac_api)) == {S2_L2A}
    gsd = search_items(_config(query={"gsd": {"gte": 30, "lt": 300}}), api_url=stac_api)
    assert {i["properties"]["gsd"] for i in gsd} == {30.0, 100.0}


def test_matches_query_operators() -> None:
    props = {"platform": "landsat-8", "eo:cloud_cover": 12.5, "gsd": 30}
    assert matches_query(props, {"platform": {"in": ["landsat-8", "landsat-9"]}})
    assert matches_query(props, {"platform": {"neq": "landsat-7"}, "eo:cloud_cover": {"lte": 12.5}})
    assert matches_query(props, {"platform": {"startsWith": "landsat"}})
    assert not matches_query(props, {"eo:cloud_cover": {"gt": 20}})
    assert not matches_query(props, {"missing": {"neq": 1}})  # a missing property never matches
    assert not matches_query(props, {"platform": {"lt": 3}})  # incomparable types do not match
    with pytest.raises(ValueError, match="unsupported operator"):
        validate_query({"gsd": {"like": "3%"}})


def test_signing(real_items: dict) -> None:
    import planetary_computer

    assert item_signer(_config()) is None
    assert item_signer(_config(signing="planetary-computer")) is planetary_computer.sign
    items = list(real_items.values())
    unsigned = filter_items(items, _config())
    assert [i["assets"] for i in unsigned] == [i["assets"] for i in items]  # unchanged without signing


def test_load_static_catalog(real_data: Path) -> None:
    items = load_static_catalog(real_data / "catalog" / "catalog.json")
    assert len(items) == 6
    for item in items:
        href = item["assets"]["image"]["href"]
        assert Path(href).is_absolute() and Path(href).is_file()
    shipped = load_static_catalog(SAMPLES / "catalog" / "catalog.json")
    assert len(shipped) == 3 and all(Path(i["assets"]["image"]["href"]).is_file() for i in shipped)


def test_shipped_samples_are_cogs_with_relative_hrefs() -> None:
    import rasterio

    lines = (SAMPLES / "items.ndjson").read_text().splitlines()
    assert len(lines) == 3
    total = 0
    for line in lines:
        item = json.loads(line)
        assert item["collection"] == "local-samples"
        href = item["assets"]["image"]["href"]
        assert not Path(href).is_absolute() and (SAMPLES / href).is_file()
        with rasterio.open(SAMPLES / href) as src:
            assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
            assert src.crs.to_epsg() == item["properties"]["proj:epsg"]
        total += (SAMPLES / href).stat().st_size
    assert total < 4_000_000
    assert "CC0" in (SAMPLES / "LICENSES.md").read_text()


def test_every_shipped_scene_is_a_cog_with_its_origin_and_licence_and_all_fit_12_mb() -> None:
    """catalog-all.json (what the demo ingests): >= 8 scenes of 3 sensors, forest to snow, <= 12 MB of
    COGs, each file with a LICENSES.md section giving its origin and licence."""
    import rasterio

    items = load_static_catalog(SAMPLES / "catalog-all.json")
    licences = (SAMPLES / "LICENSES.md").read_text()
    sections = {s.split("`", 2)[1]: s for s in licences.split("\n## ")[1:] if s.startswith("`")}
    total = 0
    for item in items:
        path = Path(item["assets"]["image"]["href"])
        with rasterio.open(path) as src:
            assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG", path
        name = str(path.relative_to(SAMPLES))
        assert "**Origin:**" in sections[name] and "**License:**" in sections[name], name
        total += path.stat().st_size
    covers = {c for i in items for c in i["properties"].get("dsat:land_cover", [])}
    sensors = {i["properties"]["platform"].rstrip("ab") for i in items}  # sentinel-2a -> sentinel-2
    assert len(items) >= 8 and total <= 12_000_000
    assert {"forest", "desert", "snow/ice", "water/coast"} <= covers
    assert sensors == {"landsat-7", "landsat-8", "sentinel-2"}


def test_samples_api_end_to_end(samples_api: str) -> None:
    """rustac started in catalogs/samples serves relative hrefs; the reader finds them under allowed_roots."""
    config = load_catalog("local-samples")
    items = search_items(config, api_url=samples_api)
    assert len(items) == 3
    assert all(not i["assets"]["image"]["href"].startswith("/") for i in items)  # served verbatim
    madre = next(i for i in items if "madre" in i["id"])
    scene = read_item(madre, config)
    assert scene.n_tiles == 2 and not [r for r in scene.rejected if r.tile_index == -1]
    assert scene.products["rgb"].asset_href[0] == str(SAMPLES / madre["assets"]["image"]["href"])
