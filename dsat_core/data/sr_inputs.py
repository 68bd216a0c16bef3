"""Named, recorded input recipes for super-resolution ControlNets trained on a fixed input (`SRInputRecipe`).

The released DiffusionSat SR ControlNet was trained on fMoW-Sentinel (Sentinel-2 L1C, 13 bands) prepared in
one fixed way; `FMOW_SENTINEL_REFERENCE` records that preparation so the converted model gets exactly the
input it was trained on:

1. raw digital numbers (L1C reflectance × 10000) of the 13 bands B01 … B12 (with B8A);
2. per band, ``lo = mean − 2·std``, ``hi = mean + 2·std`` (fixed statistics of the training set) and
   ``v = uint8(clip((x − lo) / (hi − lo) · 255, 0, 255)) / 255`` (the cast truncates);
3. B02, B03, B04 flipped to B04, B03, B02 ("BGR flip") and B01, B09, B10 dropped: 10 channels
   B04, B03, B02, B05, B06, B07, B08, B8A, B11, B12;
4. bilinear, antialiased resize of the shorter side to the conditioning resolution (256 px for the 512 px
   model: the frame is not upsampled to the target size), then a centre crop;
5. the frame's metadata GSD is 10 m whatever the real one.

`reference_sr_input` applies steps 1–4 to any Sentinel-2 read, bands matched by name (`sentinel2_band_id`:
ESA ids such as ``B02`` / ``B2``, STAC common names such as ``blue`` / ``nir08`` / ``rededge071``, or the
Earth Search asset keys ``rededge1`` … ``rededge3``). `SuperResolutionDataset` applies it to a store when its
degradation mapping names the recipe (``{"input_recipe": "fmow-sentinel-reference"}``) and yields
``cond = 2·v − 1``: the project's conditioning range [-1, 1], which the converted model maps back to [0, 1].

Raw values from a store: tiles hold uint8 / uint16 with the per-tile, per-band ``scale_min`` / ``scale_max``
that `dsat_core.data.scaling.scale` used, so ``x = scale_min + q / q_max · (scale_max − scale_min)``
(`unscale`). Sentinel-2 digital numbers are non-negative integers, so the recovered values are rounded, which
gives the exact DN when the store's step ``(scale_max − scale_min) / q_max`` is below 1 DN (uint16 over
0…10000, as the Sentinel-2 catalogs store them); a coarser store gives an approximation within half a step.
Values the scaling clipped are lost; that matters only where the reference would not clip them as well, so
`check_raw_recoverable` raises when a band's recorded range does not cover ``[max(lo, 0), hi]``
(e.g. percentile-stretched stores). L2A products (bottom-of-atmosphere reflectance) are read the same way,
but they are not the L1C values the model was trained on.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from dsat_core.data.scaling import DTYPE_MAX


# ---------------------------------------------------------------------------------------------- band names
@dataclass(frozen=True)
class Sentinel2Band:
    """One MSI band: ESA id, STAC common name, S2A central wavelength (nm), native GSD (m), other names."""

    id: str
    common_name: str
    wavelength_nm: float
    gsd: float
    aliases: tuple[str, ...] = ()


SENTINEL2_BANDS: tuple[Sentinel2Band, ...] = (
    Sentinel2Band("B01", "coastal", 442.7, 60.0),
    Sentinel2Band("B02", "blue", 492.7, 10.0),
    Sentinel2Band("B03", "green", 559.8, 10.0),
    Sentinel2Band("B04", "red", 664.6, 10.0),
    Sentinel2Band("B05", "rededge071", 704.1, 20.0, ("rededge1",)),
    Sentinel2Band("B06", "rededge075", 740.5, 20.0, ("rededge2",)),
    Sentinel2Band("B07", "rededge078", 782.8, 20.0, ("rededge3",)),
    Sentinel2Band("B08", "nir", 832.8, 10.0),
    Sentinel2Band("B8A", "nir08", 864.7, 20.0),
    Sentinel2Band("B09", "nir09", 945.1, 60.0),
    Sentinel2Band("B10", "cirrus", 1373.5, 60.0),
    Sentinel2Band("B11", "swir16", 1613.7, 20.0),
    Sentinel2Band("B12", "swir22", 2202.4, 20.0),
)
"""The 13 MSI bands in ESA order (the order of L1C products and of the fMoW-Sentinel GeoTIFFs)."""

_BY_ID = {band.id: band for band in SENTINEL2_BANDS}
_BY_NAME = {name.lower(): band.id for band in SENTINEL2_BANDS for name in (band.common_name, *band.aliases)}
_ID_PATTERN = re.compile(r"^b0?(\d{1,2})(a?)$")


def sentinel2_band_id(name: str) -> str | None:
    """The ESA id (``B01`` … ``B12``, ``B8A``) a band name stands for, or None if it names none."""
    key = name.strip().lower()
    if key in _BY_NAME:
        return _BY_NAME[key]
    match = _ID_PATTERN.match(key)
    if match is None:
        return None
    number, narrow = int(match.group(1)), match.group(2)
    band_id = f"B{number}A" if narrow else f"B{number:02d}"
    return band_id if band_id in _BY_ID else None


def _describe(band_id: str) -> str:
    band = _BY_ID[band_id]
    return f"{band.id} ({band.common_name}, {band.wavelength_nm:g} nm)"


class MissingBandsError(ValueError):
    """Bands an input recipe needs that a product does not have; ``missing`` lists their ESA ids."""

    def __init__(self, message: str, missing: Sequence[str]) -> None:
        super().__init__(message)
        self.missing = list(missing)


class RawValuesError(ValueError):
    """A store whose recorded scaling cannot give back the raw values an input recipe needs."""


def band_positions(names: Sequence[str], wanted: Sequence[str], what: str = "the input") -> list[int]:
    """Positions in ``names`` of the Sentinel-2 bands ``wanted`` (ESA ids), matched by `sentinel2_band_id`."""
    found: dict[str, int] = {}
    for pos, name in enumerate(names):
        band_id = sentinel2_band_id(str(name))
        if band_id is None:
            continue
        if band_id in found:
            raise ValueError(
                f"{what}: bands {names[found[band_id]]!r} and {name!r} both name Sentinel-2 {band_id}"
            )
        found[band_id] = pos
    missing = [b for b in wanted if b not in found]
    if missing:
        raise MissingBandsError(
            f"{what} lacks Sentinel-2 band(s) {', '.join(_describe(b) for b in missing)}; the input needs "
            f"all of {', '.join(wanted)} (bands present: {list(names)})",
            missing,
        )
    return [found[b] for b in wanted]


# ---------------------------------------------------------------------------------------------- recipes
FMOW_SENTINEL_MEAN = (
    1370.19151926, 1184.3824625, 1120.77120066, 1136.26026392, 1263.73947144, 1645.40315151, 1846.87040806,
    1762.59530783, 1972.62420416, 582.72633433, 14.77112979, 1732.16362238, 1247.91870117,
)  # fmt: skip
FMOW_SENTINEL_STD = (
    633.15169573, 650.2842772, 712.12507725, 965.23119807, 948.9819932, 1108.06650639, 1258.36394548,
    1233.1492281, 1364.38688993, 472.37967789, 14.3114637, 1310.36996126, 1087.6020813,
)  # fmt: skip


@dataclass(frozen=True)
class SRInputRecipe:
    """How raw Sentinel-2 values become the [0, 1] conditioning frame an SR model was trained on.

    ``bands`` / ``mean`` / ``std``: the bands (ESA ids) the statistics are given for, in the reference's
    order; per band ``lo, hi = mean ∓ n_std · std`` map onto [0, 255]. ``quantize``: truncate to uint8 before
    dividing by 255. ``output_bands``: the conditioning channels, in order. ``cond_resolution``: shorter side
    after the (bilinear, ``antialias``) resize, then a centre crop to a square. ``gsd``: the GSD (m) the
    frame's metadata carries (None = the tile's effective GSD). ``integer_dn``: the source values are integer
    digital numbers, so values recovered from a store are rounded.
    """

    name: str
    bands: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    output_bands: tuple[str, ...]
    n_std: float = 2.0
    quantize: bool = True
    cond_resolution: int = 256
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    antialias: bool = True
    gsd: float | None = 10.0
    integer_dn: bool = True

    def __post_init__(self) -> None:
        for name in ("bands", "mean", "std", "output_bands"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        unknown = [b for b in (*self.bands, *self.output_bands) if b not in _BY_ID]
        if unknown:
            raise ValueError(f"input recipe {self.name!r}: {unknown} are not Sentinel-2 ids (B01 … B12, B8A)")
        if not len(self.bands) == len(self.mean) == len(self.std):
            raise ValueError(f"input recipe {self.name!r}: bands, mean and std differ in length")
        if any(s <= 0 for s in self.std) or self.n_std <= 0:
            raise ValueError(f"input recipe {self.name!r}: std and n_std must be > 0")
        if missing := [b for b in self.output_bands if b not in self.bands]:
            raise ValueError(f"input recipe {self.name!r}: output bands {missing} have no statistics")
        if self.cond_resolution < 1:
            raise ValueError(f"cond_resolution must be >= 1, got {self.cond_resolution}")
        if self.interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"interpolation must be bilinear or bicubic, got {self.interpolation!r}")

    # -------------------------------------------------------------- record
    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for name in ("bands", "mean", "std", "output_bands"):
            out[name] = list(out[name])
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SRInputRecipe:
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(data) - known):
            raise ValueError(f"unknown input recipe field(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(data))

    # -------------------------------------------------------------- values
    def range(self, band_ids: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """float64 (lo, hi) of ``band_ids`` (default: ``output_bands``): the values mapped to 0 and 255."""
        index = [self.bands.index(b) for b in (self.output_bands if band_ids is None else band_ids)]
        mean, std = np.asarray(self.mean)[index], np.asarray(self.std)[index]
        return mean - self.n_std * std, mean + self.n_std * std

    def normalize(self, raw: np.ndarray) -> np.ndarray:
        """(len(output_bands), H, W) raw values → float32 in [0, 1] (uint8-quantised with ``quantize``)."""
        lo, hi = self.range()
        x = np.where(np.isfinite(raw), raw, 0.0).astype(np.float64)
        scaled = np.clip((x - lo[:, None, None]) / (hi - lo)[:, None, None] * 255.0, 0.0, 255.0)
        if self.quantize:
            return scaled.astype(np.uint8).astype(np.float32) / np.float32(255.0)
        return (scaled / 255.0).astype(np.float32)

    def resize(self, frame: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """(C, H, W) → shorter side resized to ``size`` (default ``cond_resolution``), centre-cropped."""
        size = self.cond_resolution if size is None else size
        height, width = frame.shape[-2:]
        short, long = min(height, width), max(height, width)
        if short != size:
            new_long = int(size * long / short)
            new_size = (size, new_long) if height <= width else (new_long, size)
            frame = F.interpolate(
                frame[None],
                size=new_size,
                mode=self.interpolation,
                align_corners=False,
                antialias=self.antialias,
            )[0]
        height, width = frame.shape[-2:]
        top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
        return frame[:, top : top + size, left : left + size].contiguous()

    def apply(
        self, raw: np.ndarray, band_names: Sequence[str] | None = None, size: int | None = None
    ) -> np.ndarray:
        """(bands, H, W) raw values → float32 (output bands, size, size) in [0, 1]; `reference_sr_input`."""
        raw = np.asarray(raw)
        if raw.ndim != 3:
            raise ValueError(f"expected a (band, H, W) array, got shape {raw.shape}")
        names = list(self.bands) if band_names is None else list(band_names)
        if len(names) != raw.shape[0]:
            raise ValueError(f"{len(names)} band names for an array of {raw.shape[0]} bands")
        selected = raw[band_positions(names, self.output_bands, f"input recipe {self.name!r}")]
        frame = torch.from_numpy(self.normalize(selected))
        return self.resize(frame, size).numpy()


FMOW_SENTINEL_REFERENCE = SRInputRecipe(
    name="fmow-sentinel-reference",
    bands=tuple(band.id for band in SENTINEL2_BANDS),
    mean=FMOW_SENTINEL_MEAN,
    std=FMOW_SENTINEL_STD,
    output_bands=("B04", "B03", "B02", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"),
)
"""The released DiffusionSat SR ControlNet's input (fMoW-Sentinel statistics; see the module docstring)."""

