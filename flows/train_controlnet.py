"""Prefect flow `train-controlnet`: launch 3D ControlNet training for one task (sr | temporal | inpaint).

Deployments `train-controlnet/sr`, `train-controlnet/temporal` and `train-controlnet/inpaint`
(infra/prefect.yaml) run this flow with the task's parameters; the base DiffusionSat model stays frozen.
"""

from __future__ import annotations

from typing import Any

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
    config: dict[str, Any] = params.train.model_dump(mode="json")
    if params.resume and not config.get("resume_from_checkpoint"):
        config["resume_from_checkpoint"] = "latest"
    result = launch_training(
        "dsat_core.training.train_controlnet", config, params.train.output_dir, params.launch
    )
    publish_training_artifact(
        f"train-controlnet-{params.train.task}",
        f"ControlNet training ({params.train.task})",
        result,
        {"task": params.train.task, "store": params.train.store_uri, "base_model": params.train.base_model},
    )
    return result
