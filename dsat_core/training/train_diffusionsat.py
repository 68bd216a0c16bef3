"""Train DiffusionSat (spec §1) on one CPU, one GPU or many GPUs/nodes with accelerate.

    python -m dsat_core.training.train_diffusionsat --config cfg.json [--max_steps 1000 ...]
    torchrun --standalone --nproc_per_node 2 -m dsat_core.training.train_diffusionsat --config cfg.json
    accelerate launch --multi_gpu --num_processes 8 -m dsat_core.training.train_diffusionsat --config cfg.json

v-prediction with min-SNR-γ weighting, caption dropout (whole + per phrase) and per-field metadata
dropout (mask only), frozen VAE and text encoder (its projection, when it has one, trains), EMA of the
UNet, pickle-free checkpoints with exact resume, MLflow tracking and a registered pipeline at the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import DDIMScheduler
from diffusers.optimization import get_scheduler
from torch import nn
from torch.utils.data import DataLoader

from dsat_core.data.dataset import TileDataset
from dsat_core.data.store import DatasetStore
from dsat_core.metadata import SatMetadata
from dsat_core.models import (
    SatUNet,
    encode_latents,
    load_sd_components,
    load_text_encoder,
    load_vae,
    make_tiny_vae,
    scheduler_config,
    unet_config,
    vae_scale_factor,
)
from dsat_core.pipelines import DiffusionSatPipeline
from dsat_core.training.checkpointing import load_checkpoint, resolve_checkpoint, save_checkpoint
from dsat_core.training.conditioning import drop_captions, drop_metadata
from dsat_core.training.config import TrainConfig
from dsat_core.training.ema import EMA
from dsat_core.training.latent_cache import (
    CachedLatentDataset,
    is_cache_complete,
    precompute_latents,
    vae_fingerprint,
)
from dsat_core.training.losses import diffusion_loss, diffusion_target, make_noise_scheduler
from dsat_core.training.mlflow_logging import MlflowTracker, NullTracker, default_tracking_uri, image_grid
from dsat_core.training.runtime import make_accelerator, micro_batch_seed
from dsat_core.training.sampler import ResumableBatchSampler

logger = logging.getLogger("dsat_core.training")


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


@dataclass
class Components:
    unet: SatUNet
    vae: nn.Module
    text_encoder: nn.Module
    text_projection: nn.Module | None  # the trainable part of the text encoder, if any


# ---------------------------------------------------------------------------- building blocks
def build_components(config: TrainConfig) -> Components:
    """UNet, VAE and text encoder from a DiffusionSat folder, an SD folder, or a named size (seeded init)."""
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        if config.pretrained_diffusionsat:
            pipe = DiffusionSatPipeline.from_pretrained(config.pretrained_diffusionsat)
            unet, vae, text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
        elif config.pretrained_sd:
            parts = load_sd_components(config.pretrained_sd)
            unet, vae, text_encoder = parts["unet"], parts["vae"], parts["text_encoder"]
        else:
            vae = make_tiny_vae(seed=config.seed) if config.vae == "tiny" else load_vae(config.vae)
            factor = vae_scale_factor(vae)
            cfg = unet_config(config.model_size, sample_size=config.resolution // factor)
            unet = SatUNet(use_metadata=config.use_metadata, **cfg)
            text_encoder = load_text_encoder(
                config.text_encoder, cross_attention_dim=cfg["cross_attention_dim"]
            )
    vae.requires_grad_(False).eval()
    text_encoder.requires_grad_(False)
    projection = getattr(text_encoder, "projection", None)
    if config.train_text_projection and isinstance(projection, nn.Module):
        projection.requires_grad_(True)
    else:
        projection = None
    unet.train()
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return Components(unet, vae, text_encoder, projection)


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict (names and fp32 values), to compare weights across ranks or files."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _trained_state(unet: nn.Module, projection: nn.Module | None) -> dict[str, torch.Tensor]:
    state = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    if projection is not None:
        state.update({f"text_projection.{k}": v for k, v in projection.state_dict().items()})
    return state


def _lineage(config: TrainConfig, dataset: TileDataset) -> dict[str, Any]:
    store = DatasetStore.open(config.store_uri, storage_options=config.storage_options, read_only=True)
    group = store.product_group(config.product)
    item_ids = group["item_id"][: store.n_tiles(config.product)][dataset.indices]
    return {
        "store_uri": config.store_uri,
        "product": config.product,
        "content_hash": store.content_hash,
        "store_version": store.version,
        "filters": {
            "bbox": config.bbox,
            "start": config.start,
            "end": config.end,
            "platform": config.platform,
        },
        "n_tiles": len(dataset),
        "item_ids": sorted({str(i) for i in item_ids}),
        "ingested_items": sorted(store.ingested_items()),
    }


def _validation_inputs(config: TrainConfig, tiles: TileDataset) -> tuple[list[str], list[SatMetadata]]:
    """Captions + metadata (GSD at the training resolution) of evenly spaced tiles.

    `validation_prompts`, when given, replace the captions (cycled).
    """
    n = min(config.num_validation_samples, len(tiles))
    picks = np.linspace(0, len(tiles) - 1, n).round().astype(int).tolist()
    samples = [tiles[i] for i in picks]
    metadata = [SatMetadata.decode(s["metadata"].numpy(), s["metadata_mask"].numpy()) for s in samples]
    if config.validation_prompts:
        prompts = [config.validation_prompts[k % len(config.validation_prompts)] for k in range(n)]
    else:
        prompts = [str(s["caption"]) for s in samples]
    return prompts, metadata


@torch.no_grad()
def sample_grid(
    unet: nn.Module,
    components: Components,
    prompts: list[str],
    metadata: list[SatMetadata],
    config: TrainConfig,
):
    """A grid of pipeline samples (DDIM) for the given captions/metadata."""
    pipe = DiffusionSatPipeline(
        unet=unet,
        vae=components.vae,
        text_encoder=components.text_encoder,
        scheduler=DDIMScheduler.from_config(scheduler_config()),
    )
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(config.seed)
    out = pipe(
        prompts,
        metadata=metadata,
        num_inference_steps=config.validation_inference_steps,
        guidance_scale=config.validation_guidance_scale,
        generator=generator,
        height=config.resolution,
        width=config.resolution,
        output_type="np",
    )
    return image_grid(out.images)


# ---------------------------------------------------------------------------- training
def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) training as configured; returns where things went and the final loss."""
    accelerator = make_accelerator(config.mixed_precision)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    output_dir = Path(config.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        config.to_json(output_dir / "train_config.json")
    logging.basicConfig(
        level=logging.INFO if accelerator.is_main_process else logging.WARNING,
        format="%(asctime)s %(name)s %(message)s",
        stream=sys.stdout,
        force=True,
    )
    set_seed(config.seed)

    parts = build_components(config)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
    frozen_dtype = weight_dtype if device.type == "cuda" else torch.float32
    parts.vae.to(device)
    parts.text_encoder.to(device)
    if frozen_dtype != torch.float32:
        parts.vae.to(dtype=frozen_dtype)
        if parts.text_projection is None:
            parts.text_encoder.to(dtype=frozen_dtype)
    noise_scheduler = make_noise_scheduler()

    # data (the latent cache is filled once, by the main process, before anyone reads it)
    vae_id = None
    if config.use_cached_latents:
        vae_id = vae_fingerprint(parts.vae)
        if accelerator.is_main_process and not is_cache_complete(
            config.store_uri,
            config.product,
            vae_id,
            config.resolution,
            storage_options=config.storage_options,
        ):
            precompute_latents(
                config.store_uri,
                config.product,
                parts.vae,
                config.train_batch_size,
                resolution=config.resolution,
                vae_id=vae_id,
                storage_options=config.storage_options,
            )
        accelerator.wait_for_everyone()
    tiles = TileDataset(
        config.store_uri,
        config.product,
        bbox=config.bbox,
        start=config.start,
        end=config.end,
        platform=config.platform,
        split=config.split,
        holdout_fraction=config.holdout_fraction,
        resolution=config.resolution,
        storage_options=config.storage_options,
    )
    dataset = CachedLatentDataset(tiles, vae_id) if config.use_cached_latents else tiles

    # optimisation
    trainable = [p for p in parts.unet.parameters() if p.requires_grad]
    projection_params = list(parts.text_projection.parameters()) if parts.text_projection is not None else []
    optimizer = torch.optim.AdamW(
        trainable + projection_params,
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
    unet, optimizer = accelerator.prepare(parts.unet, optimizer)
    base_unet = accelerator.unwrap_model(unet)
    ema = EMA(base_unet, config.ema_decay, use_warmup=config.ema_warmup) if config.use_ema else None

    # resume
    global_step, last_loss, run_id = 0, float("nan"), None
    checkpoint = resolve_checkpoint(output_dir, config.resume_from_checkpoint)
    if checkpoint is not None:
        state = load_checkpoint(
            checkpoint,
            unet=base_unet,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            ema=ema,
            text_projection=parts.text_projection,
            scaler=accelerator.scaler,
            process_index=rank,
            device=device,
        )
        global_step, last_loss, run_id = (
            state["global_step"],
            state.get("last_loss", last_loss),
            state.get("mlflow_run_id"),
        )
        if state.get("world_size", world) != world:
            logger.warning(
                "resuming a %s-process run on %s processes: the data order changes",
                state["world_size"],
                world,
            )
        logger.info("resumed from %s at step %d", checkpoint, global_step)
    elif config.resume_from_checkpoint:
        logger.info(
            "resume_from_checkpoint=%r: no checkpoint yet, starting at step 0", config.resume_from_checkpoint
        )

    accum = config.gradient_accumulation_steps
    sampler = ResumableBatchSampler(
        len(dataset),
        config.train_batch_size,
        seed=config.seed,
        rank=rank,
        world_size=world,
        start_batch=global_step * accum,
    )
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=config.dataloader_num_workers,
        persistent_workers=config.dataloader_num_workers > 0,
    )
    batches = iter(loader)
    end_step = min(config.max_steps, config.stop_at_step or config.max_steps)

    # tracking (main process only)
    tracker: NullTracker = NullTracker()
    lineage = _lineage(config, tiles)
    if accelerator.is_main_process and config.use_mlflow:
        tracker = MlflowTracker(
            config.mlflow_tracking_uri or default_tracking_uri(output_dir),
            config.mlflow_experiment,
            run_name=config.mlflow_run_name,
            run_id=run_id,
            parent_run_id=config.mlflow_parent_run_id,
        )
        tracker.log_params(
            {
                **config.flat_params(),
                "world_size": world,
                "trainable_text_projection": parts.text_projection is not None,
                "n_train_tiles": len(dataset),
            }
        )
        tracker.log_lineage(lineage)
    val_inputs = _validation_inputs(config, tiles) if config.validation_steps else None

    def checkpoint_now() -> None:
        save_checkpoint(
            output_dir,
            global_step,
            unet=base_unet,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            ema=ema,
            text_projection=parts.text_projection,
            scaler=accelerator.scaler,
            extra_state={
                "last_loss": last_loss,
                "mlflow_run_id": tracker.run_id,
                "world_size": world,
                "micro_batches_seen": global_step * accum,
                "store_content_hash": lineage["content_hash"],
            },
            is_main_process=accelerator.is_main_process,
            process_index=rank,
            device=device,
            wait_for_everyone=accelerator.wait_for_everyone,
            total_limit=config.checkpoints_total_limit,
        )

    status = "FAILED"
    try:
        last_saved = global_step
        while global_step < end_step:
            tic = time.perf_counter()
            losses = []
            for micro in range(accum):
                batch = next(batches)
                gen = torch.Generator().manual_seed(micro_batch_seed(config.seed, rank, global_step, micro))
                sync = accelerator.no_sync(unet) if micro < accum - 1 else nullcontext()
                with sync:
                    loss = _loss(
                        batch, gen, unet, parts, noise_scheduler, config, device, frozen_dtype, accelerator
                    )
                    accelerator.backward(loss / accum)
                losses.append(loss.detach())
            if projection_params and world > 1:  # the projection is outside DDP: average its grads by hand
                for p in projection_params:
                    if p.grad is not None:
                        p.grad.copy_(accelerator.reduce(p.grad, reduction="mean"))
            if config.max_grad_norm:
                accelerator.clip_grad_norm_(trainable + projection_params, config.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            if ema is not None:
                ema.step(base_unet)
            last_loss = float(accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item())
            if not math.isfinite(last_loss):
                raise FloatingPointError(f"loss is {last_loss} at step {global_step}")
            if global_step % config.log_every == 0 or global_step == end_step:
                metrics = {
                    "loss": last_loss,
                    "lr": lr_scheduler.get_last_lr()[0],
                    "step_time_s": time.perf_counter() - tic,
                }
                tracker.log_metrics(metrics, step=global_step)
                if accelerator.is_main_process:
                    with open(output_dir / "metrics.jsonl", "a") as log:
                        log.write(json.dumps({"step": global_step, **metrics}) + "\n")
                logger.info("step %d loss %.5f lr %.3g", global_step, last_loss, metrics["lr"])
            if config.checkpointing_steps and global_step % config.checkpointing_steps == 0:
                checkpoint_now()
                last_saved = global_step
            if val_inputs and config.validation_steps and global_step % config.validation_steps == 0:
                if accelerator.is_main_process:
                    _log_samples(base_unet, ema, parts, val_inputs, config, tracker, output_dir, global_step)
                accelerator.wait_for_everyone()
        if global_step != last_saved:
            checkpoint_now()

        pipeline_dir, version = None, None
        if world > 1:  # evidence that every rank holds the same weights
            (output_dir / "rank_weights").mkdir(parents=True, exist_ok=True)
            (output_dir / "rank_weights" / f"rank{rank}.sha256").write_text(
                weights_sha256(_trained_state(base_unet, parts.text_projection))
            )
        accelerator.wait_for_everyone()
        finished = global_step >= config.max_steps
        if accelerator.is_main_process and finished and config.save_pipeline:
            pipeline_dir = output_dir / "pipeline"
            _save_pipeline(base_unet, ema, parts, pipeline_dir)
            version = tracker.log_pipeline(pipeline_dir, config.registered_model_name, lineage=lineage)
        result = TrainResult(
            str(output_dir),
            global_step,
            last_loss,
            tracker.run_id,
            str(pipeline_dir) if pipeline_dir else None,
            version,
            world,
        )
        if accelerator.is_main_process:
            result.to_json(output_dir / "train_result.json")
        status = "FINISHED"
        return result
    finally:
        tracker.end(status)
        accelerator.end_training()


def _loss(
    batch: dict[str, Any],
    gen: torch.Generator,
    unet: nn.Module,
    parts: Components,
    noise_scheduler: Any,
    config: TrainConfig,
    device: torch.device,
    frozen_dtype: torch.dtype,
    accelerator: Accelerator,
) -> torch.Tensor:
    """Min-SNR weighted v-prediction loss of one micro-batch (all randomness from `gen`)."""
    if config.use_cached_latents:
        latents = batch["latents"].to(device, torch.float32)
    else:
        latents = encode_latents(parts.vae, batch["pixel_values"].to(device, frozen_dtype)).float()
    bsz = latents.shape[0]
    noise = torch.randn(latents.shape, generator=gen).to(device)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), generator=gen).to(device)
    captions = drop_captions(
        list(batch["caption"]), config.caption_dropout, config.caption_phrase_dropout, gen
    )
    mask = drop_metadata(batch["metadata_mask"], config.metadata_dropout, gen).to(device)
    metadata = batch["metadata"].to(device, torch.float32)  # fp32 always (×1000-scaled values)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    target = diffusion_target(noise_scheduler, latents, noise, timesteps)
    with accelerator.autocast():
        states = parts.text_encoder.encode(captions, device)
        pred = unet(noisy, timesteps, states, metadata=metadata, metadata_mask=mask, return_dict=False)[0]
    return diffusion_loss(pred, target, timesteps, noise_scheduler, config.snr_gamma)


