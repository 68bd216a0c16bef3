"""`ControlNet3D`: DiffusionSat's ControlNet over a sequence of conditioning images (spec §2).

A trainable copy of the frozen `SatUNet`'s encoder (conv_in, time embedding, metadata embedding, down blocks,
mid block; the parts of diffusers' `ControlNetModel`) that reads a conditioning sequence (B, C, T, H, W):

1. A Conv3d embedder (channels 16/32/96/256, spatial stride (1, 2, 2) in log2(vae_scale_factor) stages, then
   a zero-initialised conv) maps each frame to latent size and `block_out_channels[0]` channels.
2. The noisy target latent is repeated over T and added to it; frames run through the 2D encoder as a B*T
   batch. Each frame's embedding = timestep emb + target metadata emb + that frame's metadata emb.
   Frame metadata goes through its own embedding (``cond_metadata_embedding``, initialised from the
   UNet's): with one shared embedding the sum would be symmetric in the target and frame dates, so
   "predict forwards" and "predict backwards" would look the same to the model. Both embeddings follow the
   ControlNet's `missing_metadata` (see `MetadataEmbedding`; `from_unet` copies the UNet's).
3. At the residual positions in ``temporal_layers`` a diffusers `TransformerTemporalModel` mixes features
   over T, blended as α·attn(x) + (1 − α)·x with a learned gate α initialised at 0 and clamped to [0, 1]
   (straight-through, so a gate pushed below 0 still gets gradients; `clamp_temporal_gates_` projects the
   stored values back after an optimizer step).
4. Every residual (the UNet's skip connections and its mid block) goes through a zero-initialised 1×1×1
   Conv3d, is averaged over T (so T may differ between training and inference) and scaled by
   ``conditioning_scale``; the frozen UNet adds them as ``down_block_additional_residuals`` /
   ``mid_block_additional_residual``.

A freshly built ControlNet3D outputs exact zeros, so the controlled UNet starts as the base UNet.

Registered options for models converted from the authors' released checkpoints (defaults = the above):
``temporal_attention_heads`` (per-position heads), ``temporal_mixing="after_zero_conv"`` (zero conv first,
then the gated temporal transformer), ``frame_reduction="sum"``, ``conditioning_downsample_factor`` (the
embedder's stride, when it differs from the VAE factor), ``conditioning_range`` (the range the embedder
was trained on) and ``share_cond_metadata_embedding`` (one metadata embedding for target and frames).
"""

from __future__ import annotations

import math
import typing
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel
from torch import nn

from ..metadata.bands import align_bands, canonical_band
from .metadata_embedding import MetadataEmbedding, MissingMetadata, check_missing_metadata

TemporalMixing = Literal["before_zero_conv", "after_zero_conv"]
FrameReduction = Literal["mean", "sum"]
TEMPORAL_MIXING_MODES: tuple[str, ...] = typing.get_args(TemporalMixing)
FRAME_REDUCTIONS: tuple[str, ...] = typing.get_args(FrameReduction)
DEFAULT_CONDITIONING_RANGE: tuple[float, float] = (-1.0, 1.0)

# UNet config keys the ControlNet encoder copies (the same list diffusers' `ControlNetModel.from_unet` uses).
ENCODER_CONFIG_KEYS: tuple[str, ...] = (
    "in_channels",
    "flip_sin_to_cos",
    "freq_shift",
    "down_block_types",
    "mid_block_type",
    "only_cross_attention",
    "block_out_channels",
    "layers_per_block",
    "downsample_padding",
    "mid_block_scale_factor",
    "act_fn",
    "norm_num_groups",
    "norm_eps",
    "cross_attention_dim",
    "transformer_layers_per_block",
    "attention_head_dim",
    "num_attention_heads",
    "use_linear_projection",
    "upcast_attention",
    "resnet_time_scale_shift",
)
# UNet features a ControlNet3D cannot mirror (value other than the default → clear error).
_UNSUPPORTED_UNET_FEATURES: dict[str, Any] = {
    "addition_embed_type": None,
    "encoder_hid_dim": None,
    "class_embed_type": None,
    "num_class_embeds": None,
    "time_cond_proj_dim": None,
    "timestep_post_act": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "conv_in_kernel": 3,
}


def _as_tuple(value: Any) -> Any:
    """Lists (as JSON configs give them back) → tuples; scalars and None unchanged."""
    return tuple(value) if isinstance(value, list | tuple) else value


