"""The STAC item of an applied mosaic (and the catalog of a run), with its provenance.

Item properties: the output's ``gsd``, the source scene's date (``datetime``, or its interval), the
projection extension (``proj:code``, ``proj:shape``, ``proj:transform``, ``proj:bbox``), the processing
extension (software, lineage, time) and ``dsat:apply`` — kind, model (uri, name, version, alias, MLflow
run), inputs (item ids and hrefs), seed, steps, guidance, prompt, tiling and the input scaling per band —
plus the ``dsat:model_uri`` / ``dsat:model_version`` / ``dsat:seed`` / ``dsat:prompt`` fields the project's
offline validator (`dsat_core.evaluation.stac_output.validate_catalog`) checks on generated items.
Assets (relative hrefs): ``image`` (the COG, with ``raster:bands``-like per-band info), ``preview`` (PNG),
``fill_mask`` (the mask used, for the fill tasks).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pystac
from affine import Affine
from rasterio.crs import CRS

from dsat_core.evaluation.stac_output import PROCESSING_SCHEMA, _software_version, footprint, set_projection

COLLECTION = "dsat-applied"


def _dates(properties: Mapping[str, Any]) -> tuple[datetime | None, dict[str, str]]:
    """(datetime, extra properties) of the source scene: its datetime, else its start/end interval."""

    def parse(text: str) -> datetime:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))

    if properties.get("datetime"):
        return parse(properties["datetime"]), {}
    start, end = properties.get("start_datetime"), properties.get("end_datetime")
    if start and end:
        return None, {"start_datetime": start, "end_datetime": end}
    return datetime.now(UTC).replace(microsecond=0), {}


def build_item(
    item_id: str,
    *,
    crs: CRS,
    transform: Affine,
    shape: tuple[int, int],
    gsd: float,
    source_properties: Mapping[str, Any],
    provenance: Mapping[str, Any],
    assets: Mapping[str, tuple[str, str, Sequence[str]]],
    bands: Sequence[Mapping[str, Any]],
) -> pystac.Item:
    """The item of one mosaic; ``assets``: key → (relative href, media type, roles)."""
    height, width = shape
    geometry, bbox = footprint(crs, transform, height, width)
    when, interval = _dates(source_properties)
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    model = provenance["model"]
    props: dict[str, Any] = {
        **interval,
        "gsd": float(gsd),
        "dsat:apply": dict(provenance),
        "dsat:model_uri": str(model["uri"]),
        "dsat:model_version": str(model["version"]),
        "dsat:seed": int(provenance["seed"]),
        "dsat:prompt": str(provenance.get("prompt", "")),
        "processing:software": {"dsat-core": _software_version()},
        "processing:lineage": (
            f"{provenance['kind']} by model {model['uri']} (version {model['version']}) applied to "
            f"{', '.join(i['id'] for i in provenance['inputs'])}; see dsat:apply"
        ),
        "processing:datetime": now,
        "created": now,
    }
    item = pystac.Item(item_id, geometry, bbox, when, props)
    for key, (href, media_type, roles) in assets.items():
        extra = {"dsat:bands": list(bands)} if key == "image" else {}
        item.add_asset(key, pystac.Asset(href, media_type=media_type, roles=list(roles), extra_fields=extra))
    set_projection(item, crs, transform, height, width)
    item.stac_extensions.append(PROCESSING_SCHEMA)
    return item


def write_catalog(out_dir: str | Path, item_files: Sequence[Path], description: str) -> Path:
    """``out_dir/catalog.json`` linking the item JSONs (``out_dir/<id>/<id>.json``) by relative hrefs.

    Written directly (pystac's ``normalize_hrefs`` takes a folder named like ``run-1.0`` for a file).
    """
    out_dir = Path(out_dir)
    links = [{"rel": "root", "href": "./catalog.json", "type": "application/json"}]
    for path in sorted(item_files):
        rel = Path(path).resolve().relative_to(out_dir.resolve()).as_posix()
        links.append({"rel": "item", "href": f"./{rel}", "type": "application/geo+json"})
    catalog = {"type": "Catalog", "id": "dsat-apply", "stac_version": pystac.get_stac_version(),
               "description": description, "links": links}  # fmt: skip
    path = out_dir / "catalog.json"
    tmp = out_dir / ".catalog.json.tmp"
    tmp.write_text(json.dumps(catalog, indent=1))
    tmp.replace(path)
    return path


ITEM_LINKS = [
    {"rel": "root", "href": "../catalog.json", "type": "application/json"},
    {"rel": "parent", "href": "../catalog.json", "type": "application/json"},
]


__all__ = ["COLLECTION", "ITEM_LINKS", "build_item", "write_catalog"]
