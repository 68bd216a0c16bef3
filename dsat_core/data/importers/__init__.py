"""Importers: the paper's datasets, in their published layouts, as STAC items for the same pipeline.

`run_import(get_importer("fmow"), "/data/fmow-rgb", "catalogs/imported/fmow")` writes a static catalog
(`collection.json` + `items.ndjson`) that `dsat stac serve` serves and `refresh-dataset` ingests with the
matching `catalogs/<name>.yaml`. See `base` for the contract every importer follows.
"""

from __future__ import annotations

from typing import Any

from dsat_core.data.importers.base import (
    DatasetImporter,
    ImportRecord,
    ImportReport,
    LinkKey,
    MalformedRecord,
    import_report_markdown,
    read_items,
    run_import,
)
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


__all__ = [
    "IMPORTERS",
    "DatasetImporter",
    "FmowImporter",
    "FmowSentinelImporter",
    "ImportRecord",
    "ImportReport",
    "LinkKey",
    "MalformedRecord",
    "SpaceNetImporter",
    "XbdImporter",
    "get_importer",
    "import_report_markdown",
    "read_items",
    "run_import",
]
