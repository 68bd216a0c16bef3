"""Named model sizes: UNet, VAE and noise-scheduler configs (spec §1)."""

from __future__ import annotations

from typing import Any, Literal

UNetSize = Literal["tiny", "small", "compact", "sd21-base"]

_UNET_SIZES: dict[str, dict[str, Any]] = {
    # CPU unit tests: 8x8 to 32x32 latents, runs a forward pass in milliseconds.
    "tiny": {
        "block_out_channels": (32, 64),
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "layers_per_block": 1,
        "attention_head_dim": 8,
        "cross_attention_dim": 32,
        "norm_num_groups": 32,
    },
    # CPU smoke training / benchmarks: still small, but three levels and two attention levels.
    "small": {
        "block_out_channels": (64, 128, 128),
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "layers_per_block": 1,
        "attention_head_dim": 8,
        "cross_attention_dim": 64,
        "norm_num_groups": 32,
        "use_linear_projection": True,
    },
    # The shipped CPU base model: 64 px tiles (32 x 32 latents of the x2 VAE), three levels, attention only on
    # the 16 x 16 and 8 x 8 ones (attention over 32 x 32 latents costs ~4x the rest of a CPU training step).
    "compact": {
        "block_out_channels": (32, 64, 128),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "layers_per_block": 1,
        "attention_head_dim": 8,
        "cross_attention_dim": 64,
        "norm_num_groups": 32,
        "use_linear_projection": True,
    },
    # Stable Diffusion 2.1-base.
    "sd21-base": {
        "block_out_channels": (320, 640, 1280, 1280),
        "down_block_types": (
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "layers_per_block": 2,
        "attention_head_dim": (5, 10, 20, 20),
        "cross_attention_dim": 1024,
        "norm_num_groups": 32,
        "use_linear_projection": True,
    },
}

_DEFAULT_SAMPLE_SIZE = {"tiny": 16, "small": 32, "compact": 32, "sd21-base": 64}


def unet_config(size: UNetSize = "tiny", sample_size: int | None = None, **overrides: Any) -> dict[str, Any]:
    """`UNet2DConditionModel` / `SatUNet` keyword arguments for a named size.

    `sample_size` is the latent side (SD 2.1-base: 64 latents = 512 px). `overrides` replace any key.
    """
    if size not in _UNET_SIZES:
        raise ValueError(f"unknown UNet size {size!r}; choose one of {sorted(_UNET_SIZES)}")
    config = {
        "sample_size": sample_size or _DEFAULT_SAMPLE_SIZE[size],
        "in_channels": 4,
        "out_channels": 4,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "act_fn": "silu",
        **_UNET_SIZES[size],
    }
    config.update(overrides)
    return config


def scheduler_config(prediction_type: str = "v_prediction") -> dict[str, Any]:
    """DDPM/DDIM noise schedule of DiffusionSat: 1000 steps, scaled_linear 0.00085 → 0.012, v-prediction."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": prediction_type,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "timestep_spacing": "leading",
    }
