"""Per-tile quality checks: nodata fraction, cloud fraction, constant tiles."""

from __future__ import annotations

import numpy as np

from dsat_core.data.catalog import QualitySpec


def nodata_fraction(valid: np.ndarray) -> float:
    return float(1.0 - valid.mean()) if valid.size else 1.0


def cloud_fraction(cloud: np.ndarray, valid: np.ndarray) -> float:
    """Fraction of the valid pixels that are cloud (0 when none is valid)."""
    n = int(valid.sum())
    return float((cloud & valid).sum() / n) if n else 0.0


def tile_std(scaled: np.ndarray, valid: np.ndarray) -> float:
    """Largest per-band standard deviation over valid pixels, in output units."""
    if valid.all():  # most tiles: one call over every band
        return float(scaled.reshape(scaled.shape[0], -1).astype(np.float64).std(axis=1).max())
    if not valid.any():
        return 0.0
    return float(max(scaled[b][valid].astype(np.float64).std() for b in range(scaled.shape[0])))


def tile_problem(
    valid: np.ndarray, scaled: np.ndarray, cloud: float | None, quality: QualitySpec
) -> str | None:
    """The reason a tile is rejected, or None when it passes (checked in this order)."""
    nodata = nodata_fraction(valid)
    if nodata > quality.max_nodata_fraction:
        return f"nodata fraction {nodata:.2f} > {quality.max_nodata_fraction:.2f}"
    if cloud is not None and cloud > quality.max_cloud_fraction:
        return f"cloud fraction {cloud:.2f} > {quality.max_cloud_fraction:.2f}"
    std = tile_std(scaled, valid)
    if std < quality.min_std:
        return f"constant tile: std {std:.2f} < {quality.min_std:.2f}"
    return None
