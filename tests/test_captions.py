"""caption_for: template placeholders and offline nearest-city reverse geocoding (not point-in-polygon)."""

from __future__ import annotations

import pytest

from dsat_core.captions import caption_for, nearest_place, template_fields
from dsat_core.data.catalog import CatalogConfig
from dsat_core.metadata import SatMetadata


def _config(**changes) -> CatalogConfig:
    base = {
        "name": "t",
        "stac_api": "http://127.0.0.1:1",
        "collections": ["c"],
        "products": {"rgb": {"bands": [{"name": "red"}]}},
    }
    return CatalogConfig.model_validate({**base, **changes})


@pytest.mark.parametrize(
    ("lon", "lat", "country"),
    [
        (-77.766787, 24.557932, "Bahamas"),  # Andros
        (-63.925179, -8.741966, "Brazil"),  # Porto Velho
        (-69.995615, -12.885382, "Peru"),  # Madre de Dios
        (-11.426896, 24.800473, "Mauritania"),  # Tiris Zemmour
        (12.733033, 52.828459, "Germany"),  # Havelland
    ],
)
def test_countries_of_the_sample_scenes(lon: float, lat: float, country: str) -> None:
    meta = SatMetadata(lon=lon, lat=lat)
    assert caption_for(meta, {}, _config()) == f"a satellite image in {country}"


def test_nearest_city_is_not_point_in_polygon() -> None:
    # open Atlantic, 400 km west of Lisbon: still "Portugal" (nearest coast), not "ocean"
    assert nearest_place(39.0, -14.0).country == "Portugal"
    # Strasbourg is in France, but a point 2 km across the Rhine is nearest to a German town (Kehl):
    # near borders the nearest populated place decides, which can be either side
    assert nearest_place(48.5734, 7.7521).country == "France"
    assert nearest_place(48.5700, 7.8150).country == "Germany"
    assert nearest_place(None, 10.0) is None and nearest_place(95.0, 0.0) is None


def test_placeholders_and_class() -> None:
    props = {"platform": "landsat-8", "instruments": ["oli", "tirs"], "land_cover": "airport"}
    meta = SatMetadata(lon=-63.925179, lat=-8.741966, year=2019, month=7, day=27)
    config = _config(
        caption_template="a {platform} {sensor} image{of_class}{in_place}, {year}",
        class_property="land_cover",
    )
    assert caption_for(meta, props, config) == "a Landsat 8 OLI/TIRS image of an airport in Brazil, 2019"
    place = caption_for(
        meta,
        {"land_cover": ["crop_field"]},
        _config(caption_template="{place}:{of_class}", class_property="land_cover"),
    )
    assert place == "Porto Velho, Brazil: of a crop field"
    # unknown values vanish without leaving double spaces
    assert caption_for(SatMetadata(), {}, config) == "a image,"
    assert caption_for(SatMetadata(), {}, _config()) == "a satellite image"
    with pytest.raises(ValueError, match="unknown placeholder"):
        template_fields("a {colour} image")
    assert template_fields("a satellite image{of_class}{in_place}") == {"of_class", "in_place"}
