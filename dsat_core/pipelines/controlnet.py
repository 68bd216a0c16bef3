"""`SatControlNetPipeline`: a conditioning sequence (+ per-frame metadata, target metadata, optional caption)
→ image, through a frozen `SatUNet` steered by a `ControlNet3D` (spec §2).

Also does masked inpainting (``mask=``, 1 = fill): at every step the known region of the latents is replaced
by the known image's latents noised to the next timestep (RePaint-style blending), and after decoding the
unmasked pixels are pasted back from the input image, so they come out exactly as given (up to the
output's uint8 rounding for PIL / numpy-uint8 output).

Image-to-image start (``init_image=`` + ``strength=``, SDEdit, as diffusers'
StableDiffusionControlNetImg2ImgPipeline): with strength < 1 the latents start from the init image's latents
noised to the timestep at ``strength`` of the schedule, and only the last round(steps × strength) steps run.
For super-resolution the init image is the task baseline (bicubic of the low-res input).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor

from ..metadata import SatMetadata, encode_batch
from ..models.controlnet3d import ControlNet3D
from ..models.sat_unet import SatUNet
from ..models.text_encoders import TextEncoder
from ..models.vae import decode_latents, encode_latents
from .diffusionsat import DiffusionSatPipeline, DiffusionSatPipelineOutput, UncondMetadata, make_tiny_pipeline

FrameMetadata = Sequence[SatMetadata] | Sequence[Sequence[SatMetadata]] | torch.Tensor | None


def _as_list(value: Any, kind: str, item_type: type) -> list:
    """None → [], one value → [value], a list/tuple → list; every entry must be ``item_type``."""
    if value is None:
        return []
    items = list(value) if isinstance(value, list | tuple) else [value]
    for item in items:
        if not isinstance(item, item_type):
            raise TypeError(f"{kind} entries must be {item_type.__name__}, got {type(item).__name__}")
    return items


def inpainting_condition(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ControlNet input of the inpainting task: (B, C + 1, 1, H, W) = [image with holes at 0, mask]."""
    mask = _pixel_mask(mask, image.shape[0], image.shape[-2:]).to(image)
    return torch.cat([image * (1.0 - mask), mask], dim=1)[:, :, None]


def _pixel_mask(mask: torch.Tensor | np.ndarray, batch: int, size: Sequence[int]) -> torch.Tensor:
    """Any of (H, W), (1, H, W), (B, H, W), (B, 1, H, W) → float (B, 1, H, W) of 0/1 (1 = fill)."""
    mask = torch.as_tensor(np.asarray(mask) if isinstance(mask, np.ndarray) else mask)
    if mask.ndim == 2:
        mask = mask[None, None]
    elif mask.ndim == 3:
        mask = mask[:, None]
    if mask.ndim != 4 or mask.shape[1] != 1 or tuple(mask.shape[-2:]) != tuple(size):
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit images of size {tuple(size)}")
    if mask.shape[0] == 1 and batch > 1:
        mask = mask.expand(batch, -1, -1, -1)
    if mask.shape[0] != batch:
        raise ValueError(f"mask batch {mask.shape[0]} != image batch {batch}")
    return (mask.float() > 0.5).float()


@dataclass
class _KnownRegion:
    """Inpainting's known pixels: the image, the hole mask (1 = fill) and the latents kept at each step."""

    image: torch.Tensor
    pixel_mask: torch.Tensor
    latents: torch.Tensor
    keep: torch.Tensor

    def paste(
        self, latents: torch.Tensor, scheduler: Any, noise: torch.Tensor, next_t: torch.Tensor
    ) -> torch.Tensor:
        """``latents`` with the known latents (noised to the next timestep ``next_t``; clean at the end)."""
        known = scheduler.add_noise(self.latents, noise, next_t) if next_t.numel() else self.latents
        return self.keep * known + (1.0 - self.keep) * latents


