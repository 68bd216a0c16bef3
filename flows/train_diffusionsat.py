"""Prefect flow `train-diffusionsat`: launch metadata-conditioned UNet training on every GPU given."""

from __future__ import annotations

from typing import Any

from prefect import flow
from pydantic import BaseModel, Field

from dsat_core.training.config import TrainConfig
from flows.training import LaunchParams, TrainingRunResult, launch_training, publish_training_artifact


class TrainDiffusionSatParams(BaseModel):
    train: TrainConfig
    launch: LaunchParams = LaunchParams()
    resume: bool = Field(True, description="continue from the latest checkpoint in output_dir, if any")


@flow(name="train-diffusionsat", log_prints=True)
def train_diffusionsat(params: TrainDiffusionSatParams) -> TrainingRunResult:
    """Train (or resume) DiffusionSat; returns the MLflow run id and where the pipeline was saved."""
    config: dict[str, Any] = params.train.model_dump(mode="json")
    if params.resume and not config.get("resume_from_checkpoint"):
        config["resume_from_checkpoint"] = "latest"
    result = launch_training(
        "dsat_core.training.train_diffusionsat", config, params.train.output_dir, params.launch
    )
    publish_training_artifact(
        "train-diffusionsat", "DiffusionSat training", result, {"store": params.train.store_uri}
    )
    return result
