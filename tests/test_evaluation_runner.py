"""Evaluation runner and report on tiny pipelines and a small store: metrics, baselines on the same tiles,
per-tile rows, quality map, sensitivity report and STAC output."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import EVAL_HOLDOUT
from PIL import Image

from dsat_core.data.dataset import TileDataset
from dsat_core.data.tasks import DegradationRecipe, resolve_task
from dsat_core.evaluation import paired_metrics, validate_catalog
from dsat_core.evaluation.report import (
    evaluation_sensitivity,
    generation_rows,
    make_sample_fn,
    metadata_sensitivity,
    plot_sensitivity,
    reference_images,
    sample_grid,
    write_quality_map,
    write_stac,
)
from dsat_core.evaluation.runner import (
    evaluate_controlnet,
    evaluate_generation,
    load_pipeline,
    nearest_distance,
    spread_over_items,
)
from dsat_core.imaging import bicubic_upsample, to_rgb
from dsat_core.imaging.rgb import LABEL_HEIGHT
from dsat_core.pipelines import DiffusionSatPipeline, SatControlNetPipeline

STEPS = 2


@pytest.fixture(scope="module")
def held_rows(eval_store: str) -> list[int]:
    rows = TileDataset(eval_store, split="holdout", holdout_fraction=EVAL_HOLDOUT).indices.tolist()
    assert 4 <= len(rows) < 36  # the fixture's store holds a usable, proper subset out
    return rows


def _unit(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x)).double() / 255.0


def test_generation_fid_kid_on_held_out_tiles_and_skips_unavailable_metrics(
    eval_store: str, tiny_pipelines: dict[str, Path], held_rows: list[int]
) -> None:
    n = 11  # more samples than the 9 held-out tiles: metadata and captions cycle
    result = evaluate_generation(
        tiny_pipelines["generation"],
        eval_store,
        n_samples=n,
        num_inference_steps=STEPS,
        guidance_scale=1.0,
        seed=7,
        batch_size=4,
        holdout_fraction=EVAL_HOLDOUT,
        metrics=("fid", "kid", "is", "clip"),
        max_real=6,
    )
    m = result.metrics
    assert {"fid", "kid_mean", "kid_std"} <= m.keys()
    assert all(math.isfinite(v) for v in m.values())
    assert m["fid"] > 0 and m["n_fake"] == n and m["n_real"] == 6
    # IS and CLIP have no local model here: recorded with the reason, not failed, not faked
    assert "logits" in result.skipped["is"] and "CLIP" in result.skipped["clip"]
    assert not {"is_mean", "clip_score"} & m.keys()
    assert result.images.dtype == np.uint8 and result.images.shape == (n, 3, 16, 16)
    assert result.real_images.shape == (6, 3, 16, 16)

    # conditioning comes from held-out tiles only, spread over their items, cycling; seeds are seed + i
    held = TileDataset(eval_store, split="holdout", holdout_fraction=EVAL_HOLDOUT)
    order = spread_over_items(held.item_ids)
    rows = [r["tile_index"] for r in result.records]
    assert rows == [held_rows[order[i % len(order)]] for i in range(n)]
    assert [r["item_id"] for r in result.records] == [held.item_ids[order[i % len(order)]] for i in range(n)]
    assert [r["seed"] for r in result.records] == list(range(7, 7 + n))
    tiles = TileDataset(eval_store)
    for rec, meta in zip(result.records, result.metadata, strict=True):
        stored = tiles.metadata(rec["tile_index"])
        assert rec["lon"] == pytest.approx(stored.lon, abs=1e-4) and meta.lat == pytest.approx(
            stored.lat, abs=1e-4
        )
        assert rec["caption"] == tiles[rec["tile_index"]]["caption"]
        assert rec["nearest_real_distance"] > 0

    # any sample can be regenerated alone from its recorded seed, metadata and caption
    pipe = load_pipeline(tiny_pipelines["generation"], DiffusionSatPipeline)
    k = 5
    alone = pipe(
        result.prompts[k],
        metadata=result.metadata[k],
        num_inference_steps=STEPS,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(result.records[k]["seed"]),
        output_type="np",
    ).images[0]
    again = (np.clip(alone, 0, 1) * 255).round().astype(np.uint8).transpose(2, 0, 1)
    assert np.abs(again.astype(int) - result.images[k].astype(int)).max() <= 1


def test_sr_model_and_bicubic_scored_on_the_same_tiles(
    eval_store: str, tiny_pipelines: dict[str, Path], held_rows: list[int]
) -> None:
    result = evaluate_controlnet(
        tiny_pipelines["sr"],
        eval_store,
        "sr",
        n=5,
        steps=STEPS,
        seed=3,
        batch_size=3,
        holdout_fraction=EVAL_HOLDOUT,
    )
    assert result.baseline == "bicubic"
    for name in ("psnr", "ssim"):
        assert math.isfinite(result.metrics[f"{name}/model"]) and math.isfinite(
            result.metrics[f"{name}/bicubic"]
        )
    assert "lpips" in result.skipped and "lpips/model" not in result.metrics
    assert len(result.records) == 5 == len(result.images) == len(result.baselines) == len(result.targets)
    assert {r["tile_index"] for r in result.records} <= set(held_rows)

    # recompute the baseline of each row from the store, independently of the runner
    rgb, ms = TileDataset(eval_store, "rgb"), TileDataset(eval_store, "multispectral")
    ms_row = {(ms[i]["item_id"], tuple(ms.metadata(i).to_dict().values())): i for i in range(len(ms))}
    recipe = DegradationRecipe()
    for rec, base_img, target_img in zip(result.records, result.baselines, result.targets, strict=True):
        target = rgb[rec["tile_index"]]
        key = (target["item_id"], tuple(rgb.metadata(rec["tile_index"]).to_dict().values()))
        cond = ms[ms_row[key]]["pixel_values"]
        low = recipe.lowres(cond, ms.bands)
        expected = ((bicubic_upsample(to_rgb(low, ms.bands)[None].double(), 16)[0] + 1) / 2).clamp(0, 1)
        truth = ((target["pixel_values"].double() + 1) / 2)[None]
        psnr = paired_metrics(expected[None], truth, 1.0).mean["psnr"]
        assert rec["psnr_baseline"] == pytest.approx(psnr, abs=1e-6)
        np.testing.assert_allclose(_unit(target_img), truth[0], atol=0.5 / 255 + 1e-9)
        np.testing.assert_allclose(_unit(base_img), expected, atol=0.5 / 255 + 1e-9)
        # the model's row is scored against the same target
        model_psnr = paired_metrics(_unit(result.images[rec["sample"]])[None], truth, 1.0).mean["psnr"]
        assert rec["psnr_model"] == pytest.approx(model_psnr, abs=0.1)
    for name in ("psnr", "ssim"):
        assert result.metrics[f"{name}/model"] == pytest.approx(
            np.mean([r[f"{name}_model"] for r in result.records])
        )
        assert result.metrics[f"{name}/bicubic"] == pytest.approx(
            np.mean([r[f"{name}_baseline"] for r in result.records])
        )
    table = result.table()
    assert table["psnr_model"] == [r["psnr_model"] for r in result.records] and len(table["lon"]) == 5


def test_temporal_baseline_is_the_nearest_date_frame(
    eval_store: str, tiny_pipelines: dict[str, Path], held_rows: list[int]
) -> None:
    result = evaluate_controlnet(
        tiny_pipelines["temporal"], eval_store, "temporal", n=4, steps=STEPS, holdout_fraction=EVAL_HOLDOUT
    )
    assert result.baseline == "nearest_date" and math.isfinite(result.metrics["psnr/nearest_date"])
    tiles = TileDataset(eval_store)
    for rec, base_img in zip(result.records, result.baselines, strict=True):
        assert rec["tile_index"] in held_rows  # the target is held out (its frames need not be)
        target = tiles.metadata(rec["tile_index"])
        same_place = [
            i for i in range(len(tiles))
            if i != rec["tile_index"] and abs(tiles.metadata(i).lon - target.lon) < 1e-9
            and abs(tiles.metadata(i).lat - target.lat) < 1e-9
        ]  # fmt: skip
        gaps = {i: abs((_date(tiles.metadata(i)) - _date(target)).days) for i in same_place}
        nearest = min(gaps, key=lambda i: (gaps[i], _date(tiles.metadata(i))))
        expected = ((tiles[nearest]["pixel_values"].double() + 1) / 2).clamp(0, 1)
        np.testing.assert_allclose(_unit(base_img), expected, atol=0.5 / 255 + 1e-9)


def _date(meta):
    from datetime import date

    return date(meta.year, meta.month, meta.day)


def test_inpaint_rows_keep_known_pixels_and_score_the_hole(
    eval_store: str, tiny_pipelines: dict[str, Path]
) -> None:
    result = evaluate_controlnet(
        tiny_pipelines["inpaint"], eval_store, "inpaint", n=3, steps=STEPS, holdout_fraction=EVAL_HOLDOUT
    )
    m = result.metrics
    assert {"psnr_hole/model", "psnr_hole/classical_inpaint", "psnr/gain"} <= m.keys()
    # the hole is where the output may differ: PSNR over the hole only is lower than over the whole image
    assert m["psnr_hole/model"] <= m["psnr/model"] + 1e-9
    assert m["psnr_hole/classical_inpaint"] <= m["psnr/classical_inpaint"] + 1e-9
    assert all(math.isfinite(r["psnr_hole_model"]) for r in result.records)

    # the sensitivity report works around a ControlNet too (conditioning, image and mask kept fixed)
    report = evaluation_sensitivity(
        result,
        load_pipeline(tiny_pipelines["inpaint"], SatControlNetPipeline),
        num_inference_steps=STEPS,
        guidance_scale=1.0,
        n=3,
        fields_and_values={"month": [1, 7], "lat": [0.0]},
    )
    assert report["kind"] == "inpaint" and set(report["fields"]) == {"month", "lat"}
    assert report["robustness"]["n"] == 3 and math.isfinite(report["robustness"]["error_increase"])


def test_controlnet_evaluation_reads_the_whole_task_card(
    eval_store: str, tiny_pipelines: dict[str, Path], tmp_path: Path
) -> None:
    """By name, the task is the one training recorded (task.json), every field of it; a task object wins."""
    import shutil

    from dsat_core.data.tasks import SuperResolutionTask, TemporalTask, write_task_card

    folder = tmp_path / "sr"
    shutil.copytree(tiny_pipelines["sr"], folder)
    trained = SuperResolutionTask(degradation={"factor": 2, "blur_sigma": 0.5, "upsample": "bilinear"})
    write_task_card(trained, folder)
    common = dict(n=2, steps=STEPS, holdout_fraction=EVAL_HOLDOUT)
    result = evaluate_controlnet(folder, eval_store, "sr", **common)
    assert result.params["recipe"]["degradation"] == trained.degradation
    assert result.params["recipe"]["cond_product"] == "multispectral" and result.baseline == "bicubic"
    other = SuperResolutionTask(degradation={"factor": 4})
    again = evaluate_controlnet(folder, eval_store, other, **common)
    assert again.params["recipe"]["degradation"] == other.degradation
    with pytest.raises(ValueError, match="holds a 'sr' ControlNet"):
        evaluate_controlnet(folder, eval_store, "temporal", **common)
    write_task_card(TemporalTask(sequence_length=2, direction="forward"), folder)
    with pytest.raises(ValueError, match="conditioning channels"):  # the recorded temporal data is 3 bands
        evaluate_controlnet(folder, eval_store, "temporal", **common)
    # sensitivity samples the pipeline the evaluation loaded; it never loads one itself
    with pytest.raises(TypeError, match="SatControlNetPipeline"):
        evaluation_sensitivity(result, folder, num_inference_steps=STEPS, guidance_scale=1.0)


def test_nearest_distance_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(7, 5)), rng.normal(size=(4, 5))
    brute = np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1)).min(1)
    np.testing.assert_allclose(nearest_distance(a, b, chunk=3), brute, rtol=1e-10)
    assert nearest_distance(b, b).max() < 1e-6


def test_report_map_grid_sensitivity_and_stac(
    eval_store: str, tiny_pipelines: dict[str, Path], tmp_path: Path
) -> None:
    result = evaluate_generation(
        tiny_pipelines["generation"],
        eval_store,
        n_samples=4,
        num_inference_steps=STEPS,
        guidance_scale=1.0,
        holdout_fraction=EVAL_HOLDOUT,
        metrics=(),  # no Inception: the per-sample distance falls back to pixel space
    )
    assert result.params["nearest_real_space"] == "pixel" and "fid" not in result.metrics
    png = write_quality_map(result, tmp_path / "map.png")
    assert Image.open(png).size[0] > 400
    rows = generation_rows(result)  # a row per held-out item: the reference tile, then the item's samples
    items = list(dict.fromkeys(r["item_id"] for r in result.records))
    assert list(rows) == items and result.references is not None
    for item, row in rows.items():
        mine = [i for i, r in enumerate(result.records) if r["item_id"] == item]
        assert np.array_equal(row[0], result.references[mine[0]])
        assert all(np.array_equal(row[1 + k], result.images[i]) for k, i in enumerate(mine))
    grid = sample_grid(result)  # each row under a line naming its item
    assert grid.size == (2 + len(rows[items[0]]) * 18, 2 + len(rows) * (18 + LABEL_HEIGHT))

    pipe = load_pipeline(tiny_pipelines["generation"], DiffusionSatPipeline)
    sample_fn = make_sample_fn(pipe, result.prompts, num_inference_steps=STEPS, guidance_scale=1.0)
    base_fn = make_sample_fn(pipe, result.prompts[0], num_inference_steps=STEPS, guidance_scale=1.0)
    values = {"lon": [-100.0, 100.0], "month": [1, 7], "cloud_cover": [0.0, 1.0]}
    report = metadata_sensitivity(
        base_fn,
        result.metadata[0],
        seed=0,
        fields_and_values=values,
        correct=result.metadata,
        reference=reference_images(result.real_images[:4], (16, 16)),
        robustness_fn=sample_fn,
    )
    assert set(report["fields"]) == set(values) and report["fields"]["lon"] > 0  # the metadata path is live
    assert [v for v, _ in report["values"]["month"]] == [1, 7]
    assert report["fields"]["month"] == pytest.approx(np.mean([c for _, c in report["values"]["month"]]))
    rob = report["robustness"]
    assert rob["mean_abs_change"] > 0 and rob["n"] == 4
    assert rob["error_increase"] == pytest.approx(rob["error_wrong"] - rob["error_correct"])
    json.dumps(report)  # JSON-ready
    assert Image.open(plot_sensitivity(report, tmp_path / "sens.png")).format == "PNG"

    catalog, count = write_stac(result, tmp_path / "stac", "models:/tiny@eval", "3")
    assert count == 1 + 1 + 4 and validate_catalog(catalog) == count
    item = json.loads(next((tmp_path / "stac").rglob("dsat-generation-000002.json")).read_text())
    assert (
        item["properties"]["dsat:seed"] == result.seeds[2] and item["properties"]["dsat:model_version"] == "3"
    )
    assert item["properties"]["dsat:prompt"] == result.prompts[2]


def test_bad_inputs_raise_clear_errors(eval_store: str, tiny_pipelines: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="no holdout tiles"):
        evaluate_generation(tiny_pipelines["generation"], eval_store, n_samples=2, holdout_fraction=0.0)
    with pytest.raises(ValueError, match="unknown generation metrics"):
        evaluate_generation(tiny_pipelines["generation"], eval_store, metrics=("fid", "psnr"))
    with pytest.raises(ValueError, match="conditioning channels"):
        evaluate_controlnet(tiny_pipelines["sr"], eval_store, "temporal", n=1, holdout_fraction=EVAL_HOLDOUT)
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        evaluate_controlnet(tiny_pipelines["sr"].parent, eval_store, "sr")


def test_honest_figures_sample_sizes_interval_and_lr_consistency(
    eval_store: str, tiny_pipelines: dict[str, Path]
) -> None:
    """FID with its bootstrap interval, KID with a non-zero std, SR with LR-consistency of model and bicubic,
    sample sizes beside every figure and the smoke-figure mark (far below the benchmark's sizes here)."""
    from dsat_core.evaluation.report import evaluation_markdown, headline_figures

    gen = evaluate_generation(
        tiny_pipelines["generation"], eval_store, n_samples=8, num_inference_steps=STEPS, guidance_scale=1.0,
        holdout_fraction=EVAL_HOLDOUT, max_real=8, fid_resamples=50,
    )  # fmt: skip
    m = gen.metrics
    assert m["fid_ci_low"] < m["fid"] < m["fid_ci_high"] and m["kid_std"] > 0
    assert gen.params["kid_subset_size"] == 4 and gen.params["fid_bootstrap_resamples"] == 50
    assert gen.params["sample_sizes"]["fid"] == "n=8 generated / 8 real" and gen.params["smoke_figure"]
    figures = headline_figures("generation", m)
    assert any(f.startswith("fid=") and "95% CI" in f and "(n=8 generated / 8 real)" in f for f in figures)
    assert any(f.startswith("kid_mean=") and "±" in f for f in figures) and "smoke" in figures[-1]

    sr = evaluate_controlnet(
        tiny_pipelines["sr"], eval_store, "sr", n=4, steps=STEPS, holdout_fraction=EVAL_HOLDOUT
    )
    assert {"lr_psnr/model", "lr_psnr/bicubic", "n_sensors"} <= sr.metrics.keys()
    # bicubic is (almost) consistent with its own input; the tiny random model is not, as sampled, and is
    # once the task back-projects its outputs onto the input (the SR task's default)
    as_sampled = resolve_task("sr", tiny_pipelines["sr"]).with_options(lr_projection_steps=0)
    plain = evaluate_controlnet(
        tiny_pipelines["sr"], eval_store, as_sampled, n=4, steps=STEPS, holdout_fraction=EVAL_HOLDOUT
    )
    assert sr.metrics["lr_psnr/model"] > sr.metrics["lr_psnr/bicubic"] > 30 > plain.metrics["lr_psnr/model"]
    assert sr.metrics["psnr/model"] > plain.metrics["psnr/model"]
    assert all("lr_psnr_model" in r and r["platform"] for r in sr.records)
    assert sr.params["sample_sizes"]["psnr/model"] == f"n=4 tiles, {int(sr.metrics['n_sensors'])} sensor"
    assert sr.params["smoke_figure"] and sr.params["cond_bands"] == ["blue", "green", "red", "nir08"]
    summary = evaluation_markdown(sr, model_uri="m", store_uri=eval_store, content_hash="0" * 16)
    assert "| lr_psnr |" in summary and "n=4 tiles" in summary and "Smoke figures" in summary
    temporal = evaluate_controlnet(
        tiny_pipelines["temporal"], eval_store, "temporal", n=2, steps=STEPS, holdout_fraction=EVAL_HOLDOUT
    )
    assert "lr_psnr" in temporal.skipped and "lr_psnr/model" not in temporal.metrics


def test_a_controlnet_with_band_names_takes_another_band_set(
    eval_store: str, tiny_pipelines: dict[str, Path]
) -> None:
    """The store's bands (blue, green, red, nir08) aligned by name to a model's (blue, green, red, nir,
    swir16): nir / swir16 marked missing and recorded, nir08 dropped with a warning naming it."""
    from dsat_core.models.controlnet3d import ControlNet3D

    base = load_pipeline(tiny_pipelines["generation"], DiffusionSatPipeline)
    bands = ["blue", "green", "red", "nir", "swir16"]
    torch.manual_seed(0)
    controlnet = ControlNet3D.from_unet(base.unet, 5, (8, 16), vae_scale_factor=2, conditioning_bands=bands)
    with torch.no_grad():
        for name, p in controlnet.named_parameters():
            if "controlnet_" in name or "cond_embedding.conv_out" in name or name == "missing_band_values":
                p.normal_(0, 0.05)
    pipe = SatControlNetPipeline.from_diffusionsat(base, controlnet)
    with pytest.warns(UserWarning, match=r"\['nir08'\] are unknown"):
        result = evaluate_controlnet(pipe, eval_store, "sr", n=3, steps=STEPS, holdout_fraction=EVAL_HOLDOUT)
    assert result.params["missing_bands"] == ["nir", "swir16"] and result.params["unknown_bands"] == ["nir08"]
    assert result.params["model_bands"] == bands and math.isfinite(result.metrics["psnr/model"])
    assert result.inputs["cond_bands"] == ["blue", "green", "red", "nir08"]  # names kept for re-sampling
    report = evaluation_sensitivity(
        result, pipe, num_inference_steps=STEPS, guidance_scale=1.0, n=2, fields_and_values={"month": [1, 7]}
    )
    assert set(report["fields"]) == {"month"} and report["robustness"]["n"] == 2
    from dsat_core.data.tasks import DataSpec, SuperResolutionTask

    task = SuperResolutionTask()
    with pytest.raises(ValueError, match="none of the conditioning bands"):
        task.band_alignment(task.dataset(DataSpec(eval_store)), ["swir16", "swir22"])


def test_sr_from_the_bicubic_start_is_recorded_and_changes_the_samples(
    eval_store: str, tiny_pipelines: dict[str, Path]
) -> None:
    common = dict(n=2, steps=STEPS, seed=3, holdout_fraction=EVAL_HOLDOUT)
    noise = evaluate_controlnet(tiny_pipelines["sr"], eval_store, "sr", **common)
    started = evaluate_controlnet(tiny_pipelines["sr"], eval_store, "sr", strength=0.5, **common)
    assert noise.params["strength"] == 1.0 and started.params["strength"] == 0.5
    np.testing.assert_array_equal(started.baselines, noise.baselines)  # same tiles, same baseline
    assert np.abs(started.images.astype(int) - noise.images.astype(int)).mean() > 1.0
    with pytest.raises(ValueError, match="strength must be in"):
        evaluate_controlnet(tiny_pipelines["sr"], eval_store, "sr", strength=0.0, **common)


def test_spread_over_items_covers_every_item_first() -> None:
    order = spread_over_items(["a", "a", "a", "b", "c", "c"])
    assert order == [0, 3, 4, 1, 5, 2]
    assert spread_over_items([]) == []
