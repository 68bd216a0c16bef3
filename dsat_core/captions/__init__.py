"""Captions from tile metadata, STAC item properties and the catalog's `caption_template`.

Placeholders: `{of_class}` (" of a <class>" from `config.class_property`, else ""), `{in_place}` (" in
<country>"), `{place}` ("<nearest city>, <country>"), `{country}`, `{sensor}` (instruments, e.g. "ETM+"),
`{platform}` (e.g. "Landsat 8"), `{year}`, `{event}` (" " + the item's `dsat:event`, e.g. " after the
flooding of hurricane harvey", set by importers). Unknown values render as "" and repeated spaces are
collapsed.
Places come from offline nearest-city reverse geocoding (`dsat_core.captions.geocode`): nearest populated
place, NOT point-in-polygon, so tiles near a border or over open water may be captioned with a
neighbouring country.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dsat_core._lazy import lazy_exports

if TYPE_CHECKING:
    from dsat_core.captions.geocode import Place, nearest_place
    from dsat_core.captions.template import PLACEHOLDERS, CaptionConfig, caption_for, template_fields

_MODULE_OF = {
    "PLACEHOLDERS": "template",
    "CaptionConfig": "template",
    "Place": "geocode",
    "caption_for": "template",
    "nearest_place": "geocode",
    "template_fields": "template",
}

__all__ = ["PLACEHOLDERS", "CaptionConfig", "Place", "caption_for", "nearest_place", "template_fields"]

__getattr__, __dir__ = lazy_exports(__name__, _MODULE_OF, globals())
