"""DiffusionSat training: config, objective, EMA, checkpoints, latent cache, MLflow and launch helpers.

Names are imported on first use, like every `dsat_core` package namespace (`dsat_core._lazy`), so that
`dsat_core.training.launch` (used by orchestration) stays light. The training scripts are the submodules
`train_diffusionsat`, `train_controlnet` and `train_vae` (each with its `train` / `train_vae` function).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dsat_core._lazy import lazy_exports

if TYPE_CHECKING:
    from dsat_core.training.augment import random_dihedral
    from dsat_core.training.checkpointing import (
        list_checkpoints,
        load_checkpoint,
        resolve_checkpoint,
        rotate_checkpoints,
        save_checkpoint,
    )
    from dsat_core.training.conditioning import drop_caption, drop_metadata
    from dsat_core.training.config import TrainConfig
    from dsat_core.training.ema import EMA
    from dsat_core.training.latent_cache import LatentCacheResult, precompute_latents, vae_fingerprint
    from dsat_core.training.launch import build_launch_command, run_training_subprocess
    from dsat_core.training.losses import compute_snr, diffusion_loss, make_noise_scheduler, min_snr_weight
    from dsat_core.training.sampler import ResumableBatchSampler
    from dsat_core.training.train_controlnet import TrainControlNetConfig
    from dsat_core.training.train_diffusionsat import TrainResult, build_components, train
    from dsat_core.training.train_vae import VAETrainConfig

_MODULE_OF = {
    "EMA": "ema",
    "LatentCacheResult": "latent_cache",
    "ResumableBatchSampler": "sampler",
    "TrainConfig": "config",
    "TrainControlNetConfig": "train_controlnet",
    "TrainResult": "train_diffusionsat",
    "VAETrainConfig": "train_vae",
    "build_components": "train_diffusionsat",
    "build_launch_command": "launch",
    "compute_snr": "losses",
    "diffusion_loss": "losses",
    "drop_caption": "conditioning",
    "drop_metadata": "conditioning",
    "list_checkpoints": "checkpointing",
    "load_checkpoint": "checkpointing",
    "make_noise_scheduler": "losses",
    "min_snr_weight": "losses",
    "precompute_latents": "latent_cache",
    "random_dihedral": "augment",
    "resolve_checkpoint": "checkpointing",
    "rotate_checkpoints": "checkpointing",
    "run_training_subprocess": "launch",
    "save_checkpoint": "checkpointing",
    "train": "train_diffusionsat",
    "vae_fingerprint": "latent_cache",
}

__all__ = [
    "EMA",
    "LatentCacheResult",
    "ResumableBatchSampler",
    "TrainConfig",
    "TrainControlNetConfig",
    "TrainResult",
    "VAETrainConfig",
    "build_components",
    "build_launch_command",
    "compute_snr",
    "diffusion_loss",
    "drop_caption",
    "drop_metadata",
    "list_checkpoints",
    "load_checkpoint",
    "make_noise_scheduler",
    "min_snr_weight",
    "precompute_latents",
    "random_dihedral",
    "resolve_checkpoint",
    "rotate_checkpoints",
    "run_training_subprocess",
    "save_checkpoint",
    "train",
    "vae_fingerprint",
]

__getattr__, __dir__ = lazy_exports(__name__, _MODULE_OF, globals())
