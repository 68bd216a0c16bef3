"""Spectral band names: one canonical name per band, so models and stores from different catalogs agree.

The canonical name is the STAC `eo` common name (``blue``, ``nir``, ``swir16``, ...), lower case; Sentinel-2
band ids (``B02``, ``B8A``, also ``B2``) and Earth Search's ``rededge1..3`` / ``nir08`` map onto it. A name
with no known alias is kept as given (lower case), so two stores that use the same custom names still match.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

# Sentinel-2 MSI band id → the common name Earth Search / Planetary Computer give it
SENTINEL2_COMMON_NAMES: dict[str, str] = {
    "b01": "coastal",
    "b02": "blue",
    "b03": "green",
    "b04": "red",
    "b05": "rededge1",
    "b06": "rededge2",
    "b07": "rededge3",
    "b08": "nir",
    "b8a": "nir08",
    "b09": "nir09",
    "b10": "cirrus",
    "b11": "swir16",
    "b12": "swir22",
}
_ALIASES: dict[str, str] = {"nir08": "nir08", "swir1": "swir16", "swir2": "swir22", "narrow_nir": "nir08"}
_SENTINEL2_ID = re.compile(r"b0?(\d{1,2}|8a)")


def canonical_band(name: str) -> str:
    """The canonical (common) name of a band name; unknown names are returned in lower case."""
    key = name.strip().lower()
    found = _SENTINEL2_ID.fullmatch(key)
    if found:
        number = found.group(1)
        sentinel = "b8a" if number == "8a" else f"b{int(number):02d}"
        if sentinel in SENTINEL2_COMMON_NAMES:
            return SENTINEL2_COMMON_NAMES[sentinel]
    return _ALIASES.get(key, key)


@dataclass(frozen=True)
class BandAlignment:
    """Where each of a model's bands comes from in an input (None: the input lacks it)."""

    model_bands: tuple[str, ...]
    source: tuple[int | None, ...]  # input channel of each model band
    unknown: tuple[str, ...]  # input bands the model does not know (dropped)

    @property
    def missing(self) -> tuple[str, ...]:
        return tuple(b for b, s in zip(self.model_bands, self.source, strict=True) if s is None)


def align_bands(model_bands: Sequence[str], input_bands: Sequence[str]) -> BandAlignment:
    """Match ``input_bands`` to ``model_bands`` by canonical name (duplicates in the input are an error)."""
    canonical = [canonical_band(b) for b in input_bands]
    duplicates = sorted({b for b in canonical if canonical.count(b) > 1})
    if duplicates:
        raise ValueError(f"input bands {list(input_bands)} name {duplicates} more than once")
    model = tuple(canonical_band(b) for b in model_bands)
    index = {b: i for i, b in enumerate(canonical)}
    unknown = tuple(b for b, c in zip(input_bands, canonical, strict=True) if c not in model)
    return BandAlignment(model, tuple(index.get(b) for b in model), unknown)


__all__ = ["SENTINEL2_COMMON_NAMES", "BandAlignment", "align_bands", "canonical_band"]