def _log_samples(base_unet, ema, parts, val_inputs, config, tracker, output_dir, step) -> None:
    was_training = base_unet.training
    base_unet.eval()
    with ema.swapped_in(base_unet) if ema is not None else nullcontext():
        grid = sample_grid(base_unet, parts, *val_inputs, config)
    base_unet.train(was_training)
    (output_dir / "samples").mkdir(exist_ok=True)
    grid.save(output_dir / "samples" / f"step-{step:06d}.png")
    tracker.log_image(grid, key="samples", step=step)


def _save_pipeline(base_unet, ema, parts: Components, pipeline_dir: Path) -> None:
    """save_pretrained of the pipeline with the EMA weights, everything fp32 safetensors."""
    dtypes = {m: next(m.parameters()).dtype for m in (parts.vae, parts.text_encoder)}
    for module, dtype in dtypes.items():
        if dtype != torch.float32:
            module.to(torch.float32)
    with ema.swapped_in(base_unet) if ema is not None else nullcontext():
        pipe = DiffusionSatPipeline(
            unet=base_unet,
            vae=parts.vae,
            text_encoder=parts.text_encoder,
            scheduler=DDIMScheduler.from_config(scheduler_config()),
        )
        pipe.save_pretrained(str(pipeline_dir), safe_serialization=True)
    for module, dtype in dtypes.items():
        if dtype != torch.float32:
            module.to(dtype)


def main(argv: list[str] | None = None) -> int:
    config = TrainConfig.from_cli(argv)
    result = train(config)
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
