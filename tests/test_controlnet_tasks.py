"""Tasks (dsat_core.data.tasks): SR pairs + degradation, temporal sequences, inpainting masks; the task
objects, their registry, baselines, previews, pipeline inputs and cards."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
import torch

from dsat_core.data.dataset import TileDataset
from dsat_core.data.sr_inputs import FMOW_SENTINEL_REFERENCE
from dsat_core.data.store import DatasetStore, StoreError
from dsat_core.data.synthetic import make_scene_tiles, make_synthetic_store, synthetic_catalog
from dsat_core.data.tasks import (
    TASK_CARD,
    TASKS,
    ControlNetTask,
    DataSpec,
    DegradationRecipe,
    InpaintingDataset,
    InpaintingTask,
    SuperResolutionDataset,
    SuperResolutionTask,
    TaskName,
    TemporalDataset,
    TemporalTask,
    collate_task_batch,
    gaussian_blur,
    get_task,
    make_mask,
    read_task_card,
    resolve_task,
    task_from_options,
    write_task_card,
)
from dsat_core.imaging import bicubic_upsample, to_rgb
from dsat_core.metadata import SatMetadata

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


@pytest.fixture(scope="module")
def paired_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """2 synthetic scenes × 4 tiles, each read as `rgb` (3 bands) and `multispectral` (4 bands)."""
    path = tmp_path_factory.mktemp("paired") / "store.zarr"
    return make_synthetic_store(
        str(path), n_scenes=2, tiles_per_scene=4, size=32, products=("rgb", "multispectral")
    )


@pytest.fixture(scope="module")
def temporal_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One place at four dates (same grid) and another place at one date."""
    path = tmp_path_factory.mktemp("temporal") / "store.zarr"
    store = DatasetStore.open(str(path), create=True, catalog=synthetic_catalog(("rgb",), 16))
    dates = ["2020-01-05", "2020-03-10", "2020-06-20", "2020-09-01"]
    scenes = [make_scene_tiles(f"havelland-{d}", n_tiles=2, size=16, date=d) for d in dates]
    scenes.append(
        make_scene_tiles("andros-2020-02-02", n_tiles=2, size=16, lon=-77.77, lat=24.56, date="2020-02-02")
    )
    store.commit([store.stage(s) for s in scenes])
    return str(path)


# ------------------------------------------------------------------------------------------------ SR
def test_sr_pairs_tiles_of_the_same_scene_and_window(paired_store: str) -> None:
    recipe = DegradationRecipe(factor=4, blur_sigma=1.0, bands=("nir08", "red", "green"))
    ds = SuperResolutionDataset(paired_store, "rgb", "multispectral", recipe)
    assert len(ds) == 8 and ds.conditioning_channels == 3
    assert ds.recipe["degradation"] == {
        "factor": 4,
        "blur_sigma": 1.0,
        "bands": ["nir08", "red", "green"],
        "upsample": "bicubic",
    }
    rgb, ms = TileDataset(paired_store, "rgb"), TileDataset(paired_store, "multispectral")
    store = DatasetStore.open(paired_store, read_only=True)
    identities = {
        p: [
            f"{i}:{list(w)}"
            for i, w in zip(store.root[p]["item_id"][:], store.root[p]["window"][:].tolist(), strict=True)
        ]
        for p in ("rgb", "multispectral")
    }
    for i in (0, 5):
        s = ds[i]
        assert s["pixel_values"].shape == (3, 32, 32) and s["cond"].shape == (3, 1, 32, 32)
        assert s["cond_metadata"].shape == (1, 7) and s["cond_metadata_mask"].shape == (1, 7)
        assert s["metadata"].shape == (7,) and isinstance(s["caption"], str)
        assert s["cond"].min() >= -1 and s["cond"].max() <= 1
        # the conditioning frame is the recipe applied to the multispectral tile with the same identity
        target_row = s["index"]
        cond_row = identities["multispectral"].index(identities["rgb"][target_row])
        raw = ms[cond_row]["pixel_values"]
        torch.testing.assert_close(s["cond"][:, 0], recipe.apply(raw, ms.bands), rtol=0, atol=0)
        torch.testing.assert_close(s["pixel_values"], rgb[target_row]["pixel_values"], rtol=0, atol=0)
        # GSD of the frame = native GSD × factor; the rest of the metadata is the tile's
        frame = SatMetadata.decode(s["cond_metadata"][0].double().numpy(), s["cond_metadata_mask"][0].numpy())
        target = SatMetadata.decode(s["metadata"].double().numpy(), s["metadata_mask"].numpy())
        assert frame.gsd == pytest.approx(4 * target.gsd) and frame.year == target.year


