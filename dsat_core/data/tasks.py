"""The conditional ControlNet tasks of spec §2 (super-resolution, temporal prediction, inpainting): one
`ControlNetTask` class per task, their datasets, and the task card that training leaves beside a pipeline.

A task object (`SuperResolutionTask`, `TemporalTask`, `InpaintingTask`; by name: `get_task`, `TASKS`) owns
everything that differs between tasks: its name; its options (the fields of the dataclass: products and the
data recipe); building its dataset from a `DataSpec` (which tiles); its classical baseline (`baseline`); an
RGB preview of a conditioning sample at the target's size (`cond_preview`); the keyword inputs of a
`SatControlNetPipeline` call (`conditioning`); the pixels it must fill, when the task scores them apart
(`fill_mask`); and its card, ``task.json`` (`to_card` / `from_card`, `write_task_card` / `read_task_card`):
``{"task": <name>, <every field>}``, e.g. ``{"task": "temporal", "product": "rgb", "sequence_length": 3,
"direction": "both"}``. A new task is one new class in `TASKS`.

The datasets read the dataset store through `TileDataset` (lazy, fork-safe zarr access) and yield dicts:

- ``pixel_values`` float32 (3, H, W) in [-1, 1]: the target, as the RGB view the VAE encodes (a product's
  red/green/blue bands, or its first three, or one band repeated; `dsat_core.imaging.to_rgb`);
- ``cond`` float32 (C, T, H, W) in [-1, 1]: the conditioning sequence;
- ``cond_metadata`` float32 (T, 7) / ``cond_metadata_mask`` bool (T, 7): each frame's encoded metadata;
- ``metadata`` float32 (7,) / ``metadata_mask`` bool (7,): the target's; ``caption`` (the target's);
- ``index`` (target row in the store), ``item_id``; for inpainting also ``mask`` float32 (1, H, W), 1 = fill.

Tasks:

``sr`` (`SuperResolutionDataset`) — a low-resolution multispectral frame → the high-resolution RGB tile of the
same place. Tiles of the target and conditioning products are paired by tile identity (item id + window:
the same scene read as two products). The conditioning frame is DEGRADED by a recorded `DegradationRecipe`:
band selection, Gaussian blur (σ in high-res pixels), area-average downsampling by ``factor``, then upsampling
back to the target size (bicubic by default) so it lines up with the target pixel for pixel (T = 1). Its
metadata GSD is the native GSD × factor (the resolution the frame really carries). The recipe is stored in
``dataset.recipe`` (a dict, logged as MLflow params by the trainer).
A degradation mapping may instead name a fixed input recipe (`dsat_core.data.sr_inputs.SRInputRecipe`):
``{"input_recipe": "fmow-sentinel-reference", "cond_resolution": 256}`` gives exactly the input the released
DiffusionSat SR ControlNet was trained on — raw Sentinel-2 values recovered from the store's recorded scaling,
the reference's per-band statistics and uint8 quantisation, 10 bands in its order, resized to
``cond_resolution`` (not to the target size), metadata GSD 10 m — as ``cond = 2·v − 1``; the frame is not
degraded (factor 1, no blur), and the full recipe is recorded under ``recipe["degradation"]["input_recipe"]``.

``temporal`` (`TemporalDataset`) — T tiles of one place at other dates, with their dates → the tile at
a target date. Tiles are grouped by place: same CRS and same tile transform (the same window of the same
pixel grid) across items. For each tile with a date, the frames are the T other-date tiles of its group
nearest in time (``direction``: "both", "forward" — frames before the target, "backward" — frames after);
when fewer than T exist they are repeated (nearest first). Frames are in chronological order. A target
with no other-date tile is skipped.

``inpaint`` (`InpaintingDataset`) — an image with a hole → the full image. The conditioning frame is the
image with the masked pixels set to 0 plus the mask as one extra channel (C = bands + 1, T = 1). Masks are
random boxes, free-form strokes, or both ("mixed"), drawn from a generator seeded by (seed, tile row), so
an index always gives the same mask. (The store keeps no per-pixel cloud masks, so cloud-shaped holes are
not offered.)
"""

from __future__ import annotations

import json
import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import date
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, Self, TypeVar, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from dsat_core.data.dataset import TileDataset, holdout_mask
from dsat_core.data.sr_inputs import (
    SRInputRecipe,
    band_positions,
    check_raw_recoverable,
    get_input_recipe,
    unscale,
)
from dsat_core.data.store import DatasetStore, StoreError
from dsat_core.imaging.baselines import bicubic_upsample, classical_inpaint, nearest_date_index
from dsat_core.imaging.rgb import rgb_band_indices, rgb_preview, to_rgb
from dsat_core.metadata import SatMetadata, effective_gsd
from dsat_core.metadata.bands import BandAlignment, align_bands

Split = Literal["train", "holdout"]
Direction = Literal["both", "forward", "backward"]


# ---------------------------------------------------------------------------------------------- helpers
def _strings(values: Any) -> np.ndarray:
    """Object array of Python str (zarr string columns come back as numpy `StringDType`)."""
    return np.array([str(v) for v in np.asarray(values).tolist()], dtype=object)


def _tile_columns(
    store_uri: str, product: str, storage_options: Mapping[str, Any] | None
) -> dict[str, np.ndarray]:
    """item_id, window, crs, transform of every committed tile of ``product``."""
    store = DatasetStore.open(store_uri, storage_options=storage_options, read_only=True)
    group = store.product_group(product)
    n = store.n_tiles(product)
    return {
        "item_id": _strings(group["item_id"][:n]),
        "window": np.asarray(group["window"][:n]),
        "crs": _strings(group["crs"][:n]),
        "transform": np.asarray(group["transform"][:n]),
    }


def _identity(item_id: str, window: Sequence[int]) -> str:
    return f"{item_id}:{','.join(str(int(v)) for v in window)}"


def _keep_items(
    tiles: TileDataset, item_ids: Sequence[str] | None, exclude_item_ids: Sequence[str] | None
) -> np.ndarray:
    """Positions (into ``tiles``) whose item passes the include / exclude lists."""
    ids = np.array(tiles.item_ids, dtype=object)
    keep = np.ones(len(ids), dtype=bool)
    if item_ids is not None:
        keep &= np.isin(ids, list(item_ids))
    if exclude_item_ids is not None:
        keep &= ~np.isin(ids, list(exclude_item_ids))
    return np.nonzero(keep)[0]


def _encode(meta: SatMetadata) -> tuple[torch.Tensor, torch.Tensor]:
    vector, mask = meta.encode()
    return torch.from_numpy(vector.astype(np.float32)), torch.from_numpy(mask)


