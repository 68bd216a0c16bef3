"""LPIPS (Zhang et al. 2018) from LOCAL weights only: the `lpips` package is not used, nothing is downloaded.

`load_lpips(path)` accepts:
- a TorchScript file (`*.pt`): a module `(x, y) -> distances` taking two (N, 3, H, W) batches in [-1, 1];
- a safetensors file (`*.safetensors`) holding the LPIPS network weights, AlexNet (default LPIPS) or VGG16.
  Key layouts understood: the `lpips` package's own `state_dict()` (`net.slice{k}.{i}.weight`,
  `lin{k}.model.1.weight`) or torchvision-style `features.{i}.weight` + `lin{k}.weight`. Export once
  where `lpips` is available:
  `safetensors.torch.save_file(lpips.LPIPS(net="alex").state_dict(), "lpips_alex.safetensors")`;
- a folder holding `lpips_alex.safetensors`, `lpips_vgg.safetensors` or `lpips.pt`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

# (layer spec, indices of the ReLUs whose outputs are compared) — torchvision `features` layouts.
_ALEX: list[tuple[Any, ...]] = [
    ("conv", 3, 64, 11, 4, 2), ("relu",), ("pool",), ("conv", 64, 192, 5, 1, 2), ("relu",), ("pool",),
    ("conv", 192, 384, 3, 1, 1), ("relu",), ("conv", 384, 256, 3, 1, 1), ("relu",),
    ("conv", 256, 256, 3, 1, 1), ("relu",),
]  # fmt: skip
_ALEX_TAPS = (1, 4, 7, 9, 11)
_VGG_CFG: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", *[512] * 3]
_VGG_TAPS = (3, 8, 15, 22, 29)
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
WEIGHT_FILES = ("lpips_alex.safetensors", "lpips_vgg.safetensors", "lpips.pt")


class LPIPSUnavailable(FileNotFoundError):
    """Raised when LPIPS is requested but no local weight file is available."""


def _vgg_layers() -> list[tuple[Any, ...]]:
    layers: list[tuple] = []
    in_ch = 3
    for v in _VGG_CFG:
        if v == "M":
            layers.append(("pool",))
        else:
            layers += [("conv", in_ch, v, 3, 1, 1), ("relu",)]
            in_ch = int(v)
    return layers


class LPIPS(nn.Module):
    """LPIPS: unit-normalised deep features, squared difference, learned 1x1 weights, spatial mean."""

    shift: torch.Tensor
    scale: torch.Tensor

    def __init__(self, net: str = "alex") -> None:
        super().__init__()
        if net not in ("alex", "vgg"):
            raise ValueError(f"LPIPS net must be 'alex' or 'vgg', got {net!r}")
        self.net_type = net
        spec, self.taps = (_ALEX, _ALEX_TAPS) if net == "alex" else (_vgg_layers(), _VGG_TAPS)
        layers: list[nn.Module] = []
        conv_out: dict[int, int] = {}  # layer index → output channels of the convolutions
        for s in spec:
            if s[0] == "conv":
                _, cin, cout, k, stride, pad = s
                conv_out[len(layers)] = cout
                layers.append(nn.Conv2d(cin, cout, k, stride=stride, padding=pad))
            elif s[0] == "relu":
                layers.append(nn.ReLU(inplace=False))
            else:
                layers.append(nn.MaxPool2d(3, 2) if net == "alex" else nn.MaxPool2d(2, 2))
        self.features = nn.Sequential(*layers)
        tap_channels = [conv_out[t - 1] for t in self.taps]
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in tap_channels)
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:  # the feature stack ends at the last tap
                out.append(x)
        return out

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Distances (N,) between two (N, 3, H, W) batches in [-1, 1]."""
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(
                f"LPIPS expects two (N, 3, H, W) batches of equal shape, got {x.shape}, {y.shape}"
            )
        fx = self._taps((x.float() - self.shift) / self.scale)
        fy = self._taps((y.float() - self.shift) / self.scale)
        total = torch.zeros(x.shape[0], device=x.device)
        for lin, a, b in zip(self.lins, fx, fy, strict=True):
            a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((a - b).pow(2)).mean(dim=(1, 2, 3))
        return total

    def load_lpips_state_dict(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Load weights in either the `lpips` package layout or torchvision `features.*` + `lin*.weight`."""
        mapped: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            if key.startswith("scaling_layer."):
                continue
            key = re.sub(r"^net\.slice\d+\.(\d+)\.", r"features.\1.", key)
            key = re.sub(r"^lin(\d+)\.model\.1\.weight$", r"lins.\1.weight", key)
            key = re.sub(r"^lin(\d+)\.weight$", r"lins.\1.weight", key)
            mapped[key] = value
        missing, unexpected = self.load_state_dict(mapped, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{source}: not LPIPS-{self.net_type} weights (missing {missing}, unexpected {unexpected})"
            )


class _ScriptedLPIPS(nn.Module):
    def __init__(self, module: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.module = module

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.module(x, y).reshape(x.shape[0])


def load_lpips(path: str | Path) -> nn.Module:
    """Load LPIPS from a local TorchScript file, safetensors file or folder (see module docstring)."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / name for name in WEIGHT_FILES if (path / name).is_file()]
        if not candidates:
            raise LPIPSUnavailable(f"{path}: no LPIPS weights; expected one of {', '.join(WEIGHT_FILES)}")
        path = candidates[0]
    if not path.is_file():
        raise LPIPSUnavailable(
            f"{path}: LPIPS weight file not found (need a local lpips_alex.safetensors, "
            "lpips_vgg.safetensors or TorchScript lpips.pt; nothing is downloaded)"
        )
    if path.suffix == ".safetensors":
        state = load_file(str(path))
        first = state.get("features.0.weight", state.get("net.slice1.0.weight"))
        if first is None:
            raise ValueError(f"{path}: no first conv weight (features.0.weight / net.slice1.0.weight)")
        model = LPIPS("alex" if first.shape[-1] == 11 else "vgg")
        model.load_lpips_state_dict(state, source=str(path))
        return model
    return _ScriptedLPIPS(torch.jit.load(str(path), map_location="cpu").eval())
