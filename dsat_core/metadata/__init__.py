"""The seven metadata fields of DiffusionSat and their numeric encoding (spec §1).

Names are imported on first use, like every `dsat_core` package namespace (`dsat_core._lazy`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dsat_core._lazy import lazy_exports

if TYPE_CHECKING:
    from dsat_core.metadata.fields import (
        FIELD_NAMES,
        NUM_FIELDS,
        SatMetadata,
        decode_batch,
        effective_gsd,
        encode_batch,
        from_arrays,
    )

_MODULE_OF = {
    "FIELD_NAMES": "fields",
    "NUM_FIELDS": "fields",
    "SatMetadata": "fields",
    "decode_batch": "fields",
    "effective_gsd": "fields",
    "encode_batch": "fields",
    "from_arrays": "fields",
}

__all__ = [
    "FIELD_NAMES",
    "NUM_FIELDS",
    "SatMetadata",
    "decode_batch",
    "effective_gsd",
    "encode_batch",
    "from_arrays",
]

__getattr__, __dir__ = lazy_exports(__name__, _MODULE_OF, globals())
