"""The scratch Zarr of a run: every finished tile's output, so a killed run restarts where it stopped.

Layout (one group per run folder, one chunk per tile so ranks / workers write disjoint chunks):
``image`` float32 (n, 3, s, s) in [0, 1]; ``valid`` bool (n, s, s) the output pixels with input data;
``keep`` bool (n, s, s) pixels to return exactly as ``known`` uint8 (n, 3, s, s) (a fill task's clear
pixels); ``done`` bool (n,) set after a tile's arrays are written, so a tile killed half-way is redone.
The group's ``fingerprint`` attribute (model, inputs, seed, steps, tiling) must match to resume: a scratch
left by a different run is an error, never silently mixed in.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr


class ScratchMismatch(ValueError):
    """The scratch folder holds tiles of another run (different model, inputs or settings)."""


class ScratchTiles:
    """Finished tiles of one product/date of a run (see the module docstring)."""

    def __init__(self, path: str | Path, n_tiles: int, side: int, fingerprint: Mapping[str, Any]) -> None:
        self.path = Path(path)
        self.n_tiles, self.side = n_tiles, side
        wanted = json.loads(json.dumps(dict(fingerprint), sort_keys=True, default=str))
        if (self.path / "zarr.json").is_file():
            group = zarr.open_group(str(self.path), mode="r+")
            found = group.attrs.get("fingerprint")
            if found != wanted:
                raise ScratchMismatch(
                    f"{self.path}: scratch tiles of another run (fingerprint {found} != {wanted}); "
                    "remove it or use another output folder"
                )
            self.group = group
            return
        group = zarr.open_group(str(self.path), mode="w")
        group.attrs["fingerprint"] = wanted
        s = side
        group.create_array("image", shape=(n_tiles, 3, s, s), chunks=(1, 3, s, s), dtype="float32")
        group.create_array("known", shape=(n_tiles, 3, s, s), chunks=(1, 3, s, s), dtype="uint8")
        for name in ("valid", "keep"):
            group.create_array(name, shape=(n_tiles, s, s), chunks=(1, s, s), dtype="bool")
        group.create_array("done", shape=(n_tiles,), chunks=(1,), dtype="bool", fill_value=False)
        self.group = group

    def done(self) -> np.ndarray:
        """bool (n,): which tiles are finished."""
        return np.asarray(self.group["done"][:])

    def write(
        self, index: int, image: np.ndarray, valid: np.ndarray, keep: np.ndarray, known: np.ndarray
    ) -> None:
        """Tile ``index``'s output, then its ``done`` flag (last, so a kill in between redoes the tile)."""
        self.group["image"][index] = image.astype(np.float32, copy=False)
        self.group["valid"][index] = valid
        self.group["keep"][index] = keep
        self.group["known"][index] = known
        self.group["done"][index] = True

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(image, valid, keep, known) of a finished tile."""
        g = self.group
        return g["image"][index], g["valid"][index], g["keep"][index], g["known"][index]

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


__all__ = ["ScratchMismatch", "ScratchTiles"]
