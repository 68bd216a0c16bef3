"""Prefect flow `train-diffusionsat`: launch metadata-conditioned UNet training on every GPU given."""

from __future__ import annotations

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
    result = launch_training(
        "dsat_core.training.train_diffusionsat", params.train, params.launch, params.resume
    )
    publish_training_artifact(
        "train-diffusionsat", "DiffusionSat training", result, {"store": params.train.store_uri}
    )
    return result
