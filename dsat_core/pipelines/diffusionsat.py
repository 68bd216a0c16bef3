"""`DiffusionSatPipeline`: text + metadata → satellite image, with classifier-free guidance over both."""

from __future__ import annotations

import inspect
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import PIL.Image
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    SchedulerMixin,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..metadata import SatMetadata, encode_batch
from ..models.sat_unet import SatUNet
from ..models.sd_loading import load_sd_components
from ..models.text_encoders import TextEncoder
from ..models.vae import decode_latents, vae_scale_factor

SchedulerName = Literal["ddim", "dpm++"]
_SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}
_SCHEDULER_ALIASES = {"dpmsolver++": "dpm++", "dpm": "dpm++", "dpm-solver++": "dpm++"}
#: The offline default base model shipped with the package (64 px RGB; trained once on the shipped sample
#: scenes, its README.md is the model card): `from_pretrained("default")` loads it.
DEFAULT_PIPELINE_DIR = Path(__file__).with_name("default_model")


def pipeline_path(name_or_path: str | os.PathLike) -> Path:
    """A pipeline folder: `DEFAULT_PIPELINE_DIR` for ``"default"``, else the path given."""
    return DEFAULT_PIPELINE_DIR if str(name_or_path) == "default" else Path(name_or_path)


UncondMetadata = Literal["keep", "zero"]
UNCOND_METADATA_MODES: tuple[str, ...] = typing.get_args(UncondMetadata)


def check_uncond_metadata(mode: str) -> None:
    """ValueError unless `mode` is an `UncondMetadata` value."""
    if mode not in UNCOND_METADATA_MODES:
        raise ValueError(f"uncond_metadata must be one of {UNCOND_METADATA_MODES}, got {mode!r}")


