"""The fMoW-Sentinel reference SR input (dsat_core.data.sr_inputs) and its use by `SuperResolutionDataset`."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dsat_core.data.catalog import BandSpec, CatalogConfig, ProductSpec, ScalingSpec
from dsat_core.data.dataset import TileDataset
from dsat_core.data.scaling import scale
from dsat_core.data.sr_inputs import (
    FMOW_SENTINEL_REFERENCE,
    MissingBandsError,
    RawValuesError,
    SRInputRecipe,
    get_input_recipe,
    reference_sr_input,
    sentinel2_band_id,
)
from dsat_core.data.store import DatasetStore
from dsat_core.data.synthetic import make_scene_tiles
from dsat_core.data.tasks import (
    DataSpec,
    DegradationRecipe,
    SuperResolutionDataset,
    SuperResolutionTask,
    split_sr_recipe,
)
from dsat_core.imaging import to_rgb
from dsat_core.metadata import SatMetadata

# The reference's recipe, written out independently of the library (13 bands B1 … B12 with B8A).
MEAN = np.array([
    1370.19151926, 1184.3824625, 1120.77120066, 1136.26026392, 1263.73947144, 1645.40315151, 1846.87040806,
    1762.59530783, 1972.62420416, 582.72633433, 14.77112979, 1732.16362238, 1247.91870117,
])  # fmt: skip
STD = np.array([
    633.15169573, 650.2842772, 712.12507725, 965.23119807, 948.9819932, 1108.06650639, 1258.36394548,
    1233.1492281, 1364.38688993, 472.37967789, 14.3114637, 1310.36996126, 1087.6020813,
])  # fmt: skip
# the fMoW-Sentinel catalog's band names (catalogs/fmow-sentinel.yaml), in file order
FMOW_NAMES = (
    "coastal", "blue", "green", "red", "rededge1", "rededge2", "rededge3",
    "nir", "nir08", "nir09", "cirrus", "swir16", "swir22",
)  # fmt: skip
KEPT_NAMES = ["red", "green", "blue", "rededge1", "rededge2", "rededge3", "nir", "nir08", "swir16", "swir22"]


def reference_formula(raw13: np.ndarray, size: int) -> np.ndarray:
    """(13, H, W) DN → (10, size, size) float32 in [0, 1], step by step as the reference does it."""
    lo, hi = MEAN - 2 * STD, MEAN + 2 * STD
    img = (raw13.astype(np.float32).transpose(1, 2, 0) - lo) / (hi - lo) * 255.0  # (H, W, 13)
    img = np.clip(img, 0, 255).astype(np.uint8)
    img[:, :, 1:4] = img[:, :, [3, 2, 1]]  # BGR flip: B2, B3, B4 -> B4, B3, B2
    img = np.delete(img, [0, 9, 10], axis=2)  # drop B1, B9, B10
    v = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().div(255)
    h, w = v.shape[-2:]
    if min(h, w) != size:  # shorter side to `size`, bilinear + antialias, then centre crop
        long = int(size * max(h, w) / min(h, w))
        new = (size, long) if h <= w else (long, size)
        v = F.interpolate(v[None], size=new, mode="bilinear", align_corners=False, antialias=True)[0]
    h, w = v.shape[-2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return v[:, top : top + size, left : left + size].numpy()


def synthetic_dn(rng: np.random.Generator, shape: tuple[int, int], bands: int = 13) -> np.ndarray:
    """Integer DN spanning below lo, inside and above hi of every band (plus nodata 0 and > 10000)."""
    smooth = np.cumsum(np.cumsum(rng.normal(size=(bands, *shape)), axis=1), axis=2)
    smooth = (smooth - smooth.min()) / np.ptp(smooth)
    dn = np.rint(smooth * 7000 + rng.integers(0, 300, size=(bands, *shape))).astype(np.int64)
    dn[:, 0, :3] = 0
    dn[:, -1, -3:] = 12000
    return dn


# ------------------------------------------------------------------------------------------------ formula
@pytest.mark.parametrize("shape,size", [((48, 48), 48), ((48, 48), 32), ((40, 60), 32), ((30, 30), 64)])
def test_reference_input_matches_the_reference_formula(shape: tuple[int, int], size: int) -> None:
    raw = synthetic_dn(np.random.default_rng(sum(shape) + size), shape)
    out = reference_sr_input(raw, None, size)
    assert out.dtype == np.float32 and out.shape == (10, size, size)
    assert out.min() >= 0 and out.max() <= 1
    np.testing.assert_array_equal(out, reference_formula(raw, size))
    if shape == (size, size):  # not resized: every value is a uint8 level
        np.testing.assert_array_equal(np.rint(out * 255) / np.float32(255), out)


def test_bands_are_matched_by_name_in_any_naming_and_order() -> None:
    raw = synthetic_dn(np.random.default_rng(3), (24, 24))
    expected = reference_sr_input(raw, None, 24)
    # Planetary Computer ids, Earth Search asset keys and STAC common names; B01 / B09 / B10 absent, extras
    names = ["B02", "b3", "red", "rededge1", "rededge075", "B07", "nir", "B8A", "swir16", "B12", "scl"]
    source = [1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 0]  # raw band of each name (the extra band: anything)
    order = [7, 0, 10, 9, 2, 5, 1, 8, 3, 6, 4]
    out = reference_sr_input(raw[source][order], [names[k] for k in order], 24)
    np.testing.assert_array_equal(out, expected)

    assert [sentinel2_band_id(n) for n in ("B1", "B01", "b8a", "B08A", "B08", "B12", "nir08", "cirrus")] == [
        "B01", "B01", "B8A", "B8A", "B08", "B12", "B8A", "B10",
    ]  # fmt: skip
    assert [sentinel2_band_id(n) for n in ("rededge", "B13", "B9A", "scl", "pan")] == [None] * 5
    with pytest.raises(ValueError, match="both name Sentinel-2 B04"):
        reference_sr_input(raw[:2], ["red", "B04"], 24)


def test_missing_bands_are_named() -> None:
    raw = synthetic_dn(np.random.default_rng(4), (16, 16), bands=4)
    with pytest.raises(MissingBandsError, match=r"B05 \(rededge071, 704.1 nm\)") as err:
        reference_sr_input(raw, ["B02", "B03", "B04", "B08"], 16)
    assert err.value.missing == ["B05", "B06", "B07", "B8A", "B11", "B12"]


def test_recipe_record_and_selection() -> None:
    recipe = FMOW_SENTINEL_REFERENCE
    assert recipe.name == "fmow-sentinel-reference" and recipe.cond_resolution == 256 and recipe.gsd == 10.0
    assert recipe.output_bands == ("B04", "B03", "B02", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")
    lo, hi = recipe.range(["B01", "B10"])
    np.testing.assert_array_equal(lo, (MEAN - 2 * STD)[[0, 10]])
    np.testing.assert_array_equal(hi, (MEAN + 2 * STD)[[0, 10]])
    record = json.loads(json.dumps(recipe.to_dict()))
    assert SRInputRecipe.from_dict(record) == recipe and get_input_recipe(record) == recipe
    assert get_input_recipe("fmow-sentinel-reference") is recipe and get_input_recipe(recipe) is recipe
    with pytest.raises(ValueError, match="unknown SR input recipe"):
        get_input_recipe("sentinel-reference")
    with pytest.raises(ValueError, match="unknown input recipe field"):
        SRInputRecipe.from_dict({**record, "scale": 2})
    with pytest.raises(ValueError, match="not Sentinel-2 ids"):
        replace(recipe, output_bands=("B13",))

    assert split_sr_recipe(None) == (DegradationRecipe(), None)
    assert split_sr_recipe({"factor": 2}) == (DegradationRecipe(factor=2), None)
    degradation, inputs = split_sr_recipe({"input_recipe": "fmow-sentinel-reference", "cond_resolution": 128})
    assert degradation == DegradationRecipe(factor=1, blur_sigma=0.0)
    assert inputs == replace(recipe, cond_resolution=128)
    with pytest.raises(ValueError, match="factor 1 and blur_sigma 0"):
        split_sr_recipe({"input_recipe": "fmow-sentinel-reference", "factor": 4})
    with pytest.raises(ValueError, match="cond_resolution needs an input_recipe"):
        split_sr_recipe({"cond_resolution": 256})


# ------------------------------------------------------------------------------------------------ store
def _sentinel_store(
    path: Path,
    bands: tuple[str, ...] = FMOW_NAMES,
    scale_range: tuple[float, float] = (0.0, 10000.0),
    dtype: str = "uint16",
    size: int = 64,
) -> tuple[str, dict[str, np.ndarray]]:
    """Two fMoW-Sentinel-like scenes (2 tiles each, gsd 1.5 m as on the paired fMoW grid) + their raw DN."""
    ms_spec = ProductSpec(
        bands=[BandSpec(name=b) for b in bands],
        scaling=ScalingSpec(mode="fixed", range=scale_range, dtype=dtype),
    )
    rgb_spec = ProductSpec(bands=[BandSpec(name=b) for b in ("red", "green", "blue")])
    catalog = CatalogConfig(
        name="sentinel-like",
        stac_api="http://127.0.0.1:1/stac",
        collections=["sentinel-like"],
        products={"multispectral": ms_spec, "rgb": rgb_spec},
        tile_size=size,
    )
    store = DatasetStore.open(str(path), create=True, catalog=catalog)
    raws, staged = {}, []
    for k, item in enumerate(("fmow-sentinel-train-airport_1_0", "fmow-sentinel-train-farm_7_2")):
        rgb = make_scene_tiles(item, n_tiles=2, size=size, gsd=1.5, seed=k)
        ms_scene = make_scene_tiles(item, n_tiles=2, size=size, bands=bands, product="multispectral", gsd=1.5)
        ms = ms_scene.products["multispectral"]
        raw = synthetic_dn(np.random.default_rng(k), (size, size), bands=2 * len(bands))
        raw = raw.reshape(2, len(bands), size, size)
        low, high = np.full(len(bands), scale_range[0]), np.full(len(bands), scale_range[1])
        valid = np.ones((size, size), dtype=bool)
        images = np.stack([scale(r.astype(np.float64), valid, low, high, dtype) for r in raw])
        ms = replace(ms, images=images, scale_min=np.tile(low, (2, 1)), scale_max=np.tile(high, (2, 1)))
        rgb.products["multispectral"] = ms
        raws[item] = raw
        staged.append(store.stage(rgb))
    store.commit(staged)
    return str(path), raws


@pytest.fixture(scope="module")
def sentinel_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, np.ndarray]]:
    return _sentinel_store(tmp_path_factory.mktemp("sentinel") / "store.zarr")


REFERENCE = {"input_recipe": "fmow-sentinel-reference", "cond_resolution": 32, "factor": 1, "blur_sigma": 0}


def test_sr_dataset_yields_the_reference_input(sentinel_store: tuple[str, dict[str, np.ndarray]]) -> None:
    uri, raws = sentinel_store
    ds = SuperResolutionDataset(uri, "rgb", "multispectral", REFERENCE, resolution=64)
    assert len(ds) == 4 and ds.conditioning_channels == 10 and ds.cond_bands == KEPT_NAMES
    assert ds.degradation == DegradationRecipe(factor=1, blur_sigma=0.0, bands=tuple(KEPT_NAMES))
    recorded = ds.recipe["degradation"]
    assert recorded["input_recipe"] == replace(FMOW_SENTINEL_REFERENCE, cond_resolution=32).to_dict()
    assert recorded["factor"] == 1 and recorded["bands"] == KEPT_NAMES
    rgb = TileDataset(uri, "rgb", resolution=64)
    windows = DatasetStore.open(uri, read_only=True).root["multispectral"]["window"][:]
    for i in range(len(ds)):
        s = ds[i]
        assert s["pixel_values"].shape == (3, 64, 64) and s["cond"].shape == (10, 1, 32, 32)
        torch.testing.assert_close(s["pixel_values"], rgb[s["index"]]["pixel_values"], rtol=0, atol=0)
        # the raw DN the tile was made from: tile k of its scene is the k-th window (row-major grid)
        _, cond_pos = ds.pairs[i]
        row = int(ds.cond_tiles.indices[cond_pos])
        k = int(windows[row][1] > 0)
        expected = 2 * reference_formula(raws[s["item_id"]][k], 32) - 1
        np.testing.assert_array_equal(s["cond"][:, 0].numpy(), expected)
        frame = SatMetadata.decode(s["cond_metadata"][0].double().numpy(), s["cond_metadata_mask"][0].numpy())
        target = SatMetadata.decode(s["metadata"].double().numpy(), s["metadata_mask"].numpy())
        assert frame.gsd == pytest.approx(10.0) and target.gsd == pytest.approx(1.5)
        assert (frame.year, frame.lon) == (target.year, target.lon)
    # the evaluation baseline (the degraded frame's RGB view) still lines up with cond_bands
    low = ds.degradation.lowres(ds.cond_tiles[0]["pixel_values"], ds.cond_tiles.bands)
    assert to_rgb(low, ds.cond_bands).shape == (3, 64, 64)

    # the recorded recipe rebuilds the same dataset; so do the task and the default resolution
    again = SuperResolutionDataset(uri, recipe=json.loads(json.dumps(recorded)), resolution=64)
    assert again.recipe == ds.recipe
    torch.testing.assert_close(again[1]["cond"], ds[1]["cond"], rtol=0, atol=0)
    task = SuperResolutionTask(degradation={"input_recipe": "fmow-sentinel-reference"})
    full = task.dataset(DataSpec(uri))
    assert full[0]["cond"].shape == (10, 1, 256, 256) and full[0]["pixel_values"].shape == (3, 64, 64)


def test_sr_dataset_missing_bands(tmp_path: Path) -> None:
    uri, _ = _sentinel_store(tmp_path / "s.zarr", bands=("B02", "B03", "B04", "B08"), size=16)
    with pytest.raises(MissingBandsError, match="multispectral lacks Sentinel-2 band") as err:
        SuperResolutionDataset(uri, recipe=REFERENCE)
    assert err.value.missing == ["B05", "B06", "B07", "B8A", "B11", "B12"]


def test_sr_dataset_needs_recoverable_raw_values(tmp_path: Path) -> None:
    clipped, _ = _sentinel_store(tmp_path / "clipped.zarr", scale_range=(0.0, 3000.0), size=16)
    with pytest.raises(
        RawValuesError, match=r"clips band\(s\) \['B04'.*'B8A'.*B04: stored \[0, 3000\], needed \[0, 3066.7"
    ):
        SuperResolutionDataset(clipped, recipe=REFERENCE)
    coarse, raws = _sentinel_store(tmp_path / "coarse.zarr", dtype="uint8", size=16)
    with pytest.warns(UserWarning, match="approximate"):
        ds = SuperResolutionDataset(coarse, recipe=REFERENCE)
    sample, row = ds[0], int(ds.cond_tiles.indices[ds.pairs[0][1]])
    k = int(DatasetStore.open(coarse, read_only=True).root["multispectral"]["window"][row][1] > 0)
    expected = 2 * reference_formula(raws[sample["item_id"]][k], 32) - 1
    cond = sample["cond"][:, 0].numpy()
    assert np.abs(cond - expected).max() <= 2 * 5 / 255 + 1e-6  # 39 DN steps vs the reference's ~10 DN levels


def test_sr_task_preview_and_baseline_at_the_target_size(
    sentinel_store: tuple[str, dict[str, np.ndarray]],
) -> None:
    """The reference frame is half the target's size (256 px for 512 px): preview and baseline are resized."""
    uri, _ = sentinel_store
    task = SuperResolutionTask(degradation=REFERENCE)
    ds = task.dataset(DataSpec(uri, resolution=64))
    s = ds[0]
    assert s["cond"].shape == (10, 1, 32, 32) and s["pixel_values"].shape == (3, 64, 64)
    preview = task.cond_preview(ds, s)
    assert preview.shape == (3, 64, 64)
    rgb = s["cond"][[0, 1, 2], 0]  # B04, B03, B02: red, green, blue
    expected = F.interpolate(rgb[None], size=(64, 64), mode="bilinear", antialias=True, align_corners=False)[
        0
    ]
    torch.testing.assert_close(preview, expected, rtol=0, atol=0)
    assert task.baseline(ds, 0, s).shape == (3, 64, 64)
