"""The import structure as the design draws it, read from the source with ``ast``.

Layers, lowest first: ``models`` (the maths); ``training`` and ``export`` (use models); ``backends`` and
``model_store`` (use models and export); ``service`` and ``extract`` (use those); ``bench``; ``cli``. A module
imports only its own layer or lower ones, serving never imports ``training``, no two modules import each other
through any chain (lazy imports inside functions count), nothing imports the mapped folders by their bare
names, and every module stays under 400 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"csc_serve": "csc_serve", "models": "csc_serve.models", "training": "csc_serve.training",
           "export": "csc_serve.export"}
LAYER = {
    "csc_serve.models": 0,
    "csc_serve.training": 1,
    "csc_serve.export": 1,
    "csc_serve.backends": 2,
    "csc_serve.model_store": 2,
    "csc_serve.service": 3,
    "csc_serve.extract": 3,
    "csc_serve.bench": 4,
    "csc_serve.cli": 5,
}
SERVING = ("csc_serve.backends", "csc_serve.model_store", "csc_serve.service", "csc_serve.extract", "csc_serve.bench")
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _imports(name: str, path: Path) -> list[tuple[str, int]]:
    """Every module ``name`` imports (at the top or inside a function), with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = _package_of(name, path).split(".")
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                child = f"{base}.{alias.name}"
                found.append((child if child in MODULES else base, node.lineno))
    return found


def _layer(module: str) -> tuple[str, int] | None:
    for prefix, layer in sorted(LAYER.items(), key=lambda item: -len(item[0])):
        if module == prefix or module.startswith(prefix + "."):
            return prefix, layer
    return None


def _graph() -> dict[str, set[str]]:
    return {name: {target for target, _ in _imports(name, path) if target in MODULES and target != name}
            for name, path in MODULES.items()}


def test_the_layout_is_read():
    assert {"csc_serve.models.layer", "csc_serve.service.api", "csc_serve.cli.main"} <= set(MODULES)
    assert "csc_serve.models.layer" in _graph()["csc_serve.models.autoencoder"]


def test_nothing_imports_the_mapped_folders_by_their_bare_names():
    bare = [f"{path.relative_to(ROOT)}:{line} imports {target}"
            for name, path in MODULES.items() for target, line in _imports(name, path)
            if target.split(".")[0] in ("models", "training", "export")]
    assert bare == []


def test_imports_point_down_only():
    upward = []
    for name, path in MODULES.items():
        here = _layer(name)
        for target, line in _imports(name, path):
            there = _layer(target) if target in MODULES else None
            if here and there and there[1] > here[1]:
                upward.append(f"{path.relative_to(ROOT)}:{line} ({here[0]}) imports {target} ({there[0]})")
    assert upward == []


def test_serving_never_imports_training():
    found = [f"{path.relative_to(ROOT)}:{line} imports {target}"
             for name, path in MODULES.items() if name.startswith(SERVING)
             for target, line in _imports(name, path) if target.startswith("csc_serve.training")]
    assert found == []


def test_no_import_circles():
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert circles == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_small(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name].relative_to(ROOT)} has {lines} lines"
