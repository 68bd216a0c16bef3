"""Shared parts of the training flows: launch a training module (torchrun / accelerate), stream its logs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, Field

from dsat_core.training.launch import build_launch_command, run_training_subprocess


class LaunchParams(BaseModel):
    """Where and how training runs: processes per node (one per GPU), nodes and rendezvous."""

    nproc_per_node: int | Literal["auto"] = Field("auto", description="'auto' = visible GPUs (1 on CPU)")
    nnodes: int = Field(1, ge=1)
    node_rank: int = Field(0, ge=0)
    rdzv_endpoint: str | None = Field(None, description="host:port of node 0 when nnodes > 1")
    launcher: Literal["torchrun", "accelerate"] = "torchrun"


class TrainingRunResult(BaseModel):
    output_dir: str
    global_step: int
    final_loss: float | None
    mlflow_run_id: str | None
    pipeline_dir: str | None
    registered_model_version: str | None = None
    world_size: int = 1


@task(name="launch-training", retries=0)
def launch_training(
    script_module: str, config: dict[str, Any], output_dir: str, launch: LaunchParams
) -> TrainingRunResult:
    """Write the config, run the launcher, stream every log line, read back `train_result.json`."""
    logger = get_run_logger()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "train_config.json"
    config_path.write_text(json.dumps(config, indent=2))
    cmd = build_launch_command(
        script_module,
        str(config_path),
        nproc_per_node=launch.nproc_per_node,
        nnodes=launch.nnodes,
        node_rank=launch.node_rank,
        rdzv_endpoint=launch.rdzv_endpoint,
        launcher=launch.launcher,
    )
    logger.info("launching: %s", " ".join(cmd))
    code = run_training_subprocess(cmd, logger.info)
    if code != 0:
        raise RuntimeError(f"{script_module} exited with code {code}; see the log lines above")
    result_path = out / "train_result.json"
    if not result_path.is_file():
        raise RuntimeError(f"{script_module} finished but wrote no {result_path}")
    return TrainingRunResult.model_validate_json(result_path.read_text())


def publish_training_artifact(key: str, title: str, result: TrainingRunResult, extra: dict[str, Any]) -> None:
    rows = {**result.model_dump(), **extra}
    table = "\n".join(f"| {k} | `{v}` |" for k, v in rows.items())
    create_markdown_artifact(key=key, markdown=f"# {title}\n\n| | |\n|---|---|\n{table}\n", description=title)
