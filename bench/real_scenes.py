"""Real scenes for the benchmarks: ../shared/data/real and catalogs/samples/extra read into one store."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from dsat_core.data.catalog import CatalogConfig
from dsat_core.data.store import DatasetStore

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "data" / "real"
EXTRA = REPO / "catalogs" / "samples" / "extra"


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
