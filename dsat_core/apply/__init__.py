"""Apply a trained model to a place: STAC search → the AOI's windows (the dataset reader) → overlapping
tiles through the model (batched, resumable, sharded over ranks) → one blended COG per scene, with a STAC
item carrying its provenance, logged to MLflow. The driver is `dsat_core.apply.job.run_apply`.

Modules: `tiling` (plan, feather weights, per-tile seeds), `source` (an item on the AOI grid, read by
window), `scratch` (finished tiles, for resume), `cog` (mosaic → COG), `stac_item` (item + catalog),
`model` (model URI → runner), `job` (the driver).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dsat_core._lazy import lazy_exports

if TYPE_CHECKING:
    from dsat_core.apply.job import ApplyReport, ApplySpec, run_apply
    from dsat_core.apply.tiling import TilePlan, tile_seed

_MODULE_OF = {
    "ApplyReport": "job",
    "ApplySpec": "job",
    "TilePlan": "tiling",
    "run_apply": "job",
    "tile_seed": "tiling",
}

__all__ = ["ApplyReport", "ApplySpec", "TilePlan", "run_apply", "tile_seed"]

__getattr__, __dir__ = lazy_exports(__name__, _MODULE_OF, globals())
