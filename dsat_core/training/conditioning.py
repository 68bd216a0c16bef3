"""Conditioning dropout for classifier-free guidance: captions (whole + per phrase) and metadata (per field).

Metadata dropout only clears the presence mask; the value itself is left alone and is never replaced here
by a raw 0 that looks like real data (the reference implementation's bug, spec §1). What a cleared field
means is the model's `missing_metadata`, which the trainers set from `TrainConfig.metadata_dropout_mode`:
"learned" (default) uses the learned "missing" embedding; "zero" embeds the value 0 as present, the
reference's behaviour, for comparing the two (metadata sensitivity report, issue #7). Training and
inference thus treat a missing field the same way.

`noise_batch` is the first half of a training step that both trainers share: noise, timesteps and this
dropout, drawn from one generator in a fixed order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from dsat_core.training.losses import diffusion_target

if TYPE_CHECKING:
    from dsat_core.training.config import TrainConfig

# Optional phrases of a caption: comma/semicolon separated parts, or the fMoW template's
# " of a {class}" / " in {country}" tails ("a satellite image of a port in Kenya").
_SEPARATOR = re.compile(r"(\s*[,;]\s*|\s+(?=(?:of|in|from|over|near|with|at)\s))")


def split_caption(caption: str) -> tuple[str, list[tuple[str, str]]]:
    """Head phrase plus (separator, phrase) pairs of the optional phrases that follow it."""
    parts = _SEPARATOR.split(caption)
    head, rest = parts[0], parts[1:]
    return head, [(rest[i], rest[i + 1]) for i in range(0, len(rest) - 1, 2)]


def drop_caption(caption: str, p_caption: float, p_phrase: float, generator: torch.Generator) -> str:
    """With probability `p_caption` return "" (unconditional), else drop each optional phrase with `p_phrase`.

    The head phrase (e.g. "a satellite image") always stays.
    """
    draws = torch.rand(1 + len(split_caption(caption)[1]), generator=generator).tolist()
    if draws[0] < p_caption:
        return ""
    head, phrases = split_caption(caption)
    kept = [sep + phrase for (sep, phrase), u in zip(phrases, draws[1:], strict=True) if u >= p_phrase]
    return head + "".join(kept)


def drop_captions(
    captions: list[str], p_caption: float, p_phrase: float, generator: torch.Generator
) -> list[str]:
    return [drop_caption(c, p_caption, p_phrase, generator) for c in captions]


def drop_metadata(mask: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """New bool mask with each present field independently marked missing with probability `p`."""
    if p <= 0:
        return mask.clone()
    keep = torch.rand(mask.shape, generator=generator) >= p
    return mask & keep.to(mask.device)


@dataclass
class NoisedBatch:
    """The shared first half of a training step: noised latents, their timesteps and loss target, and the
    conditioning after dropout."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    captions: list[str]
    metadata_mask: torch.Tensor


def noise_batch(
    latents: torch.Tensor,
    batch: dict[str, Any],
    config: TrainConfig,
    noise_scheduler: Any,
    generator: torch.Generator,
    device: torch.device,
) -> NoisedBatch:
    """Noise, timesteps, caption dropout and metadata dropout, drawn from `generator` in this order (so a
    resumed run draws exactly what the uninterrupted one did), then the noised latents and the target."""
    noise = torch.randn(latents.shape, generator=generator).to(device)
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator
    ).to(device)
    captions = drop_captions(
        list(batch["caption"]), config.caption_dropout, config.caption_phrase_dropout, generator
    )
    mask = drop_metadata(batch["metadata_mask"], config.metadata_dropout, generator).to(device)
    return NoisedBatch(
        noisy=noise_scheduler.add_noise(latents, noise, timesteps),
        timesteps=timesteps,
        target=diffusion_target(noise_scheduler, latents, noise, timesteps),
        captions=captions,
        metadata_mask=mask,
    )
