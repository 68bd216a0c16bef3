"""Generated images as STAC + COGs (dsat_core.evaluation.stac_output), served by `rustac serve`."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request

import numpy as np
import pystac
import pytest
import rasterio
from pyproj import Transformer
from pystac.errors import STACValidationError

from dsat_core.evaluation.stac_output import validate_catalog, write_generated_stac
from dsat_core.imaging.geotiff import utm_epsg
from dsat_core.metadata import SatMetadata

METADATA = [
    SatMetadata(lon=12.73, lat=52.83, gsd=10.0, cloud_cover=0.04, year=2016, month=5, day=29),
    SatMetadata(lon=-69.99, lat=-12.88, gsd=30.0, year=2018, month=9, day=6),
    SatMetadata(lon=-77.5, lat=24.5, gsd=1.5),  # no date: datetime is the generation time
]


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    images = np.random.default_rng(0).integers(0, 256, (3, 3, 48, 64), dtype=np.uint8)
    out = tmp_path_factory.mktemp("generated")
    path = write_generated_stac(
        images, METADATA, ["a city", "a forest", "a reef"], [11, 12, 13], "models:/diffusionsat/4", "4", out
    )
    return path, images


def test_utm_zone():
    assert utm_epsg(12.73, 52.83) == 32633
    assert utm_epsg(-69.99, -12.88) == 32719
    assert utm_epsg(180.0, 0.0) == 32660 and utm_epsg(-180.0, -1.0) == 32701


def test_catalog_validates_offline_and_is_self_contained(catalog, tmp_path):
    path, _ = catalog
    assert validate_catalog(path) == 5  # catalog + collection + 3 items
    cat = pystac.Catalog.from_file(str(path))
    items = list(cat.get_items(recursive=True))
    assert [i.properties["dsat:seed"] for i in sorted(items, key=lambda i: i.id)] == [11, 12, 13]
    # relocatable: a copy elsewhere still validates and resolves its assets
    copy = tmp_path / "copy"
    shutil.copytree(path.parent, copy)
    assert validate_catalog(copy / "catalog.json") == 5


def test_item_content(catalog):
    path, _ = catalog
    item = next(
        i for i in pystac.Catalog.from_file(str(path)).get_items(recursive=True) if i.id.endswith("0")
    )
    props = item.properties
    assert props["dsat:prompt"] == "a city" and props["dsat:model_uri"] == "models:/diffusionsat/4"
    assert props["dsat:model_version"] == "4" and props["dsat:generated"] is True
    assert props["proj:code"] == "EPSG:32633" and props["proj:shape"] == [48, 64]
    assert props["eo:cloud_cover"] == pytest.approx(4.0) and props["gsd"] == 10.0
    assert props["processing:software"]["dsat-core"]
    assert item.datetime.isoformat().startswith("2016-05-29")
    assert SatMetadata.from_stac_properties(props) == METADATA[0]
    assert item.assets["image"].media_type == pystac.MediaType.COG
    assert not item.to_dict()["assets"]["image"]["href"].startswith("/")
    west, south, east, north = item.bbox
    assert west < 12.73 < east and south < 52.83 < north


def test_cog_georeferencing(catalog):
    path, images = catalog
    items = sorted(pystac.Catalog.from_file(str(path)).get_items(recursive=True), key=lambda i: i.id)
    for item, meta, image in zip(items, METADATA, images, strict=True):
        with rasterio.open(item.assets["image"].get_absolute_href()) as src:
            assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
            assert src.crs.to_epsg() == utm_epsg(meta.lon, meta.lat)
            assert src.res == (meta.gsd, meta.gsd)
            np.testing.assert_array_equal(src.read(), image)
            cx, cy = src.xy(src.height / 2, src.width / 2, offset="ul")  # the image centre
            lon, lat = Transformer.from_crs(src.crs, "EPSG:4326", always_xy=True).transform(cx, cy)
            assert lon == pytest.approx(meta.lon, abs=1e-7) and lat == pytest.approx(meta.lat, abs=1e-7)
            assert src.tags()["dsat_seed"] == str(item.properties["dsat:seed"])


def test_validation_catches_errors(catalog, tmp_path):
    path, _ = catalog
    copy = tmp_path / "bad"
    shutil.copytree(path.parent, copy)
    item_file = next(copy.rglob("dsat-generated-000001.json"))
    d = json.loads(item_file.read_text())
    d["properties"]["datetime"] = "yesterday"
    item_file.write_text(json.dumps(d))
    with pytest.raises(STACValidationError):
        validate_catalog(copy / "catalog.json")
    d["properties"]["datetime"] = "2018-09-06T00:00:00Z"
    d["properties"]["proj:shape"] = [48]
    item_file.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="proj:shape"):
        validate_catalog(copy / "catalog.json")


def test_missing_location_is_rejected(tmp_path):
    images = np.zeros((2, 3, 8, 8), np.uint8)
    with pytest.raises(ValueError, match="image 1: metadata lacks gsd"):
        write_generated_stac(
            images, [METADATA[0], SatMetadata(lon=1.0, lat=2.0)], ["a", "b"], [1, 2], "m", "1", tmp_path
        )
    with pytest.raises(ValueError, match="uint8"):
        write_generated_stac(images.astype(np.float32), METADATA[:2], ["a", "b"], [1, 2], "m", "1", tmp_path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("rustac") is None, reason="rustac CLI not installed")
def test_served_by_rustac(catalog):
    from pystac_client import Client

    path, _ = catalog
    collection_dir = path.parent / "dsat-generated"
    port = _free_port()
    proc = subprocess.Popen(
        ["rustac", "serve", "collection.json", "--load-collection-items", "--addr", f"127.0.0.1:{port}"],
        cwd=collection_dir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                urllib.request.urlopen(url, timeout=1).read()
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"rustac serve exited: {proc.stdout.read().decode()}") from None
                time.sleep(0.1)
        client = Client.open(url)
        found = list(client.search(collections=["dsat-generated"]).items())
        assert sorted(i.id for i in found) == [f"dsat-generated-00000{i}" for i in range(3)]
        near_berlin = list(client.search(collections=["dsat-generated"], bbox=[12, 52, 13.5, 53.5]).items())
        assert [i.properties["dsat:prompt"] for i in near_berlin] == ["a city"]
        assert near_berlin[0].properties["proj:code"] == "EPSG:32633"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
