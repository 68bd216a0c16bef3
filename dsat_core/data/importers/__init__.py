"""Importers: the paper's datasets, in their published layouts, as STAC items for the same pipeline.

`run_import(get_importer("fmow"), "/data/fmow-rgb", "catalogs/imported/fmow")` writes a static catalog
(`collection.json` + `items.ndjson`) that `dsat stac serve` serves and `refresh-dataset` ingests with the
matching `catalogs/<name>.yaml`. See `base` for the contract every importer follows, `registry` for the
names. Names are imported on first use, like every `dsat_core` package namespace (`dsat_core._lazy`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dsat_core._lazy import lazy_exports

if TYPE_CHECKING:
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
    from dsat_core.data.importers.registry import IMPORTERS, get_importer
    from dsat_core.data.importers.spacenet import SpaceNetImporter
    from dsat_core.data.importers.xbd import XbdImporter

_MODULE_OF = {
    "IMPORTERS": "registry",
    "DatasetImporter": "base",
    "FmowImporter": "fmow",
    "FmowSentinelImporter": "fmow_sentinel",
    "ImportRecord": "base",
    "ImportReport": "base",
    "LinkKey": "base",
    "MalformedRecord": "base",
    "SpaceNetImporter": "spacenet",
    "XbdImporter": "xbd",
    "get_importer": "registry",
    "import_report_markdown": "base",
    "read_items": "base",
    "run_import": "base",
}

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

__getattr__, __dir__ = lazy_exports(__name__, _MODULE_OF, globals())
