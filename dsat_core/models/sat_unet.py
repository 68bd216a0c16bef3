"""`SatUNet`: SD's `UNet2DConditionModel` + the metadata embedding, added to the time embedding."""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.configuration_utils import register_to_config

# `DiffusionPipeline.from_pretrained` finds a custom component's load method by looking `ModelMixin` up in the
# component's own module, so it must be importable from here.
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from .metadata_embedding import MetadataEmbedding, MissingMetadata, check_missing_metadata

_UNET_PARAMS = [
    p for name, p in inspect.signature(UNet2DConditionModel.__init__).parameters.items() if name != "self"
]


def _with_unet_signature(init: Callable) -> Callable:
    """Give `init(self, <SatUNet's own arguments>, **kwargs)` the full UNet signature.

    diffusers' `register_to_config` / `from_config` read `__init__`'s signature, so every UNet argument
    must appear in it for `save_pretrained` → `from_pretrained` to round trip.
    """
    own = [p for name, p in inspect.signature(init).parameters.items() if name != "kwargs"]
    init.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        own + [p.replace(kind=p.KEYWORD_ONLY) for p in _UNET_PARAMS]
    )
    return init


class SatUNet(UNet2DConditionModel):
    """UNet conditioned on text (cross-attention) and on 7 metadata values (added to the time embedding).

    `use_metadata=False` gives the plain SD UNet (same weights, no metadata path) for baselines.
    `missing_metadata`: how a missing field is embedded, "learned" (its learned missing embedding) or "zero"
    (a present value 0, for models trained with zeroed dropout; `metadata_embedding.set_missing_metadata`).
    The metadata embedding stays float32 when loaded with `torch_dtype` (and computes in float32 anyway).
    """

    _keep_in_fp32_modules = ["metadata_embedding"]

    @register_to_config
    @_with_unet_signature
    def __init__(
        self,
        num_metadata_fields: int = 7,
        use_metadata: bool = True,
        missing_metadata: MissingMetadata = "learned",
        **kwargs: Any,
    ):
        if kwargs.get("class_embed_type") is not None or kwargs.get("num_class_embeds") is not None:
            raise ValueError("SatUNet uses the class-embedding hook for metadata; no class embeddings")
        check_missing_metadata(missing_metadata)
        super().__init__(**kwargs)
        self.metadata_embedding: MetadataEmbedding | None = None
        if use_metadata:
            block_out_channels = self.config.block_out_channels
            self.metadata_embedding = MetadataEmbedding(
                num_fields=num_metadata_fields,
                embed_dim=block_out_channels[0],
                time_embed_dim=self.time_embedding.linear_2.out_features,
                flip_sin_to_cos=self.config.flip_sin_to_cos,
                freq_shift=self.config.freq_shift,
                missing_metadata=missing_metadata,
            )

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any
    ) -> Any:
        """diffusers' `from_pretrained`; a reference-layout UNet folder is refused, naming the converter."""
        config = Path(pretrained_model_name_or_path) / (kwargs.get("subfolder") or "") / "config.json"
        if config.is_file() and "num_metadata" in json.loads(config.read_text()):
            raise ValueError(
                f"{config.parent} is a DiffusionSat reference-code UNet (config key num_metadata, per-field "
                "MLPs metadata_embedding.N): convert it once with "
                "`dsat convert reference --checkpoint DIR --out OUT` and load OUT"
            )
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @classmethod
    def from_sd_unet(cls, unet: UNet2DConditionModel, num_metadata_fields: int = 7) -> SatUNet:
        """A SatUNet with `unet`'s weights; the metadata path starts at zero, so outputs are identical."""
        config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
        config.pop("num_metadata_fields", None)
        config.pop("use_metadata", None)
        sat = cls(num_metadata_fields=num_metadata_fields, use_metadata=True, **config)
        missing, unexpected = sat.load_state_dict(unet.state_dict(), strict=False)
        missing = [k for k in missing if not k.startswith("metadata_embedding.")]
        if missing or unexpected:
            raise ValueError(f"SD UNet weights do not fit SatUNet: missing {missing}, extra {unexpected}")
        param = next(unet.parameters())
        sat.to(device=param.device)
        for name, module in sat.named_children():
            if name != "metadata_embedding":
                module.to(dtype=param.dtype)
        return sat

    def embed_metadata(
        self, metadata: torch.Tensor | None, mask: torch.Tensor | None, batch: int, device: torch.device
    ) -> torch.Tensor | None:
        """float32 metadata embedding (batch, time_embed_dim), or None when `use_metadata=False`.

        It does not depend on the timestep: samplers can compute it once and pass `metadata_embeds`.
        """
        if self.metadata_embedding is None:
            return None
        num_fields = self.config.num_metadata_fields
        if metadata is None:
            metadata = torch.zeros(batch, num_fields, device=device)
            mask = torch.zeros(batch, num_fields, dtype=torch.bool, device=device)
        metadata = metadata.to(device)
        if mask is not None:
            mask = mask.to(device)
        if metadata.shape[0] != batch:
            if metadata.shape[0] != 1:
                raise ValueError(f"metadata batch {metadata.shape[0]} does not match sample batch {batch}")
            metadata = metadata.expand(batch, -1)
            mask = None if mask is None else mask.expand(batch, -1)
        return self.metadata_embedding(metadata, mask)

    def get_class_embed(self, sample: torch.Tensor, class_labels: Any) -> torch.Tensor | None:
        # `forward` passes (metadata, mask, embeds) through diffusers' class-embedding hook; the result
        # is added to the time embedding by `UNet2DConditionModel.forward`.
        if self.metadata_embedding is None:
            return None
        metadata, mask, embeds = class_labels
        batch = sample.shape[0]
        if embeds is None:
            embeds = self.embed_metadata(metadata, mask, batch, sample.device)
        elif embeds.shape[0] != batch:
            if embeds.shape[0] != 1:
                raise ValueError(f"metadata_embeds batch {embeds.shape[0]} != sample batch {batch}")
            embeds = embeds.expand(batch, -1)
        return embeds.to(dtype=sample.dtype)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        metadata: torch.Tensor | None = None,
        metadata_mask: torch.Tensor | None = None,
        return_dict: bool = True,
        metadata_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> UNet2DConditionOutput | tuple:
        """Predict noise / v for `sample` at `timestep`.

        Args:
            metadata: encoded metadata (B, 7) as from `SatMetadata.encode`; None → all fields missing.
            metadata_mask: bool (B, 7), True where a field is present; None → all present (if metadata given).
            metadata_embeds: precomputed `embed_metadata(...)` output (B, time_embed_dim); replaces
                `metadata` / `metadata_mask` (saves recomputing it at every sampling step).
            kwargs: any other `UNet2DConditionModel.forward` argument (e.g. ControlNet residuals).
        """
        if "class_labels" in kwargs:
            raise TypeError("SatUNet takes `metadata` / `metadata_mask`, not `class_labels`")
        return super().forward(
            sample,
            timestep,
            encoder_hidden_states,
            class_labels=(metadata, metadata_mask, metadata_embeds),
            return_dict=return_dict,
            **kwargs,
        )
