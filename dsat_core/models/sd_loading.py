"""Load a local Stable Diffusion folder (diffusers layout) into DiffusionSat components."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from diffusers import DDIMScheduler, UNet2DConditionModel

from .configs import scheduler_config
from .sat_unet import SatUNet
from .text_encoders import ClipTextEncoder
from .vae import load_vae

SD_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def check_sd_folder(path: str | os.PathLike) -> Path:
    """`path` as a Path; a clear error unless it holds unet/, vae/, text_encoder/, tokenizer/, scheduler/."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"SD folder {root} does not exist")
    missing = [sub for sub in SD_SUBFOLDERS if not (root / sub).is_dir()]
    if missing:
        raise FileNotFoundError(f"SD folder {root} lacks subfolder(s) {missing}")
    return root


def load_sd_components(
    path: str | os.PathLike, prediction_type: str | None = "v_prediction", **kwargs: Any
) -> dict[str, Any]:
    """`unet` (a `SatUNet`, metadata path zero-initialised), `vae`, `text_encoder` (CLIP), `scheduler`.

    The scheduler keeps the folder's noise schedule; `prediction_type` (default v-prediction, spec §1)
    overrides the folder's (SD 2.1-base itself is epsilon), None keeps it. `kwargs` go to `from_pretrained`.
    """
    root = check_sd_folder(path)
    sd_unet = UNet2DConditionModel.from_pretrained(root / "unet", local_files_only=True, **kwargs)
    unet = SatUNet.from_sd_unet(sd_unet)
    vae = load_vae(root / "vae", **kwargs)
    text_encoder = ClipTextEncoder.from_pretrained(root, **kwargs)
    config_file = root / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else scheduler_config()
    if prediction_type is not None:
        config["prediction_type"] = prediction_type
    scheduler = DDIMScheduler.from_config(config)
    if unet.config.cross_attention_dim != text_encoder.hidden_size:
        raise ValueError(
            f"SD folder {root}: text encoder width {text_encoder.hidden_size} != UNet cross_attention_dim "
            f"{unet.config.cross_attention_dim}"
        )
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "scheduler": scheduler}
