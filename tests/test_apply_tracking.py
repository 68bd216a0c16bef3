"""`dsat apply` against the real MLflow server: a registered SR ControlNet fetched by alias, the applied
item + preview PNG logged to a run with the model's provenance; the `apply-model` Prefect flow runs the same
driver (generation from a `runs:/` URI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_apply import AOI, SCENE, sr_model  # noqa: F401 - the module-scoped model fixture

REPO = Path(__file__).resolve().parents[1]


def _artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for info in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, info.path) if info.is_dir else {info.path}
    return out


@pytest.fixture(scope="module")
def registered_sr(mlflow_server: str, sr_model: Path) -> tuple[str, str]:  # noqa: F811
    """The tiny SR pipeline logged as training logs it, registered as `tiny-apply-sr`, alias `prod`."""
    from mlflow import MlflowClient

    from dsat_core.training.mlflow_logging import MlflowTracker

    tracker = MlflowTracker(mlflow_server, "train-controlnet", run_name="tiny-sr")
    version = tracker.log_pipeline(sr_model, "tiny-apply-sr", pip_requirements=["torch"])
    tracker.end()
    MlflowClient(mlflow_server).set_registered_model_alias("tiny-apply-sr", "prod", version)
    return tracker.run_id, version


def test_cli_applies_a_registered_model_and_logs_item_and_preview(
    mlflow_server: str, registered_sr: tuple[str, str], samples_api: str, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    train_run, version = registered_sr
    bbox = ",".join(str(v) for v in AOI)
    cmd = [sys.executable, "-m", "flows.cli", "apply", "sr", "--catalog", "local-samples", f"--bbox={bbox}",
           "--model", "models:/tiny-apply-sr@prod", "--out", str(tmp_path / "out"), "--stac-api", samples_api,
           "--steps", "2", "--overlap", "4", "--mlflow-tracking-uri", mlflow_server]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout[done.stdout.rindex("\n{") :])  # MLflow may print before the report
    assert report["complete"] and len(report["outputs"]) == 1
    item = json.loads(Path(report["outputs"][0]).read_text())
    model = item["properties"]["dsat:apply"]["model"]
    assert (model["name"], model["alias"], model["version"]) == ("tiny-apply-sr", "prod", version)
    assert model["run_id"] == train_run and model["uri"] == "models:/tiny-apply-sr@prod"
    client = MlflowClient(mlflow_server)
    run = client.get_run(report["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["dsat.model_run_id"] == train_run and run.data.params["kind"] == "sr"
    assert run.data.metrics["tiles_run"] == 16
    logged = _artifacts(client, run.info.run_id)
    folder = f"items/sr-{SCENE}"
    assert {f"{folder}/sr-{SCENE}.json", f"{folder}/sr-{SCENE}-preview.png", "apply_report.json"} <= logged


@pytest.mark.usefixtures("prefect_api")
def test_apply_model_flow_generates_from_a_run_uri(
    mlflow_server: str, tiny_pipelines: dict[str, Path], samples_api: str, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    from dsat_core.apply.job import ApplySpec
    from dsat_core.training.mlflow_logging import MlflowTracker
    from flows.apply_model import apply_model

    tracker = MlflowTracker(mlflow_server, "train-diffusionsat", run_name="tiny-gen")
    tracker.log_pipeline(tiny_pipelines["generation"], None, pip_requirements=["torch"])
    tracker.end()
    uri = f"runs:/{tracker.run_id}/pipeline"
    spec = ApplySpec(kind="generate", catalog="local-samples", bbox=AOI, model=uri, out=str(tmp_path),
                     stac_api=samples_api, steps=2, overlap=4, mlflow_tracking_uri=mlflow_server)  # fmt: skip
    report = apply_model(spec)
    assert report["complete"] and len(report["outputs"]) == 1
    item = json.loads(Path(report["outputs"][0]).read_text())
    assert item["properties"]["dsat:apply"]["model"]["run_id"] == tracker.run_id
    run = MlflowClient(mlflow_server).get_run(report["mlflow_run_id"])
    assert run.data.params["kind"] == "generate" and run.data.tags["dsat.model_uri"] == uri
