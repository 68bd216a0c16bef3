"""The README's picture of `dsat apply sr`: the input window beside the SR output of an apply folder.

The input is read again through the apply job's own reader (`dsat_core.apply.source.open_place`) on the
output's grid at the input GSD, so it is exactly what the model was given (the product's scaling, its RGB
bands); it is shown nearest-upsampled by the factor, the SR mosaic beside it at the same size.

    python bench/apply_figure.py applied/sr --out bench/figures/apply-sr.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def first_item(folder: Path) -> Path:
    """The first item JSON (``<folder>/<id>/<id>.json``) of an apply output folder."""
    items = sorted(p for p in folder.glob("*/*.json") if p.stem == p.parent.name)
    if not items:
        raise SystemExit(f"{folder}: no applied item (<id>/<id>.json); run `dsat apply` first")
    return items[0]


def input_rgb(item: dict, out_crs, out_transform, shape: tuple[int, int], factor: int) -> np.ndarray:  # noqa: ANN001
    """uint8 (3, h, w) RGB of the input the model read, on the output grid at the input GSD."""
    from dsat_core.apply.source import open_place
    from dsat_core.data.catalog import load_catalog
    from dsat_core.data.grid import TargetGrid
    from dsat_core.data.stac import load_static_catalog
    from dsat_core.imaging.rgb import rgb_band_indices

    apply = item["properties"]["dsat:apply"]
    source = apply["inputs"][0]
    config = load_catalog(apply["catalog"]).with_overrides(target_gsd=apply["input_gsd"])
    if not config.static_catalog:
        raise SystemExit(f"catalog {config.name!r} has no static_catalog to find {source['id']} in")
    [stac_item] = [i for i in load_static_catalog(config.static_catalog) if i["id"] == source["id"]]
    height, width = shape[0] // factor, shape[1] // factor
    grid = TargetGrid(out_crs, out_transform * out_transform.scale(factor), width, height, apply["input_gsd"])
    bbox = tuple(item["bbox"])
    with open_place(stac_item, config, source["product"], bbox, grid=grid) as place:
        from rasterio.windows import Window

        frame, _ = place.read(Window(0, 0, width, height))
        rgb = frame[rgb_band_indices(place.bands, frame.shape[0])]
    return np.clip(np.rint((rgb + 1.0) / 2.0 * 255.0), 0, 255).astype(np.uint8)


def side_by_side(item_path: Path, out: Path, zoom: int) -> Path:
    """Input (nearest-upsampled) | SR output, each ``zoom`` screen px per output px, as a PNG."""
    import rasterio
    from PIL import Image

    item = json.loads(item_path.read_text())
    factor = int(item["properties"]["dsat:apply"]["tiling"]["factor"])
    with rasterio.open(item_path.parent / item["assets"]["image"]["href"]) as src:
        output, crs, transform = src.read(), src.crs, src.transform
    low = input_rgb(item, crs, transform, output.shape[1:], factor)
    low = np.repeat(np.repeat(low, factor, axis=1), factor, axis=2)[:, : output.shape[1], : output.shape[2]]
    gap = np.full((3, output.shape[1], 4), 255, np.uint8)
    panel = np.concatenate([low, gap, output], axis=2).transpose(1, 2, 0)
    image = Image.fromarray(panel)
    image = image.resize((image.width * zoom, image.height * zoom), Image.Resampling.NEAREST)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, optimize=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a `dsat apply sr` output folder")
    parser.add_argument("--out", type=Path, default=Path("bench/figures/apply-sr.png"))
    parser.add_argument("--zoom", type=int, default=2, help="screen px per output px")
    args = parser.parse_args()
    path = side_by_side(first_item(args.folder), args.out, args.zoom)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KB): input (left, nearest) | SR output (right)")


if __name__ == "__main__":
    main()
