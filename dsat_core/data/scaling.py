"""Source values → uint8 / uint16 (`ScalingSpec`), with the (min, max) used recorded per band."""

from __future__ import annotations

import numpy as np

from dsat_core.data.catalog import ScalingSpec

DTYPE_MAX = {"uint8": 255, "uint16": 65535}


def scene_range(data: np.ndarray, valid: np.ndarray, spec: ScalingSpec) -> tuple[np.ndarray, np.ndarray]:
    """Per-band (low, high) source values mapped to 0 and the dtype maximum.

    `data` is (band, y, x) float, `valid` (y, x) bool. 'fixed' uses `spec.range` for every band;
    'percentile' takes `spec.percentiles` of the valid pixels of each band (a band with no spread gets
    high = low + 1, and a scene with no valid pixel falls back to `spec.range`).
    """
    bands = data.shape[0]
    if spec.mode == "fixed" or not valid.any():
        return np.full(bands, spec.range[0], dtype=np.float64), np.full(
            bands, spec.range[1], dtype=np.float64
        )
    values = data[:, valid].astype(np.float64)
    low, high = np.percentile(values, spec.percentiles, axis=1)
    high = np.where(high > low, high, low + 1.0)
    return low, high


def scale(data: np.ndarray, valid: np.ndarray, low: np.ndarray, high: np.ndarray, dtype: str) -> np.ndarray:
    """Linear map of (band, y, x) `data` from [low, high] to [0, dtype max], clipped; invalid pixels are 0."""
    top = DTYPE_MAX[dtype]
    lo = low[:, None, None]
    span = (high - low)[:, None, None]
    with np.errstate(invalid="ignore"):
        out = np.clip((data - lo) / span, 0.0, 1.0) * top
    out = np.where(valid[None] & np.isfinite(out), np.rint(out), 0.0)
    return out.astype(dtype)
