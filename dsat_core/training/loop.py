"""The training skeleton shared by the DiffusionSat and ControlNet trainers.

A trainer builds its own parts (models, data, loss, sample grids, pipeline saving) and hands them to a
`TrainingRun`, which owns what every run does the same way, in this order:

    accelerator = start_run(config)                        # output folder, config, logging, seed
    optimizer, lr_scheduler = make_optimizer(params, config)
    run = TrainingRun(config, accelerator, model, optimizer, lr_scheduler, params, logger=logger)
    run.resume()                                           # exact resume (weights, optimizer, EMA, RNG)
    batches = run.batches(dataset)                         # rank-sharded, resumable batches
    run.track(lineage, params)                             # MLflow run (main process only)
    return run.fit(loss_fn, batches, ...)                  # the loop, checkpoints, pipeline, TrainResult

Checkpoints keep the shared layout of `checkpointing.py` (the trained model's folder is `unet/`),
per-micro-batch randomness comes from `runtime.micro_batch_seed`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from torch import nn
from torch.utils.data import DataLoader

from dsat_core.training.checkpointing import load_checkpoint, resolve_checkpoint, save_checkpoint
from dsat_core.training.config import TrainConfig
from dsat_core.training.ema import EMA
from dsat_core.training.mlflow_logging import MlflowTracker, NullTracker, default_tracking_uri
from dsat_core.training.runtime import make_accelerator, micro_batch_seed
from dsat_core.training.sampler import ResumableBatchSampler

LossFn = Callable[[dict[str, Any], torch.Generator], torch.Tensor]


@dataclass
class TrainResult:
    output_dir: str
    global_step: int
    final_loss: float
    mlflow_run_id: str | None
    pipeline_dir: str | None
    registered_model_version: str | None = None
    world_size: int = 1

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(asdict(self), indent=1))
        return path


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict (names and fp32 values), to compare weights across ranks or files."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def start_run(config: TrainConfig) -> Accelerator:
    """The accelerator; the output folder and `train_config.json` (main process); logging; the global seed."""
    accelerator = make_accelerator(config.mixed_precision)
    if accelerator.is_main_process:
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
        config.to_json(Path(config.output_dir) / "train_config.json")
    logging.basicConfig(
        level=logging.INFO if accelerator.is_main_process else logging.WARNING,
        format="%(asctime)s %(name)s %(message)s",
        stream=sys.stdout,
        force=True,
    )
    set_seed(config.seed)
    return accelerator


def frozen_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    """dtype of the frozen modules: the mixed-precision dtype on CUDA, fp32 otherwise."""
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
    return weight_dtype if device.type == "cuda" else torch.float32


def make_optimizer(params: list[nn.Parameter], config: TrainConfig) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over ``params`` and its LR schedule, as configured."""
    optimizer = torch.optim.AdamW(
        params,
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
        weight_decay=config.weight_decay,
    )
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=config.max_steps,
    )
    return optimizer, lr_scheduler


