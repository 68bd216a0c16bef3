"""Train a DiffusionSat 3D ControlNet (spec §2) for super-resolution, temporal prediction or inpainting.

    python -m dsat_core.training.train_controlnet --config cfg.json [--task sr --max_steps 1000 ...]
    torchrun --standalone --nproc_per_node 2 -m dsat_core.training.train_controlnet --config cfg.json

The base model (a saved `DiffusionSatPipeline` or `SatUNet` folder, an SD folder, or a fresh tiny one for
smoke runs) is FROZEN; only the `ControlNet3D` trains. The machinery is the DiffusionSat trainer's: the same
`TrainConfig` fields, v-prediction with min-SNR-γ, caption / metadata dropout (mask only; here also for each
conditioning frame's metadata; `metadata_dropout_mode` sets the ControlNet's `missing_metadata`, while a
loaded base keeps its own), band dropout (a new ControlNet takes the training store's band names as its
`conditioning_bands`; whole conditioning bands are dropped per sample with probability ``band_dropout``, so
that its learned per-band "missing" values are trained and it runs on stores with fewer bands), EMA,
pickle-free checkpoints with exact resume (`checkpoint-N/unet/` holds the ControlNet3D weights: the shared
checkpoint layout names the trained model's folder `unet/`), resumable
rank-sharded batches, MLflow (params incl. the task recipe, e.g. the SR degradation; loss; sample grids;
lineage) and, at the end, the whole `SatControlNetPipeline` saved with the EMA weights and its task card
(``task.json``: `dsat_core.data.tasks.write_task_card`, which evaluation reads back), logged as an MLflow
artifact and registered in the model registry.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from accelerate import Accelerator
from diffusers import DDIMScheduler
from pydantic import Field, model_validator
from torch import nn

from dsat_core.data.store import DatasetStore
from dsat_core.data.tasks import (
    ControlNetTask,
    DataSpec,
    Direction,
    MaskKind,
    TaskDataset,
    TaskName,
    batch_metadata,
    collate_task_batch,
    task_from_options,
    write_task_card,
)
from dsat_core.imaging.rgb import image_grid
from dsat_core.metadata.bands import canonical_band
from dsat_core.models import (
    SatUNet,
    encode_latents,
    load_text_encoder,
    load_vae,
    make_tiny_vae,
    scheduler_config,
)
from dsat_core.models.controlnet3d import ControlNet3D, controlled_unet_forward, freeze
from dsat_core.models.metadata_embedding import set_missing_metadata
from dsat_core.pipelines import DiffusionSatPipeline
from dsat_core.pipelines.controlnet import SatControlNetPipeline
from dsat_core.pipelines.diffusionsat import DiffusionSatPipelineOutput, pipeline_path
from dsat_core.training.conditioning import drop_metadata, noise_batch
from dsat_core.training.config import TrainConfig
from dsat_core.training.loop import TrainingRun, TrainResult, frozen_dtype, make_optimizer, start_run
from dsat_core.training.losses import diffusion_loss, make_noise_scheduler
from dsat_core.training.mlflow_logging import MlflowTracker
from dsat_core.training.train_diffusionsat import (
    Components,
    build_components,
    init_model_card,
    write_model_card,
)

logger = logging.getLogger("dsat_core.training.controlnet")
PIPELINE_ARTIFACT = "controlnet_pipeline"


class TrainControlNetConfig(TrainConfig):
    """`TrainConfig` plus the task, the base model and the ControlNet3D's shape.

    The task options of every task are flat fields here; `control_task` keeps those of ``task``.
    ``product`` is the target product; ``base_model`` a saved DiffusionSatPipeline folder (VAE and text
    encoder come with it) or a SatUNet folder (VAE / text encoder from ``vae`` / ``text_encoder``); without it
    the base comes from ``pretrained_diffusionsat`` / ``pretrained_sd`` or is a fresh ``model_size`` UNet
    (smoke runs).
    """

    task: TaskName
    base_model: str | None = Field(
        default=None,
        description='DiffusionSatPipeline or SatUNet folder (frozen); "default": the shipped base model',
    )
    init_controlnet: str | None = Field(default=None, description="ControlNet3D folder to start from")

    # task data
    cond_product: str = Field(default="multispectral", description="sr: the low-resolution input product")
    degradation: dict[str, Any] = Field(
        default_factory=lambda: {"factor": 4, "blur_sigma": 1.0, "bands": None, "upsample": "bicubic"},
        description="sr: `split_sr_recipe` keys (DegradationRecipe fields or input_recipe, cond_resolution)",
    )
    sequence_length: int = Field(default=3, ge=1, description="temporal: frames per sequence")
    direction: Direction = "both"
    mask_kind: MaskKind = "mixed"
    item_ids: list[str] | None = Field(default=None, description="keep only targets from these items")
    exclude_item_ids: list[str] | None = Field(default=None, description="hold these items out")

    # ControlNet3D
    conditioning_embedding_channels: tuple[int, ...] = (16, 32, 96, 256)
    temporal_layers: list[int] | None = Field(
        default=None, description="residual positions; None = reference"
    )
    cond_metadata_dropout: float = Field(default=0.1, description="per-field dropout of frame metadata")
    band_dropout: float = Field(
        default=0.15,
        description="per-sample, per-band probability that a whole conditioning band is dropped (marked "
        "missing: the ControlNet's learned missing-band value; at least one band is kept); needs a "
        "ControlNet with band names (a new one takes the store's)",
    )
    controlnet_conditioning_scale: float = 1.0

    validation_guidance_scale: float = 1.0
    mlflow_experiment: str = "diffusionsat-controlnet"

    @model_validator(mode="after")
    def _check_controlnet(self) -> TrainControlNetConfig:
        if self.use_cached_latents:
            raise ValueError(
                "use_cached_latents is not supported for ControlNet training (targets are paired)"
            )
        if self.balance_by:
            raise ValueError("balance_by is not supported for ControlNet training yet (its tasks pair tiles)")
        if self.init_from and (self.base_model or self.init_controlnet):
            raise ValueError("give init_from (a pipeline folder) or base_model / init_controlnet, not both")
        if not 0.0 <= self.cond_metadata_dropout <= 1.0:
            raise ValueError(f"cond_metadata_dropout must be in [0, 1], got {self.cond_metadata_dropout}")
        if not 0.0 <= self.band_dropout < 1.0:
            raise ValueError(f"band_dropout must be in [0, 1), got {self.band_dropout}")
        return self

    def control_task(self) -> ControlNetTask:
        """The `ControlNetTask` trained: ``task`` with its options from this config."""
        return task_from_options(self.task, self.model_dump())

    def data_spec(self) -> DataSpec:
        """The training tiles: the config's filters and split (conditioning tiles from the same split)."""
        filters = {
            k: v
            for k, v in (
                ("bbox", self.bbox),
                ("start", self.start),
                ("end", self.end),
                ("platform", self.platform),
            )
            if v is not None
        }
        return DataSpec(
            store_uri=self.store_uri,
            resolution=self.resolution,
            split=self.split,
            holdout_fraction=self.holdout_fraction,
            seed=self.seed,
            item_ids=self.item_ids,
            exclude_item_ids=self.exclude_item_ids,
            storage_options=self.storage_options,
            filters=filters,
        )


