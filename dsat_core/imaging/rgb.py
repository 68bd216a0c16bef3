"""RGB views of multispectral stacks and image grids (what every preview, metric and report shows)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import overload

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

# Band names (case-insensitive) recognised for each display channel: STAC `common_name`s (what the store's
# `band` coordinate holds) and Sentinel-2 band ids. Landsat band numbers are ambiguous across missions
# (B3 is red on Landsat 7, green on Landsat 8) and are deliberately not matched: use common names.
RGB_ALIASES: dict[str, tuple[str, ...]] = {
    "red": ("red", "r", "b04"),
    "green": ("green", "g", "b03"),
    "blue": ("blue", "b", "b02"),
}


def rgb_band_indices(bands: Sequence[str] | None, num_channels: int) -> list[int]:
    """Indices of the channels used as R, G, B.

    Rule: if `bands` names a red, a green and a blue band (see `RGB_ALIASES`), those; otherwise the first
    three bands in order; a single band is repeated three times. Two bands without RGB names is an error.
    """
    if bands is not None:
        if len(bands) != num_channels:
            raise ValueError(f"{len(bands)} band names {list(bands)} for images with {num_channels} channels")
        lowered = [b.lower() for b in bands]
        found: list[int | None] = []
        for colour in ("red", "green", "blue"):
            idx = next((i for i, b in enumerate(lowered) if b in RGB_ALIASES[colour]), None)
            found.append(idx)
        picked = [i for i in found if i is not None]
        if len(picked) == 3:
            return picked
    if num_channels == 1:
        return [0, 0, 0]
    if num_channels >= 3:
        return [0, 1, 2]
    raise ValueError(f"cannot make RGB from {num_channels} channels (bands={bands}): need 1 or >= 3 channels")


@overload
def to_rgb(images: torch.Tensor, bands: Sequence[str] | None = None) -> torch.Tensor: ...
@overload
def to_rgb(images: np.ndarray, bands: Sequence[str] | None = None) -> np.ndarray: ...
def to_rgb(
    images: np.ndarray | torch.Tensor, bands: Sequence[str] | None = None
) -> np.ndarray | torch.Tensor:
    """(N, C, H, W) or (C, H, W) -> same with 3 channels (R, G, B), by the rule of `rgb_band_indices`."""
    if images.ndim not in (3, 4):
        raise ValueError(f"expected (N, C, H, W) or (C, H, W) images, got shape {tuple(images.shape)}")
    axis = images.ndim - 3
    idx = rgb_band_indices(bands, images.shape[axis])
    if isinstance(images, torch.Tensor):
        return images.index_select(axis, torch.tensor(idx, device=images.device))
    return np.take(images, idx, axis=axis)


def rgb_preview(
    image: torch.Tensor, bands: Sequence[str] | None = None, size: Sequence[int] | None = None
) -> torch.Tensor:
    """(C, H, W) → (3, H', W') float for display: `to_rgb`, resized (bilinear, antialiased) to ``size``.

    Band names that do not match the channels are ignored; two channels (no RGB rule) show the first in grey.
    """
    names = list(bands) if bands is not None and len(bands) == image.shape[0] else None
    try:
        rgb = to_rgb(image, names)
    except ValueError:
        rgb = image[:1].repeat(3, 1, 1)
    rgb = torch.as_tensor(rgb).float()
    if size is not None and tuple(rgb.shape[-2:]) != tuple(size):
        rgb = F.interpolate(
            rgb[None], size=tuple(size), mode="bilinear", antialias=True, align_corners=False
        )[0]
    return rgb


#: height (px) of the text line `image_grid` puts above each row when given row labels
LABEL_HEIGHT = 14


def image_grid(
    images: np.ndarray | list[np.ndarray],
    columns: int | None = None,
    pad: int = 2,
    row_labels: Sequence[str] | None = None,
) -> Image.Image:
    """(N, H, W, C) floats in [0, 1] or uint8 → one RGB grid image (row-major, white padding); with
    ``row_labels``, one line of text above each row (e.g. the scene the row shows)."""
    arr = np.stack([np.asarray(i) for i in images]) if isinstance(images, list) else np.asarray(images)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8)
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    arr = arr[..., :3]
    n, h, w, _ = arr.shape
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / columns))
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"image_grid: {len(row_labels)} row labels for {rows} rows")
    label = LABEL_HEIGHT if row_labels is not None else 0
    step = h + pad + label
    grid = np.full((rows * step + pad, columns * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for k in range(n):
        r, c = divmod(k, columns)
        top, left = pad + r * step + label, pad + c * (w + pad)
        grid[top : top + h, left : left + w] = arr[k]
    image = Image.fromarray(grid)
    if row_labels is not None:
        draw, font = ImageDraw.Draw(image), ImageFont.load_default()
        for r, text in enumerate(row_labels):
            draw.text((pad, pad + r * step), text, fill=(0, 0, 0), font=font)
    return image


__all__ = ["LABEL_HEIGHT", "RGB_ALIASES", "image_grid", "rgb_band_indices", "rgb_preview", "to_rgb"]
