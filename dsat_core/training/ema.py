"""Exponential moving average of model parameters, saved as safetensors (no pickle)."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers.models.modeling_utils import ModelMixin
from safetensors.torch import load_file, save_file
from torch import nn


class EMA:
    """EMA of a model's trainable parameters (fp32 shadow copies, same device as the model).

    decay_t = min(decay, (1 + t) / (10 + t)) with warmup (as diffusers' `EMAModel`), else `decay`.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, use_warmup: bool = True):
        self.decay = decay
        self.use_warmup = use_warmup
        self.optimization_step = 0
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad
        }

    def current_decay(self) -> float:
        step = self.optimization_step
        if not self.use_warmup:
            return self.decay
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def step(self, model: nn.Module) -> None:
        """shadow ← decay · shadow + (1 − decay) · param, after one optimizer step."""
        decay = self.current_decay()
        self.optimization_step += 1
        for name, param in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(param.detach().float(), 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for name, param in model.named_parameters():
            if name in self.shadow:
                param.copy_(self.shadow[name].to(param.dtype))

    @contextmanager
    def swapped_in(self, model: nn.Module):
        """Temporarily load the EMA weights into `model` (e.g. for validation samples)."""
        backup = {name: p.detach().clone() for name, p in model.named_parameters() if name in self.shadow}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if name in backup:
                        param.copy_(backup[name])

    def to(self, device: torch.device | str) -> EMA:
        self.shadow = {k: v.to(device) for k, v in self.shadow.items()}
        return self

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> None:
        """One safetensors file: the shadow tensors + decay / step in its metadata."""
        meta = {
            "decay": repr(self.decay),
            "use_warmup": json.dumps(self.use_warmup),
            "optimization_step": str(self.optimization_step),
        }
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in self.shadow.items()}, str(path), metadata=meta
        )

    def load(self, path: str | Path) -> None:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        tensors = load_file(str(path))
        if set(tensors) != set(self.shadow):
            missing = sorted(set(self.shadow) - set(tensors))[:5]
            extra = sorted(set(tensors) - set(self.shadow))[:5]
            raise ValueError(
                f"EMA file {path} does not match the model: missing {missing}, unexpected {extra}"
            )
        device = next(iter(self.shadow.values())).device if self.shadow else "cpu"
        self.shadow = {k: v.to(device=device, dtype=torch.float32) for k, v in tensors.items()}
        self.decay = float(meta.get("decay", self.decay))
        self.use_warmup = json.loads(meta.get("use_warmup", json.dumps(self.use_warmup)))
        self.optimization_step = int(meta.get("optimization_step", 0))

    def save_pretrained(self, model: ModelMixin, save_directory: str | Path) -> None:
        """Write a diffusers folder of `model` holding the EMA weights (loadable by `from_pretrained`)."""
        with self.swapped_in(model):
            model.save_pretrained(str(save_directory), safe_serialization=True)