# ---------------------------------------------------------------------------- building blocks
def load_init_pipeline(path: str) -> DiffusionSatPipeline:
    """``init_from``: a SatControlNetPipeline folder (base + ControlNet) or a DiffusionSatPipeline one
    (``"default"``: the shipped base model)."""
    path = str(pipeline_path(path))
    index = Path(path) / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"init_from {path}: not a pipeline folder (no model_index.json)")
    if "controlnet" in json.loads(index.read_text()):
        return SatControlNetPipeline.from_pretrained(path)
    return DiffusionSatPipeline.from_pretrained(path)


def init_controlnet_dir(config: TrainControlNetConfig) -> str | None:
    """The ControlNet to start from: ``init_controlnet``, or the one in the ``init_from`` pipeline."""
    if config.init_controlnet:
        return config.init_controlnet
    folder = pipeline_path(config.init_from) / "controlnet" if config.init_from else None
    return str(folder) if folder is not None and (folder / "config.json").is_file() else None


def build_base(config: TrainControlNetConfig) -> Components:
    """The frozen base: UNet, VAE, text encoder (all requires_grad False, eval mode)."""
    if config.base_model:
        path = pipeline_path(config.base_model)
        if (path / "model_index.json").is_file():
            pipe = DiffusionSatPipeline.from_pretrained(str(path))
            parts = Components(pipe.unet, pipe.vae, pipe.text_encoder, None)
        elif (path / "config.json").is_file():
            unet = SatUNet.from_pretrained(str(path))
            with torch.random.fork_rng():
                torch.manual_seed(config.seed)
                vae = make_tiny_vae(seed=config.seed) if config.vae == "tiny" else load_vae(config.vae)
                text_encoder = load_text_encoder(
                    config.text_encoder, cross_attention_dim=unet.config.cross_attention_dim
                )
            parts = Components(unet, vae, text_encoder, None)
        else:
            raise FileNotFoundError(
                f"base_model {path}: neither a DiffusionSatPipeline (model_index.json) "
                "nor a SatUNet folder (config.json)"
            )
    elif config.init_from:
        pipe = load_init_pipeline(config.init_from)
        uncond = pipe.config.get("uncond_metadata", "keep")
        card = init_model_card(config.init_from)
        parts = Components(pipe.unet, pipe.vae, pipe.text_encoder, None, uncond, card)
    else:
        parts = build_components(config)
        parts.text_projection = None
    if not isinstance(parts.unet, SatUNet):
        raise TypeError(f"base model UNet must be a SatUNet, got {type(parts.unet).__name__}")
    for module in (parts.unet, parts.vae, parts.text_encoder):
        freeze(module)
    return parts


