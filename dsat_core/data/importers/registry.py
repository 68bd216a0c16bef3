"""The importers by name: `get_importer("fmow")`."""

from __future__ import annotations

from typing import Any

from dsat_core.data.importers.base import DatasetImporter
from dsat_core.data.importers.fmow import FmowImporter
from dsat_core.data.importers.fmow_sentinel import FmowSentinelImporter
from dsat_core.data.importers.spacenet import SpaceNetImporter
from dsat_core.data.importers.xbd import XbdImporter

IMPORTERS: dict[str, type[DatasetImporter]] = {
    FmowImporter.name: FmowImporter,
    FmowSentinelImporter.name: FmowSentinelImporter,
    XbdImporter.name: XbdImporter,
    SpaceNetImporter.name: SpaceNetImporter,
}


def get_importer(name: str, **options: Any) -> DatasetImporter:
    """An importer by name (``fmow``, ``fmow-sentinel``, ``xbd``, ``spacenet``) with its options."""
    if name not in IMPORTERS:
        raise ValueError(f"unknown importer {name!r}; known: {', '.join(sorted(IMPORTERS))}")
    return IMPORTERS[name](**options)
