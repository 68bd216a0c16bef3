"""DiffusionSat models: metadata embedding, SatUNet, text encoders, VAE helpers, SD folder loading."""

from .configs import scheduler_config, unet_config
from .metadata_embedding import MetadataEmbedding
from .sat_unet import SatUNet
from .sd_loading import check_sd_folder, load_sd_components
from .text_encoders import (
    ClipTextEncoder,
    HashTextEncoder,
    MiniLMTextEncoder,
    TextEncoder,
    load_text_encoder,
)
from .vae import decode_latents, encode_latents, load_vae, make_tiny_vae, tiny_vae_config, vae_scale_factor

__all__ = [
    "ClipTextEncoder",
    "HashTextEncoder",
    "MetadataEmbedding",
    "MiniLMTextEncoder",
    "SatUNet",
    "TextEncoder",
    "check_sd_folder",
    "decode_latents",
    "encode_latents",
    "load_sd_components",
    "load_text_encoder",
    "load_vae",
    "make_tiny_vae",
    "scheduler_config",
    "tiny_vae_config",
    "unet_config",
    "vae_scale_factor",
]
from .controlnet3d import ControlNet3D, controlled_unet_forward  # noqa: E402

__all__ += ["ControlNet3D", "controlled_unet_forward"]
