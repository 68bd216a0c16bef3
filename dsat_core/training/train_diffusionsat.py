"""Train DiffusionSat (spec §1) on one CPU, one GPU or many GPUs/nodes with accelerate.

    python -m dsat_core.training.train_diffusionsat --config cfg.json [--max_steps 1000 ...]
    torchrun --standalone --nproc_per_node 2 -m dsat_core.training.train_diffusionsat --config cfg.json
    accelerate launch --multi_gpu --num_processes 8 -m dsat_core.training.train_diffusionsat --config cfg.json

v-prediction with min-SNR-γ weighting, caption dropout (whole + per phrase) and per-field metadata
dropout (mask only; `metadata_dropout_mode` sets the UNet's `missing_metadata`, i.e. whether a missing
field is a learned embedding or the reference's value 0), frozen VAE and text encoder (its projection, when
it has one, trains), EMA of the UNet, pickle-free checkpoints with exact resume, MLflow tracking and a
registered pipeline at the end.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from accelerate import Accelerator
from diffusers import DDIMScheduler
from torch import nn

from dsat_core.data.dataset import TileDataset
from dsat_core.data.store import DatasetStore
from dsat_core.imaging.rgb import image_grid
from dsat_core.metadata import SatMetadata
from dsat_core.models import (
    SatUNet,
    TextEncoder,
    encode_latents,
    load_sd_components,
    load_text_encoder,
    load_vae,
    make_tiny_vae,
    scheduler_config,
    unet_config,
    vae_scale_factor,
)
from dsat_core.models.metadata_embedding import set_missing_metadata
from dsat_core.models.sd_single_file import load_sd_single_file, model_card
from dsat_core.pipelines import DiffusionSatPipeline
from dsat_core.pipelines.diffusionsat import DiffusionSatPipelineOutput, UncondMetadata, pipeline_path
from dsat_core.training.augment import random_dihedral
from dsat_core.training.conditioning import noise_batch
from dsat_core.training.config import TrainConfig
from dsat_core.training.latent_cache import (
    CachedLatentDataset,
    is_cache_complete,
    precompute_latents,
    vae_fingerprint,
)
from dsat_core.training.loop import (
    TrainingRun,
    TrainResult,
    frozen_dtype,
    make_optimizer,
    start_run,
    weights_sha256,
)
from dsat_core.training.losses import diffusion_loss, make_noise_scheduler
from dsat_core.training.sampler import balanced_weights, tile_groups

logger = logging.getLogger("dsat_core.training")


@dataclass
class Components:
    unet: SatUNet
    vae: nn.Module
    text_encoder: TextEncoder
    text_projection: nn.Module | None  # the trainable part of the text encoder, if any
    uncond_metadata: UncondMetadata = "keep"  # guidance mode the saved pipeline records (from `init_from`)
    model_card: str | None = None  # README.md of the saved pipeline (where the weights came from)


# ---------------------------------------------------------------------------- building blocks
def build_components(config: TrainConfig) -> Components:
    """UNet, VAE and text encoder from a DiffusionSat folder, an SD folder, or a named size (seeded init).

    The UNet's `missing_metadata` is set to `config.metadata_dropout_mode` (saved with it; None keeps the
    initial model's), so the trained model embeds a missing field at inference as it saw dropped fields in
    training. A model from ``init_from`` keeps its guidance mode (`uncond_metadata`) too.
    """
    uncond_metadata: UncondMetadata = "keep"
    card: str | None = None
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        if config.init_from:
            pipe = DiffusionSatPipeline.from_pretrained(str(pipeline_path(config.init_from)))
            unet, vae, text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
            uncond_metadata = pipe.config.get("uncond_metadata", "keep")
            card = init_model_card(config.init_from)
        elif config.pretrained_sd and Path(config.pretrained_sd).is_file():
            single = load_sd_single_file(config.pretrained_sd)
            unet, card = single.unet, model_card(single.source)
            vae = single.vae or (
                make_tiny_vae(seed=config.seed) if config.vae == "tiny" else load_vae(config.vae)
            )
            text_encoder = load_text_encoder(
                config.text_encoder, cross_attention_dim=unet.config.cross_attention_dim
            )
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
    if config.metadata_dropout_mode is not None:
        set_missing_metadata(unet, config.metadata_dropout_mode)
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
    return Components(unet, vae, text_encoder, projection, uncond_metadata, card)


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
        "catalog": store.attrs.get("catalog"),
        "split": {"split": config.split, "holdout_fraction": config.holdout_fraction},
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
    unet: SatUNet,
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
        uncond_metadata=components.uncond_metadata,
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
    return image_grid(cast(np.ndarray, cast(DiffusionSatPipelineOutput, out).images))


# ---------------------------------------------------------------------------- training
def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) training as configured; returns where things went and the final loss."""
    accelerator = start_run(config)
    device, world = accelerator.device, accelerator.num_processes

    parts = build_components(config)
    frozen = frozen_dtype(config, device)
    parts.vae.to(device)
    parts.text_encoder.to(device)
    if frozen != torch.float32:
        parts.vae.to(dtype=frozen)
        if parts.text_projection is None:
            parts.text_encoder.to(dtype=frozen)
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

    # optimisation (the text projection, when trainable, sits outside DDP)
    trainable = [p for p in parts.unet.parameters() if p.requires_grad]
    projection_params = list(parts.text_projection.parameters()) if parts.text_projection is not None else []
    optimizer, lr_scheduler = make_optimizer(trainable + projection_params, config)
    run = TrainingRun(
        config,
        accelerator,
        parts.unet,
        optimizer,
        lr_scheduler,
        trainable + projection_params,
        text_projection=parts.text_projection,
        manual_sync_params=projection_params,
        logger=logger,
    )
    run.resume()
    weights = balanced_weights(tile_groups(tiles, config.balance_by)) if config.balance_by else None
    batches = run.batches(dataset, weights=weights)

    # tracking (main process only)
    lineage = _lineage(config, tiles)
    run.track(
        lineage,
        {
            **config.flat_params(),
            "world_size": world,
            "trainable_text_projection": parts.text_projection is not None,
            "n_train_tiles": len(dataset),
        },
    )
    val_inputs = _validation_inputs(config, tiles) if config.validation_steps else None

    def save_pipeline(pipeline_dir: Path) -> str | None:
        _save_pipeline(run.base, run.ema, parts, pipeline_dir)
        return run.tracker.log_pipeline(pipeline_dir, config.registered_model_name, lineage=lineage)

    return run.fit(
        lambda batch, gen: _loss(
            batch, gen, run.model, parts, noise_scheduler, config, device, frozen, accelerator
        ),
        batches,
        rank_state=lambda: _trained_state(run.base, parts.text_projection),
        save_pipeline=save_pipeline,
        metrics_file="metrics.jsonl",
        sample_fn=(lambda unet: sample_grid(cast(SatUNet, unet), parts, *val_inputs, config))
        if val_inputs
        else None,
    )


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
        pixels = batch["pixel_values"]
        if config.random_flip_rotate:
            pixels = random_dihedral(pixels, gen)
        latents = encode_latents(parts.vae, pixels.to(device, frozen_dtype)).float()
    step = noise_batch(latents, batch, config, noise_scheduler, gen, device)
    metadata = batch["metadata"].to(device, torch.float32)  # fp32 always (×1000-scaled values)
    with accelerator.autocast():
        states = parts.text_encoder.encode(step.captions, device)
        pred = unet(
            step.noisy,
            step.timesteps,
            states,
            metadata=metadata,
            metadata_mask=step.metadata_mask,
            return_dict=False,
        )[0]
    return diffusion_loss(pred, step.target, step.timesteps, noise_scheduler, config.snr_gamma)


def init_model_card(init_from: str) -> str | None:
    """The model card of an ``init_from`` folder (e.g. a converted checkpoint's, or the shipped ``"default"``
    model's), kept by what it trains."""
    card = pipeline_path(init_from) / "README.md"
    return card.read_text() if card.is_file() else None


def write_model_card(parts: Components, pipeline_dir: Path) -> None:
    """README.md beside a saved pipeline when its weights came from a file with a card (sha256, licence)."""
    if parts.model_card:
        (Path(pipeline_dir) / "README.md").write_text(parts.model_card)


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
            uncond_metadata=parts.uncond_metadata,
        )
        pipe.save_pretrained(str(pipeline_dir), safe_serialization=True)
    write_model_card(parts, pipeline_dir)
    for module, dtype in dtypes.items():
        if dtype != torch.float32:
            module.to(dtype)


def main(argv: list[str] | None = None) -> int:
    config = TrainConfig.from_cli(argv)
    result = train(config)
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(asdict(result)))
    return 0


__all__ = [
    "Components",
    "TrainConfig",
    "TrainResult",
    "build_components",
    "main",
    "sample_grid",
    "train",
    "weights_sha256",
]

if __name__ == "__main__":
    sys.exit(main())
