"""The tiling plan's feather weights: every output pixel covered, tile edges trimmed only where a neighbour
covers them, area edges at full weight."""

from __future__ import annotations

import numpy as np
import pytest

from dsat_core.apply.tiling import TRIM, TilePlan


def _summed(plan: TilePlan) -> np.ndarray:
    total = np.zeros(plan.out_shape)
    for tile in plan.tiles:
        y, x = plan.out_origin(tile)
        total[y : y + plan.out_tile, x : x + plan.out_tile] += plan.weights(tile)
    return total


PLANS = [(45, 42, 8, 2, 4), (45, 42, 8, 4, 4), (30, 23, 16, 4, 1), (16, 16, 16, 0, 2)]


@pytest.mark.parametrize(("height", "width", "tile", "overlap", "factor"), PLANS)
def test_weights_cover_every_pixel_and_keep_the_area_edges(
    height: int, width: int, tile: int, overlap: int, factor: int
) -> None:
    plan = TilePlan(height, width, tile, overlap, factor)
    assert _summed(plan).min() > 1e-3  # no output pixel is left without a tile's weight
    first, last = plan.tiles[0], plan.tiles[-1]
    assert plan.weights(first)[0, 0] == 1.0 and plan.weights(last)[-1, -1] == 1.0  # the area's corners


def test_inner_tile_edges_are_trimmed_then_ramp_up() -> None:
    plan = TilePlan(24, 24, 8, 4, 2)  # r = 8 output px of overlap, the outer 2 trimmed
    inner = next(t for t in plan.tiles if t.y > 0 and t.x > 0 and t.y + 8 < 24 and t.x + 8 < 24)
    w = plan.weights(inner)[plan.out_tile // 2]  # the middle row: the ramp along x
    trim = int(TRIM * 8)
    assert np.all(w[:trim] == 0) and np.all(w[-trim:] == 0)
    assert np.all(np.diff(w[trim:8]) > 0) and np.all(w[8:-8] == 1.0)
    assert TilePlan(24, 24, 8, 0, 2).weights(inner).min() == 1.0  # no overlap: tiles meet edge to edge
