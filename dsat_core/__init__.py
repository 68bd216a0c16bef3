"""DiffusionSat as a library: `metadata`, `imaging` and `captions` at the bottom, then `models`, `data`,
`pipelines` and `training`, with `evaluation` on top; lower layers never import higher ones and nothing
here imports Prefect (`tests/test_layers.py`).

Every subpackage namespace exports its names lazily (`dsat_core._lazy`): `__all__`, a `TYPE_CHECKING`
block for type checkers, and a name → submodule table, so importing one part loads only what it needs.
"""
