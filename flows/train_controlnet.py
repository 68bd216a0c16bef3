"""Prefect flow `train-controlnet`: launch 3D ControlNet training for one task (sr | temporal | inpaint).

Deployments `train-controlnet/sr`, `train-controlnet/temporal` and `train-controlnet/inpaint`
(infra/prefect.yaml) run this flow with the task's parameters; the base DiffusionSat model stays frozen.
"""

from __future__ import annotations

from prefect import flow
from pydantic import BaseModel, Field

from dsat_core.training.train_controlnet import TrainControlNetConfig
from flows.training import LaunchParams, TrainingRunResult, launch_training, publish_training_artifact


class TrainControlNetParams(BaseModel):
    train: TrainControlNetConfig
    launch: LaunchParams = LaunchParams()
    resume: bool = Field(True, description="continue from the latest checkpoint in output_dir, if any")


@flow(name="train-controlnet", log_prints=True)
def train_controlnet(params: TrainControlNetParams) -> TrainingRunResult:
    """Train (or resume) the ControlNet of `params.train.task`; returns the MLflow run id and pipeline."""
    result = launch_training(
        "dsat_core.training.train_controlnet", params.train, params.launch, params.resume
    )
    publish_training_artifact(
        f"train-controlnet-{params.train.task}",
        f"ControlNet training ({params.train.task})",
        result,
        {"task": params.train.task, "store": params.train.store_uri, "base_model": params.train.base_model},
    )
    return result
