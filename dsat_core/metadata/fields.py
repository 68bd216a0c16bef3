"""`SatMetadata`: longitude, latitude, GSD, cloud cover, year, month, day — each optional.

Encoding (spec §1): raw = (lon + 180, lat + 90, gsd, cloud, year - 1980, month, day), normalised by
(360, 180, 1, 1, 120, 12, 31) and multiplied by 1000. A boolean mask marks which fields are present;
a missing field's value is 0 in the vector and is replaced by a learned embedding in the model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import date, datetime
from typing import Any

import numpy as np

FIELD_NAMES: tuple[str, ...] = ("lon", "lat", "gsd", "cloud_cover", "year", "month", "day")
NUM_FIELDS = len(FIELD_NAMES)
_OFFSET = np.array([180.0, 90.0, 0.0, 0.0, -1980.0, 0.0, 0.0])
_DIVISOR = np.array([360.0, 180.0, 1.0, 1.0, 120.0, 12.0, 31.0])
_SCALE = 1000.0
_RANGES: dict[str, tuple[float, float]] = {
    "lon": (-180.0, 180.0),
    "lat": (-90.0, 90.0),
    "gsd": (0.0, math.inf),
    "cloud_cover": (0.0, 1.0),
    "year": (1900, 2200),
    "month": (1, 12),
    "day": (1, 31),
}
_STAC_KEYS = {"gsd": "gsd", "cloud_cover": "eo:cloud_cover"}


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


@dataclass(frozen=True)
class SatMetadata:
    """Metadata of one image. `None` (or NaN) means the field is unknown.

    `cloud_cover` is a fraction in [0, 1]; `gsd` is metres per pixel of the image the model sees.
    """

    lon: float | None = None
    lat: float | None = None
    gsd: float | None = None
    cloud_cover: float | None = None
    year: int | None = None
    month: int | None = None
    day: int | None = None

    def __post_init__(self) -> None:
        for name in FIELD_NAMES:
            value = getattr(self, name)
            if _missing(value):
                object.__setattr__(self, name, None)
                continue
            low, high = _RANGES[name]
            if not low <= value <= high:
                raise ValueError(f"metadata field {name}={value!r} is outside [{low}, {high}]")

    @classmethod
    def from_datetime(cls, when: datetime | date | str | None, **values: Any) -> SatMetadata:
        """Build from an acquisition date (ISO string, date or datetime) plus the other fields."""
        if isinstance(when, str):
            when = datetime.fromisoformat(when.replace("Z", "+00:00"))
        if when is None:
            return cls(**values)
        return cls(year=when.year, month=when.month, day=when.day, **values)

    def values(self) -> tuple[float | None, ...]:
        return tuple(getattr(self, name) for name in FIELD_NAMES)

    def mask(self) -> np.ndarray:
        """Boolean (7,): True where the field is present."""
        return np.array([v is not None for v in self.values()], dtype=bool)

    def encode(self) -> tuple[np.ndarray, np.ndarray]:
        """Normalised ×1000 float64 vector (7,) and presence mask (7,); missing values are 0."""
        mask = self.mask()
        raw = np.array([0.0 if v is None else float(v) for v in self.values()])
        encoded = (raw + _OFFSET) / _DIVISOR * _SCALE
        return np.where(mask, encoded, 0.0), mask

    @classmethod
    def decode(cls, vector: Sequence[float] | np.ndarray, mask: Sequence[bool] | np.ndarray) -> SatMetadata:
        """Inverse of `encode` (integer fields are rounded)."""
        raw = np.asarray(vector, dtype=np.float64) / _SCALE * _DIVISOR - _OFFSET
        values: dict[str, Any] = {}
        for i, name in enumerate(FIELD_NAMES):
            if not mask[i]:
                values[name] = None
            elif name in ("year", "month", "day"):
                values[name] = int(round(raw[i]))
            else:
                values[name] = float(raw[i])
        return cls(**values)

    def replace(self, **changes: Any) -> SatMetadata:
        return SatMetadata(**{**asdict(self), **changes})

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)

    def to_params(self, prefix: str = "metadata.") -> dict[str, str]:
        """Flat string dict for MLflow params (missing fields say `missing`)."""
        return {f"{prefix}{k}": ("missing" if v is None else str(v)) for k, v in asdict(self).items()}

    def to_stac_properties(self) -> dict[str, Any]:
        """STAC item properties: `gsd`, `eo:cloud_cover` (percent), `datetime`, and `dsat:*` for the rest."""
        props: dict[str, Any] = {f"dsat:{k}": v for k, v in asdict(self).items() if v is not None}
        if self.gsd is not None:
            props["gsd"] = self.gsd
        if self.cloud_cover is not None:
            props["eo:cloud_cover"] = self.cloud_cover * 100.0
        if self.year is not None and self.month is not None and self.day is not None:
            props["datetime"] = datetime(self.year, self.month, self.day).strftime("%Y-%m-%dT00:00:00Z")
        return props

    @classmethod
    def from_stac_properties(cls, props: Mapping[str, Any]) -> SatMetadata:
        """Inverse of `to_stac_properties`; also reads plain STAC items (`gsd`, `eo:cloud_cover`, dates)."""
        values = {name: props[f"dsat:{name}"] for name in FIELD_NAMES if f"dsat:{name}" in props}
        if "gsd" not in values and props.get("gsd") is not None:
            values["gsd"] = float(props["gsd"])
        if "cloud_cover" not in values and props.get("eo:cloud_cover") is not None:
            values["cloud_cover"] = float(props["eo:cloud_cover"]) / 100.0
        when = props.get("datetime") or props.get("start_datetime")
        if when and not {"year", "month", "day"} & values.keys():
            return cls.from_datetime(when, **values)
        return cls(**values)


def encode_batch(items: Sequence[SatMetadata]) -> tuple[np.ndarray, np.ndarray]:
    """Stack `encode()` of many: float64 (N, 7) and bool (N, 7)."""
    if not items:
        return np.zeros((0, NUM_FIELDS)), np.zeros((0, NUM_FIELDS), dtype=bool)
    vectors, masks = zip(*(m.encode() for m in items), strict=True)
    return np.stack(vectors), np.stack(masks)


def decode_batch(vectors: np.ndarray, masks: np.ndarray) -> list[SatMetadata]:
    return [SatMetadata.decode(v, m) for v, m in zip(vectors, masks, strict=True)]


def effective_gsd(native_gsd: float, source_short_side: int, training_resolution: int) -> float:
    """GSD of the pixels the model sees when a source image is resized to the training resolution."""
    return native_gsd * source_short_side / training_resolution


def from_arrays(arrays: Mapping[str, Any], index: int) -> SatMetadata:
    """Read tile `index` from store metadata arrays (NaN / -1 mark missing values)."""
    values: dict[str, Any] = {}
    for name in FIELD_NAMES:
        value = arrays[name][index]
        if name in ("year", "month", "day"):
            values[name] = None if int(value) < 0 else int(value)
        else:
            values[name] = None if np.isnan(value) else float(value)
    return SatMetadata(**values)