def conditioning_band_names(bands: Sequence[str]) -> list[str] | None:
    """The band names a new ControlNet takes (``bands``: the training data's, e.g. a store product's), or
    None (with a warning) when two of them are the same band (`canonical_band`): channels by position then.
    """
    canonical = [canonical_band(b) for b in bands]
    if len(set(canonical)) != len(canonical):
        warnings.warn(
            f"conditioning bands {list(bands)} name the same band twice ({canonical}); the ControlNet takes "
            "its channels by position (no band names, no band dropout)",
            stacklevel=2,
        )
        return None
    return list(bands)


def build_controlnet(
    config: TrainControlNetConfig,
    unet: SatUNet,
    vae: nn.Module,
    channels: int,
    bands: Sequence[str] | None = None,
) -> ControlNet3D:
    """A new ControlNet3D from the base UNet (seeded), or the one in ``init_controlnet``.

    A new one takes ``bands`` (the training data's conditioning band names, `conditioning_band_names`) as its
    `conditioning_bands`. Its `missing_metadata` is set to ``config.metadata_dropout_mode`` (None: kept from
    where it comes from).
    """
    from dsat_core.models import vae_scale_factor

    factor = vae_scale_factor(vae)
    init_dir = init_controlnet_dir(config)
    if init_dir:
        controlnet = ControlNet3D.from_pretrained(init_dir)
        if (
            controlnet.config.conditioning_channels != channels
            or controlnet.config.vae_scale_factor != factor
        ):
            raise ValueError(
                f"init ControlNet {init_dir} takes {controlnet.config.conditioning_channels}"
                f" channels at VAE factor {controlnet.config.vae_scale_factor}; the {config.task} data "
                f"gives {channels} at {factor}"
            )
    else:
        with torch.random.fork_rng():
            torch.manual_seed(config.seed + 1)
            controlnet = ControlNet3D.from_unet(
                unet,
                channels,
                config.conditioning_embedding_channels,
                config.temporal_layers,
                vae_scale_factor=factor,
                conditioning_bands=conditioning_band_names(bands) if bands is not None else None,
            )
    if config.metadata_dropout_mode is not None:
        set_missing_metadata(controlnet, config.metadata_dropout_mode)
    controlnet.train()
    if config.gradient_checkpointing:
        controlnet.enable_gradient_checkpointing()
    return controlnet


def _task_lineage(config: TrainControlNetConfig, dataset: TaskDataset) -> dict[str, Any]:
    store = DatasetStore.open(config.store_uri, storage_options=config.storage_options, read_only=True)
    items = set()
    for i in range(len(dataset)):  # item ids only: cheap columns, no pixels
        items.update(dataset.sample_item_ids(i))
    return {
        "store_uri": config.store_uri,
        "product": config.product,
        "content_hash": store.content_hash,
        "store_version": store.version,
        "task": config.task,
        "recipe": dataset.recipe,
        "filters": {
            "bbox": config.bbox,
            "start": config.start,
            "end": config.end,
            "platform": config.platform,
            "item_ids": config.item_ids,
            "exclude_item_ids": config.exclude_item_ids,
        },
        "n_tiles": len(dataset),
        "item_ids": sorted(items),
        "ingested_items": sorted(store.ingested_items()),
    }


