"""CLIP score from a LOCAL CLIP folder (transformers `CLIPModel` + `CLIPProcessor`), computed by hand.

torchmetrics' CLIPScore does not work with transformers 5, so the score is computed directly with the
same definition: `100 * max(cos(image_embedding, text_embedding), 0)` per image, averaged.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


class CLIPUnavailable(FileNotFoundError):
    """Raised when CLIP score is requested without a local CLIP folder."""


class CLIPScorer:
    """Per-image CLIP score of (image, prompt) pairs. Images: float in [0, 1] (N, 3, H, W)."""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu") -> None:
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise CLIPUnavailable(
                f"{folder}: not a local CLIP folder (config.json missing); CLIP score needs a folder written "
                "by CLIPModel.save_pretrained + CLIPProcessor.save_pretrained; nothing is downloaded"
            )
        from transformers import CLIPModel, CLIPProcessor

        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(str(folder), local_files_only=True).to(self.device).eval()
        self.processor = CLIPProcessor.from_pretrained(str(folder), local_files_only=True)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"CLIP score expects (N, 3, H, W) RGB images, got {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        pixels = [np.ascontiguousarray(img.permute(1, 2, 0).cpu().float().numpy()) for img in images]
        image_inputs = self.processor.image_processor(images=pixels, do_rescale=False, return_tensors="pt")
        text_inputs = self.processor.tokenizer(
            list(prompts), padding=True, truncation=True, return_tensors="pt"
        )
        img = self.model.get_image_features(pixel_values=image_inputs["pixel_values"].to(self.device))
        txt = self.model.get_text_features(**{k: v.to(self.device) for k, v in text_inputs.items()})
        img = _as_tensor(img)
        txt = _as_tensor(txt)
        cos = torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1)
        return (100.0 * cos.clamp(min=0)).cpu()


def _as_tensor(out) -> torch.Tensor:
    """transformers 5 may return a model output object instead of a tensor from get_*_features."""
    if isinstance(out, torch.Tensor):
        return out
    for name in ("pooler_output", "image_embeds", "text_embeds"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"unexpected CLIP feature output {type(out).__name__}")