def _is_power_of_two(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1 and not value & (value - 1)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _conditioning_range(value: Sequence[float]) -> list[float]:
    """``(low, high)`` as a list of two floats with low < high (ValueError otherwise)."""
    pair = [float(v) for v in value]
    if len(pair) != 2 or not all(math.isfinite(v) for v in pair) or pair[0] >= pair[1]:
        raise ValueError(f"conditioning_range must be two finite floats (low, high), low < high: {value!r}")
    return pair


def _temporal_heads(
    heads: Sequence[Sequence[int]] | None,
    positions: Sequence[int],
    widths: Sequence[int],
    head_dim: int,
) -> list[tuple[int, int]]:
    """(num_heads, head_dim) of each temporal layer: ``heads`` as given, or width // min(head_dim, width)."""
    if heads is None:
        derived: list[tuple[int, int]] = []
        for pos, width in zip(positions, widths, strict=True):
            dim = min(head_dim, width)
            if width % dim:
                raise ValueError(f"residual {pos} has {width} channels, not a multiple of head dim {dim}")
            derived.append((width // dim, dim))
        return derived
    pairs = [tuple(pair) for pair in heads]
    if len(pairs) != len(positions):
        raise ValueError(
            f"temporal_attention_heads has {len(pairs)} (num_heads, head_dim) pairs for "
            f"{len(positions)} temporal_layers {list(positions)}; give one pair per layer"
        )
    for pos, pair in zip(positions, pairs, strict=True):
        if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
            raise ValueError(f"temporal_attention_heads for residual {pos} must be 2 positive ints: {pair}")
    return [(int(h), int(d)) for h, d in pairs]


def zero_module(module: nn.Module) -> nn.Module:
    for param in module.parameters():
        nn.init.zeros_(param)
    return module


def straight_through_clamp(value: torch.Tensor, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """``value.clamp(low, high)`` in the forward pass, identity in the backward pass."""
    return value + (value.clamp(low, high) - value).detach()


def residual_layout(block_out_channels: Sequence[int], layers_per_block: int) -> tuple[list[int], list[int]]:
    """Channels of each down residual of an SD-style UNet, and the positions that follow a downsampler.

    Residual 0 is conv_in's output; block i adds ``layers_per_block`` residuals and, except the last block,
    one after its downsampler (SD 2.1: 12 residuals, downsamplers at 3, 6, 9).
    """
    channels = [block_out_channels[0]]
    after_downsample = []
    for i, width in enumerate(block_out_channels):
        channels += [width] * layers_per_block
        if i < len(block_out_channels) - 1:
            channels.append(width)
            after_downsample.append(len(channels) - 1)
    return channels, after_downsample


def default_temporal_layers(block_out_channels: Sequence[int], layers_per_block: int) -> list[int]:
    """The reference's placement: after conv_in and after each downsampler (SD 2.1: 0, 3, 6, 9 of 12)."""
    return [0, *residual_layout(block_out_channels, layers_per_block)[1]]


class ConditioningEmbedding3D(nn.Module):
    """Conv3d stack (B, C, T, H, W) → (B, out_channels, T, H / f, W / f), f = 2**num_downsamples.

    Each of the ``len(channels) - 1`` stages is a (k, 3, 3) conv then a (1, 3, 3) conv whose spatial
    stride is 2 for the first ``num_downsamples`` stages and 1 after; the output conv is zero-initialised.
    The temporal kernel k (``temporal_kernel``, 3 as in the reference) lets neighbouring frames mix (so
    frame order matters); k = 1 embeds every frame on its own.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int],
        num_downsamples: int,
        temporal_kernel: int = 3,
    ):
        super().__init__()
        if temporal_kernel < 1 or temporal_kernel % 2 == 0:
            raise ValueError(f"temporal_kernel must be a positive odd number, got {temporal_kernel}")
        kernel, pad = (temporal_kernel, 3, 3), (temporal_kernel // 2, 1, 1)
        if num_downsamples > len(channels) - 1:
            raise ValueError(
                f"conditioning embedder with channels {tuple(channels)} has {len(channels) - 1} stages, "
                f"fewer than the {num_downsamples} stride-2 stages the VAE factor needs"
            )
        self.conv_in = nn.Conv3d(in_channels, channels[0], kernel_size=kernel, padding=pad)
        self.blocks = nn.ModuleList()
        for i in range(len(channels) - 1):
            stride = (1, 2, 2) if i < num_downsamples else (1, 1, 1)
            self.blocks.append(nn.Conv3d(channels[i], channels[i], kernel_size=kernel, padding=pad))
            self.blocks.append(
                nn.Conv3d(
                    channels[i], channels[i + 1], kernel_size=(1, 3, 3), padding=(0, 1, 1), stride=stride
                )
            )
        self.conv_out = zero_module(nn.Conv3d(channels[-1], out_channels, kernel_size=kernel, padding=pad))

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.conv_in(cond))
        for block in self.blocks:
            x = F.silu(block(x))
        return self.conv_out(x)


class ControlNet3D(ModelMixin, ConfigMixin):
    """ControlNet over T conditioning frames with per-frame metadata; build it with `from_unet`.

    Call it as ``down, mid = controlnet(sample, t, text, metadata, metadata_mask, cond, cond_metadata,
    cond_metadata_mask)`` and pass ``down`` / ``mid`` to the frozen `SatUNet` (see `controlled_unet_forward`).

    Options for converted reference checkpoints (registered, so `save_pretrained` keeps them; the defaults
    are the behaviour described in the module docstring):

    - ``temporal_attention_heads``: one (num_heads, head_dim) pair per entry of the sorted
      ``temporal_layers``; num_heads·head_dim may differ from the residual's width (the transformer's
      proj_in / proj_out map between them). None: width // min(temporal_attention_head_dim, width) heads.
    - ``temporal_mixing``: "before_zero_conv" (gated temporal transformer on the encoder residual, then the
      zero conv) or "after_zero_conv" (the reference: zero conv first, the gated transformer on its output).
    - ``frame_reduction``: how the per-frame residuals (down and mid) are combined over T: "mean" or "sum"
      (the reference).
    - ``conditioning_downsample_factor``: the embedder's total spatial stride (a power of 2; None → the
      ``vae_scale_factor``); ``cond`` frames must be latent size × this factor.
    - ``conditioning_range``: the value range the model was trained on; callers always pass ``cond`` in
      [-1, 1] and the WHOLE tensor (all channels, masks included) is mapped linearly onto this range.
    - ``share_cond_metadata_embedding``: frame metadata go through ``metadata_embedding`` too (the
      reference); there is then no ``cond_metadata_embedding`` (None, nothing in the state dict).

    ``conditioning_bands`` (the name of each conditioning channel) makes a model usable on other band sets:
    `align_bands` maps an input's bands by name, and a band it lacks (``cond_band_mask`` False) is filled
    with a learned per-band value, trained by dropping bands (like missing metadata).
    """

    _supports_gradient_checkpointing = True
    _keep_in_fp32_modules = ["metadata_embedding", "cond_metadata_embedding"]

    @register_to_config
    def __init__(
        self,
        conditioning_channels: int = 3,
        conditioning_embedding_channels: Sequence[int] = (16, 32, 96, 256),
        vae_scale_factor: int = 8,
        temporal_layers: Sequence[int] | None = None,
        temporal_attention_head_dim: int = 64,
        conditioning_temporal_kernel: int = 3,
        use_metadata: bool = True,
        num_metadata_fields: int = 7,
        missing_metadata: MissingMetadata = "learned",
        temporal_attention_heads: Sequence[Sequence[int]] | None = None,
        temporal_mixing: TemporalMixing = "before_zero_conv",
        frame_reduction: FrameReduction = "mean",
        conditioning_downsample_factor: int | None = None,
        conditioning_range: Sequence[float] = DEFAULT_CONDITIONING_RANGE,
        share_cond_metadata_embedding: bool = False,
        conditioning_bands: Sequence[str] | None = None,
        # the UNet encoder (same meaning as in `UNet2DConditionModel`)
        in_channels: int = 4,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: Sequence[str] = (
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        mid_block_type: str | None = "UNetMidBlock2DCrossAttn",
        only_cross_attention: bool | Sequence[bool] = False,
        block_out_channels: Sequence[int] = (320, 640, 1280, 1280),
        layers_per_block: int = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1.0,
        act_fn: str = "silu",
        norm_num_groups: int | None = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int = 1024,
        transformer_layers_per_block: int | Sequence[int] = 1,
        attention_head_dim: int | Sequence[int] = 8,
        num_attention_heads: int | Sequence[int] | None = None,
        use_linear_projection: bool = False,
        upcast_attention: bool = False,
        resnet_time_scale_shift: str = "default",
    ):
        super().__init__()
        if conditioning_channels < 1:
            raise ValueError(f"conditioning_channels must be >= 1, got {conditioning_channels}")
        if not _is_power_of_two(vae_scale_factor):
            raise ValueError(f"vae_scale_factor must be a power of two, got {vae_scale_factor}")
        cond_factor = conditioning_downsample_factor
        if cond_factor is not None and not _is_power_of_two(cond_factor):
            raise ValueError(
                f"conditioning_downsample_factor must be a power of two or None, got "
                f"{conditioning_downsample_factor!r}"
            )
        _check_choice("temporal_mixing", temporal_mixing, TEMPORAL_MIXING_MODES)
        _check_choice("frame_reduction", frame_reduction, FRAME_REDUCTIONS)
        # JSON-like forms, so a config compares equal before and after save_pretrained / from_pretrained
        self.register_to_config(conditioning_range=_conditioning_range(conditioning_range))
        if not isinstance(layers_per_block, int):
            raise ValueError(f"ControlNet3D needs an int layers_per_block, got {layers_per_block!r}")
        check_missing_metadata(missing_metadata)
        # The encoder: built by diffusers' ControlNetModel, whose 2D conditioning path we replace below.
        encoder = ControlNetModel(
            conditioning_channels=1,
            conditioning_embedding_out_channels=(16,),
            in_channels=in_channels,
            flip_sin_to_cos=flip_sin_to_cos,
            freq_shift=freq_shift,
            down_block_types=tuple(down_block_types),
            mid_block_type=mid_block_type,
            only_cross_attention=_as_tuple(only_cross_attention),
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            downsample_padding=downsample_padding,
            mid_block_scale_factor=mid_block_scale_factor,
            act_fn=act_fn,
            norm_num_groups=norm_num_groups,
            norm_eps=norm_eps,
            cross_attention_dim=cross_attention_dim,
            transformer_layers_per_block=_as_tuple(transformer_layers_per_block),
            attention_head_dim=_as_tuple(attention_head_dim),
            num_attention_heads=_as_tuple(num_attention_heads),
            use_linear_projection=use_linear_projection,
            upcast_attention=upcast_attention,
            resnet_time_scale_shift=resnet_time_scale_shift,
        )
        self.conv_in = encoder.conv_in
        self.time_proj = encoder.time_proj
        self.time_embedding = encoder.time_embedding
        self.down_blocks = encoder.down_blocks
        self.mid_block = encoder.mid_block
        del encoder
        time_embed_dim = self.time_embedding.linear_2.out_features

        self.metadata_embedding: MetadataEmbedding | None = None
        self.cond_metadata_embedding: MetadataEmbedding | None = None
        if use_metadata:
            kwargs = dict(
                num_fields=num_metadata_fields,
                embed_dim=block_out_channels[0],
                time_embed_dim=time_embed_dim,
                flip_sin_to_cos=flip_sin_to_cos,
                freq_shift=freq_shift,
                missing_metadata=missing_metadata,
            )
            self.metadata_embedding = MetadataEmbedding(**kwargs)
            if not share_cond_metadata_embedding:
                self.cond_metadata_embedding = MetadataEmbedding(**kwargs)

        self.missing_band_values: nn.Parameter | None = None
        if conditioning_bands is not None:
            bands = [canonical_band(b) for b in conditioning_bands]
            if len(bands) != conditioning_channels or len(set(bands)) != len(bands):
                raise ValueError(
                    f"conditioning_bands {list(conditioning_bands)} must name each of the "
                    f"{conditioning_channels} conditioning channels once"
                )
            self.register_to_config(conditioning_bands=bands)
            # a band the input lacks is this learned value (trained with band dropout, like missing metadata)
            self.missing_band_values = nn.Parameter(torch.zeros(conditioning_channels))
        self.cond_embedding = ConditioningEmbedding3D(
            conditioning_channels,
            block_out_channels[0],
            tuple(conditioning_embedding_channels),
            int(math.log2(conditioning_downsample_factor or vae_scale_factor)),
            conditioning_temporal_kernel,
        )

        channels, _ = residual_layout(block_out_channels, layers_per_block)
        if temporal_layers is None:
            temporal_layers = default_temporal_layers(block_out_channels, layers_per_block)
        given = [int(p) for p in temporal_layers]
        temporal_layers = sorted(set(given))
        if temporal_attention_heads is not None and given != temporal_layers:
            raise ValueError(
                f"temporal_attention_heads pairs with temporal_layers in order: pass temporal_layers sorted "
                f"and without repeats (got {given})"
            )
        bad = [p for p in temporal_layers if not 0 <= p < len(channels)]
        if bad:
            raise ValueError(
                f"temporal_layers {bad} outside the {len(channels)} residual positions 0..{len(channels) - 1}"
            )
        heads = _temporal_heads(
            temporal_attention_heads,
            temporal_layers,
            [channels[p] for p in temporal_layers],
            temporal_attention_head_dim,
        )
        self.register_to_config(temporal_layers=temporal_layers)
        if temporal_attention_heads is not None:
            self.register_to_config(temporal_attention_heads=[list(pair) for pair in heads])
        self.temporal_blocks = nn.ModuleDict()
        self.temporal_gates = nn.ParameterDict()
        for pos, (num_heads, head_dim) in zip(temporal_layers, heads, strict=True):
            width = channels[pos]
            self.temporal_blocks[str(pos)] = TransformerTemporalModel(
                num_attention_heads=num_heads,
                attention_head_dim=head_dim,
                in_channels=width,
                num_layers=1,
                norm_num_groups=norm_num_groups or 32,
            )
            self.temporal_gates[str(pos)] = nn.Parameter(torch.zeros(()))

        self.controlnet_down_blocks = nn.ModuleList(
            zero_module(nn.Conv3d(width, width, kernel_size=1)) for width in channels
        )
        self.controlnet_mid_block = zero_module(nn.Conv3d(block_out_channels[-1], block_out_channels[-1], 1))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_unet(
        cls,
        unet: UNet2DConditionModel,
        conditioning_channels: int,
        conditioning_embedding_channels: Sequence[int] = (16, 32, 96, 256),
        temporal_layers: Sequence[int] | None = None,
        *,
        vae_scale_factor: int = 8,
        temporal_attention_head_dim: int = 64,
        conditioning_temporal_kernel: int = 3,
        temporal_attention_heads: Sequence[Sequence[int]] | None = None,
        temporal_mixing: TemporalMixing = "before_zero_conv",
        frame_reduction: FrameReduction = "mean",
        conditioning_downsample_factor: int | None = None,
        conditioning_range: Sequence[float] = DEFAULT_CONDITIONING_RANGE,
        share_cond_metadata_embedding: bool = False,
        conditioning_bands: Sequence[str] | None = None,
        load_weights_from_unet: bool = True,
    ) -> ControlNet3D:
        """A ControlNet3D whose encoder copies ``unet``'s config and (by default) weights.

        ``temporal_layers``: residual positions followed by a temporal transformer (None → after conv_in and
        after each downsampler, as the reference; ``()`` → none). ``vae_scale_factor``: pixels per latent.
        ``conditioning_temporal_kernel``: temporal size of the embedder's convs (3 = reference; 1 = frames
        embedded independently, which makes the residuals invariant to the order of the frames).
        ``temporal_attention_heads`` ... ``share_cond_metadata_embedding``: the reference-checkpoint options
        (see the class docstring), passed through to the config.
        ``conditioning_bands``: the name of each conditioning channel (e.g. a store's band names): the model
        then takes inputs with other band sets (`align_bands`) and learns a value for a missing band.
        The UNet itself is not modified (freeze it with `freeze`).
        """
        config = unet.config
        for key, default in _UNSUPPORTED_UNET_FEATURES.items():
            if config.get(key, default) != default:
                raise ValueError(f"ControlNet3D cannot mirror a UNet with {key}={config.get(key)!r}")
        metadata_embedding = getattr(unet, "metadata_embedding", None)
        encoder_kwargs = {k: config[k] for k in ENCODER_CONFIG_KEYS if k in config}
        controlnet = cls(
            conditioning_channels=conditioning_channels,
            conditioning_embedding_channels=tuple(conditioning_embedding_channels),
            vae_scale_factor=vae_scale_factor,
            temporal_layers=temporal_layers,
            temporal_attention_head_dim=temporal_attention_head_dim,
            conditioning_temporal_kernel=conditioning_temporal_kernel,
            temporal_attention_heads=temporal_attention_heads,
            temporal_mixing=temporal_mixing,
            frame_reduction=frame_reduction,
            conditioning_downsample_factor=conditioning_downsample_factor,
            conditioning_range=tuple(conditioning_range),
            share_cond_metadata_embedding=share_cond_metadata_embedding,
            conditioning_bands=conditioning_bands,
            use_metadata=metadata_embedding is not None,
            num_metadata_fields=config.get("num_metadata_fields", 7),
            missing_metadata=config.get("missing_metadata", "learned"),
            **encoder_kwargs,
        )
        if load_weights_from_unet:
            for name in ("conv_in", "time_proj", "time_embedding", "down_blocks", "mid_block"):
                getattr(controlnet, name).load_state_dict(getattr(unet, name).state_dict())
            if metadata_embedding is not None:
                controlnet.metadata_embedding.load_state_dict(metadata_embedding.state_dict())
                if controlnet.cond_metadata_embedding is not None:
                    controlnet.cond_metadata_embedding.load_state_dict(metadata_embedding.state_dict())
        param = next(unet.parameters())
        return controlnet.to(device=param.device)

    # ------------------------------------------------------------------ properties
    @property
    def conditioning_factor(self) -> int:
        """Pixels of ``cond`` per latent along one side (``conditioning_downsample_factor`` or the VAE's)."""
        return int(self.config.conditioning_downsample_factor or self.config.vae_scale_factor)

    @property
    def frame_metadata_embedding(self) -> MetadataEmbedding | None:
        """The embedding the frames' metadata go through (``metadata_embedding`` when shared)."""
        if self.config.get("share_cond_metadata_embedding", False):
            return self.metadata_embedding
        return self.cond_metadata_embedding

    @property
    def num_residuals(self) -> int:
        """Number of down-block residuals (SD 2.1: 12); the mid residual comes on top."""
        return len(self.controlnet_down_blocks)

    def temporal_gate_values(self) -> dict[int, float]:
        """Effective (clamped) gate α of each temporal layer."""
        return {int(k): float(v.detach().clamp(0.0, 1.0)) for k, v in self.temporal_gates.items()}

    @torch.no_grad()
    def clamp_temporal_gates_(self) -> None:
        """Project the stored gates into [0, 1] (call after each optimizer step)."""
        for gate in self.temporal_gates.values():
            gate.clamp_(0.0, 1.0)

    # ------------------------------------------------------------------ forward
    def _embed_metadata(
        self,
        module: MetadataEmbedding | None,
        values: torch.Tensor | None,
        mask: torch.Tensor | None,
        rows: int,
        device: torch.device,
    ) -> torch.Tensor | None:
        if module is None:
            return None
        fields = self.config.num_metadata_fields
        if values is None:
            values = torch.zeros(rows, fields, device=device)
            mask = torch.zeros(rows, fields, dtype=torch.bool, device=device)
        values = values.reshape(-1, fields).to(device)
        mask = None if mask is None else mask.reshape(-1, fields).to(device)
        if values.shape[0] != rows:
            raise ValueError(f"metadata has {values.shape[0]} rows, expected {rows}")
        return module(values, mask)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        metadata: torch.Tensor | None = None,
        metadata_mask: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        cond_metadata: torch.Tensor | None = None,
        cond_metadata_mask: torch.Tensor | None = None,
        conditioning_scale: float = 1.0,
        cross_attention_kwargs: dict[str, Any] | None = None,
        cond_band_mask: torch.Tensor | None = None,
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Residuals for the frozen UNet.

        Args:
            sample: noisy target latents (B, 4, h, w).
            timestep: scalar or (B,) diffusion timesteps.
            encoder_hidden_states: text states (B, L, cross_attention_dim).
            metadata / metadata_mask: the target's encoded metadata (B, 7) and presence mask (None → missing).
            cond: the conditioning sequence (B, C, T, H, W) in [-1, 1] with H = h·`conditioning_factor`
                ((B, C, H, W) → T = 1); mapped onto ``conditioning_range`` before the embedder.
            cond_metadata / cond_metadata_mask: each frame's metadata (B, T, 7) and mask (None → missing),
                or (B, 7) for every frame. The reference layout (B, 7, T) is rejected (transpose it first);
                with T == 7 the two layouts cannot be told apart and (B, T, 7) is assumed.
            conditioning_scale: multiplies every residual.
            cond_band_mask: bool (B, C) or (C,), False where a band is missing (or dropped in training): its
                pixels are replaced by the learned missing-band value (models with ``conditioning_bands``;
                see `align_bands`).

        Returns:
            ``(down_residuals, mid_residual)``: `num_residuals` tensors (B, c_i, h_i, w_i) and one
            (B, c, h', w').
        """
        if cond is None:
            raise ValueError("ControlNet3D needs a conditioning sequence `cond` (B, C, T, H, W)")
        if cond.ndim == 4:
            cond = cond.unsqueeze(2)
        if cond.ndim != 5:
            raise ValueError(f"cond must be (B, C, T, H, W), got shape {tuple(cond.shape)}")
        batch, channels, frames, height, width = cond.shape
        if batch != sample.shape[0]:
            raise ValueError(f"cond batch {batch} != sample batch {sample.shape[0]}")
        if channels != self.config.conditioning_channels:
            raise ValueError(
                f"cond has {channels} channels, this ControlNet3D takes {self.config.conditioning_channels}"
            )
        factor = self.conditioning_factor
        if (height, width) != (sample.shape[2] * factor, sample.shape[3] * factor):
            raise ValueError(
                f"cond frames are {height}x{width}; latents {tuple(sample.shape[2:])} × conditioning factor "
                f"{factor} (conditioning_downsample_factor, else vae_scale_factor) need "
                f"{sample.shape[2] * factor}x{sample.shape[3] * factor}"
            )
        cond_metadata = self._frame_metadata_layout(cond_metadata, "cond_metadata", batch, frames)
        cond_metadata_mask = self._frame_metadata_layout(
            cond_metadata_mask, "cond_metadata_mask", batch, frames
        )
        device, dtype = sample.device, sample.dtype

        # 1. per-frame embedding: timestep + target metadata (per sample) + frame metadata (per frame)
        timesteps = timestep if torch.is_tensor(timestep) else torch.tensor([timestep], device=device)
        timesteps = (
            timesteps.reshape(-1).to(device).expand(batch) if timesteps.numel() == 1 else timesteps.to(device)
        )
        emb = self.time_embedding(self.time_proj(timesteps).to(dtype=dtype))
        target_md = self._embed_metadata(self.metadata_embedding, metadata, metadata_mask, batch, device)
        if target_md is not None:
            emb = emb + target_md.to(dtype)
        emb = emb.repeat_interleave(frames, dim=0)
        frame_md = self._embed_metadata(
            self.frame_metadata_embedding, cond_metadata, cond_metadata_mask, batch * frames, device
        )
        if frame_md is not None:
            emb = emb + frame_md.to(dtype)
        text = encoder_hidden_states.repeat_interleave(frames, dim=0)

        # 2. latents repeated over T + embedded conditioning frames
        hidden = self.conv_in(sample).repeat_interleave(frames, dim=0)
        cond = self._fill_missing_bands(self.map_conditioning_range(cond), cond_band_mask)
        cond_emb = self.cond_embedding(cond.to(dtype))  # (B, c0, T, h, w)
        hidden = hidden + cond_emb.transpose(1, 2).reshape(
            batch * frames, *cond_emb.shape[1:2], *cond_emb.shape[3:]
        )

        # 3. encoder on B*T frames
        residuals: tuple[torch.Tensor, ...] = (hidden,)
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                hidden, res = block(
                    hidden_states=hidden,
                    temb=emb,
                    encoder_hidden_states=text,
                    cross_attention_kwargs=cross_attention_kwargs,
                )
            else:
                hidden, res = block(hidden_states=hidden, temb=emb)
            residuals += res
        if self.mid_block is not None:
            if getattr(self.mid_block, "has_cross_attention", False):
                hidden = self.mid_block(
                    hidden, emb, encoder_hidden_states=text, cross_attention_kwargs=cross_attention_kwargs
                )
            else:
                hidden = self.mid_block(hidden, emb)

        # 4. temporal mixing and zero convs (in the configured order), then mean / sum over T
        after = self.config.get("temporal_mixing", "before_zero_conv") == "after_zero_conv"
        down = []
        for pos, (res, zero_conv) in enumerate(zip(residuals, self.controlnet_down_blocks, strict=True)):
            if after:  # the reference: zero conv on (B, C, T, h, w), then the gated temporal transformer
                res = _frames_first(zero_conv(_frames_last(res, batch, frames)))
                res = self._temporal_mix(pos, res, frames, cross_attention_kwargs)
                res = _frames_last(res, batch, frames)
            else:
                res = self._temporal_mix(pos, res, frames, cross_attention_kwargs)
                res = zero_conv(_frames_last(res, batch, frames))
            down.append(self._reduce_frames(res) * conditioning_scale)
        mid = self._reduce_frames(self.controlnet_mid_block(_frames_last(hidden, batch, frames)))
        return tuple(down), mid * conditioning_scale

    def align_bands(self, cond: torch.Tensor, bands: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """An input with named ``bands`` (B, C_in, [T,] H, W) → (this model's bands, present mask (C,)).

        Bands are matched by canonical name (`dsat_core.metadata.bands`); a band the model knows but the input
        lacks gets zeros here and is marked absent (pass the mask as ``cond_band_mask``: the model fills it
        with its learned missing value); input bands the model does not know are dropped with a warning.
        """
        if self.config.get("conditioning_bands") is None:
            raise ValueError("this ControlNet3D was trained without band names (conditioning_bands)")
        if cond.shape[1] != len(bands):
            raise ValueError(f"cond has {cond.shape[1]} channels but {len(bands)} band names {list(bands)}")
        alignment = align_bands(self.config.conditioning_bands, bands)
        if alignment.unknown:
            warnings.warn(
                f"bands {list(alignment.unknown)} are unknown to this ControlNet "
                f"(it takes {self.config.conditioning_bands}); they are dropped",
                stacklevel=2,
            )
        if all(s is None for s in alignment.source):
            raise ValueError(f"none of the bands {list(bands)} is one of {self.config.conditioning_bands}")
        shape = (cond.shape[0], len(alignment.source), *cond.shape[2:])
        out = cond.new_zeros(shape)
        for i, source in enumerate(alignment.source):
            if source is not None:
                out[:, i] = cond[:, source]
        present = torch.tensor([s is not None for s in alignment.source], device=cond.device)
        return out, present

    def _fill_missing_bands(self, cond: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is None:
            return cond
        if self.missing_band_values is None:
            raise ValueError("cond_band_mask needs a ControlNet3D with conditioning_bands")
        mask = mask.to(device=cond.device, dtype=torch.bool)
        mask = (mask[None] if mask.ndim == 1 else mask).expand(cond.shape[0], -1)
        fill = self.missing_band_values.to(cond.dtype)[None, :, None, None, None]
        return torch.where(mask[:, :, None, None, None], cond, fill)

    def map_conditioning_range(self, cond: torch.Tensor) -> torch.Tensor:
        """``cond`` in [-1, 1] (all channels) → linearly onto ``conditioning_range`` (default: identity)."""
        low, high = (float(v) for v in self.config.get("conditioning_range", DEFAULT_CONDITIONING_RANGE))
        if (low, high) == DEFAULT_CONDITIONING_RANGE:
            return cond
        return (cond + 1.0) * ((high - low) / 2.0) + low

    def _frame_metadata_layout(
        self, values: torch.Tensor | None, name: str, batch: int, frames: int
    ) -> torch.Tensor | None:
        """``values`` (B, T, F), or (B, F) expanded over T; any other layout → ValueError."""
        if values is None:
            return None
        fields = self.config.num_metadata_fields
        shape = tuple(values.shape)
        if shape == (batch, fields):  # one vector for every frame
            return values[:, None].expand(-1, frames, -1)
        if shape == (batch, frames, fields):
            return values
        hint = ""
        if shape == (batch, fields, frames):
            hint = "; this is the reference layout (B, F, T): transpose it (.transpose(1, 2)) to (B, T, F)"
        raise ValueError(
            f"{name} must be (B, T, F) = ({batch}, {frames}, {fields}) or (B, F) = ({batch}, {fields}), "
            f"got {shape}{hint}"
        )

    def _temporal_mix(
        self, pos: int, x: torch.Tensor, frames: int, cross_attention_kwargs: dict[str, Any] | None
    ) -> torch.Tensor:
        """α·attn(x) + (1 − α)·x on the (B·T, C, h, w) view at a temporal position; else ``x``."""
        key = str(pos)
        if key not in self.temporal_blocks:
            return x
        alpha = straight_through_clamp(self.temporal_gates[key]).to(x.dtype)
        mixed = self.temporal_blocks[key](x, num_frames=frames, cross_attention_kwargs=cross_attention_kwargs)
        return alpha * mixed.sample + (1 - alpha) * x

    def _reduce_frames(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, h, w) → (B, C, h, w) by ``frame_reduction`` (mean or sum over T)."""
        return x.sum(dim=2) if self.config.get("frame_reduction", "mean") == "sum" else x.mean(dim=2)


def _frames_last(x: torch.Tensor, batch: int, frames: int) -> torch.Tensor:
    """(B·T, C, h, w) → (B, C, T, h, w)."""
    return x.reshape(batch, frames, *x.shape[1:]).transpose(1, 2)


def _frames_first(x: torch.Tensor) -> torch.Tensor:
    """(B, C, T, h, w) → (B·T, C, h, w)."""
    return x.transpose(1, 2).reshape(-1, x.shape[1], *x.shape[3:])


def freeze(module: nn.Module) -> nn.Module:
    """``requires_grad_(False)`` and eval mode (the base UNet under a ControlNet)."""
    module.requires_grad_(False)
    return module.eval()


def controlled_unet_forward(
    unet: nn.Module,
    controlnet: nn.Module,
    sample: torch.Tensor,
    timestep: torch.Tensor | float | int,
    encoder_hidden_states: torch.Tensor,
    metadata: torch.Tensor | None,
    metadata_mask: torch.Tensor | None,
    cond: torch.Tensor,
    cond_metadata: torch.Tensor | None = None,
    cond_metadata_mask: torch.Tensor | None = None,
    conditioning_scale: float = 1.0,
    cond_band_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The base `SatUNet`'s prediction with the ControlNet3D residuals added (training and sampling);
    ``controlnet``: a `ControlNet3D` or its distributed wrapper.

    ``cond_band_mask``: the ControlNet's (False: a missing or dropped band, see `ControlNet3D.forward`)."""
    down, mid = controlnet(
        sample,
        timestep,
        encoder_hidden_states,
        metadata,
        metadata_mask,
        cond,
        cond_metadata,
        cond_metadata_mask,
        conditioning_scale=conditioning_scale,
        cond_band_mask=cond_band_mask,
    )
    unet_dtype = next(unet.parameters()).dtype
    return unet(
        sample,
        timestep,
        encoder_hidden_states,
        metadata=metadata,
        metadata_mask=metadata_mask,
        down_block_additional_residuals=tuple(r.to(unet_dtype) for r in down),
        mid_block_additional_residual=mid.to(unet_dtype),
        return_dict=False,
    )[0]


__all__ = [
    "ConditioningEmbedding3D",
    "ControlNet3D",
    "controlled_unet_forward",
    "default_temporal_layers",
    "freeze",
    "residual_layout",
]
