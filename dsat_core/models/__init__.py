"""DiffusionSat models: metadata embedding, SatUNet, ControlNet3D, text encoders, VAE helpers, SD folder
loading.

Names are imported on first use, like every `dsat_core` package namespace (`dsat_core._lazy`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dsat_core._lazy import lazy_exports

if TYPE_CHECKING:
    from dsat_core.models.configs import scheduler_config, unet_config
    from dsat_core.models.controlnet3d import ControlNet3D, controlled_unet_forward
    from dsat_core.models.metadata_embedding import MetadataEmbedding
    from dsat_core.models.sat_unet import SatUNet
    from dsat_core.models.sd_loading import check_sd_folder, load_sd_components
    from dsat_core.models.text_encoders import (
        ClipTextEncoder,
        HashTextEncoder,
        MiniLMTextEncoder,
        TextEncoder,
        load_text_encoder,
    )
    from dsat_core.models.vae import (
        decode_latents,
        encode_latents,
        load_vae,
        make_tiny_vae,
        tiny_vae_config,
        vae_scale_factor,
    )

_MODULE_OF = {
    "ClipTextEncoder": "text_encoders",
    "ControlNet3D": "controlnet3d",
    "HashTextEncoder": "text_encoders",
    "MetadataEmbedding": "metadata_embedding",
    "MiniLMTextEncoder": "text_encoders",
    "SatUNet": "sat_unet",
    "TextEncoder": "text_encoders",
    "check_sd_folder": "sd_loading",
    "controlled_unet_forward": "controlnet3d",
    "decode_latents": "vae",
    "encode_latents": "vae",
    "load_sd_components": "sd_loading",
    "load_text_encoder": "text_encoders",
    "load_vae": "vae",
    "make_tiny_vae": "vae",
    "scheduler_config": "configs",
    "tiny_vae_config": "vae",
    "unet_config": "configs",
    "vae_scale_factor": "vae",
}

__all__ = [
    "ClipTextEncoder",
    "ControlNet3D",
    "HashTextEncoder",
    "MetadataEmbedding",
    "MiniLMTextEncoder",
    "SatUNet",
    "TextEncoder",
    "check_sd_folder",
    "controlled_unet_forward",
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

__getattr__, __dir__ = lazy_exports(__name__, _MODULE_OF, globals())
