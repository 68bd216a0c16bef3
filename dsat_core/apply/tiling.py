"""The tiling plan of an area: overlapping tiles that cover the whole input grid, their feather weights,
and a seed per tile taken from its position.

Tiles are ``tile`` input pixels a side, placed with stride ``tile - overlap`` from the top-left; the last
row / column is moved in so that it ends on the grid's edge (every pixel is covered, every tile is full
size). The model turns a tile into ``tile * factor`` output pixels a side.

Blending (pixel space): each tile's output is weighted by a separable ramp over the overlap on each side
that has a neighbouring tile: 0 over the outer t = ``TRIM`` · r pixels (r = ``overlap · factor``), where a
tile's output is worst (its convolutions, its bicubic start and its back-projection see no context past the
edge), then a cosine ``0.5 - 0.5·cos(π (i - t + ½) / (r - t))`` up to 1; sides on the area's edge keep
weight 1. The weighted tiles are summed and divided by the summed weights. Without overlap the weights are
all 1 and tiles meet edge to edge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

BLEND = "cosine feathering in pixel space over the tile overlap, its outer quarter trimmed"
#: fraction of the overlap, from a tile's edge, whose output is discarded where a neighbour covers it
TRIM = 0.25


def starts(length: int, tile: int, stride: int) -> list[int]:
    """Offsets of ``tile`` px tiles with ``stride`` covering ``length`` px (the last ends at the edge)."""
    if length < tile:
        raise ValueError(f"the area is {length} px across, smaller than one {tile} px tile")
    out = list(range(0, length - tile + 1, stride))
    if out[-1] + tile < length:
        out.append(length - tile)
    return out


@dataclass(frozen=True)
class Tile:
    """One tile: its index in the plan and its top-left corner on the input grid (row ``y``, column ``x``)."""

    index: int
    y: int
    x: int


@dataclass(frozen=True)
class TilePlan:
    """Tiles of ``tile`` input px with ``overlap`` px over a ``height`` × ``width`` input grid."""

    height: int
    width: int
    tile: int
    overlap: int
    factor: int = 1

    def __post_init__(self) -> None:
        if self.tile < 1 or self.factor < 1:
            raise ValueError(f"tile ({self.tile}) and factor ({self.factor}) must be >= 1")
        if not 0 <= self.overlap < self.tile:
            raise ValueError(f"overlap must be in [0, tile), got {self.overlap} for {self.tile} px tiles")

    @property
    def stride(self) -> int:
        return self.tile - self.overlap

    @cached_property
    def tiles(self) -> list[Tile]:
        """Every tile, row-major."""
        ys = starts(self.height, self.tile, self.stride)
        xs = starts(self.width, self.tile, self.stride)
        return [Tile(i * len(xs) + j, y, x) for i, y in enumerate(ys) for j, x in enumerate(xs)]

    @property
    def out_tile(self) -> int:
        return self.tile * self.factor

    @property
    def out_shape(self) -> tuple[int, int]:
        return self.height * self.factor, self.width * self.factor

    def out_origin(self, tile: Tile) -> tuple[int, int]:
        """Top-left (row, column) of a tile on the output grid."""
        return tile.y * self.factor, tile.x * self.factor

    @cached_property
    def _edge(self) -> np.ndarray:
        """The ramp over the r output pixels of the overlap, from a tile's edge inwards."""
        r = self.overlap * self.factor
        trim = int(TRIM * r)
        ramp = np.zeros(r, dtype=np.float64)
        ramp[trim:] = 0.5 - 0.5 * np.cos(math.pi * (np.arange(r - trim) + 0.5) / (r - trim))
        return ramp

    def _ramp(self, start: int, length: int) -> np.ndarray:
        """One axis of a tile at input offset ``start`` on an axis of ``length`` px: ramps where it has a
        neighbour (not on the area's edge)."""
        ramp = np.ones(self.out_tile, dtype=np.float64)
        edge, r = self._edge, len(self._edge)
        if r and start > 0:
            ramp[:r] = edge
        if r and start + self.tile < length:
            ramp[-r:] = np.minimum(ramp[-r:], edge[::-1])
        return ramp

    def weights(self, tile: Tile) -> np.ndarray:
        """float32 (out_tile, out_tile) feather weights of ``tile``: 0 only where a neighbour covers it."""
        return np.outer(self._ramp(tile.y, self.height), self._ramp(tile.x, self.width)).astype(np.float32)

    def rows_touching(self, y0: int, y1: int) -> list[Tile]:
        """Tiles whose output rows meet [y0, y1)."""
        side = self.out_tile
        return [t for t in self.tiles if t.y * self.factor < y1 and t.y * self.factor + side > y0]

    def to_dict(self) -> dict[str, int | str]:
        """What the run records about its tiling."""
        return {
            "tile_px": self.tile,
            "overlap_px": self.overlap,
            "stride_px": self.stride,
            "output_tile_px": self.out_tile,
            "factor": self.factor,
            "n_tiles": len(self.tiles),
            "blend": BLEND if self.overlap else "none (tiles edge to edge)",
        }


def tile_seed(seed: int, y: int, x: int) -> int:
    """The seed of the tile at input pixel (y, x): the same wherever and in whichever batch it runs."""
    return int(np.random.SeedSequence([int(seed), int(y), int(x)]).generate_state(1, dtype=np.uint32)[0])


__all__ = ["BLEND", "Tile", "TilePlan", "starts", "tile_seed"]
