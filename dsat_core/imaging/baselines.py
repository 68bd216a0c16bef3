"""Classical baselines: what a learned model must beat on each conditional task.

- super-resolution: `bicubic_upsample`;
- temporal prediction: `nearest_date_frame` (the conditioning frame closest in time);
- inpainting: `classical_inpaint` (harmonic fill: the masked pixels solve Laplace's equation with the known
  pixels as boundary values, i.e. the smoothest surface that matches the surroundings).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime
from typing import overload

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch
import torch.nn.functional as F


def _as_size(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


@overload
def bicubic_upsample(lowres: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor: ...
@overload
def bicubic_upsample(lowres: np.ndarray, size: int | Sequence[int]) -> np.ndarray: ...
def bicubic_upsample(
    lowres: np.ndarray | torch.Tensor, size: int | Sequence[int]
) -> np.ndarray | torch.Tensor:
    """Bicubic resize of (N, C, H, W) or (C, H, W) to `size` (int or (H, W)); keeps type and dtype.

    Integer inputs are rounded and clipped to their dtype range (bicubic overshoots near edges).
    """
    is_numpy = isinstance(lowres, np.ndarray)
    x = torch.from_numpy(np.ascontiguousarray(lowres)) if isinstance(lowres, np.ndarray) else lowres
    squeeze = x.ndim == 3
    if squeeze:
        x = x.unsqueeze(0)
    if x.ndim != 4:
        raise ValueError(f"bicubic_upsample expects (N, C, H, W) or (C, H, W), got {tuple(x.shape)}")
    out = F.interpolate(x.double(), size=_as_size(size), mode="bicubic", align_corners=False)
    if not x.is_floating_point():
        info = torch.iinfo(x.dtype)
        out = out.round().clamp(info.min, info.max)
    out = out.to(x.dtype)
    if squeeze:
        out = out.squeeze(0)
    return out.numpy() if is_numpy else out


def _as_datetime(value: date | datetime | str) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day)
    # naive values are taken as UTC; aware ones are converted to UTC
    return value if value.tzinfo is None else value.astimezone(UTC).replace(tzinfo=None)


def nearest_date_index(
    frame_dates: Sequence[date | datetime | str], target_date: date | datetime | str
) -> int:
    """Index of the date closest to `target_date` (ties go to the earlier frame)."""
    if not frame_dates:
        raise ValueError("nearest_date_index: no frame dates given")
    target = _as_datetime(target_date)
    gaps = [
        (abs((_as_datetime(d) - target).total_seconds()), _as_datetime(d), i)
        for i, d in enumerate(frame_dates)
    ]
    return min(gaps)[2]


def nearest_date_frame(
    frames: np.ndarray | torch.Tensor | Sequence,
    frame_dates: Sequence[date | datetime | str],
    target_date: date | datetime | str,
):
    """Temporal baseline: the frame (of a (T, ...) stack or list) whose date is nearest `target_date`."""
    if len(frames) != len(frame_dates):
        raise ValueError(f"{len(frames)} frames but {len(frame_dates)} dates")
    return frames[nearest_date_index(frame_dates, target_date)]


def _harmonic_fill(channel: np.ndarray, missing: np.ndarray) -> np.ndarray:
    """Solve the discrete Laplace equation on `missing` pixels (4-neighbours, Neumann at image edges)."""
    h, w = missing.shape
    unknown = np.flatnonzero(missing)
    index = -np.ones(h * w, dtype=np.int64)
    index[unknown] = np.arange(unknown.size)
    flat = channel.reshape(-1).astype(np.float64)
    ys, xs = np.divmod(unknown, w)
    rows, cols, vals = [], [], []
    degree = np.zeros(unknown.size)
    rhs = np.zeros(unknown.size)
    eq = np.arange(unknown.size)
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        ny, nx = ys + dy, xs + dx
        inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
        degree += inside
        nflat = ny[inside] * w + nx[inside]
        nidx = index[nflat]
        is_unknown = nidx >= 0
        rows.append(eq[inside][is_unknown])
        cols.append(nidx[is_unknown])
        vals.append(-np.ones(int(is_unknown.sum())))
        np.add.at(rhs, eq[inside][~is_unknown], flat[nflat[~is_unknown]])
    rows.append(eq)
    cols.append(eq)
    vals.append(degree)
    a = sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(eq.size,) * 2
    )
    out = flat.copy()
    out[unknown] = spla.spsolve(a.tocsc(), rhs)
    return out.reshape(h, w)


@overload
def classical_inpaint(image: torch.Tensor, mask: np.ndarray | torch.Tensor) -> torch.Tensor: ...
@overload
def classical_inpaint(image: np.ndarray, mask: np.ndarray | torch.Tensor) -> np.ndarray: ...
def classical_inpaint(
    image: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor
) -> np.ndarray | torch.Tensor:
    """Inpainting baseline: harmonic fill of the pixels where `mask` is True.

    image: (C, H, W) or (N, C, H, W); mask: (H, W), (1, H, W), (N, H, W) or (N, 1, H, W), True = missing.
    Known pixels are returned unchanged; type and dtype are kept (integers rounded and clipped).
    """
    is_torch = isinstance(image, torch.Tensor)
    img = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    msk = (mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)).astype(bool)
    batched = img.ndim == 4
    if img.ndim not in (3, 4):
        raise ValueError(f"classical_inpaint expects (C, H, W) or (N, C, H, W), got {img.shape}")
    imgs = img if batched else img[None]
    n, c, h, w = imgs.shape
    if msk.ndim == 4 and msk.shape[1] == 1:
        msk = msk[:, 0]
    if msk.ndim == 3 and not batched and msk.shape[0] == 1:
        msk = msk[0]
    if msk.ndim == 2:
        msk = np.broadcast_to(msk, (n, h, w))
    if msk.shape != (n, h, w):
        raise ValueError(f"mask shape {mask.shape} does not match image shape {img.shape}")
    out = imgs.astype(np.float64)
    for i in range(n):
        if msk[i].all():
            raise ValueError(f"classical_inpaint: image {i} is entirely masked, nothing to fill from")
        if not msk[i].any():
            continue
        for ch in range(c):
            out[i, ch] = _harmonic_fill(out[i, ch], msk[i])
    if np.issubdtype(img.dtype, np.integer):
        info = np.iinfo(img.dtype)
        out = np.clip(np.round(out), info.min, info.max)
    out = out.astype(img.dtype)
    if not batched:
        out = out[0]
    return torch.from_numpy(out).to(image.device) if is_torch else out


__all__ = ["bicubic_upsample", "classical_inpaint", "nearest_date_frame", "nearest_date_index"]
