"""STAC search (pystac-client) and static catalogs, returning plain item dicts.

Property filters (`CatalogConfig.query`, `max_cloud_cover`) are applied on the client side: not every STAC
API implements the query or CQL2 filter extensions (rustac's memory backend silently returns nothing for
`filter=`), so the search sends only collections / bbox / intersects / datetime and pages through every
result.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from dsat_core.data.catalog import CatalogConfig

_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "eq": operator.eq,
    "neq": operator.ne,
    "ne": operator.ne,
    "lt": operator.lt,
    "lte": operator.le,
    "gt": operator.gt,
    "gte": operator.ge,
    "in": lambda value, options: value in options,
    "startsWith": lambda value, prefix: isinstance(value, str) and value.startswith(prefix),
}


def validate_query(query: Mapping[str, Any]) -> None:
    """Raise `ValueError` naming the property and operator when a query uses an unsupported operator."""
    for prop, condition in query.items():
        if isinstance(condition, Mapping):
            unknown = set(condition) - set(_OPS)
            if unknown:
                raise ValueError(
                    f"query on {prop!r}: unsupported operator(s) {sorted(unknown)}; use {sorted(_OPS)}"
                )


def matches_query(properties: Mapping[str, Any], query: Mapping[str, Any]) -> bool:
    """True when `properties` satisfy every condition of a STAC-query-style dict.

    `{"platform": "landsat-8"}` is equality; `{"eo:cloud_cover": {"lt": 20, "gte": 0}}` combines operators
    (eq, neq, lt, lte, gt, gte, in, startsWith). A missing property never matches (not even `neq`).
    """
    validate_query(query)
    for prop, condition in query.items():
        if prop not in properties or properties[prop] is None:
            return False
        value = properties[prop]
        conditions = condition.items() if isinstance(condition, Mapping) else [("eq", condition)]
        try:
            if not all(_OPS[op](value, arg) for op, arg in conditions):
                return False
        except TypeError:  # e.g. comparing a string with a number
            return False
    return True


def _cloud_ok(properties: Mapping[str, Any], max_cloud_cover: float | None) -> bool:
    """Items without `eo:cloud_cover` are kept (unknown is not cloudy); tile filters still apply later."""
    cover = properties.get("eo:cloud_cover")
    if max_cloud_cover is None or cover is None:
        return True
    try:
        return float(cover) <= max_cloud_cover
    except (TypeError, ValueError):
        return False


def item_signer(config: CatalogConfig) -> Callable[[dict], dict] | None:
    """The function that signs an item dict's asset hrefs for `config.signing` (None when unsigned)."""
    if config.signing == "planetary-computer":
        import planetary_computer

        return planetary_computer.sign
    return None


def filter_items(items: Iterable[dict], config: CatalogConfig, max_items: int | None = None) -> list[dict]:
    """Apply `max_cloud_cover`, `query` and signing to item dicts, stopping after `max_items` matches."""
    validate_query(config.query)
    sign = item_signer(config)
    out: list[dict] = []
    for item in items:
        properties = item.get("properties") or {}
        if not _cloud_ok(properties, config.max_cloud_cover) or not matches_query(properties, config.query):
            continue
        out.append(sign(item) if sign else item)
        if max_items is not None and len(out) >= max_items:
            break
    return out


class StacApiUnreachable(ConnectionError):
    """The STAC API at `url` could not be reached (or answered with an HTTP error); `reason` says how."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(
            f"cannot reach STAC API {url} ({reason}): check the URL (the catalog's stac_api or --stac-api) "
            "and the network"
        )
        self.url, self.reason = url, reason

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # picklable (Prefect task results)
        return type(self), (self.url, self.reason)


def _unreachable_reason(err: Exception) -> str:
    """A few words for why a pystac-client request failed: refused, host not found, timed out, HTTP 404."""
    import requests

    status = getattr(err, "status_code", None)
    if status:
        return f"HTTP {status}"
    cause = err.__cause__ or err.__context__ or err
    text = str(cause)
    if isinstance(cause, requests.exceptions.Timeout):
        return "timed out"
    if isinstance(cause, requests.exceptions.SSLError):
        return "TLS error"
    if isinstance(cause, requests.exceptions.ConnectionError):
        if "refused" in text:
            return "connection refused"
        if "NameResolution" in text or "Name or service not known" in text or "nodename nor servname" in text:
            return "host not found"
        return "connection failed"
    return text.splitlines()[0][:200] if text else type(cause).__name__


def search_items(
    config: CatalogConfig,
    *,
    api_url: str | None = None,
    bbox: tuple[float, float, float, float] | list[float] | None = None,
    intersects: dict | None = None,
    datetime: str | None = None,
    max_items: int | None = None,
    page_size: int | None = None,
) -> list[dict]:
    """Search `api_url` (default `config.stac_api`) and return matching item dicts, all pages read.

    `bbox` / `datetime` / `max_items` default to the config's; `intersects` (a GeoJSON geometry) replaces the
    bbox. `page_size` is the `limit` sent per page. `StacApiUnreachable` when the API cannot be reached.
    """
    from pystac_client import Client
    from pystac_client.exceptions import APIError

    url = api_url or config.stac_api
    if url is None:
        raise ValueError("no STAC API to search: the catalog config has no stac_api and no api_url was given")
    if intersects is None:
        bbox = bbox if bbox is not None else config.bbox
    limit = max_items if max_items is not None else config.max_items
    try:
        search = Client.open(url).search(
            collections=config.collections,
            bbox=None if intersects is not None else bbox,
            intersects=intersects,
            datetime=datetime or config.datetime,
            limit=page_size,
        )
        return filter_items(search.items_as_dicts(), config, limit)
    except APIError as err:
        raise StacApiUnreachable(str(url), _unreachable_reason(err)) from err


def load_static_catalog(path: str | Path) -> list[dict]:
    """All items of a static STAC catalog (recursively), as dicts with absolute asset hrefs and self links."""
    import pystac

    catalog = pystac.Catalog.from_file(str(Path(path).resolve()) if "://" not in str(path) else str(path))
    items = []
    for item in catalog.get_items(recursive=True):
        item.make_asset_hrefs_absolute()
        items.append(item.to_dict(include_self_link=True, transform_hrefs=True))
    return items
