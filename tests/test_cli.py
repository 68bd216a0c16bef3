"""The `dsat` command line: thin layers over the library, run in-process through `main`."""

from __future__ import annotations

import rasterio
import yaml

from dsat_core.data.catalog import load_catalog
from dsat_core.data.store import DatasetStore
from dsat_core.pipelines.diffusionsat import make_tiny_pipeline
from flows.cli import main


def test_sample_writes_png_and_georeferenced_geotiff(tmp_path, capsys):
    model = tmp_path / "model"
    make_tiny_pipeline(sample_size=8).save_pretrained(model)
    out = tmp_path / "samples"
    code = main(
        ["sample", "--model", str(model), "--prompt", "a satellite image of a farm", "--lat", "52.8",
         "--lon", "12.7", "--gsd", "10", "--date", "2016-06-08", "--steps", "2", "--num-images", "2",
         "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["sample-000.png", "sample-000.tif", "sample-001.png",
                                                     "sample-001.tif"]  # fmt: skip
    with rasterio.open(out / "sample-000.tif") as tif:
        assert tif.crs.to_epsg() == 32633  # UTM zone of 12.7 E, north
        assert tif.res == (10.0, 10.0)
        assert tif.tags()["prompt"] == "a satellite image of a farm" and tif.tags()["month"] == "6"
    assert "sample-001.tif" in capsys.readouterr().out


def test_sample_without_location_writes_png_only(tmp_path):
    model = tmp_path / "model"
    make_tiny_pipeline(sample_size=8).save_pretrained(model)
    assert main(["sample", "--model", str(model), "--steps", "1", "--out", str(tmp_path / "o")]) == 0
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["sample-000.png"]


def test_ingest_command_reads_a_stac_api_into_the_store(tmp_path, stac_api):
    config = load_catalog("local-samples").model_dump(mode="json")
    config["collections"] = ["real-samples"]
    path = tmp_path / "real.yaml"
    path.write_text(yaml.safe_dump(config))
    store = tmp_path / "store.zarr"
    bbox = "-70.1,-13.0,-69.9,-12.8"  # Madre de Dios only; negative values need the --bbox=... form
    assert main(["ingest", "--catalog", str(path), "--store", str(store), "--stac-api", stac_api,
                 f"--bbox={bbox}", "--workers", "1"]) == 0  # fmt: skip
    opened = DatasetStore.open(str(store))
    assert opened.ingested_items() == {"landsat8-oli-sr-madre-de-dios-20180906"}
    assert opened.n_tiles("rgb") >= 1


def test_bad_input_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    assert main(["ingest", "--catalog", "no-such-source", "--store", str(tmp_path / "s.zarr")]) == 2
    assert "no-such-source" in capsys.readouterr().err