class SatControlNetPipeline(DiffusionSatPipeline):
    """DiffusionSat with a ControlNet3D: super-resolution, temporal prediction and inpainting.

    Components: `unet` (frozen `SatUNet`), `controlnet` (`ControlNet3D` built from it), `vae`, `text_encoder`,
    `scheduler`. Sampling helpers (scheduler switching, metadata encoding) come from `DiffusionSatPipeline`.

    The output is ``cond`` size × vae_scale_factor / ``controlnet.conditioning_factor`` (the same size unless
    the ControlNet's ``conditioning_downsample_factor`` differs from the VAE factor, e.g. a 2D SR ControlNet
    with factor 4 under an SD VAE turns 256 px inputs into 512 px images).
    `uncond_metadata` (registered): "keep" (the caption-CFG negative branch keeps the target's and frames'
    metadata) or "zero" (the reference's CFG: negative prompt, target AND frame metadata all missing).
    """

    model_cpu_offload_seq = "text_encoder->controlnet->unet->vae"

    def __init__(
        self,
        unet: SatUNet,
        controlnet: ControlNet3D,
        vae: Any,
        text_encoder: TextEncoder,
        scheduler: Any,
        uncond_metadata: str = "keep",  # an UncondMetadata: diffusers warns on every load of a Literal
    ):
        super().__init__(
            unet=unet,
            vae=vae,
            text_encoder=text_encoder,
            scheduler=scheduler,
            uncond_metadata=uncond_metadata,
        )
        if not isinstance(controlnet, ControlNet3D):
            raise TypeError(f"controlnet must be a ControlNet3D, got {type(controlnet).__name__}")
        if tuple(controlnet.config.block_out_channels) != tuple(unet.config.block_out_channels):
            raise ValueError(
                f"controlnet block_out_channels {controlnet.config.block_out_channels} do not match "
                f"the unet's {unet.config.block_out_channels}"
            )
        # the latents are VAE latents whatever the conditioning stride (`conditioning_downsample_factor`)
        if controlnet.config.vae_scale_factor != self.vae_scale_factor:
            raise ValueError(
                f"controlnet expects vae_scale_factor {controlnet.config.vae_scale_factor}, the VAE "
                f"downsamples by {self.vae_scale_factor} (a different conditioning stride is set with "
                "the controlnet's conditioning_downsample_factor, not vae_scale_factor)"
            )
        self.register_modules(controlnet=controlnet)

    @classmethod
    def from_diffusionsat(
        cls,
        pipe: DiffusionSatPipeline,
        controlnet: ControlNet3D,
        uncond_metadata: UncondMetadata | None = None,
    ) -> SatControlNetPipeline:
        """Add a ControlNet3D to a DiffusionSatPipeline (same components, scheduler copied).

        ``uncond_metadata``: None keeps ``pipe``'s mode.
        """
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        return cls(
            unet=pipe.unet,
            controlnet=controlnet,
            vae=pipe.vae,
            text_encoder=pipe.text_encoder,
            scheduler=scheduler,
            uncond_metadata=uncond_metadata or pipe.uncond_metadata,
        )

    @property
    def conditioning_factor(self) -> int:
        """Pixels of ``cond`` per latent (``controlnet.conditioning_factor``)."""
        return self.controlnet.conditioning_factor

    # ------------------------------------------------------------------ inputs
    def encode_frame_metadata(
        self,
        cond_metadata: FrameMetadata,
        cond_metadata_mask: torch.Tensor | None,
        batch: int,
        frames: int,
        device: torch.device,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-frame metadata → float32 (B, T, 7) values and bool (B, T, 7) mask.

        Accepts None (all missing), a list of T `SatMetadata` (same for every sample), a B-list of T-lists, or
        encoded tensors (B, T, 7) with an optional mask (None = all present).
        """
        fields = self.unet.config.num_metadata_fields
        if cond_metadata is None:
            return (
                torch.zeros(batch, frames, fields, device=device),
                torch.zeros(batch, frames, fields, dtype=torch.bool, device=device),
            )
        if isinstance(cond_metadata, torch.Tensor):
            values = cond_metadata.to(device, torch.float32)
            if values.ndim == 2:
                values = values[None].expand(batch, -1, -1)
            mask = (
                torch.ones_like(values, dtype=torch.bool)
                if cond_metadata_mask is None
                else cond_metadata_mask.to(device, torch.bool).expand_as(values)
            )
        else:
            rows: list[Any] = list(cond_metadata)
            if rows and isinstance(rows[0], SatMetadata):
                rows = [rows] * batch
            if len(rows) != batch or any(len(r) != frames for r in rows):
                raise ValueError(
                    f"cond_metadata must give {frames} SatMetadata per frame for {batch} samples"
                )
            flat = [m for r in rows for m in r]
            for m in flat:
                if not isinstance(m, SatMetadata):
                    raise TypeError(f"cond_metadata entries must be SatMetadata, got {type(m).__name__}")
            vals, msk = encode_batch(flat)
            values = torch.as_tensor(vals, dtype=torch.float32, device=device).reshape(batch, frames, fields)
            mask = torch.as_tensor(msk, dtype=torch.bool, device=device).reshape(batch, frames, fields)
        if values.shape != (batch, frames, fields):
            raise ValueError(
                f"cond_metadata must be ({batch}, {frames}, {fields}), got {tuple(values.shape)}"
            )
        return values, mask

    def _known_region(
        self, image: torch.Tensor, pixel_mask: torch.Tensor, device: torch.device, dtype: torch.dtype
    ) -> _KnownRegion:
        """The known part of an inpainting input; a latent is known only if every pixel it covers is."""
        image = image.to(device=device, dtype=torch.float32)
        pixel_mask = pixel_mask.to(device)
        keep = 1.0 - F.max_pool2d(pixel_mask, self.vae_scale_factor).to(dtype)
        return _KnownRegion(image, pixel_mask, encode_latents(self.vae, image).to(dtype), keep)

    def _start(
        self, noise: torch.Tensor, init_image: torch.Tensor | None, strength: float, steps: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Initial latents and the timesteps to run: pure noise over the whole schedule (``init_image`` None
        or ``strength`` 1), else ``init_image``'s latents noised to the first of the last round(steps ×
        strength) timesteps (diffusers' img2img ``get_timesteps``, rounded, at least one step)."""
        timesteps = self.scheduler.timesteps
        if init_image is None or strength >= 1.0:
            return noise * self.scheduler.init_noise_sigma, timesteps
        run = min(max(round(steps * strength), 1), steps)
        begin = (steps - run) * self.scheduler.order
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(begin)
        timesteps = timesteps[begin:]
        init = encode_latents(self.vae, init_image.float()).to(noise)
        first = timesteps[:1].repeat(noise.shape[0])
        return self.scheduler.add_noise(init, noise, first), timesteps

    @staticmethod
    def _check_init(init_image: torch.Tensor | None, strength: float, shape: tuple[int, ...]) -> None:
        """``strength`` in (0, 1]; ``init_image`` (B, 3, H, W) of the output's batch and size."""
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        if init_image is None and strength < 1.0:
            raise ValueError(f"strength {strength} < 1 needs an init_image to start from")
        if init_image is not None and (init_image.ndim != 4 or tuple(init_image.shape) != shape):
            raise ValueError(
                f"init_image must be {shape} (batch, RGB, output size), got {tuple(init_image.shape)}"
            )

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def __call__(  # type: ignore[override]  # the conditioning comes first, as in diffusers' ControlNets
        self,
        cond: torch.Tensor | None = None,
        cond_metadata: FrameMetadata = None,
        metadata: SatMetadata | list[SatMetadata] | None = None,
        prompt: str | list[str] = "",
        *,
        cond_metadata_mask: torch.Tensor | None = None,
        cond_bands: Sequence[str] | None = None,
        image: torch.Tensor | None = None,
        mask: torch.Tensor | np.ndarray | None = None,
        init_image: torch.Tensor | None = None,
        strength: float = 1.0,
        controlnet_conditioning_scale: float = 1.0,
        num_inference_steps: int = 20,
        guidance_scale: float = 1.0,
        negative_prompt: str | list[str] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: Literal["pil", "np", "pt", "latent"] = "pil",
        return_dict: bool = True,
    ) -> DiffusionSatPipelineOutput | tuple:
        """Generate one image per conditioning sequence.

        Args:
            cond: conditioning frames (B, C, T, H, W) in [-1, 1] ((B, C, H, W) is taken as T = 1); the
                output is H × vae_scale_factor / `conditioning_factor` pixels high (H when they are equal).
                For inpainting it may be omitted: it is then `inpainting_condition(image, mask)`.
            cond_metadata: each frame's `SatMetadata` (see `encode_frame_metadata`); None = unknown.
            cond_bands: the band name of each channel of ``cond``, for a ControlNet trained with band names
                (`ControlNet3D.align_bands`): bands it lacks are marked missing, unknown ones dropped.
            metadata: the target's `SatMetadata` (one, or one per sample); None = unknown.
            prompt: caption(s) (one, or one per sample).
            image, mask: inpainting: the known image (B, 3, H, W) in [-1, 1] and the hole (1 = fill, any of
                (H, W), (B, H, W), (B, 1, H, W)). Unmasked pixels of the output equal ``image``. Needs a
                ControlNet whose conditioning factor is the VAE factor.
            init_image, strength: image-to-image start (SDEdit): ``init_image`` (B, 3, H, W) in [-1, 1] at
                the output size (for SR: the bicubic baseline) is encoded, noised to the timestep at
                ``strength`` of the schedule, and only the last round(num_inference_steps × strength)
                steps run (at least one). ``strength`` 1 (default) or no ``init_image``: from pure noise.
                ``latents``, if given, is the noise added.
            controlnet_conditioning_scale: multiplies the ControlNet residuals (0 = the base model alone).
            guidance_scale: classifier-free guidance over the caption (≤ 1: off, as for the paper's metrics);
                with ``uncond_metadata="zero"`` the unconditional branch also has all target and frame
                metadata missing.
            output_type: "pil", "np" (N, H, W, 3 in [0, 1]), "pt" (N, 3, H, W in [0, 1]) or "latent".
        """
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be pil, np, pt or latent, got {output_type!r}")
        device = self._execution_device
        dtype = self.unet.dtype
        if (mask is None) != (image is None):
            raise ValueError("inpainting needs both `image` and `mask`")
        factor, cond_factor = self.vae_scale_factor, self.conditioning_factor
        if mask is not None and cond_factor != factor:
            raise ValueError(
                f"inpainting needs a ControlNet whose conditioning factor equals the VAE factor {factor}; "
                f"this one has conditioning_downsample_factor {cond_factor}"
            )
        if cond is None:
            if image is None or mask is None:
                raise ValueError("give a conditioning sequence `cond` (or `image` + `mask` for inpainting)")
            cond = inpainting_condition(image, torch.as_tensor(mask))
        if cond.ndim == 4:
            cond = cond[:, :, None]  # (B, C, H, W) → T = 1
        if cond.ndim != 5:
            raise ValueError(f"cond must be (B, C, T, H, W), got {tuple(cond.shape)}")
        band_mask = None
        if cond_bands is not None:
            cond, band_mask = self.controlnet.align_bands(cond, cond_bands)
        batch, _, frames, cond_height, cond_width = cond.shape
        if cond_height % cond_factor or cond_width % cond_factor:
            raise ValueError(
                f"cond frames {cond_height}x{cond_width} are not multiples of the conditioning factor "
                f"{cond_factor} (the controlnet's conditioning_downsample_factor, else the VAE factor)"
            )
        latent_height, latent_width = cond_height // cond_factor, cond_width // cond_factor
        height, width = latent_height * factor, latent_width * factor  # output size
        cond = cond.to(device=device, dtype=dtype)

        prompts = _as_list(prompt, "prompt", str) or [""]
        items = _as_list(metadata, "metadata", SatMetadata) or [SatMetadata()]
        if len(prompts) not in (1, batch) or len(items) not in (1, batch):
            raise ValueError(
                f"{len(prompts)} prompts / {len(items)} metadata for {batch} conditioning sequences"
            )
        prompts = prompts * (batch // len(prompts))
        items = items * (batch // len(items))
        negatives = _as_list(negative_prompt, "negative_prompt", str) or [""]
        negatives = negatives * (batch // len(negatives)) if len(negatives) in (1, batch) else negatives
        if len(negatives) != batch:
            raise ValueError(f"{len(negatives)} negative prompts for {batch} samples")

        do_cfg = guidance_scale > 1.0
        states = self.text_encoder.encode(prompts + (negatives if do_cfg else []), device).to(dtype)
        values, md_mask = self.encode_metadata(items, device)
        frame_values, frame_mask = self.encode_frame_metadata(
            cond_metadata, cond_metadata_mask, batch, frames, device
        )
        branches = 2 if do_cfg else 1

        def rep(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x] * branches) if branches > 1 else x

        def uncond(x: torch.Tensor) -> torch.Tensor:
            """Branches of `x` (conditional, then unconditional); "zero": unconditional metadata missing."""
            if do_cfg and self.uncond_metadata == "zero":
                return torch.cat([x, torch.zeros_like(x)])
            return rep(x)

        values, md_mask, cond_in = uncond(values), uncond(md_mask), rep(cond)
        frame_values, frame_mask = uncond(frame_values), uncond(frame_mask)

        shape = (batch, self.unet.config.in_channels, latent_height, latent_width)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        else:
            latents = latents.to(device=device, dtype=dtype)
        noise = latents.clone()

        known = None
        if image is not None and mask is not None:
            if image.shape[0] != batch or tuple(image.shape[-2:]) != (height, width):
                raise ValueError(f"image {tuple(image.shape)} does not match cond {tuple(cond.shape)}")
            known = self._known_region(image, _pixel_mask(mask, batch, (height, width)), device, dtype)

        self._check_init(init_image, strength, (batch, 3, height, width))
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents, timesteps = self._start(latents, init_image, strength, num_inference_steps)
        step_kwargs = self._extra_step_kwargs(generator)
        for i, t in enumerate(self.progress_bar(timesteps)):
            model_input = self.scheduler.scale_model_input(rep(latents), t)
            down, mid = self.controlnet(
                model_input,
                t,
                states,
                values,
                md_mask,
                cond_in,
                frame_values,
                frame_mask,
                conditioning_scale=controlnet_conditioning_scale,
                cond_band_mask=band_mask,
            )
            pred = self.unet(
                model_input,
                t,
                states,
                metadata=values,
                metadata_mask=md_mask,
                down_block_additional_residuals=tuple(d.to(dtype) for d in down),
                mid_block_additional_residual=mid.to(dtype),
                return_dict=False,
            )[0]
            if do_cfg:
                cond_pred, uncond_pred = pred.chunk(2)
                pred = uncond_pred + guidance_scale * (cond_pred - uncond_pred)
            latents = self.scheduler.step(pred, t, latents, **step_kwargs, return_dict=False)[0]
            if known is not None:
                latents = known.paste(latents, self.scheduler, noise, timesteps[i + 1 : i + 2])

        if output_type == "latent":
            images: Any = latents
        else:
            decoded = decode_latents(self.vae, latents).float()
            if known is not None:
                decoded = torch.where(known.pixel_mask.expand_as(decoded) > 0.5, decoded, known.image)
            images = self.image_processor.postprocess(decoded, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, items
        return DiffusionSatPipelineOutput(images=images, metadata=items)


def make_tiny_controlnet_pipeline(
    sample_size: int, channels: int, bands: Sequence[str] | None = None, seed: int = 0
) -> SatControlNetPipeline:
    """A tiny random `SatControlNetPipeline` for tests and benchmarks: `make_tiny_pipeline` (×2 VAE) with a
    `ControlNet3D` of ``channels`` conditioning channels (named ``bands``; blocks (8, 16)) whose
    zero-initialised output convolutions are drawn from N(0, 0.02), so that the conditioning changes the
    output; the global RNG is left as it was."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        pipe = make_tiny_pipeline(sample_size=sample_size, vae_downsample=2, seed=seed)
        controlnet = ControlNet3D.from_unet(
            pipe.unet, channels, (8, 16), vae_scale_factor=2, conditioning_bands=bands
        )
        with torch.no_grad():
            for name, p in controlnet.named_parameters():
                if "controlnet_" in name or "cond_embedding.conv_out" in name:
                    p.normal_(0, 0.02)
    return SatControlNetPipeline.from_diffusionsat(pipe, controlnet)


__all__ = ["SatControlNetPipeline", "inpainting_condition", "make_tiny_controlnet_pipeline"]
