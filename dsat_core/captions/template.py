"""Caption templates: placeholders filled from tile metadata and STAC item properties (see the package)."""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from typing import Any, Protocol

from dsat_core.captions.geocode import nearest_place
from dsat_core.metadata import SatMetadata

PLACEHOLDERS = ("of_class", "in_place", "place", "country", "sensor", "platform", "year", "event")


class CaptionConfig(Protocol):
    """What a caption needs of a catalog config (`dsat_core.data.catalog.CatalogConfig` has both)."""

    @property
    def caption_template(self) -> str: ...

    @property
    def class_property(self) -> str | None: ...


def _first(value: Any) -> str:
    if isinstance(value, list | tuple):
        value = value[0] if value else ""
    return "" if value is None else str(value)


def _class_phrase(word: str) -> str:
    word = word.replace("_", " ").strip()
    if not word:
        return ""
    if word.endswith("s") and not word.endswith(("ss", "us", "is")):  # plural: "of buildings"
        return f" of {word}"
    article = "an" if word[0].lower() in "aeiou" else "a"
    return f" of {article} {word}"


def _platform(value: Any) -> str:
    text = _first(value).replace("-", " ").replace("_", " ").strip()
    return " ".join(part.capitalize() if part.isalpha() else part.upper() for part in text.split())


def template_fields(template: str) -> set[str]:
    """Placeholder names used by a caption template (raises ValueError for unknown ones)."""
    names = {name for _, name, _, _ in string.Formatter().parse(template) if name}
    unknown = names - set(PLACEHOLDERS)
    if unknown:
        raise ValueError(f"caption template {template!r}: unknown placeholder(s) {sorted(unknown)}")
    return names


def caption_for(metadata: SatMetadata, item_properties: Mapping[str, Any], config: CaptionConfig) -> str:
    """Fill `config.caption_template` for one tile."""
    names = template_fields(config.caption_template)
    place = nearest_place(metadata.lat, metadata.lon) if names & {"in_place", "place", "country"} else None
    cls = _first(item_properties.get(config.class_property)) if config.class_property else ""
    values = {
        "of_class": _class_phrase(cls),
        "in_place": f" in {place.country}" if place else "",
        "place": ", ".join(p for p in (place.city, place.country) if p) if place else "",
        "country": place.country if place else "",
        "sensor": "/".join(str(i).upper() for i in item_properties.get("instruments") or []),
        "platform": _platform(item_properties.get("platform")),
        "year": "" if metadata.year is None else str(metadata.year),
        "event": f" {_first(item_properties.get('dsat:event'))}",
    }
    text = config.caption_template.format(**values)
    return re.sub(r"\s+", " ", text).replace(" ,", ",").strip()
