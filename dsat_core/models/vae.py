"""VAE helpers: load SD's `AutoencoderKL` or the shipped offline default, a tiny VAE for tests, and latent
encode/decode.

`DEFAULT_VAE_DIR` is the offline default VAE shipped with the package (×2 downsampling, 4 latent channels,
trained with `dsat_core.training.train_vae` on the train split of the shipped sample scenes; its model card is
`DEFAULT_VAE_DIR / "README.md"`). `load_vae()` without a path loads it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL

DEFAULT_VAE_DIR = Path(__file__).with_name("default_vae")


def load_vae(path: str | os.PathLike | None = None, **kwargs: Any) -> AutoencoderKL:
    """`AutoencoderKL` from a local folder: the VAE folder itself or an SD folder holding `vae/`.

    Without `path` (or with ``"default"``): the shipped offline default VAE (`DEFAULT_VAE_DIR`).
    """
    folder = DEFAULT_VAE_DIR if path is None or str(path) == "default" else Path(path)
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"VAE folder {path}: no config.json (nor vae/config.json)")
    return AutoencoderKL.from_pretrained(folder, local_files_only=True, **kwargs)


def tiny_vae_config(downsample: int = 2) -> dict[str, Any]:
    """A 4-latent-channel `AutoencoderKL` config with 32/64 channels; `downsample` is 2 or 4."""
    if downsample not in (2, 4):
        raise ValueError(f"tiny VAE downsample must be 2 or 4, got {downsample}")
    channels = (32, 64) if downsample == 2 else (32, 32, 64)
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * len(channels),
        "up_block_types": ("UpDecoderBlock2D",) * len(channels),
        "block_out_channels": channels,
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 64,
        "scaling_factor": 0.18215,
    }


def offline_vae_config(
    downsample: int = 2, block_out_channels: tuple[int, ...] = (16, 32), norm_num_groups: int = 8
) -> dict[str, Any]:
    """The offline default VAE's config: 4 latent channels, ``downsample`` = 2 ** (len(channels) - 1) per
    side, one ResNet layer per block and no mid-block attention (cheap enough to train on CPU)."""
    if 2 ** (len(block_out_channels) - 1) != downsample:
        raise ValueError(
            f"{len(block_out_channels)} blocks give ×{2 ** (len(block_out_channels) - 1)}, not ×{downsample}"
        )
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * len(block_out_channels),
        "up_block_types": ("UpDecoderBlock2D",) * len(block_out_channels),
        "block_out_channels": tuple(block_out_channels),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": norm_num_groups,
        "sample_size": 64,
        "scaling_factor": 1.0,
        "mid_block_add_attention": False,
    }


def make_offline_vae(
    downsample: int = 2,
    block_out_channels: tuple[int, ...] = (16, 32),
    norm_num_groups: int = 8,
    seed: int | None = 0,
) -> AutoencoderKL:
    """A randomly initialised VAE with `offline_vae_config` (deterministic for a given `seed`)."""
    config = offline_vae_config(downsample, block_out_channels, norm_num_groups)
    if seed is None:
        return AutoencoderKL(**config)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoencoderKL(**config)


def make_tiny_vae(downsample: int = 2, seed: int | None = 0) -> AutoencoderKL:
    """A randomly initialised tiny VAE (deterministic for a given `seed`)."""
    if seed is not None:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return AutoencoderKL(**tiny_vae_config(downsample))
    return AutoencoderKL(**tiny_vae_config(downsample))


def vae_scale_factor(vae: AutoencoderKL) -> int:
    """Pixels per latent along one side."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _scaling(vae: AutoencoderKL) -> tuple[float, float]:
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return float(vae.config.scaling_factor), float(shift)


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, pixel_values: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (B, 3, H, W) → scaled latents (posterior mean × scaling factor; deterministic)."""
    if pixel_values.ndim != 4 or pixel_values.shape[1] != vae.config.in_channels:
        raise ValueError(
            f"pixel_values must be (B, {vae.config.in_channels}, H, W), got {tuple(pixel_values.shape)}"
        )
    param = next(vae.parameters())
    posterior = vae.encode(pixel_values.to(device=param.device, dtype=param.dtype)).latent_dist
    scale, shift = _scaling(vae)
    return (posterior.mean - shift) * scale


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents → images in [-1, 1] (not clamped)."""
    param = next(vae.parameters())
    scale, shift = _scaling(vae)
    return vae.decode(latents.to(device=param.device, dtype=param.dtype) / scale + shift).sample
