"""Catalog YAML validation."""

from pathlib import Path

import pytest

from dsat_core.data.catalog import CatalogConfigError, list_catalogs, load_catalog


@pytest.mark.parametrize("name", list_catalogs())
def test_every_shipped_catalog_validates(name):
    config = load_catalog(name)
    assert config.name == name
    assert "rgb" in config.products
    assert config.stride == config.tile_size - config.overlap


def test_required_sources_are_shipped():
    names = set(list_catalogs())
    assert {
        "earth-search-sentinel-2-l2a",
        "earth-search-naip",
        "planetary-computer-sentinel-2-l2a",
        "planetary-computer-landsat-c2-l2",
        "local-samples",
    } <= names
    assert load_catalog("planetary-computer-sentinel-2-l2a").signing == "planetary-computer"


def test_bad_config_names_file_and_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstac_api: http://x\ncollections: [c]\ntile_size: 4\nproducts: {}\n")
    with pytest.raises(CatalogConfigError) as err:
        load_catalog(bad)
    message = str(err.value)
    assert "bad.yaml" in message and "tile_size" in message and "products" in message


def test_overlap_must_be_below_tile_size(tmp_path):
    bad = tmp_path / "overlap.yaml"
    bad.write_text(
        "name: x\nstac_api: http://x\ncollections: [c]\ntile_size: 64\noverlap: 64\n"
        "products: {rgb: {bands: [{name: red}]}}\n"
    )
    with pytest.raises(CatalogConfigError, match="overlap"):
        load_catalog(bad)


def test_unknown_catalog_lists_known_ones():
    with pytest.raises(CatalogConfigError, match="local-samples"):
        load_catalog("no-such-source")


def test_unknown_keys_are_rejected(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text(
        "name: x\nstac_api: http://x\ncollections: [c]\n"
        "products: {rgb: {bands: [{name: red}]}}\ntile_sise: 3\n"
    )
    with pytest.raises(CatalogConfigError, match="tile_sise"):
        load_catalog(bad)


def test_static_catalog_is_resolved_next_to_the_yaml(tmp_path):
    """A catalog may name a static catalog to serve instead of a STAC API URL (relative to its YAML)."""
    config = load_catalog("local-samples")
    assert config.stac_api is None and config.static_catalog is not None
    assert Path(config.static_catalog).is_file() and Path(config.static_catalog).name == "catalog.json"
    path = tmp_path / "own.yaml"
    path.write_text(
        "name: own\nstatic_catalog: cat/catalog.json\ncollections: [c]\n"
        "products: {rgb: {bands: [{name: red}]}}\n"
    )
    assert load_catalog(path).static_catalog == str(tmp_path / "cat" / "catalog.json")
    assert load_catalog(path).with_overrides(stac_api="http://x").stac_api == "http://x"


def test_a_catalog_needs_a_stac_api_or_a_static_catalog(tmp_path):
    bad = tmp_path / "nowhere.yaml"
    bad.write_text("name: x\ncollections: [c]\nproducts: {rgb: {bands: [{name: red}]}}\n")
    with pytest.raises(CatalogConfigError, match=r"nowhere\.yaml.*stac_api.*static_catalog"):
        load_catalog(bad)
