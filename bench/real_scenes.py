"""Real scenes for the benchmarks: ../shared/data/real and catalogs/samples/extra read into one store."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from dsat_core.data.catalog import BandSpec, CatalogConfig, ProductSpec, ScalingSpec
from dsat_core.data.store import DatasetStore

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "data" / "real"
EXTRA = REPO / "catalogs" / "samples" / "extra"


def real_catalog(
    name: str, description: str, tile_size: int, extra_bands: Sequence[str] = ()
) -> CatalogConfig:
    """A catalog over both static catalogs' files, native grid, 2–98 % percentile scaling: ``rgb`` (uint8,
    required) and, with ``extra_bands``, a ``multispectral`` product of those bands (uint16)."""
    scaling = {"mode": "percentile", "percentiles": (2.0, 98.0)}
    products = {
        "rgb": ProductSpec(
            bands=[BandSpec(name=b) for b in ("red", "green", "blue")],
            scaling=ScalingSpec(dtype="uint8", **scaling),
            required=True,
        )
    }
    if extra_bands:
        products["multispectral"] = ProductSpec(
            bands=[BandSpec(name=b) for b in extra_bands], scaling=ScalingSpec(dtype="uint16", **scaling)
        )
    return CatalogConfig(
        name=name, description=description, stac_api="http://127.0.0.1:1", collections=["real"],
        target_crs="native", target_gsd=None, tile_size=tile_size, allowed_schemes=["file"],
        allowed_roots=[str(REAL), str(EXTRA)], products=products,
    )  # fmt: skip


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_store(
    path: Path, config: CatalogConfig, item_ids: Sequence[str], *, skip_missing: bool = False
) -> str:
    """``item_ids`` of both static catalogs read (`read_item`) and committed into a store at ``path``; a
    store already there is kept. ``skip_missing``: an id in neither catalog is logged and skipped."""
    from dsat_core.data.reader import read_item
    from dsat_core.data.stac import load_static_catalog

    if (path / "zarr.json").is_file():
        return str(path)
    items = {i["id"]: i for i in load_static_catalog(REAL / "catalog" / "catalog.json")}
    items.update({i["id"]: i for i in load_static_catalog(EXTRA / "catalog" / "catalog.json")})
    store = DatasetStore.open(str(path), create=True, catalog=config)
    staged = []
    for item_id in item_ids:
        if skip_missing and item_id not in items:
            log(f"{item_id}: not in the catalogs, skipped")
            continue
        scene = read_item(items[item_id], config)
        counts = {k: len(v) for k, v in scene.products.items()}
        log(f"read {item_id}: {counts} tiles, {len(scene.rejected)} rejected")
        staged.append(store.stage(scene))
    store.commit(staged)
    return str(path)
