"""Offline reverse geocoding with the `reverse_geocode` package (bundled GeoNames cities, no network).

It returns the NEAREST POPULATED PLACE, not the polygon containing the point: near a border it can name the
neighbouring country, and over open water it names the nearest coast's country.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class Place:
    city: str
    state: str
    country: str
    country_code: str


@lru_cache(maxsize=65536)
def _lookup(lat: float, lon: float) -> Place | None:
    import reverse_geocode

    hit = reverse_geocode.get((lat, lon))
    if not hit or not hit.get("country"):
        return None
    return Place(hit.get("city", ""), hit.get("state", ""), hit["country"], hit.get("country_code", ""))


def nearest_place(lat: float | None, lon: float | None, *, precision: int = 2) -> Place | None:
    """Nearest populated place to (lat, lon), cached on coordinates rounded to `precision` decimals."""
    if lat is None or lon is None or not (-90 <= lat <= 90 and -180 <= lon <= 180):
        return None
    return _lookup(round(float(lat), precision), round(float(lon), precision))
