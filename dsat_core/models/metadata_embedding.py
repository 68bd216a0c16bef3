"""Metadata embedding of DiffusionSat (spec §1), with a learned embedding for missing fields.

Each of the 7 encoded metadata values (see `dsat_core.metadata.SatMetadata.encode`) gets a sinusoidal
embedding exactly like the diffusion timestep, then its own MLP; the per-field results are summed and
added to the UNet's timestep embedding. A field marked missing (mask False) contributes a learned
per-field vector instead of its MLP output, so "unknown" never collides with a real value of 0.

`missing_metadata="zero"` (a registered config option, saved with the model) is for models trained the
reference's way (`TrainConfig.metadata_dropout_mode="zero"`): a missing field is embedded as the value 0
marked present, exactly as such a model saw dropped fields in training; its learned embedding is unused.
"""

from __future__ import annotations

import typing
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, get_timestep_embedding
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

MissingMetadata = Literal["learned", "zero"]
MISSING_METADATA_MODES: tuple[str, ...] = typing.get_args(MissingMetadata)


def check_missing_metadata(mode: str) -> None:
    """ValueError unless `mode` is a `MissingMetadata` value."""
    if mode not in MISSING_METADATA_MODES:
        raise ValueError(f"missing_metadata must be one of {MISSING_METADATA_MODES}, got {mode!r}")


class MetadataEmbedding(ModelMixin, ConfigMixin):
    """Sum over fields of `MLP_i(sinusoid(value_i))`, or `missing[i]` where field i is absent.

    The last linear layer of every MLP and the missing embeddings start at zero, so a fresh
    embedding outputs zeros and a `SatUNet` built from an SD UNet starts exactly as that UNet.
    The computation always runs in float32 (values are ×1000-scaled; fp16/bf16 would round them).
    `missing_metadata="zero"`: absent fields are embedded as present fields of value 0 (see the module).
    """

    @register_to_config
    def __init__(
        self,
        num_fields: int = 7,
        embed_dim: int = 320,
        time_embed_dim: int = 1280,
        flip_sin_to_cos: bool = True,
        freq_shift: float = 0,
        missing_metadata: MissingMetadata = "learned",
    ):
        super().__init__()
        check_missing_metadata(missing_metadata)
        self.mlps = nn.ModuleList(
            TimestepEmbedding(embed_dim, time_embed_dim, act_fn="silu") for _ in range(num_fields)
        )
        self.missing_embedding = nn.Parameter(torch.zeros(num_fields, time_embed_dim))
        self.reset_output_layers()

    def reset_output_layers(self) -> None:
        """Zero the last linear of each MLP and the missing embeddings (output becomes exactly 0)."""
        with torch.no_grad():
            for mlp in self._field_mlps():
                mlp.linear_2.weight.zero_()
                mlp.linear_2.bias.zero_()
            self.missing_embedding.zero_()

    def _field_mlps(self) -> list[TimestepEmbedding]:
        """The per-field MLPs, typed (a ModuleList yields plain Modules)."""
        return list(self.mlps)

    def forward(self, metadata: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Embed `metadata` (B, F) with presence `mask` (B, F) → float32 (B, time_embed_dim).

        `mask=None` means every field is present. Values of missing fields are ignored (NaN allowed): they
        get the learned missing embedding, or with `missing_metadata="zero"` the embedding of a present 0.
        """
        num_fields = self.config.num_fields
        if metadata.ndim != 2 or metadata.shape[1] != num_fields:
            raise ValueError(f"metadata must have shape (batch, {num_fields}), got {tuple(metadata.shape)}")
        if mask is None:
            mask = torch.ones(metadata.shape, dtype=torch.bool, device=metadata.device)
        elif mask.shape != metadata.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != metadata shape {tuple(metadata.shape)}")
        mask = mask.to(device=metadata.device, dtype=torch.bool)

        with torch.autocast(device_type=metadata.device.type, enabled=False):
            values = torch.where(mask, metadata.float(), torch.zeros((), device=metadata.device))
            if self.config.missing_metadata == "zero":
                mask = torch.ones_like(mask)
            batch = values.shape[0]
            sinusoid = get_timestep_embedding(
                values.reshape(-1),
                self.config.embed_dim,
                flip_sin_to_cos=self.config.flip_sin_to_cos,
                downscale_freq_shift=self.config.freq_shift,
            ).reshape(batch, num_fields, -1)
            out = torch.zeros(batch, self.config.time_embed_dim, device=metadata.device)
            missing = self.missing_embedding.float()
            for i, mlp in enumerate(self._field_mlps()):
                hidden = F.linear(sinusoid[:, i], mlp.linear_1.weight.float(), mlp.linear_1.bias.float())
                hidden = F.linear(F.silu(hidden), mlp.linear_2.weight.float(), mlp.linear_2.bias.float())
                out = out + torch.where(mask[:, i : i + 1], hidden, missing[i])
        return out


def set_missing_metadata(model: ConfigMixin, mode: MissingMetadata) -> None:
    """Set `missing_metadata` of `model` (e.g. a `SatUNet`) and of every `MetadataEmbedding` in it.

    Registered in the configs, so `save_pretrained` records it and `from_pretrained` restores it.
    """
    check_missing_metadata(mode)
    model.register_to_config(missing_metadata=mode)
    for module in typing.cast(nn.Module, model).modules():
        if isinstance(module, MetadataEmbedding):
            module.register_to_config(missing_metadata=mode)
