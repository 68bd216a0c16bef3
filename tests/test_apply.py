"""`dsat apply` / the apply-model driver on a shipped real scene (Landsat 8, Rondônia) served by a real
STAC API (rustac over catalogs/samples): SR, generation and inpainting mosaics as COGs with STAC items and
provenance, resume after a stop mid-way, per-item reasons and clear errors for bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.warp
import torch

from dsat_core.apply.job import ApplySpec, run_apply
from dsat_core.data.catalog import load_catalog
from dsat_core.data.tasks import SuperResolutionTask, TemporalTask, write_task_card
from dsat_core.evaluation.stac_output import validate_catalog

SCENE = "landsat8-oli-sr-rondonia-20190727"
SOURCE = (
    Path(__file__).resolve().parents[1]
    / "catalogs"
    / "samples"
    / ("landsat8_oli_sr_rondonia_20190727_6band_30m.tif")
)
AOI = (-63.95, -8.76, -63.938, -8.749)  # about 44 x 41 input pixels (30 m) inside the scene
BANDS = ["blue", "green", "red", "nir", "swir16", "swir22"]


@pytest.fixture(scope="module")
def sr_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SR ControlNet pipeline (32 px tiles, factor 2, the six multispectral bands by name) + card."""
    from dsat_core.pipelines import make_tiny_controlnet_pipeline

    folder = tmp_path_factory.mktemp("apply-models") / "sr"
    make_tiny_controlnet_pipeline(16, 6, BANDS).save_pretrained(str(folder), safe_serialization=True)
    task = SuperResolutionTask(cond_product="multispectral", degradation={"factor": 2, "blur_sigma": 0.0})
    write_task_card(task, folder)
    return folder


def _spec(kind: str, model: Path | str, out: Path | str, api: str, **changes) -> ApplySpec:
    values = dict(kind=kind, catalog="local-samples", bbox=AOI, model=str(model), out=str(out), stac_api=api,
                  steps=2, batch_size=8, overlap=4, seed=7, mlflow_tracking_uri=None)  # fmt: skip
    return ApplySpec(**{**values, **changes})