@dataclass
class DiffusionSatPipelineOutput(BaseOutput):
    """`images` (PIL list, (N, H, W, C) numpy in [0, 1], (N, C, H, W) tensor, or latents) and the
    `metadata` each image was generated with (missing fields are None)."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    metadata: list[SatMetadata]


def _as_list(value: Any, kind: str, item_type: type | None = None) -> list:
    """`value` as a list (None → []); with `item_type`, a TypeError naming `kind` for any other item."""
    if value is None:
        return []
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    for item in items:
        if item_type is not None and not isinstance(item, item_type):
            name = type(item).__name__
            raise TypeError(f"{kind} must be a {item_type.__name__} or a list of them, got {name}")
    return items


class DiffusionSatPipeline(DiffusionPipeline):
    """Latent diffusion conditioned on a caption (cross-attention) and on `SatMetadata` (time embedding).

    Components: `unet` (`SatUNet`), `vae` (`AutoencoderKL`), `text_encoder` (a `TextEncoder`: CLIP, MiniLM,
    ...), `scheduler` (DDIM or DPM-Solver++; see `set_scheduler`).

    `uncond_metadata` (registered in model_index.json): what the unconditional branch of text guidance sees.
    "keep": the negative prompt with the sample's metadata (metadata guided separately, see `__call__`).
    "zero": the reference's classifier-free guidance, the negative prompt with every metadata field missing
    (embedded as zeros by a model with ``missing_metadata="zero"``); `metadata_guidance_scale` must then be 1.
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    scheduler: SchedulerMixin  # registered in __init__ (`register_modules`), like the other components

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
        """`DiffusionPipeline.from_pretrained`; ``"default"`` loads `DEFAULT_PIPELINE_DIR`."""
        if str(pretrained_model_name_or_path) == "default":  # other names go to diffusers as they are
            pretrained_model_name_or_path = DEFAULT_PIPELINE_DIR
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def __init__(
        self,
        unet: SatUNet,
        vae: AutoencoderKL,
        text_encoder: TextEncoder,
        scheduler: Any,
        uncond_metadata: str = "keep",  # an UncondMetadata: diffusers warns on every load of a Literal
    ):
        super().__init__()
        check_uncond_metadata(uncond_metadata)
        if not isinstance(unet, SatUNet):
            raise TypeError(f"unet must be a SatUNet (see SatUNet.from_sd_unet), got {type(unet).__name__}")
        if not isinstance(text_encoder, TextEncoder):
            raise TypeError(f"text_encoder must be a TextEncoder, not {type(text_encoder).__name__}")
        if text_encoder.hidden_size != unet.config.cross_attention_dim:
            raise ValueError(
                f"text encoder width {text_encoder.hidden_size} != unet cross_attention_dim "
                f"{unet.config.cross_attention_dim}"
            )
        self.register_modules(unet=unet, vae=vae, text_encoder=text_encoder, scheduler=scheduler)
        self.register_to_config(uncond_metadata=uncond_metadata)
        self.vae_scale_factor = vae_scale_factor(vae)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @classmethod
    def from_sd_folder(
        cls, path: str | os.PathLike, prediction_type: str | None = "v_prediction", **kwargs: Any
    ) -> DiffusionSatPipeline:
        """Start from a local Stable Diffusion folder (diffusers layout); see `load_sd_components`."""
        return cls(**load_sd_components(path, prediction_type=prediction_type, **kwargs))

    def set_scheduler(self, name: SchedulerName | str) -> DiffusionSatPipeline:
        """Switch the sampler to `"ddim"` or `"dpm++"` (DPM-Solver++ 2M), keeping the noise schedule."""
        key = _SCHEDULER_ALIASES.get(name.lower(), name.lower())
        if key not in _SCHEDULERS:
            raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(_SCHEDULERS)}")
        scheduler_cls, extra = _SCHEDULERS[key]
        self.scheduler = scheduler_cls.from_config(self.scheduler.config, **extra)
        return self

    # ------------------------------------------------------------------ inputs

    def _broadcast_inputs(
        self, prompt: str | list[str], metadata: SatMetadata | list[SatMetadata] | None
    ) -> tuple[list[str], list[SatMetadata]]:
        prompts = _as_list(prompt, "prompt", str) or [""]
        items = _as_list(metadata, "metadata", SatMetadata) or [SatMetadata()]
        batch = max(len(prompts), len(items))
        if len(prompts) not in (1, batch) or len(items) not in (1, batch):
            raise ValueError(f"{len(prompts)} prompts and {len(items)} metadata entries cannot be paired")
        return prompts * (batch // len(prompts)), items * (batch // len(items))

    def encode_metadata(
        self, items: list[SatMetadata], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 values (N, 7) and bool mask (N, 7) on `device`."""
        values, mask = encode_batch(items)
        return (
            torch.as_tensor(values, dtype=torch.float32, device=device),
            torch.as_tensor(mask, dtype=torch.bool, device=device),
        )

    @property
    def uncond_metadata(self) -> UncondMetadata:
        """The registered `uncond_metadata` mode ("keep" for pipelines saved before it existed)."""
        return self.config.get("uncond_metadata", "keep")

    def _extra_step_kwargs(self, generator: torch.Generator | list[torch.Generator] | None) -> dict[str, Any]:
        params = inspect.signature(self.scheduler.step).parameters
        return {"generator": generator} if "generator" in params else {}

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = "",
        metadata: SatMetadata | list[SatMetadata] | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 7.5,
        metadata_guidance_scale: float = 1.0,
        negative_prompt: str | list[str] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        output_type: Literal["pil", "np", "pt", "latent"] = "pil",
        latents: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> DiffusionSatPipelineOutput | tuple:
        """Generate images.

        Args:
            prompt: caption(s); paired one-to-one with `metadata` (a single value of either is broadcast).
            metadata: `SatMetadata` per image; None/None fields: unknown (learned "missing" embedding).
            guidance_scale: classifier-free guidance over text (≤ 1 disables the unconditional branch).
            metadata_guidance_scale: guidance over metadata against a branch with all fields missing
                (1 disables it). With both:
                `e = e(neg, m) + g_t·(e(c, m) − e(neg, m)) + (g_m − 1)·(e(c, m) − e(c, ∅))`.
                With ``uncond_metadata="zero"`` the one guidance is `e(neg, ∅) + g_t·(e(c, m) − e(neg, ∅))`
                and a `metadata_guidance_scale` other than 1 is an error.
            negative_prompt: caption(s) of the unconditional text branch (default "").
            height, width: pixels (default: UNet sample size × VAE factor).
            output_type: "pil", "np" (N, H, W, C in [0, 1]), "pt" (N, C, H, W in [0, 1]) or "latent".
        All guidance branches run in one batched UNet call per step.
        """
        prompts, items = self._broadcast_inputs(prompt, metadata)
        negatives = _as_list(negative_prompt, "negative_prompt", str) or [""]
        if len(negatives) == 1:
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be pil, np, pt or latent, got {output_type!r}")

        device = self._execution_device
        unet_dtype = self.unet.dtype
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(f"height, width must be multiples of {self.vae_scale_factor}: {height}x{width}")

        do_text_cfg = guidance_scale > 1.0
        do_meta_cfg = metadata_guidance_scale != 1.0
        zero_uncond = self.uncond_metadata == "zero"
        if zero_uncond and do_meta_cfg:
            raise ValueError(
                f"metadata_guidance_scale={metadata_guidance_scale}: with uncond_metadata='zero' the "
                "metadata is guided with the text (the unconditional branch has no metadata); use 1.0"
            )
        n = len(prompts) * num_images_per_prompt
        items = [m for m in items for _ in range(num_images_per_prompt)]

        # text: conditional (+ negative) in one encoder call
        texts = prompts + (negatives if do_text_cfg else [])
        states = self.text_encoder.encode(texts, device).to(unet_dtype)
        states = states.repeat_interleave(num_images_per_prompt, dim=0)
        cond_states = states[:n]
        values, mask = self.encode_metadata(items, device)
        no_mask = torch.zeros_like(mask)

        branch_states, branch_values, branch_masks = [cond_states], [values], [mask]
        if do_text_cfg:
            branch_states.append(states[n:])
            branch_values.append(torch.zeros_like(values) if zero_uncond else values)
            branch_masks.append(no_mask if zero_uncond else mask)
        if do_meta_cfg:
            branch_states.append(cond_states)
            branch_values.append(torch.zeros_like(values))
            branch_masks.append(no_mask)
        num_branches = len(branch_states)
        encoder_hidden_states = torch.cat(branch_states)
        metadata_values = torch.cat(branch_values)
        metadata_mask = torch.cat(branch_masks)

        factor = self.vae_scale_factor
        shape = (n, self.unet.config.in_channels, height // factor, width // factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=unet_dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        else:
            latents = latents.to(device=device, dtype=unet_dtype)

        # the metadata embedding does not depend on the timestep: compute it once
        total = len(metadata_values)
        metadata_embeds = self.unet.embed_metadata(metadata_values, metadata_mask, total, device)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = latents * self.scheduler.init_noise_sigma
        step_kwargs = self._extra_step_kwargs(generator)

        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([latents] * num_branches) if num_branches > 1 else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            pred = self.unet(
                model_input,
                t,
                encoder_hidden_states,
                metadata=metadata_values,
                metadata_mask=metadata_mask,
                metadata_embeds=metadata_embeds,
                return_dict=False,
            )[0]
            chunks = pred.chunk(num_branches)
            guided = chunks[0]
            if do_text_cfg:
                guided = chunks[1] + guidance_scale * (chunks[0] - chunks[1])
            if do_meta_cfg:
                guided = guided + (metadata_guidance_scale - 1.0) * (chunks[0] - chunks[-1])
            latents = self.scheduler.step(guided, t, latents, **step_kwargs, return_dict=False)[0]

        if output_type == "latent":
            images: Any = latents
        else:
            decoded = decode_latents(self.vae, latents)
            images = self.image_processor.postprocess(decoded.float(), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, items
        return DiffusionSatPipelineOutput(images=images, metadata=items)


def make_tiny_pipeline(
    sample_size: int = 8,
    text_encoder: TextEncoder | None = None,
    vae_downsample: int = 2,
    use_metadata: bool = True,
    seed: int = 0,
) -> DiffusionSatPipeline:
    """A randomly initialised pipeline with the tiny UNet / VAE (for tests and CPU smoke runs).

    The default text encoder is `HashTextEncoder`; the scheduler is DDIM with DiffusionSat's v-prediction
    schedule. Components are in eval mode.
    """
    from ..models.configs import scheduler_config, unet_config
    from ..models.text_encoders import HashTextEncoder
    from ..models.vae import make_tiny_vae

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        config = unet_config("tiny", sample_size=sample_size)
        unet = SatUNet(use_metadata=use_metadata, **config)
        if text_encoder is None:
            text_encoder = HashTextEncoder(hidden_size=config["cross_attention_dim"])
        vae = make_tiny_vae(vae_downsample, seed=seed)
    return DiffusionSatPipeline(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        scheduler=DDIMScheduler.from_config(scheduler_config()),
    )