def test_degradation_removes_detail_and_keeps_smooth_content() -> None:
    recipe = DegradationRecipe(factor=4, blur_sigma=1.0)
    flat = torch.full((2, 32, 32), 0.3)
    torch.testing.assert_close(recipe.apply(flat), flat)  # a constant survives exactly
    checker = (torch.arange(32)[:, None] + torch.arange(32)[None]) % 2 * 2.0 - 1.0
    low = recipe.lowres(checker[None])
    assert low.shape == (1, 8, 8) and low.abs().max() < 0.05  # finest detail is gone
    ramp = torch.linspace(-1, 1, 32)[None, None].expand(1, 32, 32).contiguous()
    assert (recipe.apply(ramp) - ramp)[:, 4:-4, 4:-4].abs().max() < 0.05  # smooth content is kept
    blurred = gaussian_blur(torch.randn(1, 3, 16, 16), 1.5)
    assert blurred.shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="not in the product"):
        recipe_bad = DegradationRecipe(bands=("swir16",))
        recipe_bad.band_indices(["red", "green"])


def test_back_projection_makes_outputs_agree_with_their_input_and_keeps_detail() -> None:
    recipe = DegradationRecipe(factor=4, blur_sigma=1.0)
    gen = torch.Generator().manual_seed(0)
    truth = gaussian_blur(torch.rand(2, 3, 32, 32, generator=gen) * 1.6 - 0.8, 1.5)
    low = recipe.degrade(truth)
    output = (truth * 0.6 + 0.3).clamp(-1, 1)  # right detail, wrong contrast and brightness (low frequencies)
    projected = recipe.back_project(output, low, steps=8)

    def lr_error(x: torch.Tensor) -> float:
        return float((recipe.degrade(x) - low).abs().mean())

    assert projected.shape == output.shape and projected.dtype == output.dtype
    assert lr_error(projected) < 0.1 * lr_error(output)  # agrees with the input it was made from
    assert float((projected - truth).abs().mean()) < 0.5 * float((output - truth).abs().mean())
    torch.testing.assert_close(recipe.back_project(output, low, steps=0), output)
    consistent = recipe.back_project(truth, low, steps=8)  # an output that already agrees stays as it is
    torch.testing.assert_close(consistent, truth, atol=1e-6, rtol=0)


def test_sr_task_consistency_on_samples_and_on_place_frames(paired_store: str) -> None:
    task = SuperResolutionTask(degradation={"factor": 2, "blur_sigma": 0.0}, lr_projection_steps=6)
    sr = task.dataset(DataSpec(paired_store))
    low = to_rgb(sr.lowres(3), sr.cond_bands)
    output = torch.zeros(3, 32, 32)
    made = task.consistent(sr, 3, output)
    down = DegradationRecipe(factor=2, blur_sigma=0.0).degrade(made[None])[0]
    assert float((down - low).abs().mean()) < 0.1 * float(low.abs().mean())
    torch.testing.assert_close(task.with_options(lr_projection_steps=0).consistent(sr, 3, output), output)

    bands = list(sr.cond_bands)
    frames = sr.lowres(3)[None, :, None].repeat(2, 1, 1, 1, 1)  # (B, C, T, h, w) read from a place
    baseline = task.place_baseline(frames, bands)
    expected = bicubic_upsample(low[None].double(), 32)[0]
    torch.testing.assert_close(baseline[0].double(), expected, atol=1e-5, rtol=0)
    placed = task.place_consistent(torch.zeros(2, 3, 32, 32), frames, bands)
    torch.testing.assert_close(placed[0], made, atol=1e-5, rtol=0)  # the same rule on both paths
    with pytest.raises(ValueError, match="lr_projection_steps"):
        SuperResolutionTask(lr_projection_steps=-1)


