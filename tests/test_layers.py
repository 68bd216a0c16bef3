"""The layers of `dsat_core` point down (read from the source, imports inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "dsat_core"
LAYERS = (
    {"_lazy"},
    {"metadata", "imaging"},
    {"captions", "models"},
    {"data", "pipelines"},
    {"training"},
    {"evaluation"},
    {"apply"},  # applies a model to a place; reuses evaluation's MLflow helpers and offline STAC validator
)
RANK = {package: rank for rank, packages in enumerate(LAYERS) for package in packages}


def _module_name(path: Path) -> list[str]:
    parts = ["dsat_core", *path.relative_to(ROOT).with_suffix("").parts]
    return parts[:-1] if parts[-1] == "__init__" else parts


def _imported(path: Path) -> set[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name[:-1]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            names.add(".".join([*base, *([node.module] if node.module else [])]))
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _imports() -> dict[str, set[str]]:
    """``dsat_core.<package>.<module>`` → the modules it imports."""
    return {".".join(_module_name(p)): _imported(p) for p in sorted(ROOT.rglob("*.py"))}


def _package_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "dsat_core" and len(parts) > 1 else None


def test_every_package_has_a_layer() -> None:
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()} | {"_lazy"}
    assert packages == set(RANK), packages ^ set(RANK)


def test_imports_point_to_lower_layers() -> None:
    upward = [
        f"{module} imports {target}"
        for module, targets in _imports().items()
        for target in targets
        if (package := _package_of(target)) is not None
        and package != _package_of(module)
        and RANK[package] >= RANK.get(_package_of(module) or "", len(LAYERS))
    ]
    assert not upward, upward


@pytest.mark.parametrize(
    ("lower", "higher"),
    [("captions", "data"), ("data", "evaluation"), ("training", "evaluation"), ("pipelines", "evaluation")],
)
def test_named_directions(lower: str, higher: str) -> None:
    """The directions issue #17 names: data calls captions, never the reverse; nothing below evaluation
    imports it."""
    offenders = [
        module
        for module, targets in _imports().items()
        if _package_of(module) == lower and any(_package_of(t) == higher for t in targets)
    ]
    assert not offenders, offenders


def test_no_module_imports_prefect() -> None:
    offenders = [m for m, targets in _imports().items() if any(t.split(".")[0] == "prefect" for t in targets)]
    assert not offenders, offenders
