"""Any band set, end to end on real scenes: an SR ControlNet trained on a 6-band store (blue, green, red, nir,
swir16, swir22: Landsat 8 OLI surface reflectance) is evaluated and sampled on a 4-band store of the same
scenes (blue, green, red, nir) through the `evaluate` flow, its missing bands marked missing and recorded,
and its figures set beside those of the full-band input on the same held-out tiles."""

from __future__ import annotations

import math
import shlex
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from distributed import Client, LocalCluster

from dsat_core.data.catalog import CatalogConfig, load_catalog
from dsat_core.data.dataset import TileDataset
from dsat_core.data.ingest import ingest_items
from dsat_core.models.controlnet3d import ControlNet3D
from dsat_core.training.train_controlnet import TrainControlNetConfig, train
from flows.evaluate import EvaluateParams, evaluate

pytestmark = pytest.mark.usefixtures("prefect_api")

REPO = Path(__file__).resolve().parents[1]
SIX = ["blue", "green", "red", "nir", "swir16", "swir22"]
FOUR = SIX[:4]
HOLDOUT = 0.3
LANDSAT8 = ("landsat8-oli-sr-rondonia-20190727", "landsat8-oli-sr-madre-de-dios-20180906")


def _catalog(bands: list[str]) -> CatalogConfig:
    """The shipped `local-samples` catalog with the multispectral product cut to ``bands``."""
    data = load_catalog("local-samples").model_dump(mode="json")
    data["products"]["multispectral"]["bands"] = [b for b in data["products"]["multispectral"]["bands"]
                                                  if b["name"] in bands]  # fmt: skip
    return CatalogConfig.model_validate(data)


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    """A Dask LocalCluster with one in-process worker (starts in a second; the data are two small scenes)."""
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False) as cluster, Client(cluster) as own:
        yield own


