"""Applying a model to a place: seams, throughput and memory of `dsat apply` (the `run_apply` driver) on a
real scene (the shipped Landsat 8 Rondônia clip, served by a local rustac STAC API).

1. Seams: the mean absolute gradient across tile borders divided by the one inside tiles at the same phase
   of the input's pixel grid (tile borders are input-pixel boundaries; an upsampled image has steps there of
   its own), on the SR mosaic with overlap (cosine feathering) and on the same run without overlap (target
   with overlap: ≤ 1.15); also against every inside position.
2. Throughput: tiles/s of the driver (no overlap, batched, scratch Zarr, COG, STAC item) vs a plain loop over
   the same tiles (read the window, one pipeline call per tile, paste into an array, one `write_cog`)
   (target ≥ 0.8×).
3. Memory: peak RSS of the driver, each in a fresh process, for the AOI and for 4× its area, as the whole
   process and above the RSS after the model is loaded (target: 4× the area ≤ 1.2× the memory).

    python bench/apply.py                       # tiny SR ControlNet built here (32 px tiles, factor 2)
    python bench/apply.py --model runs/controlnet-sr/pipeline --steps 20
    python bench/apply.py --model demo-output/controlnet-sr/pipeline --seams-only   # the demo's trained model
    python bench/apply.py --model demo-output/controlnet-sr/pipeline --steps 20 --strength 0.1 --seams-only

Prints each measurement and its ratio.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
AOI = (-63.95, -8.76, -63.938, -8.749)  # about 45 x 42 px of 30 m (16 tiles of 16 px)
BANDS = ["blue", "green", "red", "nir", "swir16", "swir22"]


def scaled_aoi(factor: float) -> tuple[float, float, float, float]:
    """The AOI grown about its south-west corner to ``factor`` times its area."""
    w, s, e, n = AOI
    k = factor**0.5
    return (w, s, w + (e - w) * k, s + (n - s) * k)


def build_model(folder: Path) -> Path:
    """The tiny SR ControlNet of tests/test_apply.py (random weights; a trained one via --model)."""
    from dsat_core.data.tasks import SuperResolutionTask, write_task_card
    from dsat_core.pipelines import make_tiny_controlnet_pipeline

    make_tiny_controlnet_pipeline(16, 6, BANDS).save_pretrained(str(folder), safe_serialization=True)
    write_task_card(SuperResolutionTask(degradation={"factor": 2, "blur_sigma": 0.0}), folder)
    return folder


def seam_ratio(image: np.ndarray, plan, same_phase: bool = True) -> float:  # noqa: ANN001 - a TilePlan
    """Mean |gradient| across the tiles' borders / mean |gradient| inside the tiles (both axes, all bands).

    Tile borders fall on input-pixel boundaries (multiples of the output factor), where an upsampled image has
    its own steps; with ``same_phase`` "inside" is the other input-pixel boundaries inside tiles, so that the
    ratio measures the tiling and not the input's pixel grid (with factor 1: every position, as without)."""
    x = image.astype(np.float64)
    ratios = []
    for axis, starts in ((2, {t.x for t in plan.tiles}), (1, {t.y for t in plan.tiles})):
        grad = np.abs(np.diff(x, axis=axis)).mean(axis=tuple(a for a in (0, 1, 2) if a != axis))
        edges = {s * plan.factor for s in starts} | {s * plan.factor + plan.out_tile for s in starts}
        border = sorted(e - 1 for e in edges if 0 < e < x.shape[axis])  # gradient between e-1 and e
        positions = np.arange(grad.size)
        if same_phase:
            positions = positions[positions % plan.factor == plan.factor - 1]
        inside = np.setdiff1d(positions, border)
        ratios.append((grad[border].mean(), grad[inside].mean()))
    return float(sum(r[0] for r in ratios) / sum(r[1] for r in ratios))


def spec(model: Path, out: Path, api: str, args: argparse.Namespace, **changes):  # noqa: ANN201
    from dsat_core.apply.job import ApplySpec

    values = dict(kind="sr", catalog="local-samples", bbox=AOI, model=str(model), out=str(out), stac_api=api,
                  steps=args.steps, strength=args.strength, batch_size=args.batch_size, seed=0,
                  mlflow_tracking_uri=None)  # fmt: skip
    return ApplySpec(**{**values, **changes})