def _decode(vector: torch.Tensor, mask: torch.Tensor) -> SatMetadata:
    return SatMetadata.decode(vector.double().cpu().numpy(), mask.cpu().numpy())


def _rgb_view(image: torch.Tensor, bands: Sequence[str]) -> torch.Tensor:
    return image[rgb_band_indices(list(bands), image.shape[0])].contiguous()


def _tile_date(meta: SatMetadata) -> date | None:
    if meta.year is None or meta.month is None or meta.day is None:
        return None
    return date(meta.year, meta.month, meta.day)


def _check_choice(what: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose {', '.join(choices)}")


class TaskDataset(Dataset):
    """Shared plumbing of the task datasets: a transform, the recorded recipe, the conditioning bands."""

    def __init__(self, transform: Callable[[dict[str, Any]], dict[str, Any]] | None) -> None:
        self.transform = transform
        self.recipe: dict[str, Any] = {}

    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def cond_bands(self) -> list[str]:
        """Names of the conditioning channels, in order."""
        return list(self.recipe["cond_bands"])

    @property
    def conditioning_channels(self) -> int:
        return len(self.cond_bands)

    def sample_item_ids(self, i: int) -> list[str]:
        """Item ids of sample ``i``'s target and conditioning tiles, read without pixels."""
        raise NotImplementedError

    def _finish(self, sample: dict[str, Any]) -> dict[str, Any]:
        return self.transform(sample) if self.transform is not None else sample

    def _target(self, tiles: TileDataset, pos: int) -> dict[str, Any]:
        sample = tiles[pos]
        sample["pixel_values"] = _rgb_view(sample["pixel_values"], tiles.bands)
        return sample

    def __repr__(self) -> str:
        return f"{type(self).__name__}(samples={len(self)}, recipe={self.recipe})"


# ---------------------------------------------------------------------------------------------- SR
@dataclass(frozen=True)
class DegradationRecipe:
    """How the SR conditioning frame is made from a high-resolution tile (recorded for MLflow).

    ``bands``: band names of the conditioning product to keep, in this order (None = all);
    ``blur_sigma``: Gaussian σ in high-resolution pixels (0 = no blur); ``factor``: area-average
    downsampling factor; ``upsample``: how the low-resolution frame is brought back to the target size.
    """

    factor: int = 4
    blur_sigma: float = 1.0
    bands: tuple[str, ...] | None = None
    upsample: Literal["bicubic", "bilinear", "nearest"] = "bicubic"

    def __post_init__(self) -> None:
        if self.factor < 1:
            raise ValueError(f"degradation factor must be >= 1, got {self.factor}")
        if self.blur_sigma < 0:
            raise ValueError(f"blur_sigma must be >= 0, got {self.blur_sigma}")
        if self.bands is not None:
            object.__setattr__(self, "bands", tuple(self.bands))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["bands"] = None if self.bands is None else list(self.bands)
        return out

    def band_indices(self, available: Sequence[str]) -> list[int]:
        if self.bands is None:
            return list(range(len(available)))
        missing = [b for b in self.bands if b not in available]
        if missing:
            raise ValueError(f"degradation bands {missing} are not in the product's bands {list(available)}")
        return [list(available).index(b) for b in self.bands]

    def lowres(self, image: torch.Tensor, band_names: Sequence[str] | None = None) -> torch.Tensor:
        """(C, H, W) → selected bands, blurred and area-downsampled to (C', H / factor, W / factor)."""
        if band_names is not None:
            image = image[self.band_indices(band_names)]
        return self.degrade(image[None].float())[0]

    def degrade(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) → blurred and area-downsampled (N, C, H / factor, W / factor), in ``x``'s dtype."""
        if self.blur_sigma > 0:
            x = gaussian_blur(x, self.blur_sigma)
        height, width = x.shape[-2:]
        if height % self.factor or width % self.factor:
            raise ValueError(
                f"tile {height}x{width} is not divisible by the degradation factor {self.factor}"
            )
        return F.avg_pool2d(x, self.factor)

    def back_project(self, images: torch.Tensor, lowres: torch.Tensor, steps: int) -> torch.Tensor:
        """``images`` (N, C, H, W) in [-1, 1] made to agree with their ``lowres`` input (N, C, h, w):
        ``steps`` rounds of iterative back-projection (Irani & Peleg 1991), each adding the bicubic
        upsampling of ``lowres - degrade(x)``. What the image's own low frequencies got wrong is replaced by
        the input's (the "hard constraint" of whole-scene SR models such as sen2sr); its detail is kept."""
        x = images.double()
        low = lowres.to(device=x.device, dtype=x.dtype)
        for _ in range(steps):
            x = (x + bicubic_upsample(low - self.degrade(x), x.shape[-2:])).clamp(-1.0, 1.0)
        return x.to(images.dtype)

    def apply(self, image: torch.Tensor, band_names: Sequence[str] | None = None) -> torch.Tensor:
        """The conditioning frame: `lowres`, upsampled back to the input size and clamped to [-1, 1]."""
        low = self.lowres(image, band_names)[None]
        kwargs = {} if self.upsample == "nearest" else {"align_corners": False}
        up = F.interpolate(low, size=tuple(image.shape[-2:]), mode=self.upsample, **kwargs)
        return up[0].clamp(-1.0, 1.0)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, H, W), radius ceil(3σ), reflect padding."""
    radius = max(1, math.ceil(3 * sigma))
    grid = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-(grid**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = x.shape[1]
    pad_h = min(radius, x.shape[-2] - 1)
    pad_w = min(radius, x.shape[-1] - 1)
    k = kernel[radius - pad_w : radius + pad_w + 1]
    x = F.conv2d(
        F.pad(x, (pad_w, pad_w, 0, 0), mode="reflect"),
        k.view(1, 1, 1, -1).repeat(channels, 1, 1, 1),
        groups=channels,
    )
    k = kernel[radius - pad_h : radius + pad_h + 1]
    return F.conv2d(
        F.pad(x, (0, 0, pad_h, pad_h), mode="reflect"),
        k.view(1, 1, -1, 1).repeat(channels, 1, 1, 1),
        groups=channels,
    )


def split_sr_recipe(
    recipe: DegradationRecipe | Mapping[str, Any] | None,
) -> tuple[DegradationRecipe, SRInputRecipe | None]:
    """The degradation and the optional fixed input recipe that an SR recipe (or mapping) describes.

    Mapping keys ``input_recipe`` (a registered name, an `SRInputRecipe` or its recorded `to_dict`) and
    ``cond_resolution`` (overrides the input recipe's) select a fixed input; the other keys are
    `DegradationRecipe` fields, which then default to (and must stay) ``factor=1, blur_sigma=0``.
    """
    if recipe is None:
        return DegradationRecipe(), None
    if isinstance(recipe, DegradationRecipe):
        return recipe, None
    values = dict(recipe)
    selected = values.pop("input_recipe", None)
    cond_resolution = values.pop("cond_resolution", None)
    if selected is None:
        if cond_resolution is not None:
            raise ValueError("cond_resolution needs an input_recipe (a degraded frame has the target's size)")
        return DegradationRecipe(**values), None
    inputs = get_input_recipe(selected)
    if cond_resolution is not None:
        inputs = replace(inputs, cond_resolution=int(cond_resolution))
    degradation = DegradationRecipe(**{"factor": 1, "blur_sigma": 0.0, **values})
    if degradation.factor != 1 or degradation.blur_sigma != 0:
        raise ValueError(
            f"input recipe {inputs.name!r} is the model's input as is: use factor 1 and blur_sigma 0, "
            f"got factor {degradation.factor}, blur_sigma {degradation.blur_sigma}"
        )
    return degradation, inputs


def _sr_record(degradation: DegradationRecipe, inputs: SRInputRecipe | None) -> dict[str, Any]:
    out = degradation.to_dict()
    if inputs is not None:
        out["input_recipe"] = inputs.to_dict()
    return out


def sr_recipe_record(recipe: DegradationRecipe | Mapping[str, Any] | None) -> dict[str, Any]:
    """The whole recipe that an SR recipe (or mapping) stands for, in the form `split_sr_recipe` reads back.

    The `DegradationRecipe` fields and, with a fixed input, ``input_recipe``: its full `SRInputRecipe.to_dict`
    (so a record does not depend on the registered recipes of a later version).
    """
    return _sr_record(*split_sr_recipe(recipe))


class SuperResolutionDataset(TaskDataset):
    """Degraded multispectral frame (T = 1) → RGB tile of the same scene and window (see module docstring).

    With a fixed input recipe (``recipe={"input_recipe": ...}``, see `split_sr_recipe`) the frame is that
    recipe applied to the raw values of the conditioning tile, ``cond`` (C, 1, r, r) with r its
    ``cond_resolution``; ``degradation.bands`` then names the product's bands it uses, in its order.
    """

    def __init__(
        self,
        store_uri: str,
        target_product: str = "rgb",
        cond_product: str = "multispectral",
        recipe: DegradationRecipe | Mapping[str, Any] | None = None,
        *,
        resolution: int | None = None,
        item_ids: Sequence[str] | None = None,
        exclude_item_ids: Sequence[str] | None = None,
        storage_options: Mapping[str, Any] | None = None,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        **filters: Any,
    ) -> None:
        super().__init__(transform)
        recipe, inputs = split_sr_recipe(recipe)
        self.target = TileDataset(
            store_uri, target_product, resolution=resolution, storage_options=storage_options, **filters
        )
        self.cond_tiles = TileDataset(
            store_uri, cond_product, resolution=resolution, storage_options=storage_options
        )
        self.input_recipe = inputs
        if inputs is not None:
            self._input_positions = band_positions(
                self.cond_tiles.bands, inputs.output_bands, f"{store_uri}/{cond_product}"
            )
            names = tuple(self.cond_tiles.bands[p] for p in self._input_positions)
            if recipe.bands is not None and recipe.bands != names:
                raise ValueError(
                    f"degradation bands {list(recipe.bands)} differ from the bands {list(names)} that input "
                    f"recipe {inputs.name!r} takes from {cond_product!r}"
                )
            recipe = replace(recipe, bands=names)
        self.degradation = recipe
        recipe.band_indices(self.cond_tiles.bands)  # fail early on unknown bands
        self.resolution = resolution
        store = DatasetStore.open(store_uri, storage_options=storage_options, read_only=True)
        self._cond_tile_side = int(min(store.product_group(cond_product).attrs["tile_size"]))
        tcols = _tile_columns(store_uri, target_product, storage_options)
        ccols = _tile_columns(store_uri, cond_product, storage_options)
        cond_pos = {
            _identity(ccols["item_id"][row], ccols["window"][row]): pos
            for pos, row in enumerate(self.cond_tiles.indices)
        }
        self.pairs: list[tuple[int, int]] = []
        for pos in _keep_items(self.target, item_ids, exclude_item_ids):
            row = int(self.target.indices[pos])
            match = cond_pos.get(_identity(tcols["item_id"][row], tcols["window"][row]))
            if match is not None:
                self.pairs.append((int(pos), match))
        if not self.pairs:
            raise StoreError(
                f"{store_uri}: no tile of {target_product!r} has a {cond_product!r} tile with the same "
                "item and window (SR needs both products read from the same scenes)"
            )
        if inputs is not None:
            self._check_raw_values(store, store_uri, cond_product, inputs)
        bands = list(recipe.bands) if recipe.bands is not None else list(self.cond_tiles.bands)
        self.recipe = {
            "target_product": target_product,
            "cond_product": cond_product,
            "cond_bands": bands,
            "degradation": _sr_record(recipe, inputs),
            "resolution": resolution,
        }

    def _check_raw_values(
        self, store: DatasetStore, store_uri: str, cond_product: str, inputs: SRInputRecipe
    ) -> None:
        """Keep the recorded scaling of the paired conditioning tiles; fail if it cannot give raw values."""
        group = store.product_group(cond_product)
        n, rows = self.cond_tiles.n_store_tiles, self.cond_tiles.indices
        self._scale_low = np.asarray(group["scale_min"][:n])[rows][:, self._input_positions]
        self._scale_high = np.asarray(group["scale_max"][:n])[rows][:, self._input_positions]
        used = sorted({pos for _, pos in self.pairs})
        where = f"{store_uri}/{cond_product}"
        step = check_raw_recoverable(
            self._scale_low[used], self._scale_high[used], self.cond_tiles.dtype.name, inputs, where
        )
        if step >= 1.0:
            warnings.warn(
                f"{where}: stored with steps of up to {step:.3g} per level, so the raw values for input "
                f"recipe {inputs.name!r} are approximate (within {step / 2:.3g}); store them as uint16 "
                "for the exact input",
                stacklevel=3,
            )

    def _recipe_frame(self, cond_pos: int) -> torch.Tensor:
        """(C, r, r) ``2·v − 1`` with v the input recipe applied to the raw values of a conditioning tile."""
        inputs = self.input_recipe
        if inputs is None:
            raise RuntimeError("_recipe_frame needs the dataset's fixed input recipe")
        stored = self.cond_tiles.stored_image(cond_pos)[self._input_positions]
        raw = unscale(
            stored,
            self._scale_low[cond_pos],
            self._scale_high[cond_pos],
            self.cond_tiles.dtype.name,
            integer=inputs.integer_dn,
        )
        return torch.from_numpy(inputs.apply(raw, inputs.output_bands)) * 2.0 - 1.0

    def lowres(self, i: int) -> torch.Tensor:
        """(C', h, w) in [-1, 1]: sample ``i``'s conditioning tile through `DegradationRecipe.lowres`."""
        _, cond_pos = self.pairs[i]
        return self.degradation.lowres(self.cond_tiles[cond_pos]["pixel_values"], self.cond_tiles.bands)

    def sample_item_ids(self, i: int) -> list[str]:
        target_pos, cond_pos = self.pairs[i]
        return [self.target.item_id(target_pos), self.cond_tiles.item_id(cond_pos)]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        target_pos, cond_pos = self.pairs[i]
        sample = self._target(self.target, target_pos)
        meta = self.cond_tiles.metadata(cond_pos)
        if self.input_recipe is not None:
            frame = self._recipe_frame(cond_pos)
            gsd = self.input_recipe.gsd
            if gsd is None and meta.gsd is not None:  # the effective GSD of the resized frame
                gsd = effective_gsd(meta.gsd, self._cond_tile_side, self.input_recipe.cond_resolution)
            meta = meta.replace(gsd=gsd)
        else:
            frame = self.degradation.apply(self.cond_tiles[cond_pos]["pixel_values"], self.cond_tiles.bands)
            if meta.gsd is not None:  # effective GSD of the (resized) tile × the degradation factor
                gsd = meta.gsd
                if self.resolution is not None and self._cond_tile_side != self.resolution:
                    gsd = effective_gsd(gsd, self._cond_tile_side, self.resolution)
                meta = meta.replace(gsd=gsd * self.degradation.factor)
        vector, mask = _encode(meta)
        sample.update(
            cond=frame[:, None].contiguous(), cond_metadata=vector[None], cond_metadata_mask=mask[None]
        )
        return self._finish(sample)


# ---------------------------------------------------------------------------------------------- temporal
class TemporalDataset(TaskDataset):
    """T other-date tiles of the same place (with their metadata) → the tile at the target date.

    ``split`` / ``holdout_fraction`` select the targets (see `TileDataset`); with ``split_frames`` (default)
    the frames come from the same split, without it from any tile (so that a held-out target, whose other
    dates are mostly training tiles, can be evaluated).
    """

    def __init__(
        self,
        store_uri: str,
        product: str = "rgb",
        sequence_length: int = 3,
        direction: Direction = "both",
        *,
        resolution: int | None = None,
        item_ids: Sequence[str] | None = None,
        exclude_item_ids: Sequence[str] | None = None,
        split: Split | None = None,
        holdout_fraction: float = 0.1,
        split_frames: bool = True,
        storage_options: Mapping[str, Any] | None = None,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        **filters: Any,
    ) -> None:
        super().__init__(transform)
        if sequence_length < 1:
            raise ValueError(f"sequence_length must be >= 1, got {sequence_length}")
        _check_choice("direction", direction, get_args(Direction))
        self.sequence_length = sequence_length
        tile_split: dict[str, Any] = (
            dict(split=split, holdout_fraction=holdout_fraction) if split_frames else {}
        )
        self.tiles = TileDataset(
            store_uri,
            product,
            resolution=resolution,
            storage_options=storage_options,
            **filters,
            **tile_split,
        )
        cols = _tile_columns(store_uri, product, storage_options)
        keep = set(_keep_items(self.tiles, item_ids, exclude_item_ids).tolist())
        targets = keep
        if split is not None and not split_frames:
            rows = self.tiles.indices
            held = holdout_mask(cols["item_id"][rows], cols["window"][rows], holdout_fraction)
            targets = keep & set(np.nonzero(held if split == "holdout" else ~held)[0].tolist())
        # group every (filtered) tile by place: CRS + tile transform (same window of the same pixel grid)
        groups: dict[tuple, list[tuple[date, int, str]]] = {}
        for pos, row in enumerate(self.tiles.indices):
            when = _tile_date(self.tiles.metadata(pos))
            if when is None:
                continue
            key = (cols["crs"][row], *np.round(cols["transform"][row], 6).tolist())
            groups.setdefault(key, []).append((when, pos, str(cols["item_id"][row])))
        self.sequences: list[tuple[int, list[int]]] = []
        repeats = False
        for members in groups.values():
            for when, pos, item in members:
                if pos not in keep:
                    continue
                others = [(w, p) for w, p, it in members if it != item and w != when]
                if direction == "forward":
                    others = [(w, p) for w, p in others if w < when]
                elif direction == "backward":
                    others = [(w, p) for w, p in others if w > when]
                repeats |= bool(others)
                if not others or pos not in targets:
                    continue
                others.sort(key=lambda wp: (abs((wp[0] - when).days), wp[0]))
                frames = [others[k % len(others)] for k in range(sequence_length)]
                frames.sort()  # chronological order
                self.sequences.append((pos, [p for _, p in frames]))
        self.sequences.sort()
        if not repeats:
            raise StoreError(
                f"{store_uri}/{product}: no tile has another dated tile of the same place "
                f"(direction={direction!r}); temporal prediction needs repeat acquisitions"
            )
        self.recipe = {
            "product": product,
            "sequence_length": sequence_length,
            "direction": direction,
            "resolution": resolution,
            "cond_bands": list(self.tiles.bands),
            "grouping": "crs + tile transform",
        }
        if split is not None:
            self.recipe.update(split=split, holdout_fraction=holdout_fraction, split_frames=split_frames)

    def sample_item_ids(self, i: int) -> list[str]:
        target_pos, frames = self.sequences[i]
        return [self.tiles.item_id(p) for p in (target_pos, *frames)]

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, i: int) -> dict[str, Any]:
        target_pos, frame_pos = self.sequences[i]
        sample = self._target(self.tiles, target_pos)
        frames = [self.tiles[p] for p in frame_pos]
        sample.update(
            cond=torch.stack([f["pixel_values"] for f in frames], dim=1),
            cond_metadata=torch.stack([f["metadata"] for f in frames]),
            cond_metadata_mask=torch.stack([f["metadata_mask"] for f in frames]),
            cond_item_ids=[f["item_id"] for f in frames],
        )
        return self._finish(sample)


# ---------------------------------------------------------------------------------------------- inpainting
MaskKind = Literal["boxes", "strokes", "mixed"]


def random_box_mask(
    height: int,
    width: int,
    rng: np.random.Generator,
    n_boxes: tuple[int, int] = (1, 3),
    size: tuple[float, float] = (0.15, 0.5),
) -> np.ndarray:
    """bool (H, W): a few axis-aligned boxes, each side a ``size`` fraction of the tile."""
    mask = np.zeros((height, width), dtype=bool)
    for _ in range(rng.integers(n_boxes[0], n_boxes[1] + 1)):
        h = max(1, int(rng.uniform(*size) * height))
        w = max(1, int(rng.uniform(*size) * width))
        y, x = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
        mask[y : y + h, x : x + w] = True
    return mask


def random_stroke_mask(
    height: int,
    width: int,
    rng: np.random.Generator,
    n_strokes: tuple[int, int] = (1, 4),
    max_vertices: int = 6,
    width_frac: tuple[float, float] = (0.04, 0.12),
) -> np.ndarray:
    """bool (H, W): free-form brush strokes (random polylines of thick discs), as in LaMa / DeepFill v2."""
    mask = np.zeros((height, width), dtype=bool)
    yy, xx = np.mgrid[:height, :width]
    side = min(height, width)
    for _ in range(rng.integers(n_strokes[0], n_strokes[1] + 1)):
        y, x = rng.uniform(0, height), rng.uniform(0, width)
        radius = max(1.0, rng.uniform(*width_frac) * side)
        for _ in range(rng.integers(2, max_vertices + 1)):
            angle = rng.uniform(0, 2 * np.pi)
            length = rng.uniform(0.1, 0.4) * side
            ny = float(np.clip(y + length * np.sin(angle), 0, height - 1))
            nx = float(np.clip(x + length * np.cos(angle), 0, width - 1))
            for t in np.linspace(0.0, 1.0, max(2, int(length / radius) * 2 + 2)):
                cy, cx = y + t * (ny - y), x + t * (nx - x)
                mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
            y, x = ny, nx
    return mask


def make_mask(kind: MaskKind, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A random hole of the given kind; never empty and never the whole tile."""
    for _ in range(16):
        if kind == "boxes":
            mask = random_box_mask(height, width, rng)
        elif kind == "strokes":
            mask = random_stroke_mask(height, width, rng)
        elif kind == "mixed":
            mask = (
                random_box_mask(height, width, rng)
                if rng.random() < 0.5
                else random_stroke_mask(height, width, rng)
            )
        else:
            raise ValueError(f"unknown mask kind {kind!r}; choose boxes, strokes or mixed")
        if mask.any() and not mask.all():
            return mask
    mask = np.zeros((height, width), dtype=bool)
    mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = True
    return mask


class InpaintingDataset(TaskDataset):
    """Image with a hole (+ the mask as a channel) → the full image (see module docstring)."""

    def __init__(
        self,
        store_uri: str,
        product: str = "rgb",
        mask_kind: MaskKind = "mixed",
        *,
        seed: int = 0,
        resolution: int | None = None,
        item_ids: Sequence[str] | None = None,
        exclude_item_ids: Sequence[str] | None = None,
        storage_options: Mapping[str, Any] | None = None,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        **filters: Any,
    ) -> None:
        super().__init__(transform)
        _check_choice("mask kind", mask_kind, get_args(MaskKind))
        self.mask_kind = mask_kind
        self.seed = seed
        self.tiles = TileDataset(
            store_uri, product, resolution=resolution, storage_options=storage_options, **filters
        )
        self.positions = _keep_items(self.tiles, item_ids, exclude_item_ids)
        if len(self.positions) == 0:
            raise StoreError(f"{store_uri}/{product}: no tiles left for inpainting after filtering")
        self.recipe = {
            "product": product,
            "mask_kind": mask_kind,
            "mask_seed": seed,
            "resolution": resolution,
            "cond_bands": [*self.tiles.bands, "mask"],
            "mask_convention": "1 = missing (to fill); masked pixels are 0 in the conditioning",
        }

    def sample_item_ids(self, i: int) -> list[str]:
        return [self.tiles.item_id(int(self.positions[i]))]

    def __len__(self) -> int:
        return len(self.positions)

    def mask_for(self, i: int, height: int, width: int) -> torch.Tensor:
        """float32 (1, H, W) hole of sample ``i`` (1 = missing), the same every time."""
        row = int(self.tiles.indices[self.positions[i]])
        rng = np.random.default_rng([self.seed, row])
        return torch.from_numpy(make_mask(self.mask_kind, height, width, rng).astype(np.float32))[None]

    def __getitem__(self, i: int) -> dict[str, Any]:
        pos = int(self.positions[i])
        raw = self.tiles[pos]
        image = raw["pixel_values"]
        mask = self.mask_for(i, *image.shape[-2:])
        sample = dict(raw, pixel_values=_rgb_view(image, self.tiles.bands))
        cond = torch.cat([image * (1.0 - mask), mask], dim=0)
        sample.update(
            cond=cond[:, None].contiguous(),
            cond_metadata=raw["metadata"][None].clone(),
            cond_metadata_mask=raw["metadata_mask"][None].clone(),
            mask=mask,
        )
        return self._finish(sample)


def collate_task_batch(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors, keep lists of everything else (captions, item ids)."""
    out: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out


def batch_metadata(batch: Mapping[str, Any]) -> list[SatMetadata]:
    """The targets' `SatMetadata` of a collated batch (what a pipeline call takes as ``metadata``)."""
    return [_decode(v, m) for v, m in zip(batch["metadata"], batch["metadata_mask"], strict=True)]


# ---------------------------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class DataSpec:
    """Which tiles a task dataset reads; the task says how they become samples.

    ``split`` / ``holdout_fraction``: the targets' split (`TileDataset`); ``split_conditioning``: the
    conditioning tiles come from the same split (training: no held-out tile is ever read), else from any
    tile (evaluation: a held-out target's other dates are mostly training tiles). ``seed``: inpainting masks.
    ``filters``: the other `TileDataset` filters (bbox, start, end, platform).
    """

    store_uri: str
    resolution: int | None = None
    split: Split | None = None
    holdout_fraction: float = 0.1
    split_conditioning: bool = True
    seed: int = 0
    item_ids: Sequence[str] | None = None
    exclude_item_ids: Sequence[str] | None = None
    storage_options: Mapping[str, Any] | None = None
    filters: Mapping[str, Any] = field(default_factory=dict)

    def options(self) -> dict[str, Any]:
        """Keyword arguments every task dataset takes (the targets' split among them)."""
        return dict(
            resolution=self.resolution,
            item_ids=self.item_ids,
            exclude_item_ids=self.exclude_item_ids,
            storage_options=self.storage_options,
            split=self.split,
            holdout_fraction=self.holdout_fraction,
            **self.filters,
        )


DatasetT = TypeVar("DatasetT", bound=TaskDataset)
#: default rounds of `DegradationRecipe.back_project` of an SR task's outputs (see `SuperResolutionTask`)
LR_PROJECTION_STEPS = 8


@dataclass(frozen=True)
class ControlNetTask(ABC, Generic[DatasetT]):
    """A conditional task: its options (the dataclass fields, recorded in its card) and its behaviour.

    Subclasses set ``name`` (the registry key, `TaskName`) and ``baseline_name`` and implement `dataset`
    and `baseline`; the other methods have defaults that fit a conditioning of image frames.
    """

    name: ClassVar[str]
    baseline_name: ClassVar[str]

    product: str = "rgb"

    # -------------------------------------------------------------- data
    @abstractmethod
    def dataset(self, spec: DataSpec) -> DatasetT:
        """The task's dataset over the tiles ``spec`` selects."""

    @abstractmethod
    def baseline(self, dataset: DatasetT, i: int, sample: dict[str, Any]) -> torch.Tensor:
        """The classical prediction of sample ``i`` (``sample = dataset[i]``): (3, H, W) in [-1, 1]."""

    def cond_preview(self, dataset: DatasetT, sample: dict[str, Any]) -> torch.Tensor:
        """(3, H, W) RGB view of the last conditioning frame, at the target's size (H, W)."""
        return rgb_preview(sample["cond"][:, -1], dataset.cond_bands, sample["pixel_values"].shape[-2:])

    def conditioning(
        self, batch: Mapping[str, Any], cond_bands: Sequence[str] | None = None
    ) -> dict[str, Any]:
        """The `SatControlNetPipeline` inputs of a collated batch, other than ``metadata`` and ``prompt``.

        ``cond_bands``: the name of each conditioning channel (the dataset's `TaskDataset.cond_bands`), for a
        ControlNet that takes bands by name: the pipeline then aligns them to the model's bands (a band the
        store lacks is marked missing, one the model does not know is dropped with a warning; see
        `band_alignment`).
        """
        out: dict[str, Any] = {key: batch[key] for key in ("cond", "cond_metadata", "cond_metadata_mask")}
        if cond_bands is not None:
            out["cond_bands"] = list(cond_bands)
        return out

    def band_alignment(self, dataset: DatasetT, model_bands: Sequence[str]) -> BandAlignment:
        """How the dataset's conditioning bands map onto a ControlNet's ``model_bands`` (by name): the
        model's bands the store lacks (``missing``) and the store's bands the model does not know
        (``unknown``). None of the model's bands in the store is an error naming both band lists."""
        alignment = align_bands(model_bands, dataset.cond_bands)
        if all(source is None for source in alignment.source):
            raise ValueError(
                f"{self.name}: none of the conditioning bands {dataset.cond_bands} is one of the "
                f"ControlNet's bands {list(model_bands)}"
            )
        return alignment

    def fill_mask(self, batch: Mapping[str, Any]) -> torch.Tensor | None:
        """(N, 1, H, W) pixels the task fills, scored apart (1 = fill); None when that is the whole image."""
        return None

    def consistent(self, dataset: DatasetT, i: int, image: torch.Tensor) -> torch.Tensor:
        """Sample ``i``'s output (3, H, W) in [-1, 1] made to agree with what the task observed of its target
        (SR: the low-resolution input); unchanged by default."""
        return image

    def lowres_views(
        self, dataset: DatasetT, i: int, image: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For LR-consistency: (``image``, a (3, H, W) output in [-1, 1], taken down to the input's
        resolution as the input was made; sample ``i``'s low-resolution input), both (3, h, w) in [-1, 1];
        None for a task whose input is no degraded view of the target."""
        return None

    # -------------------------------------------------------------- apply to a place (dsat_core.apply)
    #: the task fills the pixels of a mask (a scene's cloud mask) and keeps the others exactly
    fills_place_mask: ClassVar[bool] = False

    @property
    def input_product(self) -> str:
        """The catalog product whose frames condition the model when it is applied to a place."""
        return self.product

    @property
    def output_factor(self) -> int:
        """Output pixels per input pixel along a side when the model is applied to a place."""
        return 1

    def place_conditioning(
        self, frames: torch.Tensor, bands: Sequence[str], fill: torch.Tensor | None = None
    ) -> dict[str, Any]:
        """`SatControlNetPipeline` inputs (besides metadata and prompt) for frames read from a place.

        ``frames``: (B, C, T, h, w) in [-1, 1] on the input grid, channels named ``bands``; ``fill``:
        (B, 1, H, W) pixels to fill on the output grid (1 = fill), for tasks that fill a mask. The result
        holds ``cond`` and ``cond_bands`` (the name of each of its channels).
        """
        return {"cond": frames, "cond_bands": list(bands)}

    def place_baseline(self, frames: torch.Tensor, bands: Sequence[str]) -> torch.Tensor | None:
        """(B, 3, H, W) in [-1, 1] on the output grid: the task's classical prediction for frames read from a
        place (the start of image-to-image sampling, ``strength`` < 1); None for a task without one."""
        return None

    def place_consistent(
        self, images: torch.Tensor, frames: torch.Tensor, bands: Sequence[str]
    ) -> torch.Tensor:
        """`consistent` for outputs (B, 3, H, W) in [-1, 1] of frames read from a place (default: as is)."""
        return images

    # -------------------------------------------------------------- card
    def to_card(self) -> dict[str, Any]:
        """``{"task": name, <every field>}``, JSON-ready; `from_card` gives the task back."""
        return {"task": self.name, **json.loads(json.dumps(asdict(self)))}

    @classmethod
    def from_card(cls, card: Mapping[str, Any]) -> ControlNetTask[Any]:
        """The task a card describes: every field the card has, the default of one it lacks.

        A key that is no field of the task is an error, except the other tasks' options that cards of the old
        seven-field format (every task's options in every card) carry: those are dropped.
        """
        values = dict(card)
        task = get_task(values.pop("task", None))
        if cls is not ControlNetTask and task is not cls:
            raise ValueError(f"card of a {task.name!r} task, not {cls.name!r}")
        known = {f.name for f in fields(task)}
        values = {k: v for k, v in values.items() if k in known or k not in _LEGACY_CARD_FIELDS}
        return task().with_options(**values)

    def with_options(self, **changes: Any) -> Self:
        """A copy with some fields changed; a name that is not a field of this task is an error."""
        known = [f.name for f in fields(self)]
        if unknown := sorted(set(changes) - set(known)):
            raise ValueError(f"the {self.name} task has no option(s) {unknown}; its options are {known}")
        return replace(self, **changes)


@dataclass(frozen=True)
class SuperResolutionTask(ControlNetTask[SuperResolutionDataset]):
    """``sr``: a degraded (or fixed-recipe) ``cond_product`` frame → the ``product`` RGB tile; baseline:
    bicubic upsampling of the degraded frame's RGB bands. ``degradation``: `split_sr_recipe` keys, kept as
    the whole recipe (`sr_recipe_record`). Outputs are back-projected onto the degraded input
    (``lr_projection_steps`` rounds, `DegradationRecipe.back_project`): taken down by the recipe, an output
    gives its input back, as whole-scene SR models (sen2sr's hard constraint) guarantee."""

    name: ClassVar[str] = "sr"
    baseline_name: ClassVar[str] = "bicubic"

    cond_product: str = "multispectral"
    degradation: Mapping[str, Any] = field(default_factory=dict)
    #: rounds of back-projection onto the low-resolution input applied to each output (0: none)
    lr_projection_steps: int = LR_PROJECTION_STEPS

    def __post_init__(self) -> None:
        object.__setattr__(self, "degradation", sr_recipe_record(self.degradation))
        if self.lr_projection_steps < 0:
            raise ValueError(f"lr_projection_steps must be >= 0, got {self.lr_projection_steps}")

    def dataset(self, spec: DataSpec) -> SuperResolutionDataset:
        return SuperResolutionDataset(
            spec.store_uri, self.product, self.cond_product, self.degradation, **spec.options()
        )

    def baseline(self, dataset: SuperResolutionDataset, i: int, sample: dict[str, Any]) -> torch.Tensor:
        low = to_rgb(dataset.lowres(i), dataset.cond_bands)
        return bicubic_upsample(low[None].double(), tuple(sample["pixel_values"].shape[-2:]))[0]

    def lowres_views(
        self, dataset: SuperResolutionDataset, i: int, image: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The output blurred and area-downsampled by the recipe, and the RGB bands of the degraded input
        (what bicubic upsamples); None with a fixed input recipe (its input is not the target degraded)."""
        if dataset.input_recipe is not None:
            return None
        low = to_rgb(dataset.lowres(i), dataset.cond_bands).double()
        return dataset.degradation.lowres(image.double()).to(low.dtype), low

    def consistent(self, dataset: SuperResolutionDataset, i: int, image: torch.Tensor) -> torch.Tensor:
        """`DegradationRecipe.back_project` onto the RGB bands of the degraded input, `lr_projection_steps`
        rounds; unchanged with a fixed input recipe (its input is not the target degraded)."""
        if not self.lr_projection_steps or dataset.input_recipe is not None:
            return image
        low = to_rgb(dataset.lowres(i), dataset.cond_bands)
        return dataset.degradation.back_project(image[None], low[None], self.lr_projection_steps)[0]

    def place_baseline(self, frames: torch.Tensor, bands: Sequence[str]) -> torch.Tensor:
        """Bicubic upsampling of the last frame's RGB bands by the factor (the evaluation's baseline)."""
        height, width = frames.shape[-2:]
        low = to_rgb(frames[:, :, -1].double(), bands)
        return bicubic_upsample(low, (height * self.output_factor, width * self.output_factor)).float()

    def place_consistent(
        self, images: torch.Tensor, frames: torch.Tensor, bands: Sequence[str]
    ) -> torch.Tensor:
        """`consistent` onto the last frame's RGB bands (the place's low-resolution input)."""
        if not self.lr_projection_steps:
            return images
        recipe = DegradationRecipe(**self.degradation)
        low = to_rgb(frames[:, :, -1], bands)
        return recipe.back_project(images, low, self.lr_projection_steps)

    @property
    def input_product(self) -> str:
        return self.cond_product

    @property
    def output_factor(self) -> int:
        if "input_recipe" in self.degradation:
            raise ValueError("an SR model with a fixed input recipe cannot be applied to a place yet")
        return int(self.degradation["factor"])

    def place_conditioning(
        self, frames: torch.Tensor, bands: Sequence[str], fill: torch.Tensor | None = None
    ) -> dict[str, Any]:
        """The recipe's bands, upsampled by the factor with the recipe's ``upsample`` (as in training)."""
        recipe = DegradationRecipe(**self.degradation)
        keep = recipe.band_indices(list(bands))
        batch, _, steps, height, width = frames.shape
        x = frames[:, keep].permute(0, 2, 1, 3, 4).reshape(batch * steps, len(keep), height, width)
        kwargs = {} if recipe.upsample == "nearest" else {"align_corners": False}
        size = (height * recipe.factor, width * recipe.factor)
        up = F.interpolate(x.float(), size=size, mode=recipe.upsample, **kwargs).clamp(-1.0, 1.0)
        cond = up.reshape(batch, steps, len(keep), *size).permute(0, 2, 1, 3, 4)
        return {"cond": cond.contiguous(), "cond_bands": [list(bands)[k] for k in keep]}


@dataclass(frozen=True)
class TemporalTask(ControlNetTask[TemporalDataset]):
    """``temporal``: ``sequence_length`` other-date tiles of a place → the tile at the target date; baseline:
    the frame nearest in time."""

    name: ClassVar[str] = "temporal"
    baseline_name: ClassVar[str] = "nearest_date"

    sequence_length: int = 3
    direction: Direction = "both"

    def __post_init__(self) -> None:
        if self.sequence_length < 1:
            raise ValueError(f"sequence_length must be >= 1, got {self.sequence_length}")
        _check_choice("direction", self.direction, get_args(Direction))

    def dataset(self, spec: DataSpec) -> TemporalDataset:
        return TemporalDataset(
            spec.store_uri,
            self.product,
            self.sequence_length,
            self.direction,
            split_frames=spec.split_conditioning,
            **spec.options(),
        )

    def baseline(self, dataset: TemporalDataset, i: int, sample: dict[str, Any]) -> torch.Tensor:
        frames = [
            _decode(v, m) for v, m in zip(sample["cond_metadata"], sample["cond_metadata_mask"], strict=True)
        ]
        target = _tile_date(_decode(sample["metadata"], sample["metadata_mask"]))
        dated = [(k, day) for k, day in enumerate(map(_tile_date, frames)) if day is not None]
        if target is None or not dated:  # no dates to compare: the last frame
            k = len(frames) - 1
        else:
            k = dated[nearest_date_index([day for _, day in dated], target)][0]
        return to_rgb(sample["cond"][:, k], dataset.cond_bands)

    #: applied to a place, it fills a date's clouded pixels from ``sequence_length`` other dates
    fills_place_mask: ClassVar[bool] = True

    def place_conditioning(
        self, frames: torch.Tensor, bands: Sequence[str], fill: torch.Tensor | None = None
    ) -> dict[str, Any]:
        """``frames``: (B, C, T, h, w) the other dates' frames of the place, in chronological order (as in
        training); the pixels to fill are kept apart by the apply job (the model predicts the whole tile)."""
        return {"cond": frames.float(), "cond_bands": list(bands)}


@dataclass(frozen=True)
class InpaintingTask(ControlNetTask[InpaintingDataset]):
    """``inpaint``: the image with a ``mask_kind`` hole (+ the mask) → the full image; baseline: the harmonic
    fill of the hole. The pipeline gets the known image and the mask; the hole is scored apart."""

    name: ClassVar[str] = "inpaint"
    baseline_name: ClassVar[str] = "classical_inpaint"

    mask_kind: MaskKind = "mixed"

    def __post_init__(self) -> None:
        _check_choice("mask kind", self.mask_kind, get_args(MaskKind))

    def dataset(self, spec: DataSpec) -> InpaintingDataset:
        return InpaintingDataset(
            spec.store_uri, self.product, self.mask_kind, seed=spec.seed, **spec.options()
        )

    def baseline(self, dataset: InpaintingDataset, i: int, sample: dict[str, Any]) -> torch.Tensor:
        return classical_inpaint(sample["pixel_values"].double(), sample["mask"][0] > 0.5)

    def cond_preview(self, dataset: InpaintingDataset, sample: dict[str, Any]) -> torch.Tensor:
        """The masked image (holes at 0), without the mask channel."""
        frame = sample["cond"][:-1, -1]
        return rgb_preview(frame, dataset.cond_bands[:-1], sample["pixel_values"].shape[-2:])

    def conditioning(
        self, batch: Mapping[str, Any], cond_bands: Sequence[str] | None = None
    ) -> dict[str, Any]:
        return {
            **super().conditioning(batch, cond_bands),
            "image": batch["pixel_values"],
            "mask": batch["mask"],
        }

    def fill_mask(self, batch: Mapping[str, Any]) -> torch.Tensor:
        return batch["mask"].float()

    fills_place_mask: ClassVar[bool] = True

    def place_conditioning(
        self, frames: torch.Tensor, bands: Sequence[str], fill: torch.Tensor | None = None
    ) -> dict[str, Any]:
        """The last frame with the holes at 0 plus the mask (as in training), its RGB view and the mask."""
        if fill is None:
            raise ValueError("inpainting a place needs the pixels to fill (a cloud mask)")
        frame = frames[:, :, -1].float()
        fill = (fill > 0.5).float()
        cond = torch.cat([frame * (1.0 - fill), fill], dim=1)[:, :, None]
        image = frame[:, rgb_band_indices(list(bands), frame.shape[1])]
        return {"cond": cond, "cond_bands": [*bands, "mask"], "image": image, "mask": fill}


# ---------------------------------------------------------------------------------------------- registry
TaskName = Literal["sr", "temporal", "inpaint"]
TASKS: dict[str, type[ControlNetTask[Any]]] = {
    task.name: task for task in (SuperResolutionTask, TemporalTask, InpaintingTask)
}
if set(TASKS) != set(get_args(TaskName)):
    raise RuntimeError(f"TaskName {get_args(TaskName)} does not list the registered tasks {sorted(TASKS)}")

TASK_CARD = "task.json"
# the card every task got before each task had its own fields: the fields of other tasks are dropped
_LEGACY_CARD_FIELDS = frozenset({"cond_product", "degradation", "sequence_length", "direction", "mask_kind"})


def get_task(name: str | None) -> type[ControlNetTask[Any]]:
    """The task class registered as ``name``."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name]


def task_from_options(name: str, options: Mapping[str, Any]) -> ControlNetTask:
    """The task ``name`` with those of ``options`` that are its fields (a config holds every task's)."""
    task = get_task(name)
    return task(**{f.name: options[f.name] for f in fields(task) if f.name in options})


def write_task_card(task: ControlNetTask, folder: str | Path) -> Path:
    """``folder/task.json``: the task's card, beside the pipeline trained on it."""
    path = Path(folder) / TASK_CARD
    path.write_text(json.dumps(task.to_card(), indent=1))
    return path


def read_task_card(folder: str | Path) -> ControlNetTask | None:
    """The task recorded in ``folder/task.json``, or None when there is no card."""
    path = Path(folder) / TASK_CARD
    return ControlNetTask.from_card(json.loads(path.read_text())) if path.is_file() else None


def resolve_task(task: ControlNetTask | str, pipeline_dir: str | Path | None = None) -> ControlNetTask:
    """``task`` itself; or, by name, the task recorded beside ``pipeline_dir`` (all of its card), or the
    task's defaults when there is no card."""
    if isinstance(task, ControlNetTask):
        return task
    recorded = read_task_card(pipeline_dir) if pipeline_dir is not None else None
    if recorded is None:
        return get_task(task)()
    if recorded.name != task:
        raise ValueError(f"{pipeline_dir} holds a {recorded.name!r} ControlNet ({TASK_CARD}), not {task!r}")
    return recorded


__all__ = [
    "TASKS",
    "TASK_CARD",
    "ControlNetTask",
    "DataSpec",
    "DegradationRecipe",
    "Direction",
    "InpaintingDataset",
    "InpaintingTask",
    "MaskKind",
    "SuperResolutionDataset",
    "SuperResolutionTask",
    "TaskDataset",
    "TaskName",
    "TemporalDataset",
    "TemporalTask",
    "batch_metadata",
    "collate_task_batch",
    "gaussian_blur",
    "get_task",
    "make_mask",
    "random_box_mask",
    "random_stroke_mask",
    "read_task_card",
    "resolve_task",
    "split_sr_recipe",
    "sr_recipe_record",
    "task_from_options",
    "write_task_card",
]
