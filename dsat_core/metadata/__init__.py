"""The seven metadata fields of DiffusionSat and their numeric encoding (spec §1)."""

from dsat_core.metadata.fields import (
    FIELD_NAMES,
    NUM_FIELDS,
    SatMetadata,
    decode_batch,
    effective_gsd,
    encode_batch,
    from_arrays,
)

__all__ = [
    "FIELD_NAMES",
    "NUM_FIELDS",
    "SatMetadata",
    "decode_batch",
    "effective_gsd",
    "encode_batch",
    "from_arrays",
]
