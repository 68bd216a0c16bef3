"""Geometric augmentation of training tiles: the 8 symmetries of the square (dihedral group D4).

Satellite tiles have no "up": a tile turned by 90° or mirrored is as plausible as the tile itself, so
small stores (a scene of a few dozen tiles) give the model eight times as many distinct views. It does
change the direction of shadows, which the sun's position (lat/lon, date) fixes on real images, so it is
an option (`TrainConfig.random_flip_rotate`), off by default.
"""

from __future__ import annotations

import torch

#: the symmetries as (quarter turns, mirrored): index k is ``(k % 4, k >= 4)``
N_SYMMETRIES = 8


def dihedral(image: torch.Tensor, k: int) -> torch.Tensor:
    """Symmetry ``k`` (0–7) of the last two dims: ``k % 4`` quarter turns, then mirrored left-right if
    ``k >= 4``; k = 0 is the identity."""
    out = torch.rot90(image, k % 4, dims=(-2, -1))
    return out.flip(-1) if k >= 4 else out


def random_dihedral(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each sample of (N, C, H, W) square images under its own symmetry drawn from ``generator``."""
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"random_dihedral: square images only, got {tuple(images.shape[-2:])}")
    picks = torch.randint(0, N_SYMMETRIES, (len(images),), generator=generator).tolist()
    return torch.stack([dihedral(image, k) for image, k in zip(images, picks, strict=True)])


__all__ = ["N_SYMMETRIES", "dihedral", "random_dihedral"]
