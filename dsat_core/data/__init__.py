from dsat_core.data.ingest import IngestReport, ingest_items, ingest_report_markdown  # noqa: E402,F401
from dsat_core.data.store import (  # noqa: E402,F401
    CommitResult,
    DatasetStore,
    StagedScene,
    StoreError,
    has_latents,
    write_latents,
)
from dsat_core.data.synthetic import make_scene_tiles, make_synthetic_store  # noqa: E402,F401


def __getattr__(name: str):  # TileDataset imports torch: load it only when asked for
    if name == "TileDataset":
        from dsat_core.data.dataset import TileDataset

        return TileDataset
    raise AttributeError(f"module 'dsat_core.data' has no attribute {name!r}")


from dsat_core.data.grid import TargetGrid, build_grid, utm_crs  # noqa: E402,F401
from dsat_core.data.reader import read_item, scene_dates  # noqa: E402,F401
from dsat_core.data.security import UnsafeHrefError, check_href, check_vrt  # noqa: E402,F401
from dsat_core.data.stac import filter_items, load_static_catalog, matches_query, search_items  # noqa: E402,F401
