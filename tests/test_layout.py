"""The layers of broker/ hold: read from the source's imports, transitively.

- the domain (`broker.core`) imports neither grpc nor lmdb, nor any outer layer;
- the SDKs (`broker.sdk`) import nothing of the server (api, server, storage);
- storage and the gRPC adapters do not import each other.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "broker"


def _module_file(module: str) -> Path | None:
    path = ROOT.joinpath(*module.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


@cache
def _imports(module: str) -> frozenset[str]:
    """Absolute names a module imports (at any depth in its body, TYPE_CHECKING aside)."""
    source = _module_file(module)
    if source is None:
        return frozenset()
    tree = ast.parse(source.read_text())
    names: set[str] = set()
    type_checking_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            type_checking_only.update(id(child) for child in ast.walk(node))
    for node in ast.walk(tree):
        if id(node) in type_checking_only:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return frozenset(names)


def _closure(module: str) -> set[str]:
    """Everything `module` imports, following imports of broker's own modules."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        for name in _imports(todo.pop()):
            if name in seen:
                continue
            seen.add(name)
            if name.split(".")[0] in ("broker", "broker_ext") and _module_file(name):
                todo.append(name)
    return seen


def _modules(subpackage: str) -> list[str]:
    folder = PACKAGE / subpackage
    return sorted(f"broker.{subpackage}.{p.stem}" for p in folder.glob("*.py"))


def _offenders(module: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(
        name
        for name in _closure(module)
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    )


@pytest.mark.parametrize("module", _modules("core"))
def test_the_domain_imports_neither_grpc_nor_lmdb_nor_outer_layers(module: str) -> None:
    forbidden = ("grpc", "lmdb", "broker.api", "broker.server", "broker.storage", "broker.sdk",
                 "broker.cli", "prometheus_client")  # fmt: skip
    assert _offenders(module, forbidden) == []


@pytest.mark.parametrize("module", _modules("sdk"))
def test_the_sdks_import_nothing_of_the_server(module: str) -> None:
    forbidden = ("lmdb", "broker.api", "broker.server", "broker.storage", "broker.config")
    assert _offenders(module, forbidden) == []


@pytest.mark.parametrize("module", _modules("storage"))
def test_storage_does_not_import_the_grpc_adapters(module: str) -> None:
    assert _offenders(module, ("grpc", "broker.api", "broker.server")) == []


@pytest.mark.parametrize("module", _modules("api"))
def test_the_adapters_reach_the_store_only_through_the_domain(module: str) -> None:
    assert _offenders(module, ("lmdb", "broker.storage")) == []


def test_the_layers_are_all_checked() -> None:
    """A new subpackage must get its own rule above."""
    subpackages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert subpackages == {"api", "core", "sdk", "security", "server", "storage", "v1"}
