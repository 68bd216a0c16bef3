"""The package namespaces import their parts on first use: training does not load the ingest stack, nor
ingest the model stack. Every namespace is written one way (`dsat_core._lazy`)."""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

INGEST_STACK = ("rasterio", "pyproj", "pystac", "distributed", "prefect")
ROOT = Path(__file__).resolve().parents[1]
PACKAGES = sorted(
    ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "dsat_core").glob("*/**/__init__.py")
)


def _modules_after(statement: str) -> set[str]:
    report = "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    code = f"import json, sys\n{statement}\n{report}"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(json.loads(out.splitlines()[-1]))


def test_training_and_sampling_do_not_import_the_ingest_stack() -> None:
    loaded = _modules_after(
        "import dsat_core.training.train_diffusionsat, dsat_core.training.train_controlnet\n"
        "import dsat_core.pipelines.diffusionsat, dsat_core.pipelines.controlnet\n"
        "from dsat_core.data import DatasetStore, TileDataset"
    )
    assert {"torch", "zarr", "diffusers"} <= loaded
    assert not loaded & set(INGEST_STACK), loaded & set(INGEST_STACK)
    ingest = _modules_after("from dsat_core.data import DatasetStore, ingest_items, read_item, search_items")
    assert {"rasterio", "pyproj", "zarr"} <= ingest and not ingest & {"torch", "diffusers"}


def test_namespaces_alone_load_no_heavy_dependency() -> None:
    loaded = _modules_after("\n".join(f"import {p}" for p in PACKAGES if p != "dsat_core.evaluation"))
    assert not loaded & {"numpy", "torch", "diffusers", *INGEST_STACK}, loaded


def _type_checking_imports(package: str) -> dict[str, str]:
    """name → submodule of the imports in the package's ``if TYPE_CHECKING:`` block."""
    tree = ast.parse((ROOT / package.replace(".", "/") / "__init__.py").read_text())
    blocks = [n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"]
    imports = [n for block in blocks for n in block.body if isinstance(n, ast.ImportFrom)]
    return {a.name: (n.module or "").removeprefix(f"{package}.") for n in imports for a in n.names}


@pytest.mark.parametrize("package", PACKAGES)
def test_namespace_lists_agree(package: str) -> None:
    """`__all__`, the TYPE_CHECKING imports and the lazy name → submodule table name the same things."""
    module = importlib.import_module(package)
    assert _type_checking_imports(package) == module._MODULE_OF
    assert sorted(module.__all__) == sorted(module._MODULE_OF)


@pytest.mark.parametrize("package", PACKAGES)
def test_every_exported_name_resolves(package: str) -> None:
    module = __import__(package, fromlist=["__all__"])
    for name in module.__all__:
        value = getattr(module, name)
        assert getattr(value, "__name__", name) == name or not callable(value), (package, name)
    assert set(module.__all__) <= set(dir(module))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        module.nope  # noqa: B018


def test_a_function_named_like_its_module_stays_the_function() -> None:
    importlib.import_module("dsat_core.evaluation.sensitivity")  # binds the package attribute to the module
    from dsat_core.evaluation import sensitivity

    assert callable(sensitivity) and sensitivity.__module__ == "dsat_core.evaluation.sensitivity"
