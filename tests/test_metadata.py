"""The 7-field metadata encoding of spec §1."""

from datetime import datetime

import numpy as np
import pytest

from dsat_core.metadata import FIELD_NAMES, SatMetadata, decode_batch, effective_gsd, encode_batch


def test_encoding_matches_spec_formula():
    meta = SatMetadata(lon=-63.9, lat=-8.74, gsd=30.0, cloud_cover=0.25, year=2019, month=7, day=27)
    vector, mask = meta.encode()
    expected = (
        np.array([(-63.9 + 180) / 360, (-8.74 + 90) / 180, 30.0, 0.25, (2019 - 1980) / 120, 7 / 12, 27 / 31])
        * 1000
    )
    np.testing.assert_allclose(vector, expected)
    assert mask.all()


def test_round_trip_all_fields():
    meta = SatMetadata(lon=12.7, lat=52.8, gsd=10.0, cloud_cover=0.0, year=2016, month=6, day=8)
    decoded = SatMetadata.decode(*meta.encode())
    for name in FIELD_NAMES:
        assert getattr(decoded, name) == pytest.approx(getattr(meta, name))


def test_missing_fields_are_masked_not_zero_valued():
    meta = SatMetadata(lat=0.0, lon=0.0, cloud_cover=0.0)  # equator, prime meridian, clear sky
    vector, mask = meta.encode()
    assert mask.tolist() == [True, True, False, True, False, False, False]
    # A real zero is encoded as a non-zero value for lon/lat, so it never collides with "missing".
    assert vector[0] == pytest.approx(500.0) and vector[1] == pytest.approx(500.0)
    decoded = SatMetadata.decode(vector, mask)
    assert decoded.gsd is None and decoded.year is None and decoded.lat == pytest.approx(0.0)


def test_nan_means_missing_and_ranges_are_checked():
    assert SatMetadata(gsd=float("nan")).gsd is None
    with pytest.raises(ValueError, match="lat"):
        SatMetadata(lat=91.0)
    with pytest.raises(ValueError, match="cloud_cover"):
        SatMetadata(cloud_cover=40.0)  # a percentage, not a fraction


def test_batch_round_trip_and_datetime():
    metas = [
        SatMetadata.from_datetime("2020-02-19T11:34:25.405Z", lon=-11.4, lat=24.8, gsd=100.0),
        SatMetadata.from_datetime(datetime(2016, 5, 29), gsd=10.0),
        SatMetadata(),
    ]
    vectors, masks = encode_batch(metas)
    assert vectors.shape == (3, 7) and masks.dtype == bool
    assert decode_batch(vectors, masks)[0].month == 2
    assert decode_batch(vectors, masks)[2] == SatMetadata()


def test_stac_properties_round_trip():
    meta = SatMetadata(lon=-77.8, lat=24.5, gsd=300.0, cloud_cover=0.04, year=2020, month=2, day=19)
    props = meta.to_stac_properties()
    assert props["eo:cloud_cover"] == pytest.approx(4.0)
    assert props["datetime"].startswith("2020-02-19")
    assert SatMetadata.from_stac_properties(props) == meta
    plain = {"gsd": 10.0, "eo:cloud_cover": 4.05, "datetime": "2020-02-19T11:34:25Z"}
    assert SatMetadata.from_stac_properties(plain) == SatMetadata(
        gsd=10.0, cloud_cover=0.0405, year=2020, month=2, day=19
    )
    assert meta.to_params()["metadata.gsd"] == "300.0"
    assert SatMetadata().to_params()["metadata.lon"] == "missing"


def test_effective_gsd():
    # A 1024 px image at 0.5 m resized to 256 px: the model sees 2 m pixels.
    assert effective_gsd(0.5, 1024, 256) == pytest.approx(2.0)