@pytest.fixture(scope="module")
def sr_run(sr_model: Path, samples_api: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("apply-sr")
    report = run_apply(_spec("sr", sr_model, out, samples_api))
    return {"out": out, "report": report}


def _aoi_shape(src: rasterio.DatasetReader) -> tuple[int, int]:
    """(width, height) of the AOI on the scene's pixel grid, snapped outwards to whole pixels."""
    left, bottom, right, top = rasterio.warp.transform_bounds("EPSG:4326", src.crs, *AOI, densify_pts=21)
    t = src.transform
    cols = math.ceil((right - t.c) / t.a - 1e-6) - math.floor((left - t.c) / t.a + 1e-6)
    rows = math.ceil((t.f - bottom) / -t.e - 1e-6) - math.floor((t.f - top) / -t.e + 1e-6)
    return cols, rows


def _read(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict]:
    with rasterio.open(path) as src:
        return src.read(), src.read_masks(1), src.profile


def test_sr_cog_matches_the_input_grid_at_half_the_gsd(sr_run: dict) -> None:
    report = sr_run["report"]
    assert report.complete and not report.skipped and len(report.outputs) == 1
    item = json.loads(Path(report.outputs[0]).read_text())
    cog = Path(report.outputs[0]).parent / item["assets"]["image"]["href"]
    with rasterio.open(SOURCE) as src, rasterio.open(cog) as out:
        assert out.crs == src.crs  # the AOI's grid is the scene's own (catalog target_crs: native)
        t, s = out.transform, src.transform
        assert (t.a, t.e) == (pytest.approx(s.a / 2), pytest.approx(s.e / 2))  # GSD 30 m → 15 m
        # the output grid is the input pixel grid subdivided: its origin is on an input pixel corner
        assert ((t.c - s.c) / s.a) == pytest.approx(round((t.c - s.c) / s.a))
        assert ((t.f - s.f) / s.e) == pytest.approx(round((t.f - s.f) / s.e))
        assert out.width % 2 == 0 and out.height % 2 == 0
        assert (out.width // 2, out.height // 2) == _aoi_shape(src)
        left, bottom, right, top = rasterio.warp.transform_bounds(out.crs, "EPSG:4326", *out.bounds)
        assert left <= AOI[0] and bottom <= AOI[1] and right >= AOI[2] and top >= AOI[3]
        assert (
            out.count == 3 and out.dtypes == ("uint8",) * 3 and out.descriptions == ("red", "green", "blue")
        )
        assert out.overviews(1), "a COG with overviews"
        assert out.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert out.mask_flag_enums[0] == [rasterio.enums.MaskFlags.per_dataset]  # nodata: internal mask
        assert out.read_masks(1).all()  # the AOI lies inside the scene: every pixel has data
        image = out.read()
        assert image.std() > 1.0
        provenance = json.loads(out.tags()["dsat_apply"])
        assert provenance["input_scaling"]["red"]["dtype"] == "uint16"
    assert item["properties"]["gsd"] == pytest.approx(15.0)
    assert item["properties"]["proj:code"] == "EPSG:32620"
    assert item["properties"]["proj:shape"] == [out.height, out.width]
    assert item["properties"]["datetime"].startswith("2019-07-27")


def test_sr_item_validates_and_carries_provenance(sr_run: dict, sr_model: Path) -> None:
    report = sr_run["report"]
    assert validate_catalog(report.catalog) == 2  # catalog + item, offline (pystac core schemas + rules)
    item = json.loads(Path(report.outputs[0]).read_text())
    apply = item["properties"]["dsat:apply"]
    assert apply["model"]["uri"] == str(sr_model.resolve()) and apply["model"]["version"] == "local"
    assert apply["inputs"][0]["id"] == SCENE
    assert apply["inputs"][0]["hrefs"][0].endswith(SOURCE.name)
    assert (apply["seed"], apply["steps"], apply["guidance_scale"]) == (7, 2, 1.0)
    assert apply["tiling"]["tile_px"] == 16 and apply["tiling"]["overlap_px"] == 4
    assert apply["tiling"]["output_tile_px"] == 32 and apply["tiling"]["n_tiles"] == 16
    assert apply["task"]["task"] == "sr" and apply["task"]["degradation"]["factor"] == 2
    assert set(item["assets"]) == {"image", "preview"}
    assert not (sr_run["out"] / ".work" / "scratch" / f"sr-{SCENE}.zarr").exists()  # cleaned once written


def test_stopped_run_resumes_without_redoing_tiles_and_gives_the_same_mosaic(
    sr_run: dict, sr_model: Path, samples_api: str, tmp_path: Path
) -> None:
    first = run_apply(_spec("sr", sr_model, tmp_path, samples_api, max_tiles=5))
    assert not first.complete and first.tiles_run == 5 and not first.outputs
    assert not list(tmp_path.glob("sr-*")), "nothing in the output before every tile is done"
    second = run_apply(_spec("sr", sr_model, tmp_path, samples_api))
    assert second.complete and second.tiles_reused == 5 and second.tiles_run == 16 - 5
    resumed, mask, _ = _read(Path(second.outputs[0]).with_suffix(".tif"))
    reference, _, _ = _read(Path(sr_run["report"].outputs[0]).with_suffix(".tif"))
    # per-tile noise comes from the tile's position, so batching differs only by float rounding
    assert np.abs(resumed.astype(int) - reference.astype(int)).max() <= 1
    again = run_apply(_spec("sr", sr_model, tmp_path, samples_api))
    assert again.tiles_run == 0 and again.outputs == second.outputs  # idempotent


def test_other_seed_changes_the_mosaic(
    sr_run: dict, sr_model: Path, samples_api: str, tmp_path: Path
) -> None:
    other = run_apply(_spec("sr", sr_model, tmp_path, samples_api, seed=8))
    a, _, _ = _read(Path(other.outputs[0]).with_suffix(".tif"))
    b, _, _ = _read(Path(sr_run["report"].outputs[0]).with_suffix(".tif"))
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 0.5


# ---------------------------------------------------------------------------------------------- strength
def _to_uint8(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return np.clip(np.rint((np.asarray(x, dtype=np.float64) + 1.0) / 2.0 * 255.0), 0, 255)


def _input_frame(api: str) -> tuple[torch.Tensor, list[str]]:
    """The AOI's multispectral frame (1, C, 1, h, w) in [-1, 1] on the grid the job reads, and its bands."""
    from dsat_core.apply.source import open_place
    from dsat_core.data.stac import search_items

    config = load_catalog("local-samples").with_overrides(stac_api=api, tile_size=16, overlap=0)
    [item] = [i for i in search_items(config, bbox=AOI) if i["id"] == SCENE]
    with open_place(item, config, "multispectral", AOI) as place:
        frame, _ = place.read(rasterio.windows.Window(0, 0, place.grid.width, place.grid.height))
        return torch.from_numpy(frame)[None, :, None], list(place.bands)


@pytest.fixture(scope="module")
def flat_sr_model(sr_model: Path, samples_api: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`sr_model` without back-projection of its outputs (``lr_projection_steps`` 0), its tiny VAE's scaling
    factor set for unit-std latents of the AOI's bicubic (as a trained VAE's is), so that a timestep's noise
    means what it means for a real model."""
    import shutil

    from diffusers import AutoencoderKL

    folder = tmp_path_factory.mktemp("apply-models") / "sr-flat"
    shutil.copytree(sr_model, folder)
    degradation = {"factor": 2, "blur_sigma": 0.0}
    write_task_card(SuperResolutionTask(degradation=degradation, lr_projection_steps=0), folder)
    frame, bands = _input_frame(samples_api)
    start = SuperResolutionTask(degradation=degradation).place_baseline(frame, bands)
    vae = AutoencoderKL.from_pretrained(str(folder / "vae")).eval()
    with torch.no_grad():
        std = float(vae.encode(start[..., :40, :40]).latent_dist.mean.std())
    config = json.loads((folder / "vae" / "config.json").read_text())
    (folder / "vae" / "config.json").write_text(json.dumps({**config, "scaling_factor": 1.0 / std}))
    return folder


@pytest.fixture(scope="module")
def flat_runs(flat_sr_model: Path, samples_api: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`flat_sr_model` over the AOI from noise (strength 1) and from the bicubic (strength 0.3)."""
    out = tmp_path_factory.mktemp("apply-sr-flat")
    return {
        s: run_apply(_spec("sr", flat_sr_model, out / str(s), samples_api, strength=s)) for s in (1.0, 0.3)
    }


def test_sr_strength_starts_from_the_bicubic_and_is_recorded(
    flat_runs: dict, flat_sr_model: Path, samples_api: str
) -> None:
    """At strength 0.3 (1 of 2 steps, from the last timestep) the output is the model's rendering of the
    bicubic start: the tiny VAE is random, so the reference is its round trip of the first tile's bicubic
    (the mosaic's top-left 24 px are that tile's alone); the mosaic from noise is >= 4x further away."""
    from diffusers import AutoencoderKL

    from dsat_core.models.vae import decode_latents, encode_latents

    frame, bands = _input_frame(samples_api)
    task = SuperResolutionTask(degradation={"factor": 2, "blur_sigma": 0.0})
    start = task.place_baseline(frame[..., :16, :16], bands)
    vae = AutoencoderKL.from_pretrained(str(flat_sr_model / "vae")).eval()
    reference = _to_uint8(decode_latents(vae, encode_latents(vae, start))[0])[:, :24, :24]
    mosaics = {s: _read(Path(r.outputs[0]).with_suffix(".tif"))[0][:, :24, :24] for s, r in flat_runs.items()}
    near = np.abs(mosaics[0.3] - reference).mean()
    far = np.abs(mosaics[1.0] - reference).mean()
    assert near < 0.25 * far, (near, far)
    for strength, report in flat_runs.items():
        item = json.loads(Path(report.outputs[0]).read_text())
        assert item["properties"]["dsat:apply"]["strength"] == pytest.approx(strength)


def test_sr_outputs_are_made_consistent_with_the_low_res_input(
    sr_run: dict, flat_runs: dict, samples_api: str
) -> None:
    """The task's back-projection (``lr_projection_steps`` 8 in `sr_model`'s card, 0 in `flat_sr_model`'s):
    2 x 2 means of the output match the input's RGB bands, within 3 / 255 (vs tens without it)."""
    from dsat_core.imaging.rgb import to_rgb

    frame, bands = _input_frame(samples_api)
    low = _to_uint8(to_rgb(frame[:, :, 0], bands)[0])

    def lr_error(report) -> float:  # noqa: ANN001
        image = _read(Path(report.outputs[0]).with_suffix(".tif"))[0].astype(np.float64)
        pooled = image.reshape(3, low.shape[1], 2, low.shape[2], 2).mean(axis=(2, 4))
        return float(np.abs(pooled - low).mean())

    projected, flat = lr_error(sr_run["report"]), lr_error(flat_runs[1.0])
    assert projected < 3.0 and flat > 10 * projected, (projected, flat)


def test_a_rerun_with_another_strength_does_not_reuse_the_tiles(
    sr_model: Path, samples_api: str, tmp_path: Path
) -> None:
    from dsat_core.apply.scratch import ScratchMismatch

    first = run_apply(_spec("sr", sr_model, tmp_path, samples_api, max_tiles=3))
    assert not first.complete and first.tiles_run == 3
    with pytest.raises(ScratchMismatch, match="'strength': 0.5"):
        run_apply(_spec("sr", sr_model, tmp_path, samples_api, strength=0.5))
    assert not list(tmp_path.glob("sr-*"))


def test_strength_below_one_without_a_baseline_is_refused_before_writing(
    tiny_pipelines: dict[str, Path], samples_api: str, tmp_path: Path
) -> None:
    generate = _spec("generate", tiny_pipelines["generation"], tmp_path / "gen", samples_api, strength=0.5)
    with pytest.raises(ValueError, match="generation has none"):
        run_apply(generate)
    assert not list((tmp_path / "gen").glob("generate*"))
    spec = _spec("inpaint", tiny_pipelines["inpaint"], tmp_path / "out", samples_api, strength=0.5,
                 fill_mask=str(_mask_raster(tmp_path / "clouds.tif")))  # fmt: skip
    with pytest.raises(ValueError, match="the 'inpaint' task has none to start from"):
        run_apply(spec)
    assert not (tmp_path / "out" / ".work" / "scratch").exists() and not list((tmp_path / "out").glob("in*"))


# ---------------------------------------------------------------------------------------------- bad input
def test_no_items_is_a_clear_error(sr_model: Path, samples_api: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no items in catalog 'local-samples'"):
        run_apply(_spec("sr", sr_model, tmp_path / "out", samples_api, bbox=(10.0, 50.0, 10.1, 50.1)))
    assert not (tmp_path / "out").exists()


def test_aoi_over_max_pixels_is_refused_before_writing(
    sr_model: Path, samples_api: str, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="max_pixels"):
        run_apply(_spec("sr", sr_model, tmp_path, samples_api, max_pixels=1000))
    assert not list(tmp_path.glob("sr-*")) and not (tmp_path / "catalog.json").exists()


def test_unnamed_model_with_another_channel_count_is_refused(
    tiny_pipelines: dict[str, Path], samples_api: str, tmp_path: Path
) -> None:
    """The fixture's SR ControlNet takes 4 unnamed channels; the catalog's multispectral product has 6."""
    with pytest.raises(ValueError, match="conditioning channels"):
        run_apply(_spec("sr", tiny_pipelines["sr"], tmp_path, samples_api))
    assert not list(tmp_path.glob("sr-*"))


def _named_sr_model(folder: Path, bands: list[str]) -> Path:
    from dsat_core.models.controlnet3d import ControlNet3D
    from dsat_core.pipelines import SatControlNetPipeline, make_tiny_pipeline

    pipe = make_tiny_pipeline(sample_size=8, vae_downsample=2, seed=0)
    controlnet = ControlNet3D.from_unet(
        pipe.unet, len(bands), (8, 16), vae_scale_factor=2, conditioning_bands=bands
    )
    SatControlNetPipeline.from_diffusionsat(pipe, controlnet).save_pretrained(str(folder))
    write_task_card(SuperResolutionTask(degradation={"factor": 2, "blur_sigma": 0.0}), folder)
    return folder


def test_named_model_band_the_catalog_lacks_is_marked_missing_with_a_warning(
    samples_api: str, tmp_path: Path
) -> None:
    """A ControlNet trained on Sentinel-2 bands (red edge) fed the Landsat product: red edge missing."""
    model = _named_sr_model(tmp_path / "m", ["red", "green", "blue", "rededge1"])
    report = run_apply(_spec("sr", model, tmp_path / "out", samples_api, overlap=2))
    assert report.complete and len(report.outputs) == 1
    assert any("lacks the model's bands ['rededge1']" in w for w in report.warnings)
    item = json.loads(Path(report.outputs[0]).read_text())
    assert item["properties"]["dsat:apply"]["band_warnings"] == report.warnings
    image, valid, _ = _read(Path(report.outputs[0]).with_suffix(".tif"))
    assert valid.all() and image.std() > 1.0


def test_model_none_of_whose_bands_the_catalog_has_is_refused(samples_api: str, tmp_path: Path) -> None:
    model = _named_sr_model(tmp_path / "m", ["rededge1", "rededge2"])
    with pytest.raises(ValueError, match=r"none of the model's bands \['rededge1', 'rededge2'\]"):
        run_apply(_spec("sr", model, tmp_path / "out", samples_api))
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("sr-*"))


def test_items_outside_the_allowed_roots_are_skipped_with_their_reason(
    sr_model: Path, samples_api: str, local_catalog, tmp_path: Path
) -> None:
    catalog = local_catalog("local-samples", allowed_schemes=["file"])  # allowed_roots: only tmp_path
    report = run_apply(_spec("sr", sr_model, tmp_path / "out", samples_api, catalog=catalog))
    assert not report.outputs and [s["item_id"] for s in report.skipped] == [SCENE]
    assert report.skipped[0]["reason"].startswith("href not allowed")
    assert not list((tmp_path / "out").glob("sr-*"))


# ---------------------------------------------------------------------------------------------- generate
def test_generate_follows_the_scene_grid_and_metadata(
    tiny_pipelines: dict[str, Path], samples_api: str, tmp_path: Path
) -> None:
    report = run_apply(_spec("generate", tiny_pipelines["generation"], tmp_path, samples_api, overlap=4))
    assert report.complete and len(report.outputs) == 1
    tif = Path(report.outputs[0]).with_suffix(".tif")
    with rasterio.open(SOURCE) as src, rasterio.open(tif) as out:
        assert out.crs == src.crs and out.transform.a == pytest.approx(src.transform.a)
        assert (out.width, out.height) == _aoi_shape(src)
    item = json.loads(Path(report.outputs[0]).read_text())
    assert item["properties"]["gsd"] == pytest.approx(30.0)
    assert item["properties"]["dsat:apply"]["guidance_scale"] == 3.0
    assert validate_catalog(report.catalog) == 2


# ---------------------------------------------------------------------------------------------- cloud fill
def _mask_raster(path: Path, value: int | None = None) -> Path:
    """A fill mask on the scene's own grid: a block of 'cloud' in the AOI (or ``value`` everywhere)."""
    with rasterio.open(SOURCE) as src:
        mask = np.zeros((src.height, src.width), np.uint8)
        if value is None:
            [x], [y] = rasterio.warp.transform("EPSG:4326", src.crs, [-63.944], [-8.7545])
            row, col = src.index(x, y)
            mask[row - 6 : row + 6, col - 9 : col + 9] = 1
        else:
            mask[:] = value
        profile = {"driver": "GTiff", "width": src.width, "height": src.height, "count": 1, "dtype": "uint8",
                   "crs": src.crs, "transform": src.transform}  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(mask[None])
    return path


def test_inpaint_fills_the_mask_and_keeps_clear_pixels_bit_exact(
    tiny_pipelines: dict[str, Path], samples_api: str, tmp_path: Path
) -> None:
    from dsat_core.data.reader import read_item
    from dsat_core.data.stac import search_items

    mask_path = _mask_raster(tmp_path / "clouds.tif")
    out = tmp_path / "out"
    report = run_apply(
        _spec("inpaint", tiny_pipelines["inpaint"], out, samples_api, fill_mask=str(mask_path), overlap=4)
    )
    assert report.complete and len(report.outputs) == 1
    item = json.loads(Path(report.outputs[0]).read_text())
    folder = Path(report.outputs[0]).parent
    image, valid, _ = _read(folder / item["assets"]["image"]["href"])
    used, _, _ = _read(folder / item["assets"]["fill_mask"]["href"])
    used = used[0]
    assert valid.all() and set(np.unique(used)) == {0, 1} and 100 < int(used.sum()) < used.size // 2
    # the reference: the ingest reader's own tiles of the same scene and AOI (rgb product, 8 px, no filter)
    config = load_catalog("local-samples").with_overrides(stac_api=samples_api, tile_size=8, overlap=0)
    relaxed = config.model_copy(update={"quality": config.quality.model_copy(
        update={"max_nodata_fraction": 1.0, "min_std": 0.0})})  # fmt: skip
    [scene] = [i for i in search_items(relaxed, bbox=AOI) if i["id"] == SCENE]
    tiles = read_item(scene, relaxed, aoi_bbox=AOI).products["rgb"]
    assert len(tiles.window) > 20
    for k, (row, col, h, w) in enumerate(tiles.window):
        clear = used[row : row + h, col : col + w] == 0
        np.testing.assert_array_equal(
            image[:, row : row + h, col : col + w][:, clear], tiles.images[k][:, clear]
        )
    filled = image[:, used == 1]
    assert filled.std() > 0.5
    assert item["properties"]["dsat:apply"]["fill"]["fraction"] == pytest.approx(used.mean(), abs=1e-6)
    assert validate_catalog(report.catalog) == 2


def test_fully_clouded_scene_is_skipped_with_its_reason(
    tiny_pipelines: dict[str, Path], samples_api: str, tmp_path: Path
) -> None:
    mask_path = _mask_raster(tmp_path / "all-cloud.tif", value=1)
    report = run_apply(_spec("inpaint", tiny_pipelines["inpaint"], tmp_path / "out", samples_api,
                             fill_mask=str(mask_path)))  # fmt: skip
    assert not report.outputs and report.skipped == [
        {"item_id": SCENE, "reason": "fully clouded: no clear pixel to fill from"}
    ]
    assert not list((tmp_path / "out").glob("inpaint-*"))


def test_two_torchrun_processes_share_the_tiles_and_give_the_same_mosaic(
    sr_run: dict, sr_model: Path, samples_api: str, tmp_path: Path
) -> None:
    """Sharded over 2 CPU processes (torchrun, gloo): every tile once, rank 0 writes the one mosaic."""
    report = run_apply(_spec("sr", sr_model, tmp_path, samples_api, nproc_per_node=2), log=print)
    assert report.complete and report.tiles_run == 16 and report.tiles_reused == 0
    sharded, _, _ = _read(Path(report.outputs[0]).with_suffix(".tif"))
    reference, _, _ = _read(Path(sr_run["report"].outputs[0]).with_suffix(".tif"))
    assert np.abs(sharded.astype(int) - reference.astype(int)).max() <= 1
    assert validate_catalog(report.catalog) == 2


def test_s3_output_is_uploaded_with_the_catalog_last(
    tiny_pipelines: dict[str, Path], samples_api: str, s3_server: dict, s3_bucket: str, tmp_path: Path
) -> None:
    import s3fs

    out = f"s3://{s3_bucket}/applied"
    spec = _spec("generate", tiny_pipelines["generation"], out, samples_api, storage_options=s3_server,
                 work_dir=str(tmp_path / "work"))  # fmt: skip
    report = run_apply(spec)
    assert report.complete and report.catalog == f"{out}/catalog.json"
    fs = s3fs.S3FileSystem(**s3_server)
    names = {Path(p).name for p in fs.find(f"{s3_bucket}/applied")}
    assert {"catalog.json", f"generate-{SCENE}.json", f"generate-{SCENE}.tif"} <= names
    with (
        fs.open(f"{s3_bucket}/applied/generate-{SCENE}/generate-{SCENE}.tif", "rb") as f,
        rasterio.open(f) as src,
    ):
        assert src.crs.to_epsg() == 32620 and src.overviews(1)


def test_killed_run_resumes_from_its_finished_tiles(
    sr_run: dict, sr_model: Path, samples_api: str, tmp_path: Path
) -> None:
    """A real SIGKILL of the job process mid-way; the rerun keeps every tile marked done before the kill."""
    import signal
    import subprocess
    import sys
    import time

    import zarr

    spec = _spec("sr", sr_model, tmp_path / "out", samples_api, batch_size=2)
    config = tmp_path / "spec.json"
    config.write_text(spec.model_dump_json())
    proc = subprocess.Popen([sys.executable, "-m", "dsat_core.apply.job", "--config", str(config)],
                            cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    scratch = tmp_path / "out" / ".work" / "scratch" / f"sr-{SCENE}.zarr"
    deadline = time.monotonic() + 300
    done = 0
    while done < 4 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
        if (scratch / "done" / "zarr.json").is_file():
            done = int(np.asarray(zarr.open_group(str(scratch), mode="r")["done"][:]).sum())
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert 4 <= done < 16, f"killed after {done} tiles"
    finished = int(np.asarray(zarr.open_group(str(scratch), mode="r")["done"][:]).sum())
    assert not list((tmp_path / "out").glob("sr-*"))
    report = run_apply(spec)
    assert report.complete and report.tiles_reused == finished and report.tiles_run == 16 - finished
    resumed, _, _ = _read(Path(report.outputs[0]).with_suffix(".tif"))
    reference, _, _ = _read(Path(sr_run["report"].outputs[0]).with_suffix(".tif"))
    assert np.abs(resumed.astype(int) - reference.astype(int)).max() <= 1


# ---------------------------------------------------------------------------------------------- temporal
EXTRA = Path(__file__).resolve().parents[1] / "catalogs" / "samples" / "extra"
PAIR = ("sentinel2-l1c-T33UUU-20160529-b03", "sentinel2-l1c-T33UUU-20160608-b03")  # same 10 m pixel grid
PAIR_AOI = (12.680, 52.853, 12.686, 52.857)  # about 41 x 45 px of Havelland farmland


@pytest.fixture(scope="module")
def pair_catalog(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A catalog of the shipped extra samples (served from their static catalog): the B03 band as 'green'."""
    import yaml

    from dsat_core.data.catalog import CatalogConfig

    folder = tmp_path_factory.mktemp("pair-catalog")
    config = CatalogConfig(
        name="t33uuu-pair", static_catalog=str(EXTRA / "catalog" / "catalog.json"),
        collections=["local-samples-extra"], target_crs="native", target_gsd=None, tile_size=8,
        allowed_schemes=["file"], allowed_roots=[str(EXTRA)],
        products={"green": {"bands": [{"name": "green", "common_name": "green"}],
                            "scaling": {"mode": "fixed", "range": [0, 3000], "dtype": "uint8"}}},
    )  # fmt: skip
    path = folder / "t33uuu-pair.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return str(path)


@pytest.fixture(scope="module")
def temporal_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny temporal ControlNet (16 px tiles, 1 channel: green) reading 2 other-date frames."""
    from dsat_core.pipelines import make_tiny_controlnet_pipeline

    folder = tmp_path_factory.mktemp("apply-models") / "temporal"
    make_tiny_controlnet_pipeline(8, 1).save_pretrained(str(folder), safe_serialization=True)
    write_task_card(TemporalTask(product="green", sequence_length=2), folder)
    return folder


def _pair_mask(path: Path) -> Path:
    """A 'cloud' block inside the AOI, on the pair's pixel grid (used for both dates)."""
    with rasterio.open(EXTRA / "sentinel2_l1c_T33UUU_20160529_b03_10m_crop640.tif") as src:
        mask = np.zeros((src.height, src.width), np.uint8)
        [x], [y] = rasterio.warp.transform("EPSG:4326", src.crs, [12.683], [52.855])
        row, col = src.index(x, y)
        mask[row - 8 : row + 8, col - 10 : col + 10] = 1
        profile = {"driver": "GTiff", "width": src.width, "height": src.height, "count": 1, "dtype": "uint8",
                   "crs": src.crs, "transform": src.transform}  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(mask[None])
    return path


def test_temporal_fills_each_date_from_the_other_and_keeps_clear_pixels_bit_exact(
    temporal_model: Path, pair_catalog: str, tmp_path: Path
) -> None:
    from dsat_core.data.reader import read_item
    from dsat_core.data.stac import load_static_catalog

    mask_path = _pair_mask(tmp_path / "clouds.tif")
    spec = _spec("temporal", temporal_model, tmp_path / "out", "", catalog=pair_catalog, bbox=PAIR_AOI,
                 stac_api=None, fill_mask=str(mask_path))  # fmt: skip
    report = run_apply(spec)
    assert report.complete and not report.skipped and len(report.outputs) == 2
    items = {i["id"]: i for i in load_static_catalog(EXTRA / "catalog" / "catalog.json")}
    config = load_catalog(pair_catalog)
    config = config.model_copy(update={"quality": config.quality.model_copy(
        update={"max_nodata_fraction": 1.0, "min_std": 0.0})})  # fmt: skip
    for output in report.outputs:
        item = json.loads(Path(output).read_text())
        apply = item["properties"]["dsat:apply"]
        target = apply["inputs"][0]["id"]
        [other] = [i for i in PAIR if i != target]
        assert [c["id"] for c in apply["conditioning"]] == [other, other]  # 2 frames, one other date
        assert apply["conditioning"][0]["masked_fraction"] == pytest.approx(0.0)
        assert apply["conditioning"][0]["hrefs"][0].endswith(f"{other.split('-')[3]}_b03_10m_crop640.tif")
        folder = Path(output).parent
        image, valid, profile = _read(folder / item["assets"]["image"]["href"])
        used = _read(folder / item["assets"]["fill_mask"]["href"])[0][0]
        assert valid.all() and set(np.unique(used)) == {0, 1} and 200 < int(used.sum()) < used.size // 2
        assert profile["crs"].to_epsg() == 32633 and profile["transform"].a == pytest.approx(10.0)
        tiles = read_item(items[target], config, aoi_bbox=PAIR_AOI).products["green"]
        assert len(tiles.window) > 20
        for k, (row, col, h, w) in enumerate(tiles.window):
            clear = used[row : row + h, col : col + w] == 0
            for band in range(3):  # one band → grey RGB
                np.testing.assert_array_equal(
                    image[band, row : row + h, col : col + w][clear], tiles.images[k][0][clear]
                )
        assert image[:, used == 1].std() > 0.5
    assert validate_catalog(report.catalog) == 3


def test_temporal_date_without_another_date_is_skipped_with_its_reason(
    temporal_model: Path, pair_catalog: str, tmp_path: Path
) -> None:
    spec = _spec("temporal", temporal_model, tmp_path / "out", "", catalog=pair_catalog, bbox=PAIR_AOI,
                 stac_api=None, fill_mask=str(_pair_mask(tmp_path / "clouds.tif")),
                 datetime="2016-05-28/2016-05-30")  # fmt: skip
    report = run_apply(spec)
    assert not report.outputs and report.skipped == [
        {"item_id": PAIR[0], "reason": "no other date of this place in the search to fill from (temporal)"}
    ]
    assert not list((tmp_path / "out").glob("temporal-*"))
