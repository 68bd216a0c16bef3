"""In-memory tiles of one scene: what the reader produces and the store writes."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dsat_core.metadata import FIELD_NAMES, SatMetadata

# Per-tile string lineage columns of a product group (architecture.md, "Zarr store").
LINEAGE_FIELDS: tuple[str, ...] = ("caption", "item_id", "asset_href", "crs", "scene_datetime", "platform")


@dataclass(frozen=True)
class Rejection:
    """A scene (`tile_index == -1`) or tile that was not written, and why."""

    item_id: str
    reason: str
    tile_index: int = -1
    product: str = ""


@dataclass
class ProductTiles:
    """Tiles of one product of one scene. Arrays share their first axis (the tile)."""

    product: str
    bands: list[str]
    images: np.ndarray  # (n, band, y, x) uint8 / uint16
    metadata: list[SatMetadata]
    caption: list[str]
    item_id: list[str]
    asset_href: list[str]  # space-separated hrefs of the assets read
    crs: list[str]  # e.g. "EPSG:32633"
    scene_datetime: list[str]  # ISO 8601
    platform: list[str]
    transform: np.ndarray  # (n, 6) float64, rasterio/affine order (a, b, c, d, e, f)
    window: np.ndarray  # (n, 4) int64: row_off, col_off, height, width on the scene's target grid
    scale_min: np.ndarray  # (n, band) float64: source value mapped to 0
    scale_max: np.ndarray  # (n, band) float64: source value mapped to the dtype max

    def __post_init__(self) -> None:
        n = len(self.images)
        for name in ("metadata", *LINEAGE_FIELDS, "transform", "window", "scale_min", "scale_max"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{self.product}: {name} has {len(getattr(self, name))} rows, images {n}")
        if self.images.ndim != 4 or self.images.shape[1] != len(self.bands):
            raise ValueError(f"{self.product}: images {self.images.shape} do not match bands {self.bands}")

    def __len__(self) -> int:
        return len(self.images)

    def identities(self) -> list[str]:
        """Tile identity `(item id, window)` as a string; writing one identity twice is a no-op."""
        return [
            f"{i}:{','.join(map(str, w))}" for i, w in zip(self.item_id, self.window.tolist(), strict=True)
        ]

    def metadata_arrays(self) -> dict[str, np.ndarray]:
        """float64 lon/lat/gsd/cloud_cover (NaN missing) and int64 year/month/day (-1 missing)."""
        out: dict[str, np.ndarray] = {}
        for name in FIELD_NAMES:
            values = [getattr(m, name) for m in self.metadata]
            if name in ("year", "month", "day"):
                out[name] = np.array([-1 if v is None else v for v in values], dtype=np.int64)
            else:
                out[name] = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
        return out


@dataclass
class SceneTiles:
    """Everything read from one STAC item: tiles per product, plus what was rejected."""

    item_id: str
    products: dict[str, ProductTiles] = field(default_factory=dict)
    rejected: list[Rejection] = field(default_factory=list)

    @property
    def n_tiles(self) -> int:
        return sum(len(p) for p in self.products.values())