def test_sr_needs_both_products(paired_store: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not in the product"):
        SuperResolutionDataset(paired_store, recipe={"bands": ["swir22"]})
    rgb_only = make_synthetic_store(str(tmp_path / "rgb.zarr"), n_scenes=1, tiles_per_scene=1, size=16)
    with pytest.raises(StoreError, match="multispectral"):
        SuperResolutionDataset(rgb_only)


def test_sr_hold_out_by_item(paired_store: str) -> None:
    full = SuperResolutionDataset(paired_store)
    items = sorted({full[i]["item_id"] for i in range(len(full))})
    train = SuperResolutionDataset(paired_store, exclude_item_ids=[items[0]])
    test = SuperResolutionDataset(paired_store, item_ids=[items[0]])
    assert len(train) == len(test) == 4
    assert {train[i]["item_id"] for i in range(4)} == {items[1]}


# ------------------------------------------------------------------------------------------------ temporal
@pytest.mark.parametrize("frames", [1, 3, 5])
def test_temporal_sequences_come_from_other_dates_of_the_same_place(temporal_store: str, frames: int) -> None:
    ds = TemporalDataset(temporal_store, "rgb", sequence_length=frames)
    assert len(ds) == 8  # 4 dates × 2 tiles of Havelland; Andros has no second date
    for i in range(len(ds)):
        s = ds[i]
        assert s["cond"].shape == (3, frames, 16, 16) and s["cond_metadata"].shape == (frames, 7)
        assert "andros" not in s["item_id"] and all(it != s["item_id"] for it in s["cond_item_ids"])
        dates = [
            SatMetadata.decode(v.double().numpy(), m.numpy())
            for v, m in zip(s["cond_metadata"], s["cond_metadata_mask"], strict=True)
        ]
        target = SatMetadata.decode(s["metadata"].double().numpy(), s["metadata_mask"].numpy())
        assert all((d.year, d.month, d.day) != (target.year, target.month, target.day) for d in dates)
        assert [(d.month, d.day) for d in dates] == sorted((d.month, d.day) for d in dates)  # chronological
        assert abs(dates[0].lon - target.lon) < 1e-3  # same place


def test_temporal_directions(temporal_store: str) -> None:
    forward = TemporalDataset(temporal_store, sequence_length=2, direction="forward")
    backward = TemporalDataset(temporal_store, sequence_length=2, direction="backward")
    assert len(forward) == len(backward) == 6  # the first (last) date has nothing before (after) it
    for ds, later in ((forward, True), (backward, False)):
        for i in range(len(ds)):
            s = ds[i]
            target = SatMetadata.decode(s["metadata"].double().numpy(), s["metadata_mask"].numpy())
            for v, m in zip(s["cond_metadata"], s["cond_metadata_mask"], strict=True):
                frame = SatMetadata.decode(v.double().numpy(), m.numpy())
                assert ((target.month, target.day) > (frame.month, frame.day)) == later


def test_temporal_without_repeat_acquisitions_is_an_error(paired_store: str) -> None:
    with pytest.raises(StoreError, match="repeat acquisitions"):
        TemporalDataset(paired_store)


@pytest.fixture(scope="module")
def real_pair_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The real two-date Sentinel-2 B03 pair (T33UUU, same pixel grid), tiled at 256 px by the real reader."""
    if not (REAL / "catalog" / "catalog.json").is_file():
        pytest.skip(f"real sample data not found at {REAL}")
    from dsat_core.data.catalog import BandSpec, CatalogConfig, ProductSpec, ScalingSpec
    from dsat_core.data.reader import read_item
    from dsat_core.data.stac import load_static_catalog

    items = {i["id"]: i for i in load_static_catalog(REAL / "catalog" / "catalog.json")}
    config = CatalogConfig(
        name="t33uuu-green",
        stac_api="http://127.0.0.1:1",
        collections=["real"],
        target_crs="native",
        target_gsd=None,
        tile_size=256,
        allowed_schemes=["file"],
        allowed_roots=[str(REAL)],
        products={
            "green": ProductSpec(
                bands=[BandSpec(name="green")],
                scaling=ScalingSpec(mode="fixed", range=(0, 3000), dtype="uint8"),
            )
        },
    )
    path = str(tmp_path_factory.mktemp("real") / "store.zarr")
    store = DatasetStore.open(path, create=True, catalog=config)
    staged = []
    for item_id in ("sentinel2-l1c-T33UUU-20160529-b03", "sentinel2-l1c-T33UUU-20160608-b03"):
        scene = read_item(items[item_id], config)
        assert scene.products, scene.rejected
        staged.append(store.stage(scene))
    store.commit(staged)
    return path


def test_temporal_from_the_real_two_date_pair(real_pair_store: str) -> None:
    ds = TemporalDataset(real_pair_store, "green", sequence_length=1, resolution=64)
    n = DatasetStore.open(real_pair_store, read_only=True).n_tiles("green")
    assert len(ds) == n  # every tile of each date has its twin at the other date
    s = ds[0]
    assert s["cond"].shape == (1, 1, 64, 64) and s["pixel_values"].shape == (3, 64, 64)  # 1 band → grey RGB
    assert torch.equal(s["pixel_values"][0], s["pixel_values"][2])
    assert s["cond_item_ids"][0] != s["item_id"] and "T33UUU" in s["cond_item_ids"][0]
    frame = SatMetadata.decode(s["cond_metadata"][0].double().numpy(), s["cond_metadata_mask"][0].numpy())
    assert (frame.year, frame.month) == (2016, 5 if "0608" in s["item_id"] else 6)
    fwd = TemporalDataset(real_pair_store, "green", sequence_length=1, direction="forward")
    assert len(fwd) == n // 2 and all("20160608" in fwd[i]["item_id"] for i in range(0, len(fwd), 7))


# ------------------------------------------------------------------------------------------------ inpainting
@pytest.mark.parametrize("kind", ["boxes", "strokes", "mixed"])
def test_inpainting_condition_is_masked_image_plus_mask(paired_store: str, kind: str) -> None:
    ds = InpaintingDataset(paired_store, "multispectral", kind, seed=3, resolution=16)
    assert ds.conditioning_channels == 5 and len(ds) == 8
    s = ds[2]
    mask = s["mask"]
    assert s["cond"].shape == (5, 1, 16, 16) and mask.shape == (1, 16, 16)
    assert 0 < mask.mean() < 1 and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(s["cond"][-1, 0], mask[0])
    assert torch.count_nonzero(s["cond"][:-1, 0][mask.expand(4, -1, -1) > 0]) == 0
    raw = TileDataset(paired_store, "multispectral", resolution=16)[s["index"]]["pixel_values"]
    keep = mask.expand(4, -1, -1) == 0
    assert torch.equal(s["cond"][:-1, 0][keep], raw[keep])
    assert torch.equal(s["pixel_values"], raw[[2, 1, 0]])  # RGB view of blue, green, red, nir08
    assert torch.equal(ds[2]["mask"], mask)  # the same mask every time


def test_mask_kinds_differ_and_are_never_empty_or_full() -> None:
    rng = np.random.default_rng(0)
    boxes = [make_mask("boxes", 32, 32, rng) for _ in range(20)]
    strokes = [make_mask("strokes", 32, 32, rng) for _ in range(20)]
    assert all(m.any() and not m.all() for m in boxes + strokes)
    assert np.mean([m.mean() for m in boxes]) > 0.05 and np.mean([m.mean() for m in strokes]) > 0.02
    with pytest.raises(ValueError, match="mask kind"):
        make_mask("clouds", 8, 8, rng)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ factory
def test_factory_and_collate(paired_store: str, temporal_store: str) -> None:
    sr = SuperResolutionTask(degradation={"factor": 2}).dataset(DataSpec(paired_store, resolution=16))
    tp = TemporalTask(sequence_length=2).dataset(DataSpec(temporal_store))
    ip = InpaintingTask(mask_kind="boxes").dataset(DataSpec(paired_store))
    for ds, channels, frames in ((sr, 4, 1), (tp, 3, 2), (ip, 4, 1)):
        batch = collate_task_batch([ds[0], ds[1]])
        assert batch["cond"].shape[:3] == (2, channels, frames)
        assert batch["cond_metadata"].shape == (2, frames, 7) and batch["pixel_values"].shape[:2] == (2, 3)
        assert isinstance(batch["caption"], list) and len(batch["caption"]) == 2
    s = sr[0]  # 32 px tiles resized to 16 (effective GSD × 2), then degraded × 2: the frame GSD is 4× native
    frame = SatMetadata.decode(s["cond_metadata"][0].double().numpy(), s["cond_metadata_mask"][0].numpy())
    target = SatMetadata.decode(s["metadata"].double().numpy(), s["metadata_mask"].numpy())
    assert target.gsd == pytest.approx(2 * sr.cond_tiles.metadata(0).gsd)
    assert frame.gsd == pytest.approx(2 * target.gsd)
    with pytest.raises(ValueError, match="unknown task"):
        get_task("colourise")


# -------------------------------------------------------------------------------------------- task objects
def test_registry_and_task_name_agree() -> None:
    assert set(get_args(TaskName)) == set(TASKS)
    for name, task in TASKS.items():
        assert task.name == name and issubclass(task, ControlNetTask) and task.baseline_name
        assert get_task(name) is task


@pytest.mark.parametrize(
    "task",
    [
        SuperResolutionTask(
            cond_product="rgb", degradation={"factor": 2, "blur_sigma": 0.5, "bands": ["red"]}
        ),
        SuperResolutionTask(degradation={"input_recipe": "fmow-sentinel-reference", "cond_resolution": 128}),
        TemporalTask(product="green", sequence_length=5, direction="backward"),
        InpaintingTask(product="multispectral", mask_kind="strokes"),
    ],
)
def test_card_round_trips_every_field(task: ControlNetTask, tmp_path: Path) -> None:
    card = json.loads(json.dumps(task.to_card()))
    assert card["task"] == task.name
    assert set(card) == {"task", *(f.name for f in dataclasses.fields(task))}
    assert ControlNetTask.from_card(card) == task and type(task).from_card(card) == task
    write_task_card(task, tmp_path)
    assert read_task_card(tmp_path) == task
    assert json.loads((tmp_path / TASK_CARD).read_text()) == card
    assert resolve_task(task.name, tmp_path) == task  # by name: the WHOLE recorded task
    assert read_task_card(tmp_path / "nothing-here") is None
    assert resolve_task(task.name, tmp_path / "nothing-here") == type(task)()  # no card: the defaults


def test_sr_card_keeps_the_whole_input_recipe() -> None:
    task = SuperResolutionTask(
        degradation={"input_recipe": "fmow-sentinel-reference", "cond_resolution": 128}
    )
    recorded = task.to_card()["degradation"]
    assert recorded["input_recipe"] == replace(FMOW_SENTINEL_REFERENCE, cond_resolution=128).to_dict()
    assert (recorded["factor"], recorded["blur_sigma"]) == (1, 0.0)
    assert SuperResolutionTask().degradation == DegradationRecipe().to_dict()


def test_cards_that_do_not_fit_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no option"):
        ControlNetTask.from_card({"task": "temporal", "sequence_length": 2, "mask_kinds": "boxes"})
    with pytest.raises(ValueError, match="unknown task"):
        ControlNetTask.from_card({"product": "rgb"})
    with pytest.raises(ValueError, match="card of a 'sr' task"):
        TemporalTask.from_card({"task": "sr"})
    with pytest.raises(ValueError, match="direction"):
        TemporalTask(direction="sideways")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mask kind"):
        InpaintingTask(mask_kind="clouds")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="factor 1 and blur_sigma 0"):
        SuperResolutionTask(degradation={"input_recipe": "fmow-sentinel-reference", "factor": 4})
    write_task_card(InpaintingTask(), tmp_path)
    with pytest.raises(ValueError, match="holds a 'inpaint' ControlNet"):
        resolve_task("sr", tmp_path)
    # a card of the seven-field format (every task's options) keeps the task's own and drops the others'
    legacy = {"product": "rgb", "task": "temporal", "cond_product": "multispectral",
              "degradation": {"factor": 2}, "sequence_length": 2, "direction": "forward",
              "mask_kind": "mixed"}  # fmt: skip
    assert ControlNetTask.from_card(legacy) == TemporalTask(sequence_length=2, direction="forward")
    assert TemporalTask().with_options(direction="forward").direction == "forward"
    with pytest.raises(ValueError, match="no option"):
        TemporalTask().with_options(degradation={})


def test_task_options_and_spec_build_the_datasets(paired_store: str, temporal_store: str) -> None:
    options = {"product": "multispectral", "cond_product": "rgb", "sequence_length": 2, "mask_kind": "boxes",
               "degradation": {"factor": 2, "blur_sigma": 0.0}, "direction": "both"}  # fmt: skip
    sr = task_from_options("sr", options)
    assert sr == SuperResolutionTask("multispectral", "rgb", {"factor": 2, "blur_sigma": 0.0})
    assert task_from_options("inpaint", options) == InpaintingTask("multispectral", "boxes")
    ds = sr.dataset(DataSpec(paired_store, resolution=16))
    assert isinstance(ds, SuperResolutionDataset) and ds.recipe["cond_product"] == "rgb"
    assert ds.recipe["degradation"] == sr.degradation and ds.conditioning_channels == 3
    ip = task_from_options("inpaint", options).dataset(DataSpec(paired_store, seed=4))
    assert ip.recipe["mask_seed"] == 4 and ip.recipe["cond_bands"][-1] == "mask"
    for dataset in (ds, ip):  # the item ids of a sample, without reading pixels, are the sample's
        assert dataset.sample_item_ids(1)[0] == dataset[1]["item_id"]


def test_temporal_split_of_targets_only(temporal_store: str) -> None:
    """Evaluation: held-out targets with frames from any tile; training: frames from the split too."""
    fraction = 0.5
    held = set(TileDataset(temporal_store, split="holdout", holdout_fraction=fraction).indices.tolist())
    task = TemporalTask(sequence_length=2)
    spec = DataSpec(temporal_store, split="holdout", holdout_fraction=fraction, split_conditioning=False)
    ev = task.dataset(spec)
    full = task.dataset(DataSpec(temporal_store))
    expected = [seq for seq in full.sequences if int(full.tiles.indices[seq[0]]) in held]
    assert 0 < len(ev) < len(full) and ev.sequences == expected
    assert ev.recipe["split"] == "holdout" and ev.recipe["split_frames"] is False
    train = task.dataset(replace(spec, split="train", split_conditioning=True))
    rows = {int(train.tiles.indices[p]) for seq in train.sequences for p in (seq[0], *seq[1])}
    assert rows and not rows & held  # no held-out tile is read, not even as a frame
    assert set(ev.sample_item_ids(0)) == {ev[0]["item_id"], *ev[0]["cond_item_ids"]}


def test_baselines_previews_and_pipeline_inputs(paired_store: str, temporal_store: str) -> None:
    sr_task = SuperResolutionTask(degradation={"factor": 2, "blur_sigma": 0.0})
    sr = sr_task.dataset(DataSpec(paired_store))
    s = sr[3]
    low = DegradationRecipe(factor=2, blur_sigma=0.0).lowres(sr.cond_tiles[sr.pairs[3][1]]["pixel_values"])
    expected = bicubic_upsample(to_rgb(low, sr.cond_tiles.bands)[None].double(), 32)[0]
    torch.testing.assert_close(sr_task.baseline(sr, 3, s), expected, rtol=0, atol=0)
    assert (
        sr_task.cond_preview(sr, s).shape == (3, 32, 32)
        and sr_task.fill_mask(collate_task_batch([s])) is None
    )

    tp_task = TemporalTask(sequence_length=3)
    tp = tp_task.dataset(DataSpec(temporal_store))
    s = tp[2]
    target = SatMetadata.decode(s["metadata"].double().numpy(), s["metadata_mask"].numpy())
    gaps = []
    for k, (v, m) in enumerate(zip(s["cond_metadata"], s["cond_metadata_mask"], strict=True)):
        frame = SatMetadata.decode(v.double().numpy(), m.numpy())
        gaps.append(
            (
                abs(
                    (
                        date(frame.year, frame.month, frame.day) - date(target.year, target.month, target.day)
                    ).days
                ),
                k,
            )
        )
    torch.testing.assert_close(tp_task.baseline(tp, 2, s), s["cond"][:, min(gaps)[1]], rtol=0, atol=0)

    ip_task = InpaintingTask(mask_kind="boxes")
    ip = ip_task.dataset(DataSpec(paired_store, resolution=16))
    batch = collate_task_batch([ip[0], ip[1]])
    inputs = ip_task.conditioning(batch)
    assert set(inputs) == {"cond", "cond_metadata", "cond_metadata_mask", "image", "mask"}
    assert torch.equal(inputs["image"], batch["pixel_values"]) and torch.equal(
        ip_task.fill_mask(batch), batch["mask"]
    )
    assert set(sr_task.conditioning(batch)) == {"cond", "cond_metadata", "cond_metadata_mask"}
    s = ip[0]
    filled = ip_task.baseline(ip, 0, s)
    known = s["mask"].expand(3, -1, -1) == 0
    torch.testing.assert_close(filled[known], s["pixel_values"].double()[known])  # known pixels stay
    preview = ip_task.cond_preview(ip, s)  # the masked image without the mask channel: holes are 0
    assert preview.shape == (3, 16, 16) and torch.all(preview[s["mask"].expand(3, -1, -1) > 0] == 0)
