"""The apply job: a model applied to an area of interest, one georeferenced mosaic per scene (date).

`run_apply(ApplySpec)` is the one driver (the `dsat apply` command and the `apply-model` Prefect flow both
call it):

1. STAC search of the catalog over the AOI and dates; the model resolved (folder, ``models:/``, ``runs:/``)
   and loaded once; its task card says which product conditions it and the output factor.
2. Per item: the product opened on the AOI grid at the input GSD (`open_place`, the dataset reader); a
   `TilePlan` of overlapping tiles of the model's size; tiles run in batches (noise from each tile's
   position; ``strength`` < 1: from the task's baseline, as evaluation), each finished tile written to a
   scratch Zarr (`ScratchTiles`); a restarted run skips the finished ones. Several processes (torchrun:
   ``RANK`` / ``WORLD_SIZE``) take every WORLD_SIZE-th tile; rank 0 writes the mosaic once all are done.
3. Once every tile is done: the blended mosaic as a COG (`write_mosaic_cog`) at the output GSD in the grid's
   CRS, the fill mask as a sidecar COG (fill tasks), a preview PNG and the STAC item with provenance, built
   in a staging folder and moved into the output in one rename (S3: uploaded, item JSON last). Then
   ``catalog.json`` over every item, validated offline.
4. The report names every output and every item skipped with its reason; the run (params, items, previews)
   is logged to MLflow when a tracking URI is set.

Bad input: no items, a model none of whose bands the catalog supplies (or, without band names, another
channel count), an AOI over ``max_pixels``, ``strength`` < 1 for generation or a task without a baseline
→ `ValueError` before anything is written; model bands the catalog lacks are marked missing (the band rule
of evaluation) with a warning in the report and the items; an item outside the allowed roots / schemes,
without overlap, fully clouded or (temporal) without another date → skipped with its reason in the report.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext, suppress
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, Field
from rasterio.windows import Window

from dsat_core.apply.cog import write_mask_cog, write_mosaic_cog
from dsat_core.apply.model import ModelInfo, TileRunner, load_runner, resolve
from dsat_core.apply.scratch import ScratchTiles
from dsat_core.apply.source import ItemUnusable, PlaceSource, open_place
from dsat_core.apply.stac_item import ITEM_LINKS, build_item, write_catalog
from dsat_core.apply.tiling import Tile, TilePlan, tile_seed
from dsat_core.data.catalog import CatalogConfig, load_catalog
from dsat_core.data.reader import scene_dates
from dsat_core.data.stac import search_items
from dsat_core.imaging.rgb import rgb_band_indices

# Input px of overlap a tile needs at least: a tile's bicubic start and its back-projection see 2 input px
# past its edge (the bicubic kernel), so the blend needs about twice that to leave it out (bench/apply.py:
# seams of small SR tiles, 8 input px, at 2 px of overlap vs 4).
MIN_OVERLAP_PX = 4


class ApplySpec(BaseModel):
    """What to apply where (the `dsat apply` options and the `apply-model` flow parameters)."""

    kind: str = Field(..., description="'generate' or a ControlNet task: sr, inpaint, temporal")
    catalog: str = Field(..., description="catalogs/<name>.yaml or a YAML path")
    bbox: tuple[float, float, float, float] = Field(..., description="AOI, WGS84 lon/lat")
    datetime: str | None = Field(None, description="STAC datetime range A/B")
    model: str = Field(
        ..., description="pipeline folder, models:/name@alias, models:/name/N or runs:/id/path"
    )
    out: str = Field(..., description="output folder or s3://bucket/prefix")
    stac_api: str | None = Field(None, description="override the catalog's STAC API URL")
    max_items: int | None = Field(None, gt=0)
    input_gsd: float | None = Field(None, gt=0, description="metres per input pixel (default: the catalog's)")
    overlap: int | None = Field(None, ge=0, description="input px shared by tiles (default ¼ tile, >= 4)")
    batch_size: int = Field(8, ge=1)
    steps: int = Field(20, ge=1)
    guidance_scale: float | None = None
    strength: float = Field(
        1.0, gt=0, le=1,
        description="image-to-image start from the task's baseline, as evaluation's strength; 1 = from noise",
    )  # fmt: skip
    seed: int = 0
    prompt: str = "a satellite image"
    product: str = Field("rgb", description="generate: the product whose grid and dates it follows")
    fill_mask: str | None = Field(None, description="fill tasks: a mask GeoTIFF (1 = fill) instead of clouds")
    device: str = "cpu"
    max_pixels: int = Field(50_000_000, gt=0, description="largest output mosaic (pixels) accepted")
    max_tiles: int | None = Field(None, ge=0, description="stop after this many tiles (resume later)")
    work_dir: str | None = Field(None, description="scratch Zarr and staging (default: <out>/.work)")
    nproc_per_node: int = Field(1, ge=1, description="processes (torchrun) sharing the tiles; one per GPU")
    storage_options: dict[str, Any] | None = None
    mlflow_tracking_uri: str | None = Field(default_factory=lambda: os.environ.get("MLFLOW_TRACKING_URI"))
    experiment: str = "apply"


@dataclass
class ApplyReport:
    """What a run produced: outputs (item JSON paths), skipped items with reasons, tile counts."""

    outputs: list[str]
    skipped: list[dict[str, str]]
    tiles_run: int
    tiles_reused: int
    complete: bool
    catalog: str | None = None
    mlflow_run_id: str | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _rank() -> tuple[int, int]:
    """(rank, world size) of this process (torchrun's environment; 1 process otherwise)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _init_distributed() -> None:
    _, world = _rank()
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")


# ---------------------------------------------------------------------------------------------- setup
@dataclass
class _Run:
    spec: ApplySpec
    config: CatalogConfig
    runner: TileRunner
    model: ModelInfo
    out_local: Path
    work: Path
    band_warnings: list[str] = field(default_factory=list)

    @property
    def tile_in(self) -> int:
        factor = self.runner.output_factor
        if self.runner.tile_px % factor:
            raise ValueError(f"model tile {self.runner.tile_px} px is not a multiple of its factor {factor}")
        return self.runner.tile_px // factor

    @property
    def overlap(self) -> int:
        """``--overlap``, else ¼ of a tile and at least `MIN_OVERLAP_PX` (at most half a tile)."""
        if self.spec.overlap is not None:
            return self.spec.overlap
        return max(self.tile_in // 4, min(MIN_OVERLAP_PX, self.tile_in // 2))


def _config(spec: ApplySpec, tile_in: int) -> CatalogConfig:
    config = load_catalog(spec.catalog).with_overrides(
        stac_api=spec.stac_api, target_gsd=spec.input_gsd, tile_size=max(tile_in, 8), overlap=0
    )
    return config


def _out_dirs(spec: ApplySpec) -> tuple[Path, Path]:
    """(local output folder — a staging folder for s3://, the work folder for scratch and staging)."""
    if spec.out.startswith("s3://"):
        key = hashlib.sha256(spec.out.encode()).hexdigest()[:16]
        work = Path(spec.work_dir or Path(tempfile.gettempdir()) / f"dsat-apply-{key}")
        return work / "out", work
    out = Path(spec.out)
    return out, Path(spec.work_dir) if spec.work_dir else out / ".work"


def _setup(spec: ApplySpec) -> tuple[_Run, list[dict]]:
    out_local, work = _out_dirs(spec)
    rank, world = _rank()
    model = resolve(spec.model, work / f"rank{rank}" if world > 1 else work, spec.mlflow_tracking_uri)
    runner = load_runner(
        spec.kind, model, product=spec.product, device=spec.device, steps=spec.steps,
        guidance_scale=spec.guidance_scale, prompt=spec.prompt, strength=spec.strength,
    )  # fmt: skip
    run = _Run(spec, load_catalog(spec.catalog), runner, model, out_local, work)
    run.config = _config(spec, run.tile_in)
    if runner.input_product not in run.config.products:
        raise ValueError(
            f"the model reads product {runner.input_product!r}; catalog {run.config.name!r} has "
            f"{sorted(run.config.products)}"
        )
    with _catalog_api(run.config) as url:  # a catalog's static_catalog is served while the search runs
        items = search_items(
            run.config, api_url=url, bbox=spec.bbox, datetime=spec.datetime, max_items=spec.max_items
        )
    if not items:
        raise ValueError(
            f"no items in catalog {run.config.name!r} ({run.config.stac_api}) for bbox {spec.bbox} "
            f"and datetime {spec.datetime}"
        )
    return run, items


def _catalog_api(config: CatalogConfig) -> AbstractContextManager[str | None]:
    """The STAC API the search goes to: ``stac_api``, else the catalog's ``static_catalog`` served for it."""
    try:
        from dsat_core.data.stac_server import catalog_api
    except ImportError:  # a tree whose catalogs have no static_catalog
        return nullcontext(config.stac_api)
    return catalog_api(config)


# ---------------------------------------------------------------------------------------------- tiles
def _upsample(mask: np.ndarray, factor: int) -> np.ndarray:
    return mask if factor == 1 else np.repeat(np.repeat(mask, factor, axis=-2), factor, axis=-1)


@dataclass
class _Scene:
    """One item being applied: its source, plan, scratch and fill mask reader."""

    place: PlaceSource
    plan: TilePlan
    scratch: ScratchTiles
    fill: Callable[[Window], np.ndarray] | None
    others: list[_OtherDate] = field(default_factory=list)

    def inputs(self, tile: Tile) -> dict[str, Any]:
        """The tile's frame, validity and pixels to fill, and its conditioning frames (C, T, h, w) with their
        metadata: the frame itself, or the other dates' frames (temporal)."""
        window = Window(tile.x, tile.y, self.plan.tile, self.plan.tile)
        frame, valid = self.place.read(window)
        fill = self.fill(window) & valid if self.fill is not None else None
        sources = [o.place for o in self.others] or [self.place]
        cond = np.stack([frame] if not self.others else [s.read(window)[0] for s in sources], axis=1)
        meta = [s.metadata(window) for s in sources]
        return {"window": window, "frame": frame, "valid": valid, "fill": fill, "cond": cond, "meta": meta}


def _run_batch(run: _Run, scene: _Scene, batch: list[Tile]) -> None:
    """Run the model on one batch of tiles and write each to the scratch."""
    factor, place = run.runner.output_factor, scene.place
    reads = [scene.inputs(t) for t in batch]
    frames = torch.from_numpy(np.stack([r["cond"] for r in reads]))
    fill = None
    if run.runner.fills_mask:
        fill = torch.from_numpy(
            np.stack([_upsample(r["fill"], factor) for r in reads])[:, None].astype(np.float32)
        )
    frame_meta = [r["meta"] for r in reads]
    out_gsd = place.grid.gsd_m / factor
    target_meta = [place.metadata(r["window"]).replace(gsd=out_gsd) for r in reads]
    seeds = [tile_seed(run.spec.seed, t.y, t.x) for t in batch]
    images = run.runner(frames, place.bands, fill, target_meta, frame_meta, seeds)
    for k, (tile, read) in enumerate(zip(batch, reads, strict=True)):
        valid = _upsample(read["valid"], factor)
        keep = np.zeros_like(valid)
        known = np.zeros((3, *valid.shape), np.uint8)
        if run.runner.fills_mask:
            keep = valid & ~_upsample(read["fill"], factor)
            rgb = read["frame"][rgb_band_indices(place.bands, read["frame"].shape[0])]
            known = np.clip(np.rint((rgb + 1.0) / 2.0 * 255.0), 0, 255).astype(np.uint8)
        scene.scratch.write(tile.index, images[k], valid, keep, known)


def _run_tiles(run: _Run, scene: _Scene, budget: list[int]) -> tuple[int, int, bool]:
    """This rank's unfinished tiles in batches; (run, reused, all tiles of the scene done)."""
    rank, world = _rank()
    done = scene.scratch.done()
    mine = [t for t in scene.plan.tiles if t.index % world == rank]
    todo = [t for t in mine if not done[t.index]]
    ran = 0
    for start in range(0, len(todo), run.spec.batch_size):
        if budget[0] <= 0:
            break
        batch = todo[start : start + min(run.spec.batch_size, budget[0])]
        _run_batch(run, scene, batch)
        ran += len(batch)
        budget[0] -= len(batch)
    _barrier()
    return ran, len(mine) - len(todo), bool(scene.scratch.done().all())


# ---------------------------------------------------------------------------------------------- fill masks
def _mask_reader(run: _Run, place: PlaceSource) -> Callable[[Window], np.ndarray] | None:
    """Where a fill task fills: the given mask raster on the input grid, else the catalog's cloud mask."""
    if not run.runner.fills_mask:
        return None
    if run.spec.fill_mask is None:
        return place.cloud
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT

    grid = place.grid

    def read(window: Window) -> np.ndarray:
        with rasterio.open(run.spec.fill_mask) as src, WarpedVRT(
            src, crs=grid.crs, transform=grid.transform, width=grid.width, height=grid.height,
            resampling=Resampling.nearest,
        ) as vrt:  # fmt: skip
            return vrt.read(1, window=window) > 0

    return read


def _row_strips(place: PlaceSource, rows: int = 256) -> Iterator[Window]:
    """Full-width windows of ``rows`` input rows covering the place's grid (reads with flat memory)."""
    grid = place.grid
    for y0 in range(0, grid.height, rows):
        yield Window(0, y0, grid.width, min(rows, grid.height - y0))


def _fill_fraction(place: PlaceSource, fill: Callable[[Window], np.ndarray]) -> float:
    """Fraction of the valid input pixels to fill, read strip by strip."""
    total, filled = 0, 0
    for window in _row_strips(place):
        _, valid = place.read(window)
        total += int(valid.sum())
        filled += int((fill(window) & valid).sum())
    return filled / total if total else 1.0


def _mask_strip(scene: _Scene, factor: int, y0: int, y1: int) -> np.ndarray:
    """uint8 output rows [y0, y1): 1 = filled by the model, 0 = kept, 255 = no input data."""
    grid = scene.place.grid
    r0, r1 = y0 // factor, -(-y1 // factor)
    window = Window(0, r0, grid.width, r1 - r0)
    _, valid = scene.place.read(window)
    fill = scene.fill(window) if scene.fill is not None else np.zeros_like(valid)
    out = _upsample(np.where(valid, fill.astype(np.uint8), 255).astype(np.uint8), factor)
    return out[y0 - r0 * factor : y1 - r0 * factor]


# ---------------------------------------------------------------------------------------------- other dates
@dataclass
class _OtherDate:
    """A conditioning date of the temporal task: its source on the target's grid and masked fraction."""

    place: PlaceSource
    masked: float
    when: datetime

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.place.item_id, "hrefs": self.place.hrefs, "datetime": self.place.scene_datetime,
                "masked_fraction": self.masked}  # fmt: skip


def _masked_fraction(place: PlaceSource) -> float:
    """Fraction of the grid without clear data (nodata, or cloud where the catalog has a mask)."""
    masked = 0
    for window in _row_strips(place):
        _, valid = place.read(window)
        if place.has_cloud_mask:
            valid &= ~place.cloud(window)
        masked += int((~valid).sum())
    return masked / max(1, place.grid.width * place.grid.height)


def _candidate_dates(run: _Run, place: PlaceSource, items: list[dict]) -> list[dict]:
    """The search's items of another date than ``place``'s, in the task's direction."""
    target, _ = scene_dates(place.properties)
    direction = getattr(run.runner.task, "direction", "both")
    out = []
    for item in items:
        when, _ = scene_dates(item.get("properties") or {})
        if item.get("id") == place.item_id or when is None or target is None or when.date() == target.date():
            continue
        if (direction == "forward" and when >= target) or (direction == "backward" and when <= target):
            continue
        out.append(item)
    return out


@dataclass(frozen=True)
class _Candidate:
    """Another date of the place, ranked for the temporal task: clearest first, then nearest in time."""

    item: dict
    masked: float
    when: datetime
    gap_s: float

    @property
    def rank(self) -> tuple[float, float]:
        return self.masked, self.gap_s


def _open_other(run: _Run, place: PlaceSource, item: dict) -> AbstractContextManager[PlaceSource]:
    """``item``'s product on ``place``'s grid (with the catalog's cloud mask when it has one)."""
    return open_place(
        item, run.config, place.product, run.spec.bbox, storage_options=run.spec.storage_options,
        cloud_mask=run.config.cloud_mask is not None, grid=place.grid,
    )  # fmt: skip


def _candidate(run: _Run, place: PlaceSource, item: dict) -> _Candidate | None:
    """``item`` opened for its masked fraction over the AOI, then closed; None when unusable or undated."""
    target = scene_dates(place.properties)[0]
    with ExitStack() as stack:
        try:
            other = stack.enter_context(_open_other(run, place, item))
        except ItemUnusable:
            return None
        masked, when = _masked_fraction(other), scene_dates(other.properties)[0]
    if when is None or target is None:
        return None
    return _Candidate(item, masked, when, abs((when - target).total_seconds()))


def _other_dates(run: _Run, place: PlaceSource, items: list[dict], stack: ExitStack) -> list[_OtherDate]:
    """The temporal task's ``sequence_length`` frames: the clearest other dates of the place (least masked
    fraction over the AOI, then nearest in time; only those not fully masked), repeated when fewer, in
    chronological order (as in training); each opened on ``place``'s grid in ``stack``. `ItemUnusable` when
    none."""
    length = int(getattr(run.runner.task, "sequence_length", 1))
    candidates = (_candidate(run, place, item) for item in _candidate_dates(run, place, items))
    ranked = sorted((c for c in candidates if c is not None), key=lambda c: c.rank)
    usable = [c for c in ranked if c.masked < 1.0][:length]
    if not usable:
        raise ItemUnusable(place.item_id, "no other date of this place in the search to fill from (temporal)")
    chosen = [
        _OtherDate(stack.enter_context(_open_other(run, place, c.item)), c.masked, c.when) for c in usable
    ]
    return sorted((chosen[k % len(chosen)] for k in range(length)), key=lambda o: o.when)


# ---------------------------------------------------------------------------------------------- outputs
def _fingerprint(run: _Run, place: PlaceSource, plan: TilePlan, others: list[_OtherDate]) -> dict[str, Any]:
    card = run.runner.task.to_card() if run.runner.task is not None else None
    return {
        "kind": run.spec.kind, "model": run.model.uri, "version": run.model.version, "task": card,
        "item": place.item_id, "hrefs": place.hrefs, "grid": list(place.grid.transform)[:6],
        "shape": [place.grid.height, place.grid.width], "tiling": plan.to_dict(), "seed": run.spec.seed,
        "steps": run.spec.steps, "guidance": run.runner.guidance_scale, "strength": run.spec.strength,
        "prompt": run.spec.prompt, "fill_mask": run.spec.fill_mask,
        "conditioning": [o.to_dict() for o in others],
    }  # fmt: skip


def _provenance(
    run: _Run, place: PlaceSource, plan: TilePlan, fill_fraction: float | None, others: list[_OtherDate]
) -> dict:
    out: dict[str, Any] = {
        "kind": run.spec.kind,
        "model": run.model.to_dict(),
        "task": run.runner.task.to_card() if run.runner.task is not None else None,
        "inputs": [{"id": place.item_id, "hrefs": place.hrefs, "product": place.product}],
        "catalog": run.config.name,
        "input_gsd": place.grid.gsd_m,
        "seed": run.spec.seed,
        "steps": run.spec.steps,
        "guidance_scale": run.runner.guidance_scale,
        "strength": run.spec.strength,
        "prompt": run.spec.prompt,
        "tiling": plan.to_dict(),
        "input_scaling": {
            b: {"min": float(lo), "max": float(hi), "dtype": place.dtype}
            for b, lo, hi in zip(place.bands, place.scale_min, place.scale_max, strict=True)
        },
    }
    if run.band_warnings:
        out["band_warnings"] = run.band_warnings
    if others:
        out["conditioning"] = [o.to_dict() for o in others]  # the other dates the temporal task read
    if fill_fraction is not None:
        out["fill"] = {
            "source": run.spec.fill_mask or "catalog cloud mask",
            "fraction": fill_fraction,
            "kept_pixels": "returned unchanged (bit-exact)",
        }
    return out


def _preview(cog: Path, png: Path, max_side: int = 512) -> None:
    """A PNG of the COG, read from its overviews at most ``max_side`` px a side."""
    import rasterio
    from PIL import Image

    with rasterio.open(cog) as src:
        scale = max(1.0, max(src.width, src.height) / max_side)
        shape = (3, max(1, round(src.height / scale)), max(1, round(src.width / scale)))
        data = src.read(out_shape=shape)
    Image.fromarray(np.moveaxis(data, 0, -1)).save(png)


def _write_outputs(run: _Run, scene: _Scene, out_id: str, fill_fraction: float | None) -> Path:
    """COG, mask, preview and item in a staging folder, then moved into the output in one rename."""
    place, plan, factor = scene.place, scene.plan, run.runner.output_factor
    staging = run.work / "staging" / out_id
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    transform = place.grid.transform @ place.grid.transform.scale(1.0 / factor)
    crs = place.grid.crs
    bands = ["red", "green", "blue"]
    provenance = _provenance(run, place, plan, fill_fraction, scene.others)
    tags = {"dsat_apply": json.dumps(provenance, default=str)[:30000], "dsat_nodata": "internal mask"}
    cog = write_mosaic_cog(staging / f"{out_id}.tif", plan, scene.scratch, crs, transform, bands, tags,
                           run.work / "strips")  # fmt: skip
    assets = {
        "image": (f"./{cog.name}", "image/tiff; application=geotiff; profile=cloud-optimized", ["data"])
    }
    if scene.fill is not None:
        strip = partial(_mask_strip, scene, factor)
        write_mask_cog(
            staging / f"{out_id}-mask.tif", plan.out_shape, strip, crs, transform, run.work / "strips"
        )
        assets["fill_mask"] = (f"./{out_id}-mask.tif", "image/tiff; application=geotiff", ["data-mask"])
    _preview(cog, staging / f"{out_id}-preview.png")
    assets["preview"] = (f"./{out_id}-preview.png", "image/png", ["overview"])
    band_info = [
        {"name": b, "data_type": "uint8", "nodata": "mask", "scale": 1 / 255, "offset": 0.0} for b in bands
    ]
    item = build_item(
        out_id, crs=crs, transform=transform, shape=plan.out_shape, gsd=place.grid.gsd_m / factor,
        source_properties=place.properties, provenance=provenance, assets=assets, bands=band_info,
    )  # fmt: skip
    item_path = staging / f"{out_id}.json"
    item.set_self_href(str(item_path))
    item.make_asset_hrefs_relative()
    record = item.to_dict(include_self_link=False)
    record["links"] = [*record.get("links", []), *ITEM_LINKS]  # the catalog at the output's root
    item_path.write_text(json.dumps(record, indent=1))
    final = run.out_local / out_id
    run.out_local.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    return final / f"{out_id}.json"


# ---------------------------------------------------------------------------------------------- driver
def _apply_item(
    run: _Run, item: dict, items: list[dict], budget: list[int], counts: dict[str, int]
) -> Path | None:
    """One item: its tiles (resumed), then its outputs once every tile is done; None when not finished."""
    out_id = f"{run.spec.kind}-{item.get('id')}"
    final = run.out_local / out_id / f"{out_id}.json"
    if final.is_file():  # idempotent: a finished output is not made again
        return final
    with ExitStack() as stack:
        place = _open_checked(run, item, stack)
        fill, fraction = _fill_of(run, place)
        scene = _plan_scene(run, out_id, place, fill, items, stack)
        ran, reused, complete = _run_tiles(run, scene, budget)
        counts["run"] += ran
        counts["reused"] += reused
        if not complete or _rank()[0] != 0:
            return None
        path = _write_outputs(run, scene, out_id, fraction)
        scene.scratch.remove()
        return path


def _open_checked(run: _Run, item: dict, stack: ExitStack) -> PlaceSource:
    """The item's input product on the AOI grid (kept open in ``stack``), its bands and size checked."""
    place = stack.enter_context(open_place(
        item, run.config, run.runner.input_product, run.spec.bbox, storage_options=run.spec.storage_options,
        cloud_mask=run.runner.fills_mask and run.spec.fill_mask is None,
    ))  # fmt: skip
    run.runner.check_bands(place.bands)
    run.runner.check_strength(place.bands)
    factor = run.runner.output_factor
    out_pixels = place.grid.width * place.grid.height * factor * factor
    if out_pixels > run.spec.max_pixels:
        raise ValueError(
            f"{place.item_id}: the AOI's output is {place.grid.width * factor} x "
            f"{place.grid.height * factor} = {out_pixels:.3g} pixels > max_pixels "
            f"{run.spec.max_pixels:.3g}"
        )
    return place


def _fill_of(run: _Run, place: PlaceSource) -> tuple[Callable[[Window], np.ndarray] | None, float | None]:
    """(fill mask reader, fraction of the valid pixels to fill) of a fill task, (None, None) otherwise;
    `ItemUnusable` when every pixel is to fill."""
    fill = _mask_reader(run, place)
    if fill is None:
        return None, None
    fraction = _fill_fraction(place, fill)
    if fraction >= 1.0:
        raise ItemUnusable(place.item_id, "fully clouded: no clear pixel to fill from")
    return fill, fraction


def _plan_scene(
    run: _Run,
    out_id: str,
    place: PlaceSource,
    fill: Callable[[Window], np.ndarray] | None,
    items: list[dict],
    stack: ExitStack,
) -> _Scene:
    """The item's other dates (temporal), tile plan and scratch (resumed when its fingerprint matches)."""
    others = _other_dates(run, place, items, stack) if run.spec.kind == "temporal" else []
    plan = TilePlan(place.grid.height, place.grid.width, run.tile_in, run.overlap, run.runner.output_factor)
    scratch = _scratch(run, out_id, plan, _fingerprint(run, place, plan, others))
    return _Scene(place, plan, scratch, fill, others)


def _scratch(run: _Run, out_id: str, plan: TilePlan, fingerprint: dict[str, Any]) -> ScratchTiles:
    """The scene's scratch: made (or checked) by rank 0, then opened by the other ranks."""
    path, rank = run.work / "scratch" / f"{out_id}.zarr", _rank()[0]
    scratch = ScratchTiles(path, len(plan.tiles), plan.out_tile, fingerprint) if rank == 0 else None
    _barrier()
    return scratch or ScratchTiles(path, len(plan.tiles), plan.out_tile, fingerprint)


def _check_first(run: _Run, items: list[dict]) -> None:
    """Errors that concern the whole run (bands, AOI size) before any tile runs, on the first usable item."""
    for item in items:
        try:
            with open_place(item, run.config, run.runner.input_product, run.spec.bbox,
                            storage_options=run.spec.storage_options) as place:  # fmt: skip
                run.band_warnings = run.runner.check_bands(place.bands)
                run.runner.check_strength(place.bands)
                return
        except ItemUnusable:
            continue


def run_apply(spec: ApplySpec, log: Callable[[str], None] = lambda _: None) -> ApplyReport:
    """Apply ``spec.model`` to ``spec.bbox`` (see the module docstring); returns the run's report.

    With ``nproc_per_node`` > 1 (outside a torchrun already) the job relaunches itself on that many
    processes (`dsat_core.training.launch`, torchrun) and returns rank 0's report.
    """
    if spec.nproc_per_node > 1 and "WORLD_SIZE" not in os.environ:
        return _launch(spec, log)
    _init_distributed()
    run, items = _setup(spec)
    _check_first(run, items)
    for warning in run.band_warnings:
        log(f"warning: {warning}")
    budget = [spec.max_tiles if spec.max_tiles is not None else 1 << 62]
    counts = {"run": 0, "reused": 0}
    outputs: list[str] = []
    skipped: list[dict[str, str]] = []
    complete = True
    for item in items:
        try:
            path = _apply_item(run, item, items, budget, counts)
        except ItemUnusable as err:
            skipped.append({"item_id": err.item_id, "reason": err.reason})
            log(f"skipped {err.item_id}: {err.reason}")
            continue
        if path is None:
            complete = False
        else:
            outputs.append(str(path))
            log(f"wrote {path}")
    counts = _all_ranks(counts)
    report = ApplyReport(outputs, skipped, counts["run"], counts["reused"], complete,
                         warnings=list(run.band_warnings))  # fmt: skip
    if _rank()[0] != 0:
        return report
    if outputs:
        report.catalog = _finish_catalog(run, [Path(p) for p in outputs])
    if complete and outputs:
        report.mlflow_run_id = _log_mlflow(run, report)
    if run.spec.out.startswith("s3://") and outputs:
        _upload(run)
    if complete:
        _remove_empty(run.work)
    return report


def _remove_empty(work: Path) -> None:
    """The work folder's empty scratch / staging folders (and the folder, when nothing else is left)."""
    for folder in (work / "scratch", work / "staging", work / "strips", work):
        with suppress(OSError):  # not empty (a downloaded model, another scene's scratch) or absent
            folder.rmdir()


def _all_ranks(counts: dict[str, int]) -> dict[str, int]:
    """Tile counts summed over the ranks (unchanged in one process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return counts
    values = torch.tensor([counts["run"], counts["reused"]], dtype=torch.int64)
    torch.distributed.all_reduce(values)
    return {"run": int(values[0]), "reused": int(values[1])}


def _launch(spec: ApplySpec, log: Callable[[str], None]) -> ApplyReport:
    """``spec`` on ``spec.nproc_per_node`` torchrun processes; rank 0's report."""
    from dsat_core.training.launch import build_launch_command, run_training_subprocess

    _, work = _out_dirs(spec)
    work.mkdir(parents=True, exist_ok=True)
    config, report = work / "launch-spec.json", work / "launch-report.json"
    config.write_text(spec.model_dump_json())
    report.unlink(missing_ok=True)
    cmd = build_launch_command(__name__, str(config), nproc_per_node=spec.nproc_per_node)
    code = run_training_subprocess(cmd, log)
    if code != 0 or not report.is_file():
        raise RuntimeError(f"apply on {spec.nproc_per_node} processes failed (exit code {code})")
    return ApplyReport(**json.loads(report.read_text()))


def _finish_catalog(run: _Run, item_files: Sequence[Path]) -> str:
    from dsat_core.evaluation.stac_output import validate_catalog

    every = sorted(p for p in run.out_local.glob("*/*.json") if p.stem == p.parent.name)  # item folders
    path = write_catalog(run.out_local, every or list(item_files), f"{run.spec.kind} by {run.model.uri}")
    validate_catalog(path)
    return str(path if not run.spec.out.startswith("s3://") else f"{run.spec.out.rstrip('/')}/catalog.json")


def _upload(run: _Run) -> None:
    """Copy the finished outputs to S3: item folders first, ``catalog.json`` last."""
    import fsspec

    fs = fsspec.filesystem("s3", **(run.spec.storage_options or {}))
    root = run.spec.out.rstrip("/")
    for folder in sorted(p for p in run.out_local.iterdir() if p.is_dir()):
        for file in sorted(folder.iterdir()):
            fs.put_file(str(file), f"{root}/{folder.name}/{file.name}")
    fs.put_file(str(run.out_local / "catalog.json"), f"{root}/catalog.json")


def _log_mlflow(run: _Run, report: ApplyReport) -> str | None:
    """One MLflow run: the spec as params, each item JSON and preview PNG as artifacts."""
    if not run.spec.mlflow_tracking_uri:
        return None
    from dsat_core.evaluation.tracking import EvaluationRun

    tags = {"dsat.kind": run.spec.kind, "dsat.model_uri": run.model.uri}
    if run.model.run_id:
        tags["dsat.model_run_id"] = run.model.run_id
    tracker = EvaluationRun(run.spec.mlflow_tracking_uri, run.spec.experiment,
                            run_name=f"apply-{run.spec.kind}", tags=tags)  # fmt: skip
    spec = run.spec.model_dump(exclude={"storage_options", "mlflow_tracking_uri"})
    tracker.log_params({**spec, "model_version": run.model.version, "model_alias": run.model.alias})
    metrics = {"tiles_run": report.tiles_run, "tiles_reused": report.tiles_reused,
               "items_written": len(report.outputs), "items_skipped": len(report.skipped)}  # fmt: skip
    tracker.log_metrics(metrics)
    for item_file in report.outputs:
        folder = Path(item_file).parent
        tracker.log_artifact(item_file, f"items/{folder.name}")
        for png in folder.glob("*-preview.png"):
            tracker.log_artifact(png, f"items/{folder.name}")
    tracker.log_dict(report.to_dict(), "apply_report.json")
    tracker.end()
    return tracker.run_id


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m dsat_core.apply.job --config spec.json`` (what each torchrun process runs)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    spec = ApplySpec.model_validate_json(Path(args.config).read_text())
    report = run_apply(spec, log=lambda line: print(f"[rank {_rank()[0]}] {line}", flush=True))
    if _rank()[0] == 0:
        (Path(args.config).parent / "launch-report.json").write_text(json.dumps(report.to_dict()))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


__all__ = ["ApplyReport", "ApplySpec", "main", "run_apply"]

if __name__ == "__main__":
    main()
