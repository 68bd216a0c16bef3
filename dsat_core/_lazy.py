"""Package namespaces whose names are imported on first use (PEP 562), so that importing one part of a
package does not load the heavy dependencies of every other part (GDAL, pyproj, pystac, torch)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib import import_module
from typing import Any


def lazy_exports(
    package: str, module_of: Mapping[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``: name ``n`` comes from ``package.<module_of[n]>``.

    A name is imported once and then kept in ``namespace`` (the package's globals). A name spelled like its
    own module (``evaluation.sensitivity``, the function of ``evaluation/sensitivity.py``) is imported now:
    importing the submodule binds the package attribute to the module, and ``__getattr__`` would never run.
    """
    for name, module in module_of.items():
        if name == module:
            namespace[name] = getattr(import_module(f"{package}.{module}"), name)

    def __getattr__(name: str) -> Any:
        module = module_of.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(f"{package}.{module}"), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *module_of})

    return __getattr__, __dir__