SR_INPUT_RECIPES: dict[str, SRInputRecipe] = {FMOW_SENTINEL_REFERENCE.name: FMOW_SENTINEL_REFERENCE}


def get_input_recipe(spec: str | Mapping[str, Any] | SRInputRecipe) -> SRInputRecipe:
    """A registered recipe by name, a recorded one from its `SRInputRecipe.to_dict`, or ``spec`` itself."""
    if isinstance(spec, SRInputRecipe):
        return spec
    if isinstance(spec, str):
        if spec not in SR_INPUT_RECIPES:
            raise ValueError(f"unknown SR input recipe {spec!r}; known: {sorted(SR_INPUT_RECIPES)}")
        return SR_INPUT_RECIPES[spec]
    return SRInputRecipe.from_dict(spec)


def reference_sr_input(
    raw: np.ndarray,
    band_names: Sequence[str] | None = None,
    size: int | None = None,
    recipe: SRInputRecipe = FMOW_SENTINEL_REFERENCE,
) -> np.ndarray:
    """The SR ControlNet input of a Sentinel-2 read: float32 (10, size, size) in [0, 1].

    ``raw``: (band, H, W) raw digital numbers (L1C reflectance × 10000); ``band_names`` name its bands (any
    naming `sentinel2_band_id` knows, any order, extra bands ignored; None = the 13 bands in ESA order);
    ``size``: the conditioning resolution (default the recipe's, 256). Non-finite values count as 0 (nodata).
    """
    return recipe.apply(raw, band_names, size)


