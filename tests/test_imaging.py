"""dsat_core.imaging: the low-level image helpers below data, training, pipelines and evaluation."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import dsat_core.imaging as imaging
from dsat_core.imaging import image_grid, rgb_preview
from dsat_core.imaging.rgb import LABEL_HEIGHT


def _modules_after(statement: str) -> set[str]:
    code = (
        f"import json, sys\n{statement}\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(json.loads(out.splitlines()[-1]))


def test_only_the_geotiff_part_loads_rasterio_and_pyproj() -> None:
    light = _modules_after(
        "from dsat_core.imaging import to_rgb, image_grid, rgb_preview, bicubic_upsample, classical_inpaint"
    )
    assert "torch" in light and not light & {"rasterio", "pyproj"}
    assert {"rasterio", "pyproj"} <= _modules_after("from dsat_core.imaging import write_cog")


def test_every_exported_name_resolves() -> None:
    for name in imaging.__all__:
        value = getattr(imaging, name)
        assert getattr(value, "__name__", name) == name or not callable(value), name
    assert set(imaging.__all__) <= set(dir(imaging))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        imaging.nope  # noqa: B018


def test_rgb_preview_picks_rgb_bands_and_resizes() -> None:
    image = torch.arange(4.0)[:, None, None].expand(4, 8, 8).contiguous() / 4  # channel c holds c / 4
    out = rgb_preview(image, ["nir", "blue", "green", "red"], (16, 16))
    assert out.shape == (3, 16, 16)
    torch.testing.assert_close(out[:, 5, 7], torch.tensor([0.75, 0.5, 0.25]))
    two = rgb_preview(image[:2], ["vv", "vh"])  # no RGB rule for two bands: the first one in grey
    assert two.shape == (3, 8, 8) and torch.equal(two, image[:1].expand(3, -1, -1))
    assert torch.equal(rgb_preview(image, ["a", "b"]), image[:3])  # names that do not fit are ignored


def test_image_grid_layout() -> None:
    tiles = np.zeros((5, 4, 6, 3), np.float32)
    tiles[3] = 1.0
    grid = np.asarray(image_grid(tiles, columns=2, pad=1))
    assert grid.shape == (1 + 3 * 5, 1 + 2 * 7, 3)
    assert (grid[1 + 5 : 1 + 5 + 4, 1 + 7 : 1 + 7 + 6] == 255).all()  # tile 3: row 1, column 1
    assert (grid[1:5, 1:7] == 0).all() and (grid[0] == 255).all()


def test_image_grid_row_labels() -> None:
    tiles = np.full((4, 8, 8, 3), 255, np.uint8)
    grid = np.asarray(image_grid(tiles, columns=2, pad=1, row_labels=["water", "snow"]))
    assert grid.shape == (1 + 2 * (8 + 1 + LABEL_HEIGHT), 1 + 2 * 9, 3)
    strips = [grid[1 + r * (9 + LABEL_HEIGHT) :][:LABEL_HEIGHT] for r in range(2)]
    assert all((strip < 128).any() for strip in strips)  # text drawn above each row; the tiles stay white
    assert (grid[1 + LABEL_HEIGHT : 9 + LABEL_HEIGHT] == 255).all()
    with pytest.raises(ValueError, match="3 row labels for 2 rows"):
        image_grid(tiles, columns=2, row_labels=["a", "b", "c"])
