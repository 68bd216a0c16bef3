"""STAC source definitions (`catalogs/*.yaml`), validated with pydantic."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

CATALOG_DIR = Path(__file__).resolve().parents[2] / "catalogs"


class CatalogConfigError(ValueError):
    """A catalog YAML file that does not validate; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BandSpec(_Strict):
    """One output band: found by asset key, or by `common_name` in an asset's `eo:bands`."""

    name: str
    asset: str | None = None
    common_name: str | None = None

    @model_validator(mode="after")
    def _has_lookup(self) -> BandSpec:
        if self.asset is None and self.common_name is None:
            object.__setattr__(self, "common_name", self.name)
        return self


class ScalingSpec(_Strict):
    """How source values become uint8/uint16.

    `fixed`: `range` maps linearly onto the dtype range (same for every scene, e.g. reflectance 0..3000).
    `percentile`: per scene and band, the `percentiles` of valid pixels map onto the dtype range.
    Either way the per-tile (min, max) actually used is recorded in the store.
    """

    mode: Literal["fixed", "percentile"] = "fixed"
    range: tuple[float, float] = (0.0, 3000.0)
    percentiles: tuple[float, float] = (2.0, 98.0)
    dtype: Literal["uint8", "uint16"] = "uint8"


class ProductSpec(_Strict):
    """A product of the store (e.g. `rgb`, `multispectral`): its bands and scaling."""

    bands: list[BandSpec] = Field(min_length=1)
    scaling: ScalingSpec = ScalingSpec()
    required: bool = False


class CloudMaskSpec(_Strict):
    """A classification band giving per-pixel clouds (e.g. Sentinel-2 `scl` classes 8, 9, 10)."""

    asset: str
    classes: list[int] = Field(min_length=1)


class QualitySpec(_Strict):
    max_nodata_fraction: float = Field(0.1, ge=0, le=1)
    max_cloud_fraction: float = Field(0.5, ge=0, le=1)
    min_std: float = Field(
        1.0, ge=0, description="tiles whose pixel std (output units) is below are constant"
    )
    max_pixels: int = Field(400_000_000, gt=0, description="a source raster larger than this is rejected")


class ImporterSpec(_Strict):
    """A dataset that is not a STAC API: where its published copy lives and which importer reads it.

    `dsat import <catalog>` runs `dsat_core.data.importers` over `source` (overridable) into a static catalog
    that the catalog's `stac_api` (a local `dsat stac serve`) then serves.
    """

    name: Literal["fmow", "fmow-sentinel", "xbd", "spacenet"]
    source: str = Field(description="public location of the published copy (s3:// or https://)")
    docs: str = Field("", description="where to read about obtaining it (licence, registration)")
    options: dict[str, Any] = Field(default_factory=dict, description="importer keyword arguments")


class CatalogConfig(_Strict):
    """One STAC source: where to search, what to read, how to tile and filter it."""

    name: str
    description: str = ""
    stac_api: str | None = Field(
        None, description="STAC API root URL; may be overridden at run time (e.g. a local server)"
    )
    static_catalog: str | None = Field(
        None,
        description="a static STAC catalog (catalog.json, or an importer's folder; relative to the YAML) "
        "that each run serves itself on a free 127.0.0.1 port when no stac_api is given",
    )
    collections: list[str] = Field(min_length=1)
    signing: Literal["none", "planetary-computer"] = "none"
    products: dict[str, ProductSpec] = Field(min_length=1)
    target_crs: str = Field("utm", description="'utm' (zone of the scene centre), 'native' or 'EPSG:<code>'")
    target_gsd: float | None = Field(10.0, gt=0, description="metres per pixel; null keeps the scene's own")
    tile_size: int = Field(256, ge=8, le=4096)
    overlap: int = Field(
        0, ge=0, description="pixels shared by neighbouring tiles; partial edge tiles dropped"
    )
    max_cloud_cover: float | None = Field(None, ge=0, le=100, description="scene eo:cloud_cover, percent")
    query: dict[str, Any] = Field(default_factory=dict, description="property filters, applied client-side")
    bbox: tuple[float, float, float, float] | None = None
    datetime: str | None = None
    max_items: int | None = Field(None, gt=0)
    cloud_mask: CloudMaskSpec | None = None
    quality: QualitySpec = QualitySpec()
    caption_template: str = "a satellite image{of_class}{in_place}"
    class_property: str | None = Field(None, description="item property holding a class/land-cover word")
    allowed_schemes: list[Literal["https", "http", "s3", "file"]] = ["https", "s3"]
    allowed_roots: list[str] = Field(default_factory=list, description="local folders hrefs may point into")
    importer: ImporterSpec | None = None

    @field_validator("target_crs")
    @classmethod
    def _crs(cls, value: str) -> str:
        if value in ("utm", "native") or value.upper().startswith("EPSG:"):
            return value
        raise ValueError("target_crs must be 'utm', 'native' or 'EPSG:<code>'")

    @model_validator(mode="after")
    def _has_source(self) -> CatalogConfig:
        if self.stac_api is None and self.static_catalog is None:
            raise ValueError("give stac_api (a STAC API URL) or static_catalog (a catalog to serve)")
        return self

    @model_validator(mode="after")
    def _overlap_below_tile(self) -> CatalogConfig:
        if self.overlap >= self.tile_size:
            raise ValueError(f"overlap ({self.overlap}) must be smaller than tile_size ({self.tile_size})")
        return self

    @property
    def stride(self) -> int:
        return self.tile_size - self.overlap

    def with_overrides(self, **changes: Any) -> CatalogConfig:
        """A copy with fields replaced (validated again)."""
        data = self.model_dump()
        data.update({k: v for k, v in changes.items() if v is not None})
        return CatalogConfig.model_validate(data)

    def resolved_roots(self, base: Path | None = None) -> list[Path]:
        base = base or CATALOG_DIR
        return [(base / root).resolve() for root in self.allowed_roots]


def load_catalog(name_or_path: str | Path) -> CatalogConfig:
    """Load `catalogs/<name>.yaml` or a YAML path; relative `allowed_roots` are made absolute."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CATALOG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CATALOG_DIR.glob("*.yaml")))
        raise CatalogConfigError(f"catalog {name_or_path!r} not found (known: {known})")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise CatalogConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise CatalogConfigError(f"{path}: expected a mapping at top level")
    raw["allowed_roots"] = [str((path.parent / r).resolve()) for r in raw.get("allowed_roots", [])]
    if isinstance(raw.get("static_catalog"), str) and "://" not in raw["static_catalog"]:
        raw["static_catalog"] = str((path.parent / raw["static_catalog"]).resolve())
    try:
        return CatalogConfig.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise CatalogConfigError(f"{path}: {problems}") from err


def list_catalogs() -> list[str]:
    return sorted(p.stem for p in CATALOG_DIR.glob("*.yaml"))
