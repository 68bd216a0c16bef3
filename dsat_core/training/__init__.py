"""DiffusionSat training: config, objective, EMA, checkpoints, latent cache, MLflow and launch helpers.

Imports are lazy so that `dsat_core.training.launch` (used by orchestration) stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TrainConfig": "config",
    "train": "train_diffusionsat",
    "TrainResult": "train_diffusionsat",
    "build_components": "train_diffusionsat",
    "TrainControlNetConfig": "train_controlnet",
    "train_controlnet": "train_controlnet:train",
    "VAETrainConfig": "train_vae",
    "train_vae": "train_vae",
    "EMA": "ema",
    "compute_snr": "losses",
    "min_snr_weight": "losses",
    "diffusion_loss": "losses",
    "make_noise_scheduler": "losses",
    "precompute_latents": "latent_cache",
    "vae_fingerprint": "latent_cache",
    "LatentCacheResult": "latent_cache",
    "save_checkpoint": "checkpointing",
    "load_checkpoint": "checkpointing",
    "list_checkpoints": "checkpointing",
    "resolve_checkpoint": "checkpointing",
    "rotate_checkpoints": "checkpointing",
    "build_launch_command": "launch",
    "run_training_subprocess": "launch",
    "drop_caption": "conditioning",
    "drop_metadata": "conditioning",
    "ResumableBatchSampler": "sampler",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dsat_core.training' has no attribute {name!r}")
    module, _, attr = _EXPORTS[name].partition(":")  # "module" or "module:attribute"
    return getattr(importlib.import_module(f"dsat_core.training.{module}"), attr or name)