class TrainingRun:
    """One (possibly resumed) run of one trained model: state, resume, batches, tracking and the loop.

    ``model`` and ``optimizer`` are passed through ``accelerator.prepare``; ``params`` are the optimised
    parameters (gradient clipping); ``manual_sync_params`` those outside DDP whose gradients are averaged
    across ranks by hand (e.g. a trainable text projection, also checkpointed as ``text_projection``).
    """

    def __init__(
        self,
        config: TrainConfig,
        accelerator: Accelerator,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Any,
        params: list[nn.Parameter],
        *,
        text_projection: nn.Module | None = None,
        manual_sync_params: list[nn.Parameter] | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self.config = config
        self.accelerator = accelerator
        self.output_dir = Path(config.output_dir)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.base = accelerator.unwrap_model(self.model)
        self.lr_scheduler = lr_scheduler
        self.params = params
        self.manual_sync_params = manual_sync_params or []
        self.text_projection = text_projection
        self.ema = EMA(self.base, config.ema_decay, use_warmup=config.ema_warmup) if config.use_ema else None
        self.logger = logger or logging.getLogger("dsat_core.training")
        self.global_step, self.last_loss, self.run_id = 0, float("nan"), None
        self.tracker: NullTracker = NullTracker()
        self.lineage: dict[str, Any] = {}

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    # ------------------------------------------------------------------------ resume / data / tracking
    def resume(self, check_state: Callable[[dict[str, Any], Path], None] | None = None) -> None:
        """Load ``resume_from_checkpoint`` if there is one; ``check_state(state, path)`` may refuse it."""
        config = self.config
        checkpoint = resolve_checkpoint(self.output_dir, config.resume_from_checkpoint)
        if checkpoint is not None:
            state = load_checkpoint(
                checkpoint,
                unet=self.base,
                optimizer=self.optimizer,
                lr_scheduler=self.lr_scheduler,
                ema=self.ema,
                text_projection=self.text_projection,
                scaler=self.accelerator.scaler,
                process_index=self.rank,
                device=self.accelerator.device,
            )
            if check_state is not None:
                check_state(state, checkpoint)
            self.global_step = state["global_step"]
            self.last_loss = state.get("last_loss", self.last_loss)
            self.run_id = state.get("mlflow_run_id")
            if state.get("world_size", self.world) != self.world:
                self.logger.warning(
                    "resuming a %s-process run on %s processes: the data order changes",
                    state["world_size"],
                    self.world,
                )
            self.logger.info("resumed from %s at step %d", checkpoint, self.global_step)
        elif config.resume_from_checkpoint:
            self.logger.info(
                "resume_from_checkpoint=%r: no checkpoint yet, starting at step 0",
                config.resume_from_checkpoint,
            )

    def batches(
        self, dataset: Any, collate_fn: Callable | None = None, weights: Sequence[float] | None = None
    ) -> Iterator[dict[str, Any]]:
        """Rank-sharded batches that continue where the resumed step left off (drawn by `weights`)."""
        config = self.config
        sampler = ResumableBatchSampler(
            len(dataset),
            config.train_batch_size,
            seed=config.seed,
            rank=self.rank,
            world_size=self.world,
            start_batch=self.global_step * config.gradient_accumulation_steps,
            weights=weights,
        )
        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=config.dataloader_num_workers,
            collate_fn=collate_fn,
            persistent_workers=config.dataloader_num_workers > 0,
        )
        return iter(loader)

    def track(self, lineage: dict[str, Any], params: dict[str, Any]) -> None:
        """Keep the data lineage; on the main process with ``use_mlflow``, start (or reopen) the run."""
        config = self.config
        self.lineage = lineage
        if self.accelerator.is_main_process and config.use_mlflow:
            self.tracker = MlflowTracker(
                config.mlflow_tracking_uri or default_tracking_uri(self.output_dir),
                config.mlflow_experiment,
                run_name=config.mlflow_run_name,
                run_id=self.run_id,
                parent_run_id=config.mlflow_parent_run_id,
            )
            self.tracker.log_params(params)
            self.tracker.log_lineage(lineage)

    def checkpoint(self, extra_state: dict[str, Any] | None = None) -> None:
        """Write ``checkpoint-<global_step>`` (every rank takes part) and rotate old ones."""
        accelerator = self.accelerator
        save_checkpoint(
            self.output_dir,
            self.global_step,
            unet=self.base,
            optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler,
            ema=self.ema,
            text_projection=self.text_projection,
            scaler=accelerator.scaler,
            extra_state={
                "last_loss": self.last_loss,
                "mlflow_run_id": self.tracker.run_id,
                "world_size": self.world,
                "micro_batches_seen": self.global_step * self.config.gradient_accumulation_steps,
                "store_content_hash": self.lineage["content_hash"],
                **(extra_state or {}),
            },
            is_main_process=accelerator.is_main_process,
            process_index=self.rank,
            device=accelerator.device,
            wait_for_everyone=accelerator.wait_for_everyone,
            total_limit=self.config.checkpoints_total_limit,
        )

    # ------------------------------------------------------------------------ the loop
    def _step(self, loss_fn: LossFn, batches: Iterator[dict[str, Any]]) -> list[torch.Tensor]:
        """Forward/backward over the accumulated micro-batches (DDP sync only on the last one)."""
        config, accelerator = self.config, self.accelerator
        accum = config.gradient_accumulation_steps
        seed, rank, step = config.seed, self.rank, self.global_step
        losses = []
        for micro in range(accum):
            batch = next(batches)
            gen = torch.Generator().manual_seed(micro_batch_seed(seed, rank, step, micro))
            with accelerator.no_sync(self.model) if micro < accum - 1 else nullcontext():
                loss = loss_fn(batch, gen)
                accelerator.backward(loss / accum)
            losses.append(loss.detach())
        if self.manual_sync_params and self.world > 1:  # outside DDP: average their grads by hand
            for p in self.manual_sync_params:
                if p.grad is not None:
                    p.grad.copy_(accelerator.reduce(p.grad, reduction="mean"))
        return losses

    def _log_samples(self, sample_fn: Callable[[nn.Module], Any]) -> None:
        base, step = self.base, self.global_step
        was_training = base.training
        base.eval()
        with self.ema.swapped_in(base) if self.ema is not None else nullcontext():
            grid = sample_fn(base)
        base.train(was_training)
        (self.output_dir / "samples").mkdir(exist_ok=True)
        grid.save(self.output_dir / "samples" / f"step-{step:06d}.png")
        self.tracker.log_image(grid, key="samples", step=step)

    def fit(
        self,
        loss_fn: LossFn,
        batches: Iterator[dict[str, Any]],
        *,
        rank_state: Callable[[], dict[str, torch.Tensor]],
        save_pipeline: Callable[[Path], str | None],
        extra_state: dict[str, Any] | None = None,
        after_optimizer_step: Callable[[], None] | None = None,
        extra_metrics: Callable[[], dict[str, float]] | None = None,
        metrics_file: str | None = None,
        sample_fn: Callable[[nn.Module], Any] | None = None,
    ) -> TrainResult:
        """Train up to ``stop_at_step`` / ``max_steps``, checkpointing, logging and sampling on the way.

        ``loss_fn(batch, generator)`` is one micro-batch's loss (all randomness from the generator);
        ``rank_state()`` the trained weights hashed per rank when ``world_size > 1``; ``save_pipeline(dir)``
        saves (and logs / registers) the final pipeline on the main process, returning the registered
        version; ``extra_state`` goes into every checkpoint's state; ``after_optimizer_step`` runs after
        each update (before EMA); ``extra_metrics()`` are logged with the loss, also written to
        ``metrics_file`` (JSON lines in the output folder) when given; ``sample_fn(model)`` makes the
        validation grid (EMA weights swapped in) every ``validation_steps``.
        """
        config, accelerator, output_dir = self.config, self.accelerator, self.output_dir
        end_step = min(config.max_steps, config.stop_at_step or config.max_steps)
        status = "FAILED"
        try:
            last_saved = self.global_step
            while self.global_step < end_step:
                tic = time.perf_counter()
                losses = self._step(loss_fn, batches)
                if config.max_grad_norm:
                    accelerator.clip_grad_norm_(self.params, config.max_grad_norm)
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                if after_optimizer_step is not None:
                    after_optimizer_step()
                self.global_step += 1
                step = self.global_step
                if self.ema is not None:
                    self.ema.step(self.base)
                mean_loss = accelerator.reduce(torch.stack(losses).mean(), reduction="mean")
                self.last_loss = float(mean_loss.item())
                if not math.isfinite(self.last_loss):
                    raise FloatingPointError(f"loss is {self.last_loss} at step {step}")
                if step % config.log_every == 0 or step == end_step:
                    metrics = {
                        "loss": self.last_loss,
                        "lr": self.lr_scheduler.get_last_lr()[0],
                        "step_time_s": time.perf_counter() - tic,
                        **(extra_metrics() if extra_metrics is not None else {}),
                    }
                    self.tracker.log_metrics(metrics, step=step)
                    if metrics_file and accelerator.is_main_process:
                        with open(output_dir / metrics_file, "a") as log:
                            log.write(json.dumps({"step": step, **metrics}) + "\n")
                    self.logger.info("step %d loss %.5f lr %.3g", step, self.last_loss, metrics["lr"])
                if config.checkpointing_steps and step % config.checkpointing_steps == 0:
                    self.checkpoint(extra_state)
                    last_saved = step
                if sample_fn is not None and config.validation_steps and step % config.validation_steps == 0:
                    if accelerator.is_main_process:
                        self._log_samples(sample_fn)
                    accelerator.wait_for_everyone()
            if self.global_step != last_saved:
                self.checkpoint(extra_state)
            result = self._finish(rank_state, save_pipeline)
            status = "FINISHED"
            return result
        finally:
            self.tracker.end(status)
            accelerator.end_training()

    def _finish(
        self, rank_state: Callable[[], dict[str, torch.Tensor]], save_pipeline: Callable[[Path], str | None]
    ) -> TrainResult:
        """Rank weight hashes, the final pipeline (a finished run only) and ``train_result.json``."""
        accelerator, output_dir = self.accelerator, self.output_dir
        pipeline_dir, version = None, None
        if self.world > 1:  # evidence that every rank holds the same weights
            (output_dir / "rank_weights").mkdir(parents=True, exist_ok=True)
            (output_dir / "rank_weights" / f"rank{self.rank}.sha256").write_text(weights_sha256(rank_state()))
        accelerator.wait_for_everyone()
        finished = self.global_step >= self.config.max_steps
        if accelerator.is_main_process and finished and self.config.save_pipeline:
            pipeline_dir = output_dir / "pipeline"
            version = save_pipeline(pipeline_dir)
        result = TrainResult(
            str(output_dir),
            self.global_step,
            self.last_loss,
            self.tracker.run_id,
            str(pipeline_dir) if pipeline_dir else None,
            version,
            self.world,
        )
        if accelerator.is_main_process:
            result.to_json(output_dir / "train_result.json")
        return result
