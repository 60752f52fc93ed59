"""The package's layers: no module imports one from a layer above it (issue 17).

Lowest first:
  0  r1tune itself and its top-level helper modules (errors, fileio, ui, envinfo, config, resources, ...)
  1  r1tune.data, r1tune.models        models may import data; data must not import models
  2  r1tune.train
  3  r1tune.evaluation, r1tune.export, r1tune.serve    siblings: none of them imports another
  4  r1tune.cli, r1tune.__main__ (which runs cli), and a future web UI

Every module under src/r1tune is parsed with `ast`, and every import in it counts, at any depth
(inside functions too): `import a.b`, `from a import b` (b a submodule or a name) and relative imports.
An edge from a lower layer to a higher one, or between two packages of one layer other than those
ALLOWED_SAME_LAYER names, fails the test. Fix one by moving the code to the layer that needs it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "r1tune"

# The first name below r1tune -> its layer. A top-level module not listed here is a helper (layer 0).
LAYERS = {
    "data": 1, "models": 1,
    "train": 2,
    "evaluation": 3, "export": 3, "serve": 3,
    "cli": 4, "__main__": 4, "webui": 4,
}
TOP = 4
# (importer, imported) packages of one layer that may depend on each other.
ALLOWED_SAME_LAYER = {("models", "data"), ("__main__", "cli")}

# Edges waiting on work in progress: (importing module, imported module). Remove an entry once its
# edge is gone: the test fails on an entry that no longer matches an import.
PENDING_UPWARD: set[tuple[str, str]] = set()


def modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the package (a package is its __init__.py)."""
    found = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> list[tuple[int, str]]:
    """(line, imported module) for every import of the package's own modules in one file, at any depth.
    `from x import y` names the module x.y when y is a submodule, else x."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]  # the package `.` means
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                found.append((node.lineno, sub if sub in known else module))
    return [(line, target) for line, target in dict.fromkeys(found) if target == PACKAGE or target.startswith(PACKAGE + ".")]


def part(module: str) -> str:
    """The package or top-level module under r1tune that a module belongs to ('' for r1tune itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer(module: str) -> int:
    return LAYERS.get(part(module), 0)


def module_edges() -> list[tuple[str, int, str]]:
    """(importer, line, imported) for every import of one r1tune module by another."""
    found = modules()
    known = set(found)
    return [(name, line, target) for name, path in found.items() for line, target in imports(name, path, known)]


def edges() -> list[tuple[str, int, str]]:
    """module_edges between different parts of the package."""
    return [(name, line, target) for name, line, target in module_edges() if part(target) != part(name)]


def forbidden(importer: str, imported: str) -> bool:
    low, high = layer(importer), layer(imported)
    if high > low:
        return True
    return high == low and low > 0 and (part(importer), part(imported)) not in ALLOWED_SAME_LAYER


def describe(importer: str, line: int, imported: str) -> str:
    return f"{importer} (layer {layer(importer)}, line {line}) imports {imported} (layer {layer(imported)})"


def test_every_module_has_a_layer_and_the_map_names_real_parts():
    parts = {part(m) for m in modules()}
    assert {"data", "models", "train", "evaluation", "export", "serve", "cli"} <= parts
    assert max(layer(m) for m in modules()) == TOP
    assert set(LAYERS) - parts <= {"webui"}, "LAYERS names a part of the package that does not exist"


def test_no_import_goes_up_a_layer():
    bad = [(i, line, t) for i, line, t in edges() if forbidden(i, t) and (i, t) not in PENDING_UPWARD]
    assert not bad, ("imports from a lower layer to a higher one (or across a layer); move the code to the "
                     "layer that uses it:\n" + "\n".join(describe(*e) for e in sorted(bad)))


def test_pending_list_holds_only_real_upward_imports():
    present = {(i, t) for i, _, t in edges() if forbidden(i, t)}
    stale = PENDING_UPWARD - present
    assert not stale, f"PENDING_UPWARD entries no longer needed (remove them): {sorted(stale)}"


def test_data_does_not_import_models():
    assert not [e for e in edges() if part(e[0]) == "data" and part(e[2]) == "models"]


@pytest.mark.parametrize(("source", "importer", "expected"), [
    ("from r1tune.serve.chat import reply\n", "r1tune.models.configured", "r1tune.serve.chat"),
    ("def f():\n    import r1tune.train.engine\n", "r1tune.data.dataset", "r1tune.train.engine"),
    ("from ..export import merge\n", "r1tune.models.configured", "r1tune.export.merge"),
    ("from r1tune.serve import chat\n", "r1tune.export.run", "r1tune.serve.chat"),
    ("from r1tune.models import tiny\n", "r1tune.data.inspect", "r1tune.models.tiny"),
    ("from r1tune.train.engine import Engine\n", "r1tune.config", "r1tune.train.engine"),
])
def test_the_check_sees_an_upward_import(tmp_path, source, importer, expected):
    """Imports inside functions, relative ones and `from package import submodule` are all caught."""
    path = tmp_path / "module.py"
    path.write_text(source, encoding="utf-8")
    found = imports(importer, path, set(modules()))
    assert [t for _, t in found] == [expected] and forbidden(importer, expected)


def test_no_module_import_cycle():
    """Modules import each other one way only (data/cache.py and data/dataset.py once did both)."""
    graph: dict[str, set[str]] = {}
    for importer, _, imported in module_edges():
        if importer != imported:
            graph.setdefault(importer, set()).add(imported)
    cycles, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for nxt in sorted(graph.get(module, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(path[path.index(nxt):] + [module, nxt]) if nxt in path else f"{module} -> {nxt}")
            elif nxt not in state:
                visit(nxt, path + [module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
