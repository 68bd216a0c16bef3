"""The MLflow UI renders a DiffusionSat run in a real (headless) browser.

Needs Debian's Chromium (`apt-get install -y chromium`, /usr/bin/chromium); skipped without it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def screenshot(url: str, png: Path, profile: Path, budget_ms: int = 20000) -> None:
    """`chromium --headless --screenshot` of `url` (flags that keep it off the closed network)."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--screenshot={png}",
           "--window-size=1400,1000", f"--virtual-time-budget={budget_ms}", url]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and png.is_file(), done.stderr[-3000:]


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install -y chromium)")
def test_mlflow_ui_shows_a_logged_run(mlflow_server: str, tmp_path: Path) -> None:
    import mlflow
    from mlflow import MlflowClient

    from dsat_core.training.mlflow_logging import lineage_tags

    mlflow.set_tracking_uri(mlflow_server)
    experiment_id = mlflow.set_experiment("ui-check").experiment_id
    rng = np.random.default_rng(0)
    grid = (rng.random((64, 192, 3)) * 255).astype("uint8")
    lineage = {"store_uri": "s3://dsat/store.zarr", "content_hash": "3f2a9c", "product": "rgb",
               "item_ids": ["S2A_33UUU_20240601", "S2B_33UUU_20240611"], "n_tiles": 128}  # fmt: skip
    with mlflow.start_run(run_name="diffusionsat-ui-check") as run:
        mlflow.log_params({"model_size": "tiny", "resolution": 32, "learning_rate": 1e-4, "task": "sr"})
        for step in range(1, 21):
            mlflow.log_metrics({"loss": 1.0 / step, "lr": 1e-4}, step=step)
        mlflow.log_image(Image.fromarray(grid), key="samples", step=20)
        mlflow.set_tags(lineage_tags(lineage))
        (tmp_path / "pipeline").mkdir()
        (tmp_path / "pipeline" / "model_index.json").write_text('{"_class_name": "DiffusionSatPipeline"}')
        mlflow.log_artifacts(str(tmp_path / "pipeline"), "pipeline")
    client = MlflowClient(mlflow_server)
    client.create_registered_model("ui-check-model")
    version = client.create_model_version(
        "ui-check-model", f"{run.info.artifact_uri}/pipeline", run_id=run.info.run_id
    )
    assert version.version == "1"

    png = tmp_path / "run.png"
    url = f"{mlflow_server}/#/experiments/{experiment_id}/runs/{run.info.run_id}"
    screenshot(url, png, tmp_path / "chromium-profile")
    pixels = np.asarray(Image.open(png).convert("L"), dtype=float)
    assert pixels.shape == (1000, 1400)
    # a rendered page, not a blank or single-colour canvas: many grey levels, real variance
    assert pixels.std() > 10 and len(np.unique(pixels)) > 50, (pixels.std(), len(np.unique(pixels)))
    if keep := os.environ.get("DSAT_KEEP_SCREENSHOT"):  # a path: keep the PNG for a human look
        shutil.copy(png, keep)