@pytest.fixture(scope="module")
def stores(
    real_items: dict[str, dict], client: Client, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    """The two real Landsat 8 scenes ingested (real reader, Dask) as a 6-band and as a 4-band store."""
    root = tmp_path_factory.mktemp("band-stores")
    items = [real_items[i] for i in LANDSAT8]
    out = {}
    for name, bands in (("six", SIX), ("four", FOUR)):
        uri = str(root / "data" / f"landsat-{len(bands)}band.zarr")
        report = ingest_items(items, _catalog(bands), uri, client=client)
        assert report.added_tiles["multispectral"] == report.added_tiles["rgb"] > 4, report
        assert TileDataset(uri, "multispectral").bands == bands
        out[name] = uri
    return out


@pytest.fixture(scope="module")
def trained(stores: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SR ControlNet trained for a few steps on the 6-band store (band dropout on; no EMA, whose
    weights would still be the zero start after so few steps)."""
    out = tmp_path_factory.mktemp("sr-6band")
    config = TrainControlNetConfig(
        task="sr", store_uri=stores["six"], output_dir=str(out), model_size="tiny", text_encoder="hash",
        resolution=32, train_batch_size=4, learning_rate=1e-2, max_steps=8, checkpointing_steps=100,
        use_mlflow=False, use_ema=False, seed=1, lr_warmup_steps=1, conditioning_embedding_channels=(8, 16),
        degradation={"factor": 4, "blur_sigma": 1.0}, holdout_fraction=HOLDOUT, band_dropout=0.3,
    )  # fmt: skip
    result = train(config)
    assert result.global_step == 8 and result.pipeline_dir
    return Path(result.pipeline_dir)


def test_trained_controlnet_takes_the_store_bands_by_name(trained: Path) -> None:
    controlnet = ControlNet3D.from_pretrained(trained / "controlnet")
    assert controlnet.config.conditioning_bands == SIX
    # band dropout trained the learned missing value of every band away from its zero start
    assert controlnet.missing_band_values.abs().min() > 0


def _evaluate(pipeline: Path, store: str, out: Path, stac: bool) -> tuple[dict[str, float], dict[str, str]]:
    """The `evaluate` flow (sensitivity off: the README command below runs it); metrics and MLflow params."""
    import mlflow

    uri = f"sqlite:///{out / 'mlflow.db'}"
    params = EvaluateParams(
        pipeline_dir=str(pipeline), store_uri=store, kind="sr", n_samples=8, steps=2,
        holdout_fraction=HOLDOUT, sensitivity=False, stac=stac, mlflow_tracking_uri=uri, output_dir=str(out),
    )  # fmt: skip
    result = evaluate(params)
    run = mlflow.MlflowClient(uri).get_run(result.mlflow_run_id)
    if stac:  # the samples, as a validated STAC catalog
        assert (Path(result.output_dir) / "stac" / "catalog.json").is_file()
    return result.metrics, run.data.params


def test_six_band_model_evaluated_and_sampled_on_four_bands(
    trained: Path, stores: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        full, full_params = _evaluate(trained, stores["six"], tmp_path / "six", stac=False)
        subset, subset_params = _evaluate(trained, stores["four"], tmp_path / "four", stac=True)
    assert not [w for w in caught if "unknown to" in str(w.message)]  # no band of either store is dropped

    # the missing bands are recorded with the run (MLflow params) and in its summary
    assert full_params["eval.missing_bands"] == "[]"
    assert subset_params["eval.missing_bands"] == '["swir16", "swir22"]'
    assert subset_params["eval.cond_bands"] == str(FOUR).replace("'", '"')
    assert subset_params["eval.model_bands"] == str(SIX).replace("'", '"')
    summary = next((tmp_path / "four").rglob("summary.md")).read_text()
    assert "missing (learned missing value): ['swir16', 'swir22']" in summary

    # the same held-out tiles and the same RGB input: bicubic (from the RGB bands only) scores the same
    assert subset["n_tiles"] == full["n_tiles"] >= 2
    for name in ("psnr", "ssim", "lr_psnr"):
        assert subset[f"{name}/bicubic"] == pytest.approx(full[f"{name}/bicubic"], abs=1e-9)
    # the model ran on both; its 4-band figures are measured against its full-band ones
    for metrics in (full, subset):
        assert all(math.isfinite(metrics[f"{m}/model"]) for m in ("psnr", "ssim", "lr_psnr"))
    # the missing bands do change the output (deterministic: same seeds; ~1e-3 dB for this tiny model)
    assert abs(subset["psnr/model"] - full["psnr/model"]) > 1e-5
    with capsys.disabled():
        n = int(full["n_tiles"])
        print(f"\nSR on {n} held-out real tiles (tiny untrained base, 8 ControlNet steps):")
        for name in ("psnr", "ssim", "lr_psnr"):
            print(f"  {name}: 6 bands {full[f'{name}/model']:.4g}, 4 bands {subset[f'{name}/model']:.4g}, "
                  f"4 - 6 = {subset[f'{name}/model'] - full[f'{name}/model']:+.3g}; "
                  f"bicubic {full[f'{name}/bicubic']:.4g}")  # fmt: skip


def test_readme_any_band_set_command(
    trained: Path, stores: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The README's "Any band set" command, verbatim, in a folder holding the store and model it names."""
    from flows.cli import main

    readme = (REPO / "README.md").read_text()
    marker = "dsat evaluate --model models/sr-6band"
    command = next(line.strip() for line in readme.splitlines() if line.startswith(marker))
    folder = Path(stores["four"]).parents[1]
    (folder / "models").mkdir(exist_ok=True)
    if not (folder / "models" / "sr-6band").exists():
        (folder / "models" / "sr-6band").symlink_to(trained)
    monkeypatch.chdir(folder)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = shlex.split(command)
    assert args[:2] == ["dsat", "evaluate"] and "data/landsat-4band.zarr" in args
    assert main(args[1:]) == 0
    out = capsys.readouterr().out
    assert '"psnr/model"' in out and '"lr_psnr/bicubic"' in out