def _flat_recipe(recipe: dict[str, Any], prefix: str = "task.") -> dict[str, str]:
    out = {}
    for key, value in recipe.items():
        if isinstance(value, dict):
            out.update(_flat_recipe(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, str) else json.dumps(value)
    return out


# ---------------------------------------------------------------------------- validation samples
@torch.no_grad()
def sample_grid(
    controlnet: ControlNet3D,
    parts: Components,
    task: ControlNetTask,
    dataset: TaskDataset,
    picks: list[int],
    config: TrainControlNetConfig,
):
    """Rows of [conditioning | sample | target] for the dataset samples ``picks`` (DDIM)."""
    pipe = SatControlNetPipeline(
        unet=parts.unet,
        controlnet=controlnet,
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        scheduler=DDIMScheduler.from_config(scheduler_config()),
        uncond_metadata=parts.uncond_metadata,
    )
    pipe.set_progress_bar_config(disable=True)
    samples = [dataset[i] for i in picks]
    batch = collate_task_batch(samples)
    result = pipe(
        **task.conditioning(batch),
        metadata=batch_metadata(batch),
        prompt=list(batch["caption"]),
        num_inference_steps=config.validation_inference_steps,
        guidance_scale=config.validation_guidance_scale,
        generator=torch.Generator().manual_seed(config.seed),
        controlnet_conditioning_scale=config.controlnet_conditioning_scale,
        output_type="pt",
    )
    out = torch.as_tensor(cast(DiffusionSatPipelineOutput, result).images)
    rows = []
    for k, sample in enumerate(samples):
        preview = task.cond_preview(dataset, sample)
        rows += [(preview + 1) / 2, out[k].cpu(), (sample["pixel_values"] + 1) / 2]
    images = torch.stack(rows).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return image_grid(images, columns=3)


def _save_pipeline(base, ema, parts: Components, pipeline_dir: Path) -> None:
    """save_pretrained of the SatControlNetPipeline with the EMA ControlNet weights (all safetensors)."""
    with ema.swapped_in(base) if ema is not None else nullcontext():
        pipe = SatControlNetPipeline(
            unet=parts.unet,
            controlnet=base,
            vae=parts.vae,
            text_encoder=parts.text_encoder,
            scheduler=DDIMScheduler.from_config(scheduler_config()),
            uncond_metadata=parts.uncond_metadata,
        )
        pipe.save_pretrained(str(pipeline_dir), safe_serialization=True)
    write_model_card(parts, pipeline_dir)


def _register_pipeline(
    tracker: Any, pipeline_dir: Path, name: str | None, lineage: dict[str, Any]
) -> str | None:
    """Log the pipeline folder as run artifacts and register it (a model version pointing at them)."""
    if not isinstance(tracker, MlflowTracker):
        return None
    import mlflow

    mlflow.log_artifacts(str(pipeline_dir), PIPELINE_ARTIFACT)
    tracker.set_tags({"dsat.model_uri": f"runs:/{tracker.run_id}/{PIPELINE_ARTIFACT}"})
    if not name:
        return None
    from dsat_core.training.mlflow_logging import CANDIDATE_ALIAS, lineage_tags

    client = mlflow.MlflowClient()
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(
            name, description="DiffusionSat ControlNet3D pipeline (SatControlNetPipeline)"
        )
    source = mlflow.get_run(tracker.run_id).info.artifact_uri.rstrip("/") + f"/{PIPELINE_ARTIFACT}"
    version = client.create_model_version(name, source, run_id=tracker.run_id, tags=lineage_tags(lineage))
    client.set_registered_model_alias(name, CANDIDATE_ALIAS, str(version.version))
    return str(version.version)


# ---------------------------------------------------------------------------- training
def train(config: TrainControlNetConfig) -> TrainResult:
    """Run (or resume) ControlNet training as configured."""
    accelerator = start_run(config)
    device, world = accelerator.device, accelerator.num_processes

    task = config.control_task()
    dataset = task.dataset(config.data_spec())
    parts = build_base(config)
    frozen = frozen_dtype(config, device)
    for module in (parts.vae, parts.text_encoder, parts.unet):
        module.to(device)
        if frozen != torch.float32:
            module.to(dtype=frozen)
    controlnet = build_controlnet(
        config, parts.unet, parts.vae, dataset.conditioning_channels, dataset.cond_bands
    )
    # band dropout trains the learned missing-band values: only a ControlNet with band names has them (it
    # always gets a band mask, all present at band_dropout 0, so that every parameter is in the graph for DDP)
    band_dropout = config.band_dropout if controlnet.missing_band_values is not None else None
    noise_scheduler = make_noise_scheduler()

    trainable = [p for p in controlnet.parameters() if p.requires_grad]
    optimizer, lr_scheduler = make_optimizer(trainable, config)
    run = TrainingRun(config, accelerator, controlnet, optimizer, lr_scheduler, trainable, logger=logger)

    def check_task(state: dict[str, Any], checkpoint: Path) -> None:
        if state.get("task", config.task) != config.task:
            raise ValueError(
                f"checkpoint {checkpoint} is a {state['task']!r} ControlNet, config asks for {config.task!r}"
            )

    run.resume(check_task)
    batches = run.batches(dataset, collate_fn=collate_task_batch)

    lineage = _task_lineage(config, dataset)
    run.track(
        lineage,
        {
            **config.flat_params(),
            **_flat_recipe(dataset.recipe),
            "world_size": world,
            "n_train_samples": len(dataset),
            "conditioning_channels": dataset.conditioning_channels,
            "conditioning_bands": json.dumps(controlnet.config.get("conditioning_bands")),
            "band_dropout_applied": band_dropout or 0.0,
            "controlnet_parameters": sum(p.numel() for p in trainable),
        },
    )
    picks = None
    if config.validation_steps:
        n = min(config.num_validation_samples, len(dataset))
        picks = np.linspace(0, len(dataset) - 1, n).round().astype(int).tolist()

    def save_pipeline(pipeline_dir: Path) -> str | None:
        _save_pipeline(run.base, run.ema, parts, pipeline_dir)
        write_task_card(task, pipeline_dir)
        return _register_pipeline(run.tracker, pipeline_dir, config.registered_model_name, lineage)

    return run.fit(
        lambda batch, gen: _loss(
            batch, gen, run.model, parts, noise_scheduler, config, device, frozen, accelerator, band_dropout
        ),
        batches,
        rank_state=lambda: run.base.state_dict(),
        save_pipeline=save_pipeline,
        extra_state={"task": config.task, "recipe": dataset.recipe, "model": "ControlNet3D"},
        after_optimizer_step=lambda: run.base.clamp_temporal_gates_(),
        extra_metrics=lambda: {f"temporal_gate_{k}": v for k, v in run.base.temporal_gate_values().items()},
        sample_fn=(lambda model: sample_grid(cast(ControlNet3D, model), parts, task, dataset, picks, config))
        if picks
        else None,
    )


def _loss(
    batch: dict[str, Any],
    gen: torch.Generator,
    model: nn.Module,
    parts: Components,
    noise_scheduler: Any,
    config: TrainControlNetConfig,
    device: torch.device,
    frozen_dtype: torch.dtype,
    accelerator: Accelerator,
    band_dropout: float | None = None,
) -> torch.Tensor:
    """Min-SNR weighted v-prediction loss of the controlled UNet on one micro-batch (randomness: `gen`).

    ``band_dropout`` (a ControlNet with band names; None without): whole conditioning bands dropped per sample
    with that probability (`drop_bands`), which the ControlNet fills with its learned missing-band values.
    """
    latents = encode_latents(parts.vae, batch["pixel_values"].to(device, frozen_dtype)).float()
    step = noise_batch(latents, batch, config, noise_scheduler, gen, device)
    cond_mask = drop_metadata(batch["cond_metadata_mask"], config.cond_metadata_dropout, gen).to(device)
    band_mask = None
    if band_dropout is not None:
        band_mask = drop_bands(batch["cond"].shape[0], batch["cond"].shape[1], band_dropout, gen).to(device)
    with accelerator.autocast():
        states = parts.text_encoder.encode(step.captions, device)
        pred = controlled_unet_forward(
            parts.unet,
            model,
            step.noisy.to(frozen_dtype),
            step.timesteps,
            states.to(frozen_dtype),
            batch["metadata"].to(device, torch.float32),
            step.metadata_mask,
            batch["cond"].to(device),
            batch["cond_metadata"].to(device, torch.float32),
            cond_mask,
            cond_band_mask=band_mask,
        )
    return diffusion_loss(pred, step.target, step.timesteps, noise_scheduler, config.snr_gamma)


def drop_bands(batch: int, channels: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """bool (batch, channels) band-present mask: each band of each sample dropped (False) with probability
    ``p``; a sample whose every band was drawn dropped keeps one of them (drawn from the same generator)."""
    keep = torch.rand(batch, channels, generator=generator) >= p
    rescue = torch.randint(0, channels, (batch,), generator=generator)
    none_left = ~keep.any(dim=1)
    keep[none_left, rescue[none_left]] = True
    return keep


def main(argv: list[str] | None = None) -> int:
    config = TrainControlNetConfig.from_cli(argv)
    result = train(config)
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(asdict(result)))
    return 0


__all__ = [
    "TrainControlNetConfig",
    "build_base",
    "build_controlnet",
    "conditioning_band_names",
    "drop_bands",
    "sample_grid",
    "train",
]

if __name__ == "__main__":
    sys.exit(main())