def plan_of(report) -> tuple[np.ndarray, object]:  # noqa: ANN001
    import rasterio

    from dsat_core.apply.tiling import TilePlan

    item = json.loads(Path(report.outputs[0]).read_text())
    tiling = item["properties"]["dsat:apply"]["tiling"]
    with rasterio.open(Path(report.outputs[0]).with_suffix(".tif")) as src:
        image = src.read()
    f = tiling["factor"]
    plan = TilePlan(image.shape[1] // f, image.shape[2] // f, tiling["tile_px"], tiling["overlap_px"], f)
    return image, plan


def plain_loop(model: Path, api: str, args: argparse.Namespace, out: Path) -> tuple[float, int]:
    """The same tiles without overlap, one pipeline call each, pasted and written once; (seconds, tiles)."""
    import torch
    from rasterio.windows import Window

    from dsat_core.apply.source import open_place
    from dsat_core.apply.tiling import TilePlan
    from dsat_core.data.catalog import load_catalog
    from dsat_core.data.stac import search_items
    from dsat_core.data.tasks import read_task_card
    from dsat_core.imaging.geotiff import write_cog
    from dsat_core.pipelines import SatControlNetPipeline

    start = time.perf_counter()
    pipe = SatControlNetPipeline.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    task = read_task_card(model)
    config = load_catalog("local-samples").with_overrides(stac_api=api, tile_size=8, overlap=0)
    [item] = search_items(config, bbox=AOI)
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    with open_place(item, config, task.input_product, AOI) as place:
        f = task.output_factor
        plan = TilePlan(place.grid.height, place.grid.width, side // f, 0, f)
        mosaic = np.zeros((3, *plan.out_shape), np.uint8)
        for tile in plan.tiles:
            frame, _ = place.read(Window(tile.x, tile.y, plan.tile, plan.tile))
            frames = torch.from_numpy(frame)[None, :, None]
            inputs = task.place_conditioning(frames, place.bands)
            if args.strength < 1:
                inputs.update(init_image=task.place_baseline(frames, place.bands), strength=args.strength)
            image = pipe(**inputs, num_inference_steps=args.steps, output_type="pt",
                         generator=torch.Generator().manual_seed(tile.index)).images  # fmt: skip
            image = (task.place_consistent(image.double() * 2 - 1, frames, place.bands)[0] + 1) / 2
            y, x = plan.out_origin(tile)
            mosaic[:, y : y + side, x : x + side] = np.rint(image.clamp(0, 1).numpy() * 255).astype(np.uint8)
        transform = place.grid.transform @ place.grid.transform.scale(1.0 / f)
        write_cog(out / "plain.tif", mosaic, place.grid.crs, transform, ["red", "green", "blue"], {})
    return time.perf_counter() - start, len(plan.tiles)


def memory_child(model: str, api: str, factor: float, out: str, steps: int, batch: int) -> None:
    """One driver run in this process; prints {"peak_mb", "loaded_mb"} as JSON."""
    from dsat_core.apply import job

    loaded = {}
    load = job.load_runner

    def measured_load(*a, **k):  # noqa: ANN002, ANN003, ANN202
        runner = load(*a, **k)
        loaded["mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return runner

    job.load_runner = measured_load
    args = argparse.Namespace(steps=steps, batch_size=batch, strength=1.0)
    job.run_apply(spec(Path(model), Path(out), api, args, bbox=scaled_aoi(factor), overlap=4))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_mb": peak, "loaded_mb": loaded["mb"]}))


def memory(model: Path, api: str, args: argparse.Namespace, work: Path, factor: float) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--memory-child", str(factor), "--model", str(model), "--api", api,
           "--out", str(work / f"mem-{factor}"), "--steps", str(args.steps),
           "--batch-size", str(args.batch_size)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"memory run ({factor}x area) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="an SR pipeline folder (default: a tiny one built here)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--strength", type=float, default=1.0, help="image-to-image start (1: from noise)")
    parser.add_argument("--seams-only", action="store_true", help="only the seam ratios (no speed, memory)")
    parser.add_argument("--memory-child", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--api", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    if args.memory_child is not None:
        memory_child(args.model, args.api, args.memory_child, args.out, args.steps, args.batch_size)
        return
    from dsat_core.apply.job import run_apply
    from dsat_core.data.stac_server import start_rustac

    work = Path(tempfile.mkdtemp(prefix="bench-apply-"))
    model = Path(args.model) if args.model else build_model(work / "model")
    server = start_rustac(["collection.json", "items.ndjson"], REPO / "catalogs" / "samples")
    try:
        results = {}
        for name, overlap in (("overlap", None), ("no_overlap", 0)):
            start = time.perf_counter()
            report = run_apply(spec(model, work / name, server.url, args, overlap=overlap))
            seconds = time.perf_counter() - start
            image, plan = plan_of(report)
            results[name] = {"seam": seam_ratio(image, plan), "seam_all": seam_ratio(image, plan, False),
                             "seconds": seconds, "tiles": report.tiles_run,
                             "overlap_px": plan.overlap}  # fmt: skip
        if not args.seams_only:
            plain_s, plain_tiles = plain_loop(model, server.url, args, work)
            mem = {factor: memory(model, server.url, args, work, factor) for factor in (1.0, 4.0)}
    finally:
        server.stop()
    o, n = results["overlap"], results["no_overlap"]
    print(f"seam ratio (border / inside |gradient|), model {args.model or 'tiny (random)'}, strength "
          f"{args.strength}, {args.steps} steps: overlap "
          f"{o['overlap_px']} px {o['seam']:.3f} (target <= 1.15), no overlap {n['seam']:.3f}; against every "
          f"inside position (the input's pixel steps included): {o['seam_all']:.3f} vs "
          f"{n['seam_all']:.3f}")  # fmt: skip
    if args.seams_only:
        return
    ours, plain = n["tiles"] / n["seconds"], plain_tiles / plain_s
    print(f"throughput, no overlap, {n['tiles']} tiles: driver {ours:.2f} tiles/s, plain loop {plain:.2f} "
          f"tiles/s -> {ours / plain:.2f}x (target >= 0.8); "
          f"with overlap {o['tiles']} tiles in {o['seconds']:.1f} s")  # fmt: skip
    one, four = mem[1.0], mem[4.0]
    print(f"peak RSS: 1x area {one['peak_mb']:.0f} MB, 4x area {four['peak_mb']:.0f} MB -> "
          f"{four['peak_mb'] / one['peak_mb']:.3f}x (target <= 1.2); above the loaded model: "
          f"{one['peak_mb'] - one['loaded_mb']:.0f} vs "
          f"{four['peak_mb'] - four['loaded_mb']:.0f} MB")  # fmt: skip


if __name__ == "__main__":
    main()