# ---------------------------------------------------------------------------------------------- store values
def unscale(
    values: np.ndarray, low: np.ndarray, high: np.ndarray, dtype: str, integer: bool = False
) -> np.ndarray:
    """Inverse of `dsat_core.data.scaling.scale`: (band, H, W) stored values → float64 source values.

    ``low`` / ``high`` (band,): the recorded ``scale_min`` / ``scale_max``; ``integer`` rounds the result.
    """
    top = float(DTYPE_MAX[dtype])
    low = np.asarray(low, dtype=np.float64)[:, None, None]
    span = np.asarray(high, dtype=np.float64)[:, None, None] - low
    out = low + np.asarray(values, dtype=np.float64) / top * span
    return np.rint(out) if integer else out


def check_raw_recoverable(
    low: np.ndarray, high: np.ndarray, dtype: str, recipe: SRInputRecipe, what: str = "the store"
) -> float:
    """Check recorded scale ranges (tile, output band) against ``recipe``; the largest step (DN) is returned.

    Raises `RawValuesError` when a tile's range does not cover ``[max(lo, 0), hi]`` of a band: values the
    scaling clipped there would come back wrong (digital numbers are non-negative, so ``lo < 0`` is safe).
    """
    low = np.atleast_2d(np.asarray(low, dtype=np.float64))
    high = np.atleast_2d(np.asarray(high, dtype=np.float64))
    lo, hi = recipe.range()
    bad = ~((low <= np.maximum(lo, 0.0)) & (high >= hi))
    if bad.any():
        tiles, bands = np.nonzero(bad)
        names = sorted({recipe.output_bands[b] for b in bands})
        t, b = int(tiles[0]), int(bands[0])
        raise RawValuesError(
            f"{what}: {len(set(tiles.tolist()))} tile(s) were scaled with a range that clips band(s) {names} "
            f"inside the input recipe {recipe.name!r}'s range (e.g. tile {t}, {recipe.output_bands[b]}: "
            f"stored [{low[t, b]:g}, {high[t, b]:g}], needed [{max(lo[b], 0.0):g}, {hi[b]:g}]); the raw "
            "values cannot be recovered: re-import the product with fixed scaling, e.g. "
            "{mode: fixed, range: [0, 10000], dtype: uint16}"
        )
    return float(((high - low) / DTYPE_MAX[dtype]).max(initial=0.0))


__all__ = [
    "FMOW_SENTINEL_REFERENCE",
    "SENTINEL2_BANDS",
    "SR_INPUT_RECIPES",
    "MissingBandsError",
    "RawValuesError",
    "SRInputRecipe",
    "Sentinel2Band",
    "band_positions",
    "check_raw_recoverable",
    "get_input_recipe",
    "reference_sr_input",
    "sentinel2_band_id",
    "unscale",
]
