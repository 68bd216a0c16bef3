"""Shared parts of the training flows: launch a training module (torchrun / accelerate), stream its logs."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, cast
from uuid import UUID

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from pydantic import BaseModel, Field

from dsat_core.training.config import TrainConfig
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


class TrainingProgress:
    """Training progress from the trainer's `step N` log lines: a progress bar on the terminal (tqdm) and a
    progress artifact in the Prefect UI, updated at most every 2 % of the run."""

    _STEP = re.compile(r"\bstep (\d+) loss\b")

    def __init__(self, total: int, key: str) -> None:
        from tqdm.auto import tqdm

        self.total = max(int(total), 1)
        self.bar = tqdm(total=self.total, desc=key.removesuffix("-progress"), unit="step", leave=True)
        # sync in a sync flow (Prefect's `sync_compatible` also types the coroutine it returns in async code)
        self.artifact = cast(UUID, create_progress_artifact(0.0, key=re.sub(r"[^a-z0-9-]", "-", key.lower())))
        self.reported = 0.0

    def log_line(self, log: Callable[[str], None]) -> Callable[[str], None]:
        def handle(line: str) -> None:
            log(line)
            match = self._STEP.search(line)
            if match:
                self.update(int(match.group(1)))

        return handle

    def update(self, step: int) -> None:
        self.bar.update(max(0, min(step, self.total) - self.bar.n))
        percent = 100.0 * min(step, self.total) / self.total
        if percent - self.reported >= 2.0 or percent == 100.0:
            update_progress_artifact(self.artifact, percent)
            self.reported = percent

    def close(self) -> None:
        self.bar.close()


@task(name="launch-training", retries=0)
def launch_training(
    script_module: str, train: TrainConfig, launch: LaunchParams, resume: bool
) -> TrainingRunResult:
    """Write the config, run the launcher, stream every log line, read back `train_result.json`.

    `resume`: continue from the latest checkpoint in the output folder (if any) unless the config names one.
    """
    logger = get_run_logger()
    config: dict[str, Any] = train.model_dump(mode="json")
    if resume and not config.get("resume_from_checkpoint"):
        config["resume_from_checkpoint"] = "latest"
    out = Path(train.output_dir)
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
    progress = TrainingProgress(config.get("max_steps", 0), key=f"{out.name}-progress")
    code = run_training_subprocess(cmd, progress.log_line(logger.info))
    progress.close()
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
